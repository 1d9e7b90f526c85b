"""NovoGrad has no library anchor (timm dropped it): it is checked against PaperNovoGrad, a float64 transcription of
the formulas in fused_optim.NovoGrad's docstring (Ginsburg et al. 2019, Algorithm 1, moments started at zero).
tests/cases_timm_b.py uses PaperNovoGrad as NovoGrad's anchor, so the generic tests (every step, both checkpoint
directions, defaults) run against it; the tests here pin the formulas themselves and NvNovoGrad's first-step rule.
"""
import math

import pytest
import torch

import fused_optim
from anchors import timm_class
from conftest import DEVICE


class PaperNovoGrad(torch.optim.Optimizer):
    """The paper's update, written out per tensor with Python-float (float64) scalars and float64 tensors:

        v_1 = ||g_1||^2,  v_t = b2 v_{t-1} + (1 - b2) ||g_t||^2;  amsgrad: v^_t = max(v^_{t-1}, v_t) replaces v_t
        m_t = b1 m_{t-1} + s (g_t / (sqrt(v_t) + eps) + wd w_t),  m_0 = 0,  s = 1 - b1 if grad_averaging else 1
        w_{t+1} = w_t - lr m_t

    State layout (for checkpoints both ways): step (float32 0-d), exp_avg, exp_avg_sq / max_exp_avg_sq (0-d, param
    precision, float32 for half params). Complex params are treated as their real view."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0, grad_averaging=False,
                 amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      grad_averaging=grad_averaging, amsgrad=amsgrad))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                real = torch.view_as_real if p.is_complex() else (lambda x: x)
                st = self.state[p]
                if not st:
                    mdt = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else real(p).dtype
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros((), dtype=mdt)
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros((), dtype=mdt)
                t = int(st["step"]) + 1
                w = real(p).double()
                g = real(p.grad).double()
                m = real(st["exp_avg"]).double()
                norm2 = float((g * g).sum())
                v = norm2 if t == 1 else b2 * float(st["exp_avg_sq"]) + (1 - b2) * norm2
                vhat = v
                if group["amsgrad"]:
                    vhat = max(float(st["max_exp_avg_sq"]), v)
                    st["max_exp_avg_sq"].fill_(vhat)
                s = 1 - b1 if group["grad_averaging"] else 1.0
                m = b1 * m + s * (g / (math.sqrt(vhat) + eps) + wd * w)
                real(p).copy_(w - lr * m)
                real(st["exp_avg"]).copy_(m)
                st["exp_avg_sq"].fill_(v)
                st["step"].fill_(t)


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
