"""fused_optim inside timm's optimizer factory, Hugging Face's Trainer and Lightning's Trainer (the real packages).

timm's package __init__ (and timm.models, which timm's param-group helpers import) need torchvision, which does not
import beside the CPU torch build; the optimizer factory itself needs only torch. As in anchors.py, bare `timm` and
`timm.optim` packages stand in for the real __init__, and a `timm.models` stand-in supplies `group_parameters` for
layer decay only, which these tests do not use.
"""
import importlib
import importlib.util
import sys
import types

import pytest
import torch

import fused_optim
from anchors import timm_module
from helpers import mse_step
from fused_optim import integrations


def _installed(module: str):
    """The module, or a skip if its package is not installed; a package that is installed but fails to import fails."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module.split('.')[0]} is not installed")
    return importlib.import_module(module)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)


def _train(model, opt, steps):
    x, y = (t.to(next(model.parameters()).device) for t in _data())
    losses = []
    for _ in range(steps):
        losses.append(mse_step(opt, model, x, y).item())
    return losses


# ---- timm -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_factory():
    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:  # stand-ins have no spec
        pytest.skip("timm is not installed")
    timm_module("adamp")  # bare timm / timm.optim packages unless timm is imported already
    if "timm.models" not in sys.modules:
        def group_parameters(*args, **kwargs):
            raise NotImplementedError("layer decay needs the real timm.models")
        stand_in = types.ModuleType("timm.models")
        stand_in.group_parameters = group_parameters
        sys.modules["timm.models"] = stand_in
    factory = importlib.import_module("timm.optim._optim_factory")
    integrations.register_timm()
    return factory


def _twins(factory):
    """(our name, timm's name) for every registered twin of a timm entry."""
    p = integrations.TIMM_PREFIX
    return [(n, n[len(p):]) for n in factory.list_optimizers(f"{p}*") if n[len(p):] in factory.list_optimizers()]


def test_timm_names_cover_our_optimizers(timm_factory):
    names = set(timm_factory.list_optimizers("fo*"))
    assert {"fosgd", "fomomentum", "foadam", "foadamw", "foradamw", "foadamp", "fosgdp", "foadafactor",
            "foadahessian", "fonovograd", "fonovogradw", "formsprop", "foasgd"} <= names
    assert not {"forprop", "folbfgs", "fosparseadam"} & names  # no weight_decay option: timm always passes one
    assert set(integrations.register_timm()) == names  # registering again changes nothing
    assert set(timm_factory.list_optimizers("fo*")) == names
    sgd = timm_factory.create_optimizer_v2(_mlp(), "fosgd", lr=0.1)
    assert type(sgd) is fused_optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert not timm_factory.create_optimizer_v2(_mlp(), "fomomentum", lr=0.1).defaults["nesterov"]
    look = timm_factory.create_optimizer_v2(_mlp(), "lookahead_foadamw", lr=1e-3)
    assert type(look._base_optimizer) is fused_optim.AdamW  # Lookahead keeps the wrapped optimizer there


def test_timm_refuses_bad_prefixes(timm_factory):
    with pytest.raises(ValueError, match="no '_'"):
        integrations.register_timm(prefix="fused_")
    before = timm_factory.list_optimizers()
    with pytest.raises(ValueError, match="'fusedadam' is taken by apex"):
        integrations.register_timm(prefix="fused")  # timm's apex entries
    assert timm_factory.list_optimizers() == before


def test_timm_adamw_trains_with_timm_groups_and_our_state(timm_factory):
    model, anchor_model = _mlp(), _mlp()
    opt = timm_factory.create_optimizer_v2(model, "foadamw", lr=1e-2, weight_decay=0.05, fused=False)
    anchor = timm_factory.create_optimizer_v2(anchor_model, "adamw", lr=1e-2, weight_decay=0.05)
    assert type(opt) is fused_optim.AdamW and type(anchor) is torch.optim.AdamW
    assert [(g["weight_decay"], [p.shape for p in g["params"]]) for g in opt.param_groups] == \
        [(g["weight_decay"], [p.shape for p in g["params"]]) for g in anchor.param_groups]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]  # biases and norm weights: none
    losses = _train(model, opt, 8)
    _train(anchor_model, anchor, 8)
    assert losses[-1] < 0.8 * losses[0]
    for p, q in zip(model.parameters(), anchor_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p].keys() == anchor.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}


def test_timm_twins_match_timms_entries(timm_factory):
    """Each twin gets timm's defaults and flags: same numbers as timm's entry of the same name."""
    checked = []
    for ours, theirs in _twins(timm_factory):
        if timm_factory.get_optimizer_info(theirs).second_order:
            continue  # Adahessian needs backward(create_graph=True): tests/optimizers/test_projection.py covers it
        model, anchor_model = _mlp(), _mlp()
        kw = dict(lr=1e-2, weight_decay=0.01)
        opt = timm_factory.create_optimizer_v2(model, ours, fused=False, **kw)
        anchor = timm_factory.create_optimizer_v2(anchor_model, theirs, **kw)
        assert type(opt).__name__ == type(anchor).__name__, ours
        _train(model, opt, 3)
        _train(anchor_model, anchor, 3)
        for p, q in zip(model.parameters(), anchor_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{ours}: {m}")
        checked.append(theirs)
    assert {"sgd", "momentum", "adamw", "radamw", "adamp", "cadamp", "sgdp", "adafactor", "novograd", "novogradw",
            "rmsprop"} <= set(checked)


def test_timm_fused_kernels(timm_factory, device):
    runs = {}
    for fused in (False, True):
        model = _mlp().to(device)
        opt = timm_factory.create_optimizer_v2(model, "foadamw", lr=1e-2, weight_decay=0.05, fused=fused)
        runs[fused] = (_train(model, opt, 3), [p.detach().clone() for p in model.parameters()])
    assert runs[True][0][-1] < runs[True][0][0]
    for p, q in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_launcher_runs_a_script_with_the_names_registered(timm_factory, tmp_path, monkeypatch):
    script, out = tmp_path / "train.py", tmp_path / "out.txt"
    script.write_text("import sys, torch, fused_optim\nfrom timm.optim._optim_factory import create_optimizer_v2\n"
                      "opt = create_optimizer_v2(torch.nn.Linear(2, 2), sys.argv[1], lr=0.1)\n"
                      "open(sys.argv[2], 'w').write(str(type(opt) is fused_optim.SGDP))\n")
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    integrations.main([str(script), "fosgdp", str(out)])
    assert out.read_text() == "True"
    with pytest.raises(SystemExit, match="usage"):
        integrations.main([])


# ---- Hugging Face transformers.Trainer ----------------------------------------------------------------------------

def test_hf_trainer_with_our_optimizer(tmp_path):
    transformers = _installed("transformers")
    _installed("accelerate")  # the Trainer's requirement
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)  # built from the config: nothing downloaded
    rows = torch.arange(16).repeat(16, 1) * 3 % 64 + torch.arange(16)[:, None]  # 16 learnable sequences
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=12, per_device_train_batch_size=8,
        learning_rate=1e-2, weight_decay=0.1, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(
        fused_optim.AdamW, {"lr": args.learning_rate, "fused": False}))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(opt) is fused_optim.AdamW
    named = dict(model.named_parameters())  # tied lm_head.weight appears once, as transformer.wte.weight
    decay = set(trainer.get_decay_parameter_names(model)) & set(named)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd == {0.1: {id(named[n]) for n in decay}, 0.0: {id(p) for n, p in named.items() if n not in decay}}
    some = named["transformer.h.0.mlp.c_fc.weight"]
    assert opt.state[some].keys() == {"step", "exp_avg", "exp_avg_sq"} and opt.state[some]["step"].item() == 12
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]


# ---- Lightning ----------------------------------------------------------------------------------------------------

def test_lightning_configure_optimizers_returns_ours(device):
    pl = _installed("lightning.pytorch")

    class Tiny(pl.LightningModule):
        def __init__(self, fused):
            super().__init__()
            self.net, self.fused, self.losses = _mlp(), fused, []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return fused_optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05, fused=self.fused)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=32)
    runs = {}
    for fused in (False, True):  # True: the Triton kernels (interpreted on CPU), called with Lightning's closure
        module = Tiny(fused)
        trainer = pl.Trainer(accelerator=device, devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
        opt = trainer.optimizers[0]
        assert type(opt) is fused_optim.AdamW
        assert all(opt.state[p]["step"].item() == 6 for p in module.parameters())
        runs[fused] = module.losses
    assert len(runs[False]) == 6 and runs[False][-1] < 0.8 * runs[False][0]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
