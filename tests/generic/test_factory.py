"""create_optimizer / from_config: names, aliases, weight-decay filtering, errors."""
import json

import pytest
import torch

import fused_optim


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("name", sorted(fused_optim.REGISTRY))
def test_every_registered_name_builds(name):
    cls = fused_optim.REGISTRY[name]
    kw = {"lr": 0.1}
    model = [p for p in _model().parameters() if p.ndim == 2] if name == "muon" else _model()  # matrices only
    opt = fused_optim.create_optimizer(model, name.upper(), **kw) if name != "sparseadam" else \
        fused_optim.create_optimizer(list(torch.nn.Embedding(5, 3, sparse=True).parameters()), name, **kw)
    assert type(opt) is cls


def test_aliases_follow_timm():
    sgd = fused_optim.create_optimizer(_model(), "sgd", lr=0.1)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    mom = fused_optim.create_optimizer(_model(), "momentum", lr=0.1, momentum=0.5)
    assert not mom.defaults["nesterov"] and mom.defaults["momentum"] == 0.5
    assert type(fused_optim.create_optimizer(_model(), "Nv_NovoGrad")) is fused_optim.NvNovoGrad


def test_biases_and_norms_get_no_weight_decay():
    model = _model()
    opt = fused_optim.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    no_decay = {id(p) for p in by_wd[0.0]}
    assert no_decay == {id(p) for n, p in model.named_parameters() if p.ndim <= 1}
    assert {id(p) for p in by_wd[0.05]} == {id(model[0].weight), id(model[2].weight)}
    flat = fused_optim.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=False)
    assert len(flat.param_groups) == 1


def test_unknown_name_and_option_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*adamw"):
        fused_optim.create_optimizer(_model(), "adamz")
    with pytest.raises(TypeError, match="valid options: .*amsgrad"):
        fused_optim.create_optimizer(_model(), "adam", amsgrd=True)


def test_from_json_config():
    cfg = json.loads('{"optimizer": "adamw", "lr": 0.002, "betas": [0.8, 0.9], "weight_decay": 0.1, "fused": false}')
    opt = fused_optim.from_config(_model(), cfg)
    assert type(opt) is fused_optim.AdamW and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["lr"] == 0.002
    with pytest.raises(ValueError, match="exactly one"):
        fused_optim.from_config(_model(), {"lr": 0.1})


def test_config_options_beyond_the_anchor_reach_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = fused_optim.from_config(model, {"optimizer": "adamw", "lr": 1e-3, "max_grad_norm": 0.5,
                                          "master_weights": True})
    assert (opt.max_grad_norm, opt.master_weights) == (0.5, True)
    model(torch.randn(2, 4)).pow(2).sum().mul(100).backward()
    opt.step()
    assert opt.last_grad_norm > 0.5  # measured before clipping
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_optim.create_optimizer(model, "sgd", lr=0.1, max_grad_norm=-1)
