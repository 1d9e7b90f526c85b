"""NvNovoGrad against timm.optim; NovoGrad (no library anchor: timm dropped it) against PaperNovoGrad, a float64
transcription of the formulas in fused_optim.NovoGrad's docstring (Ginsburg et al. 2019, Algorithm 1, moments started
at zero). tests/optimizers/test_novograd.py pins the transcription itself."""
import math

import torch

from anchors import timm_class
from cases import Case


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


CASES = [
    Case("NvNovoGrad", lambda: timm_class("nvnovograd", "NvNovoGrad"),
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
                  {"amsgrad": True, "betas": (0.9, 0.99), "eps": 1e-6},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_decay": True},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_decay": True, "corrected_weight_decay": True,
                   "amsgrad": True, "grad_averaging": True}],
         group2={"lr": 3e-3, "weight_decay": 0.05}, complex_ok=False, launches=2),
    Case("NovoGrad", lambda: PaperNovoGrad,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
                  {"amsgrad": True, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01}],
         group2={"lr": 3e-3, "weight_decay": 0.05}, launches=2,
         rtol32=1e-5, atol32=1e-6),  # float32 ops against a float64 transcription
]
