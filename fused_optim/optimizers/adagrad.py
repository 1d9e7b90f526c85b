"""Adagrad with lr decay, an initial accumulator, weight decay, maximize and sparse grads (anchor: torch.optim.Adagrad).

Also the home of the small pieces RMSprop, Adadelta and Rprop share with it: the step-counting SCALARS and the
"maximize, then L2 weight decay" grad both as kernel code and as reference code.
"""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check_nonneg, new_step, scalar
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime

if runtime.available():
    import triton
    import triton.language as tl

    # Element math mirrors torch's op by op, with tl.fma exactly where torch's element-wise kernels fuse
    # (add with alpha, addcmul, lerp; not addcdiv, whose division comes last). Division and sqrt are the IEEE-rounded
    # ones (div_rn, sqrt_rn) like torch's, not the GPU's faster approximations. Then the kernel's fp32 numbers are
    # torch's to the last bit, but where torch's CPU sqrt (vectorized, not correctly rounded) is an ulp off.
    # Bits 0 and 1 belong to effective_grad: modules that call it declare theirs with the same two first.
    MAXIMIZE, WD = mt.flag_bits(2)

    @triton.jit
    def count_step(step, t1, t2, t3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # SCALARS for optimizers whose only per-tensor scalar is a step counter that the math never reads
        return step + 1.0, t1, t2, t3, 0.0, 0.0, 0.0, 0.0

    @triton.jit
    def effective_grad(p, g, wd, FLAGS: tl.constexpr):
        if FLAGS & MAXIMIZE:
            g = -g
        if FLAGS & WD:
            g = tl.fma(wd.to(tl.float32), p, g)
        return g

    @triton.jit
    def _adagrad_scalars(step, t1, t2, t3, lr, lr_decay, eps, wd, h4, h5, h6, h7, FLAGS: tl.constexpr):
        step = step + 1.0
        return step, t1, t2, t3, -lr / (1.0 + (step - 1.0) * lr_decay), 0.0, 0.0, 0.0

    @triton.jit
    def _adagrad_update(p, g, acc, s1, s2, s3, neg_clr, c1, c2, c3, lr, lr_decay, eps, wd, h4, h5, h6, h7,
                        FLAGS: tl.constexpr):
        g = effective_grad(p, g, wd, FLAGS)
        acc = tl.fma(g, g, acc)
        p = p + tl.div_rn(neg_clr * g, tl.sqrt_rn(acc) + eps.to(tl.float32))
        return p, acc, s1, s2, s3


def grad_flags(group) -> int:
    """FLAGS bits read by effective_grad."""
    return mt.pack((MAXIMIZE, group["maximize"]), (WD, scalar(group.get("weight_decay", 0)) != 0))


def effective_grads(grads, params, maximize: bool, weight_decay: float):
    """The grads the update sees: negated for maximize, plus L2 weight decay. New tensors where changed: p.grad
    is never modified."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)  # already a copy
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


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
