"""NAdam: Adam with Nesterov momentum and a momentum-decay schedule, with L2 or decoupled weight decay and maximize
(anchor: torch.optim.NAdam)."""
from __future__ import annotations

import math

import torch

from .._tensors import new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .adam import AdamFamily
from .common import adam_hyper, adam_moments_, begin_step, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from .common import adam_start, bias_corrections

    LOG2_096 = tl.constexpr(math.log2(0.96))
    MU_PRODUCT_F64 = mt.SCALAR_F64[1]  # scalar slot 1 (mu_product) is float64

    @triton.jit
    def _momentum(beta1, step, momentum_decay):
        # mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
        return beta1 * (1.0 - 0.5 * tl.exp2(step * momentum_decay * LOG2_096))

    @triton.jit
    def _nadam_scalars(step, mu_product, t2, t3, lr, beta1, beta2, eps, wd, momentum_decay, h6, h7,
                       FLAGS: tl.constexpr):
        step, _, bc2 = bias_corrections(step, beta1, beta2)
        mu = _momentum(beta1, step, momentum_decay)
        mu_next = _momentum(beta1, step + 1.0, momentum_decay)
        if FLAGS & MU_PRODUCT_F64:  # float64 after a checkpoint load into float64 params: torch multiplies in float64
            mu_product = mu_product * mu
        else:  # a float32 state that torch multiplies in float32: round the same way
            mu_product = (mu_product.to(tl.float32) * mu.to(tl.float32)).to(tl.float64)
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        avg_coef = -lr * mu_next / (1.0 - mu_product * mu_next)
        return step, mu_product, t2, t3, grad_coef, avg_coef, bc2, 1.0 - lr * wd

    @triton.jit
    def _nadam_update(p, g, m, v, s2, s3, grad_coef, avg_coef, bc2, decay, lr, beta1, beta2, eps, wd, h5, h6, h7,
                      FLAGS: tl.constexpr):
        p, g, m, v = adam_start(p, g, m, v, decay, wd, beta1, beta2, FLAGS)
        denom = tl.sqrt(v / bc2) + eps.to(p.dtype)
        p = p + grad_coef * (g / denom)
        p = p + avg_coef * (m / denom)
        return p, m, v, s2, s3


@register
class NAdam(AdamFamily):
    """NAdam: Adam with Nesterov momentum and the momentum-decay schedule
    mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)), with L2 or decoupled weight decay and maximize.
    Anchor: torch.optim.NAdam.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""

    extra_nonneg = ("momentum_decay",)
    scalar_keys = ("step", "mu_product")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _init_state(self, p, group):
        step = new_step(p, group)
        return {"step": step, "mu_product": torch.ones_like(step),
                "exp_avg": zeros_like(p),
                "exp_avg_sq": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lr, eps, md = group["lr"], group["eps"], group["momentum_decay"]  # a Tensor lr: coefficients in its dtype
        beta1, beta2 = (scalar(b) for b in group["betas"])
        mu_products = [st["mu_product"] for st in states]
        grads, m, v, t = begin_step(params, grads, states, lr=lr, weight_decay=group["weight_decay"],
                                    maximize=group["maximize"], decoupled=group["decoupled_weight_decay"])
        mus = [beta1 * (1.0 - 0.5 * 0.96 ** (s * md)) for s in t]
        mus_next = [beta1 * (1.0 - 0.5 * 0.96 ** ((s + 1) * md)) for s in t]
        torch._foreach_mul_(mu_products, mus)  # in the state's dtype, like torch's `mu_product *= mu`
        adam_moments_(m, v, grads, beta1, beta2)
        denom = torch._foreach_div(v, [1 - beta2 ** s for s in t])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        mp = [x.item() for x in mu_products]
        grad_coef = [scalar(-lr * (1.0 - mu) / (1.0 - q)) for mu, q in zip(mus, mp)]
        torch._foreach_addcdiv_(params, grads, denom, grad_coef)
        torch._foreach_addcdiv_(params, m, denom, [scalar((-lr * mn) / (1.0 - q * mn)) for mn, q in zip(mus_next, mp)])

    def _kernel_rule(self, group, variant=None):
        rule = mt.Rule(_nadam_update, _nadam_scalars, grad_flags(group, group["decoupled_weight_decay"]),
                       adam_hyper(group, momentum_decay=group["momentum_decay"]))
        return rule, ("exp_avg", "exp_avg_sq"), self.scalar_keys
