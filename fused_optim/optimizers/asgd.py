"""ASGD: averaged SGD with a decaying step size eta and averaging weight mu, with weight decay and maximize
(anchor: torch.optim.ASGD)."""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_nonneg, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import decayed_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from .common import decayed_grad  # L2 weight decay only: DECOUPLED is never set

    @triton.jit
    def _asgd_scalars(step, eta, mu, t3, lr, lambd, alpha, t0, wd, h5, h6, h7, FLAGS: tl.constexpr):
        # this step uses the eta and mu left by the previous one; the new ones depend on the new step
        step = step + 1.0
        # torch makes the new values as float32 tensors (the default dtype), whatever the states' dtype: round so,
        # also into float64 slots (after a checkpoint load into float64 params). Not matched: a float64 Tensor lr
        # with float64 states, where torch keeps the float64 values (rel 6e-8 apart)
        new_eta = (lr / tl.exp2(alpha * tl.log2(1.0 + lambd * lr * step))).to(tl.float32).to(tl.float64)
        new_mu = (1.0 / tl.maximum(step - t0, 1.0)).to(tl.float32).to(tl.float64)
        return step, new_eta, new_mu, t3, eta, 1.0 - lambd * eta, mu, 0.0

    @triton.jit
    def _asgd_update(p, g, ax, s1, s2, s3, eta, decay, mu, c3, lr, lambd, alpha, t0, wd, h5, h6, h7,
                     FLAGS: tl.constexpr):
        p, g = decayed_grad(p, g, 1.0, wd, FLAGS)
        p = p * decay
        p = p - eta * g
        # mu == 1 (before t0) copies the param: ax + (p - ax) * 1 need not round to p
        ax = tl.where(mu == 1.0, p, ax + (p - ax) * mu)
        return p, ax, s1, s2, s3


def _by_value(values):
    """{value: [indices]}: torch ops with one scalar argument (add's alpha) run once per distinct value."""
    out: dict = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return out.items()


@register
class ASGD(FusedOptimizer):
    """ASGD (averaged SGD): SGD with the decaying step size eta = lr / (1 + lambd * lr * t) ** alpha and a running
    average of the iterates (state['ax'], averaging weight mu = 1 / max(1, t - t0)), with weight decay and
    maximize. Anchor: torch.optim.ASGD.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step (eta and mu are advanced per
    tensor on the device)."""

    scalar_keys = ("step", "eta", "mu")

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, foreach=None,
                 maximize=False, differentiable=False, capturable=False, *, fused=None):
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, capturable=capturable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], lambd=group["lambd"], weight_decay=group["weight_decay"])
        alpha, t0 = group["alpha"], group["t0"]
        check(isinstance(alpha, (int, float)) and math.isfinite(alpha), f"Invalid alpha value: {alpha}")
        # t0 = inf (never average) is meaningful; NaN and negative are not
        check(isinstance(t0, (int, float)) and 0.0 <= t0, f"Invalid t0 value: {t0}")

    def _init_state(self, p, group):
        # torch keeps all three scalars on the param's device (unlike Adam's step)
        scal = dict(dtype=torch.float32, device=p.device)
        return {"step": torch.zeros((), **scal), "eta": torch.tensor(scalar(group["lr"]), **scal),
                "mu": torch.ones((), **scal), "ax": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        grads = decayed_grads(params, grads, lr=lr, weight_decay=group["weight_decay"], maximize=group["maximize"])
        etas = [st["eta"].item() for st in states]
        torch._foreach_mul_(params, [1 - lambd * e for e in etas])
        for e, idx in _by_value(etas):  # p += -eta * g, as one op (add's alpha) like torch
            torch._foreach_add_([params[i] for i in idx], [grads[i] for i in idx], alpha=-e)
        axs = [st["ax"] for st in states]
        mus = [st["mu"].item() for st in states]
        avg = [i for i, mu in enumerate(mus) if mu != 1]
        copy = [i for i, mu in enumerate(mus) if mu == 1]
        if avg:
            diff = torch._foreach_sub([params[i] for i in avg], [axs[i] for i in avg])
            torch._foreach_mul_(diff, [states[i]["mu"] for i in avg])
            torch._foreach_add_([axs[i] for i in avg], diff)
        if copy:
            torch._foreach_copy_([axs[i] for i in copy], [params[i] for i in copy])
        # torch makes the new values with torch.as_tensor (the default dtype; a Tensor lr: its dtype), then copies
        # them into the states (float64 ones after loading a checkpoint into float64 params)
        for st, s in zip(states, steps):
            s = s.item()
            st["eta"].copy_(torch.as_tensor(lr / ((1 + lambd * lr * s) ** alpha)))
            st["mu"].copy_(torch.as_tensor(1 / max(1, s - t0)))

    def _kernel_rule(self, group, variant=None):
        rule = mt.Rule(_asgd_update, _asgd_scalars, grad_flags(group),
                       dict(lr=scalar(group["lr"]), lambd=group["lambd"], alpha=group["alpha"], t0=group["t0"],
                            wd=group["weight_decay"]))
        return rule, ("ax",), self.scalar_keys
