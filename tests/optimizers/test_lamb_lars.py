"""Lamb's and Lars's own behaviour beyond the Case database: launch structure (Lamb's persistent launch and its
refused-cooperative fallback, Lars's norms + apply), timm's global clip leaving p.grad unclipped, the factory's
timm names, and timm's refusals. Shapes span several work chunks under the tests' block size (512 elements)."""
import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import assert_kernels_idle, assert_states_close, refuse_persistent_launch, twin_groups
from fused_optim.kernels import runtime

SHAPES = [(7,), (), (0,), (1300,), (67, 33)]
SHAPES_2 = [(11,), (3, 4, 2, 2)]


def _pair(cls, cfg, group2):
    return twin_groups(cls, cfg, group2, SHAPES, SHAPES_2, DEVICE)


def _steps(fused, pa, ref, pb, gen, steps, per_step):
    for step in range(steps):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=gen).to(DEVICE)
            b.grad = a.grad.clone()
        n0 = runtime.launch_count
        fused.step()
        ref.step()
        assert runtime.launch_count - n0 == per_step, step
        assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(fused)


@pytest.mark.parametrize("refused", [False, True], ids=["persistent", "refused"])
def test_lamb_launches_and_numbers(refused, reductions, monkeypatch):
    """Per group 1 launch (stats and apply as the phases of one persistent launch) or, where the cooperative launch
    is refused, 2; plus 2 per step for the global clip: the reference's numbers either way, caution and L2 on."""
    if refused:
        refuse_persistent_launch(monkeypatch, DEVICE)
    cfg = {"lr": 0.01, "weight_decay": 0.1, "caution": True, "max_grad_norm": 20.0}
    fused, pa, ref, pb, gen = _pair(fused_optim.Lamb, cfg, {"lr": 3e-3, "always_adapt": True})
    _steps(fused, pa, ref, pb, gen, 3, 2 + 2 * (2 if refused else 1))
    assert [float(g["step"]) for g in fused.param_groups] == [3.0, 3.0]


def test_lamb_without_adaptation_is_the_apply_alone():
    fused, pa, ref, pb, gen = _pair(fused_optim.Lamb, {"weight_decay": 0.0, "max_grad_norm": None}, {"lr": 3e-3})
    _steps(fused, pa, ref, pb, gen, 2, 2)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_lamb_clips_globally_and_leaves_grads(fused):
    """timm divides every grad by max(|g| / max_grad_norm, 1), |g| over all groups, without touching p.grad: a
    second group's grads change the first group's step."""
    gen = torch.Generator().manual_seed(2)
    p1 = [torch.randn(40, generator=gen).to(DEVICE)]
    p2 = [torch.randn(30, generator=gen).to(DEVICE)]
    g1 = torch.randn(40, generator=gen).to(DEVICE)
    moved = []
    for scale in (1.0, 1000.0):  # the second group's grad norm: below, then far above max_grad_norm
        a, b = [p.clone() for p in p1], [p.clone() for p in p2]
        opt = fused_optim.Lamb([{"params": a}, {"params": b}], fused=fused, max_grad_norm=10.0, weight_decay=0.0)
        a[0].grad, b[0].grad = g1.clone(), torch.full((30,), 0.01 * scale, device=DEVICE)
        opt.step()
        torch.testing.assert_close(a[0].grad, g1, rtol=0, atol=0)
        moved.append(opt.state[a[0]]["exp_avg"].clone())
    torch.testing.assert_close(moved[0], 0.1 * g1)  # |g| ~ 6: no clip (m = (1 - beta1) g)
    assert (moved[1].abs() < moved[0].abs() / 2).all()  # |g| ~ 55: divided by ~5.5


@pytest.mark.parametrize("adapt", [False, True], ids=["plain", "adapt"])
def test_lars_launches_and_numbers(adapt, reductions):
    """Per group the norms of grads and params in 1 launch, then the apply (on the first step, when every buffer
    starts at its grad, too); without adaptation the apply alone."""
    cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01 if adapt else 0.0, "trust_clip": adapt}
    fused, pa, ref, pb, gen = _pair(fused_optim.Lars, cfg, {"lr": 0.05})
    _steps(fused, pa, ref, pb, gen, 3, 2 * (2 if adapt else 1))


@pytest.mark.parametrize("name,cls,kwargs", [
    ("lamb", "Lamb", {}), ("lambc", "Lamb", {"trust_clip": True}), ("lambw", "Lamb", {"decoupled_decay": True}),
    ("lambcd", "Lamb", {"decoupled_decay": True, "corrected_weight_decay": True}), ("clamb", "Lamb", {"caution": True}),
    ("lars", "Lars", {"momentum": 0.9}), ("larc", "Lars", {"trust_clip": True, "momentum": 0.9}),
    ("nlars", "Lars", {"nesterov": True}), ("nlarc", "Lars", {"nesterov": True, "trust_clip": True})])
def test_factory_names_are_timms(name, cls, kwargs):
    opt = fused_optim.create_optimizer(torch.nn.Linear(3, 2), name, lr=0.1, fused=False)
    assert type(opt).__name__ == cls
    for k, v in kwargs.items():
        assert all(g[k] == v for g in opt.param_groups), k


@pytest.mark.parametrize("cls,kwargs,message", [
    ("Lars", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("Lars", {"momentum": -1.0}, "Invalid momentum value: -1.0"),
    ("Lars", {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    ("Lars", {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
    ("Lamb", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("Lamb", {"eps": -1.0}, "Invalid epsilon: -1.0"),
    ("Lamb", {"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
    ("Lamb", {"lr": 0.0, "corrected_weight_decay": True}, "Corrected weight decay requires a positive max lr"),
    ("Lamb", {"max_grad_norm": 0.0}, "Invalid max_grad_norm value: 0.0")])
def test_timms_refusals(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(fused_optim, cls)([torch.nn.Parameter(torch.randn(3))], **kwargs)
