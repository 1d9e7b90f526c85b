"""Bad input gets a clear error naming the problem, before any state changes — for every optimizer."""
import inspect
import math

import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import assert_unchanged, snapshot, step_twins

CLASSES = sorted(fused_optim.REGISTRY.values(), key=lambda c: c.__name__)
DENSE = [c for c in CLASSES if c.dense_only]


def _kw(cls):
    """Minimal valid constructor kwargs (SGDP's lr is required)."""
    p = inspect.signature(cls.__init__).parameters["lr"]
    return {} if p.default is not inspect.Parameter.empty and "required" not in repr(p.default) else {"lr": 0.1}


def _bad_values(cls):
    params = inspect.signature(cls.__init__).parameters
    for name in ("lr", "eps", "weight_decay", "momentum", "lr_decay"):
        if name in params and (name != "lr" or params[name].default is not None):
            for v in (-1.0, math.nan):
                yield name, v
    if "betas" in params and params["betas"].default is not None:
        for betas in ((1.5, 0.9), (0.9, -0.1), (math.nan, 0.9)):
            yield "betas", betas


CASES = [(cls, name, v) for cls in CLASSES for name, v in _bad_values(cls)]


@pytest.mark.parametrize("cls,name,value", CASES, ids=[f"{c.__name__}-{n}={v}" for c, n, v in CASES])
def test_invalid_hyperparameter_raises_value_error(cls, name, value):
    # the message names the value ("Learning rate should be >= 0": torch.optim.Muon's wording)
    with pytest.raises(ValueError, match="|".join(["Invalid", "invalid", name.split("_")[0], "Learning rate"])):
        cls([torch.nn.Parameter(torch.randn(3))], **{**_kw(cls), name: value})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_invalid_hyperparameter_in_added_group(cls):
    params = inspect.signature(cls.__init__).parameters
    opt = cls([torch.nn.Parameter(torch.randn(3, 2))], **_kw(cls))  # 2-D: Muon takes only matrices
    if "lr" in params and params["lr"].default is not None:
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "lr": -0.5})


@pytest.mark.parametrize("cls", [c for c in DENSE if not c.requires_closure], ids=lambda c: c.__name__)
def test_sparse_grad_to_dense_optimizer_changes_nothing(cls):
    dense = torch.nn.Parameter(torch.randn(4, 3))
    emb = torch.nn.Parameter(torch.randn(5, 3))
    opt = cls([dense, emb], **_kw(cls))
    dense.grad = torch.randn(4, 3)
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.randn(2, 3), (5, 3))
    snap = snapshot(opt, [dense, emb])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, [dense, emb], snap)  # the dense param listed first was not updated either


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_mixed_devices_in_a_group(cls):
    with pytest.raises(ValueError, match="one device"):
        cls([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))], **_kw(cls))


@pytest.mark.parametrize("cls", [c for c in CLASSES if not c.supports_complex], ids=lambda c: c.__name__)
def test_complex_params_refused_where_unsupported(cls):
    # the anchor's exception type: ValueError, RuntimeError for Muon (torch.optim.Muon's)
    with pytest.raises(RuntimeError if cls.__name__ == "Muon" else ValueError, match="complex"):
        cls([torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))], **_kw(cls))


@pytest.mark.parametrize("cls", [c for c in CLASSES if c.supports_complex and c.dense_only
                                 and not c.requires_closure], ids=lambda c: c.__name__)
def test_complex_params_match_real_view(cls):
    """Where supported (as in torch), a complex param is updated exactly like its real view."""
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = cls([z], fused=False, **_kw(cls)), cls([r], fused=False, **_kw(cls))
    for _ in range(5):
        g = torch.randn(4, 3, dtype=torch.complex128)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c.supports_complex and c.dense_only and not c.requires_closure
                                 and c._has_kernel()], ids=lambda c: c.__name__)
def test_complex_params_fused_match_reference(cls):
    """The fused path updates complex params through their real views too (mixed with real params in one group)."""
    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g).to(DEVICE)),
                torch.nn.Parameter(torch.randn(5, generator=g).to(DEVICE))]
    pf, pr = make(), make()
    of, orr = cls(pf, fused=True, **_kw(cls)), cls(pr, fused=False, **_kw(cls))
    step_twins(of, pf, orr, pr, torch.Generator().manual_seed(1), steps=5)
    for a, b in zip(pf, pr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_closure_required():
    closure_cls = [c for c in CLASSES if c.requires_closure]
    assert closure_cls, "LBFGS must require a closure"
    for cls in closure_cls:
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        with pytest.raises(RuntimeError, match="closure"):
            cls([p]).step()


def test_differentiable_is_refused_clearly():
    with pytest.raises(ValueError, match="differentiable"):
        fused_optim.Adam([torch.nn.Parameter(torch.randn(3))], differentiable=True)
