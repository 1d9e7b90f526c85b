"""Adagrad with lr decay, an initial accumulator, weight decay, maximize and sparse grads (anchor: torch.optim.Adagrad)."""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check_nonneg, new_step, scalar
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import effective_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from ..kernels.access import div_rn, sqrt_rn  # IEEE-rounded in either compute dtype
    from .common import effective_grad

    @triton.jit
    def _adagrad_scalars(step, t1, t2, t3, lr, lr_decay, eps, wd, h4, h5, h6, h7, FLAGS: tl.constexpr):
        step = step + 1.0
        return step, t1, t2, t3, -lr / (1.0 + (step - 1.0) * lr_decay), 0.0, 0.0, 0.0

    @triton.jit
    def _adagrad_update(p, g, acc, s1, s2, s3, neg_clr, c1, c2, c3, lr, lr_decay, eps, wd, h4, h5, h6, h7,
                        FLAGS: tl.constexpr):
        g = effective_grad(p, g, wd, FLAGS)
        acc = tl.fma(g, g, acc)
        p = p + div_rn(neg_clr * g, sqrt_rn(acc) + eps.to(p.dtype))
        return p, acc, s1, s2, s3


def _sparse_step(p, g, acc, neg_clr, eps):
    """torch's sparse Adagrad: only the rows present in g are accumulated and updated."""
    g = g.coalesce()  # the update is non-linear: repeated indices must be summed first
    idx, vals = g._indices(), g._values()
    acc.add_(torch.sparse_coo_tensor(idx, vals.pow(2), g.size()))
    std = acc.sparse_mask(g)._values().sqrt_().add_(eps)
    p.add_(torch.sparse_coo_tensor(idx, vals / std, g.size()), alpha=neg_clr)


@register
class Adagrad(FusedOptimizer):
    """Adagrad: per-element steps lr / (1 + (t - 1) * lr_decay) / (sqrt(sum of squared grads) + eps), with an
    initial accumulator, L2 weight decay and maximize. Anchor: torch.optim.Adagrad (like it, the state exists from
    construction on).

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step. Sparse grads (e.g.
    nn.Embedding(sparse=True)) take the reference path, as in torch."""
    nonnegative_states = ("sum",)

    dense_only = False  # sparse grads (nn.Embedding(sparse=True)) take the reference path, like torch

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None):
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fused=fused)
        # torch creates Adagrad's state in the constructor (state_dict lists every param before any step);
        # params of groups added later get theirs lazily, on their first grad
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                     initial_accumulator_value=group["initial_accumulator_value"], eps=group["eps"])

    def _init_state(self, p, group):
        # torch fills the accumulator from the constructor's value, even for a group that sets its own
        v = self.defaults["initial_accumulator_value"]
        return {"step": new_step(p, group),
                "sum": torch.full_like(p, complex(v, v) if p.is_complex() else v,
                                       memory_format=torch.preserve_format)}

    def _use_kernel(self, group, params):
        if any(p.grad.is_sparse for p in params):
            if group.get("fused"):
                raise RuntimeError("Adagrad: fused=True does not support sparse gradients")
            return False
        return super()._use_kernel(group, params)

    def _reference(self, group, params, grads, states):
        lr, lr_decay, eps, wd = group["lr"], group["lr_decay"], group["eps"], group["weight_decay"]
        sparse = [i for i, g in enumerate(grads) if g.is_sparse]
        if sparse and wd != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        neg_clr = [scalar(-lr / (1 + (s.item() - 1) * lr_decay)) for s in steps]  # a Tensor lr: in its dtype
        for i in sparse:
            g = -grads[i] if group["maximize"] else grads[i]
            _sparse_step(params[i], g, states[i]["sum"], neg_clr[i], eps)
        dense = [i for i, g in enumerate(grads) if not g.is_sparse]
        if not dense:
            return
        ps = [params[i] for i in dense]
        acc = [states[i]["sum"] for i in dense]
        gs = effective_grads([grads[i] for i in dense], ps, group["maximize"], wd)
        torch._foreach_addcmul_(acc, gs, gs, value=1)
        std = torch._foreach_sqrt(acc)
        torch._foreach_add_(std, eps)
        torch._foreach_addcdiv_(ps, gs, std, [neg_clr[i] for i in dense])

    def _kernel_rule(self, group, variant=None):
        rule = mt.Rule(_adagrad_update, _adagrad_scalars, grad_flags(group),
                       dict(lr=scalar(group["lr"]), lr_decay=group["lr_decay"], eps=group["eps"], wd=group["weight_decay"]))
        return rule, ("sum",), ("step",)
