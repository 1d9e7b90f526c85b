"""SGD with sparse grads (nn.Embedding(sparse=True)) takes torch.optim.SGD's steps, on both paths: a group with
sparse grads runs the reference, dense groups keep the kernel; torch's refusals are ours, before any change."""
import pytest
import torch

import fused_optim
from helpers import assert_close, assert_unchanged, snapshot

from fused_optim.kernels import runtime

CONFIGS = [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.1, "maximize": True},
           {"momentum": 0.9, "nesterov": True}]


def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(12, 4, sparse=True), "lin": torch.nn.Linear(4, 1)})


def _groups(model, split):
    if not split:
        return [{"params": list(model.parameters())}]
    return [{"params": list(model["emb"].parameters())}, {"params": list(model["lin"].parameters()), "lr": 0.05}]


def _step(model, opt, i):
    gen = torch.Generator().manual_seed(i)
    idx = torch.randint(0, 12, (6,), generator=gen)  # repeated rows now and then: uncoalesced grads
    opt.zero_grad()
    torch.tanh(model["lin"](model["emb"](idx))).sum().backward()
    opt.step()


def _dense(t):
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sparse_grads_match_torch(config, fused, split):
    ours_model, torch_model = _model(), _model()
    ours = fused_optim.SGD(_groups(ours_model, split), lr=0.1, fused=fused, **config)
    theirs = torch.optim.SGD(_groups(torch_model, split), lr=0.1, **config)
    n0 = runtime.launch_count
    for i in range(10):
        _step(ours_model, ours, i)
        _step(torch_model, theirs, i)
    # the dense group keeps the kernel; a group with sparse grads runs the reference
    assert (runtime.launch_count > n0) == (fused and split)
    for pa, pb in zip(ours_model.parameters(), torch_model.parameters()):
        assert_close(pa, pb, 1e-6, 1e-7, "param")
        sa, sb = ours.state[pa], theirs.state[pb]
        assert set(sa) == set(sb)
        for k in sb:
            assert sa[k].layout == sb[k].layout, f"state {k}: layout {sa[k].layout} != {sb[k].layout}"
            assert_close(_dense(sa[k]), _dense(sb[k]), 1e-6, 1e-7, f"state {k}")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("config", [{"weight_decay": 0.01}, {"momentum": 0.9, "weight_decay": torch.tensor(0.01)}])
def test_weight_decay_with_sparse_grads_is_refused_like_torch(config, fused):
    for opt_cls, kw in ((torch.optim.SGD, {}), (fused_optim.SGD, {"fused": fused})):
        model = _model()
        opt = opt_cls(_groups(model, True), lr=0.1, **config, **kw)
        params = list(model.parameters())
        model["lin"](model["emb"](torch.tensor([1, 2]))).sum().backward()
        snap = snapshot(opt, params)
        with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
            opt.step()
        if opt_cls is fused_optim.SGD:
            assert_unchanged(opt, params, snap)  # checked before any change (torch has updated some params)
