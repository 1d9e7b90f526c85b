"""NovoGrad has no library anchor (timm dropped it): it is checked against PaperNovoGrad, a float64 transcription of
the formulas in fused_optim.NovoGrad's docstring (Ginsburg et al. 2019, Algorithm 1, moments started at zero).
tests/cases/novograd.py holds PaperNovoGrad and uses it as NovoGrad's anchor, so the generic tests (every step, both
checkpoint directions, defaults) run against it; the tests here pin the formulas themselves and NvNovoGrad's
first-step rule.
"""
import math

import pytest
import torch

import fused_optim
from anchors import timm_class
from cases.novograd import PaperNovoGrad
from conftest import DEVICE


def _params(dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    return [torch.rand(s, generator=gen, dtype=torch.float64).sub_(0.4).to(dtype).to(device)
            for s in [(6, 5), (9,), (), (2, 3, 4)]]


def test_first_step_by_hand():
    """Step 1: v = ||g||^2, m = g / (||g|| + eps) + wd * w, w -= lr * m."""
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    p = w0.clone()
    opt = fused_optim.NovoGrad([p], lr=0.1, weight_decay=0.5, fused=False)
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||g|| = 1
    opt.step()
    m = p.grad / (1 + 1e-8) + 0.5 * w0
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-15, atol=0)
    torch.testing.assert_close(p, w0 - 0.1 * m, rtol=1e-15, atol=0)


def test_second_step_by_hand():
    """Step 2: v = b2 v + (1 - b2) ||g||^2 and the moment accumulates without (1 - b1) unless grad_averaging."""
    for averaging in (False, True):
        p = torch.tensor([1.0, 2.0], dtype=torch.float64)
        opt = fused_optim.NovoGrad([p], lr=0.01, betas=(0.9, 0.5), eps=0.0, grad_averaging=averaging, fused=False)
        p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)   # ||g||^2 = 25
        opt.step()
        p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)   # ||g||^2 = 1
        w1 = p.clone()
        opt.step()
        v2 = 0.5 * 25 + 0.5 * 1
        s = 0.1 if averaging else 1.0
        m2 = 0.9 * (s * torch.tensor([3.0, 4.0], dtype=torch.float64) / 5) + s * p.grad / math.sqrt(v2)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(v2, dtype=torch.float64))
        torch.testing.assert_close(p, w1 - 0.01 * m2, rtol=1e-14, atol=0)


@pytest.mark.parametrize("config", [{}, {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
                                    {"amsgrad": True, "betas": (0.9, 0.5), "weight_decay": 0.01}])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_matches_paper_transcription(config, fused):
    """Reference path at 1e-12 in float64; fused path (fp32 kernel math) at 1e-5 in float32."""
    dtype, tol = (torch.float64, 1e-12) if not fused else (torch.float32, 1e-5)
    ours_p = _params(dtype, DEVICE)
    paper_p = [p.detach().clone().cpu().double() for p in ours_p]
    ours = fused_optim.NovoGrad(ours_p, fused=fused, **config)
    paper = PaperNovoGrad(paper_p, **config)
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        for a, b in zip(ours_p, paper_p):
            g = torch.randn(b.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.to(dtype).to(a.device), g
        ours.step()
        paper.step()
        for a, b in zip(ours_p, paper_p):
            torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol)
            torch.testing.assert_close(ours.state[a]["exp_avg_sq"].double().cpu(), paper.state[b]["exp_avg_sq"],
                                       rtol=tol, atol=0)


def test_first_step_is_per_tensor():
    """A tensor that first gets a grad at step 3 starts its moment then (v = ||g||^2), not blended with zero."""
    a, b = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    opt = fused_optim.NovoGrad([a, b], fused=False)
    for i in range(3):
        a.grad = torch.full((3,), 2.0, dtype=torch.float64)
        b.grad = torch.tensor([3.0, 4.0], dtype=torch.float64) if i == 2 else None
        opt.step()
    assert float(opt.state[b]["exp_avg_sq"]) == 25.0


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_nvnovograd_restarts_while_moment_is_zero(fused):
    """timm's NvNovoGrad takes ||g||^2 as is whenever exp_avg_sq == 0 (here: a zero first grad), NovoGrad only on a
    tensor's first step; the fused path decides this on the device."""
    anchor = timm_class("nvnovograd", "NvNovoGrad")
    if anchor is None:
        pytest.skip("timm not installed")
    ours_p = [torch.ones(4, device=DEVICE), torch.ones(3, 2, device=DEVICE)]
    ref_p = [p.detach().clone().cpu() for p in ours_p]
    ours = fused_optim.NvNovoGrad(ours_p, lr=0.1, fused=fused)
    ref = anchor(ref_p, lr=0.1)
    for i in range(3):
        for a, b in zip(ours_p, ref_p):
            g = torch.zeros(b.shape) if i == 0 else torch.full(b.shape, float(i))
            a.grad, b.grad = g.to(a.device), g.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(ours.state[a]["exp_avg_sq"].cpu(), ref.state[b]["exp_avg_sq"])
            torch.testing.assert_close(a.cpu(), b)
    # restarted at step 2 (v = 4 * 1^2), blended at step 3 with 4 * 2^2
    assert float(ref.state[ref_p[0]]["exp_avg_sq"]) == pytest.approx(0.98 * 4 + 0.02 * 16, rel=1e-6)
