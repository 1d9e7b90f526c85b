"""Element math several optimizers share, kernel half (triton.jit) beside reference half (foreach ops): grad
preparation (maximize, L2 or decoupled weight decay), Adam's moments and bias corrections, step counting, torch's
lerp, and timm's caution (the cautious mask, whose per-tensor mean the kernels get from the statistics pass of the
element-wise apply: kernels/multi_tensor.py).

FLAGS bits 0-2 (MAXIMIZE, WD, DECOUPLED) belong to the grad preparation here; a module that calls it declares its
own bits after them: ``mt.flag_bits(n, first=GRAD_BITS)``.
"""
from __future__ import annotations

import torch

from .._tensors import restore_state_dtypes, scalar
from ..kernels import multi_tensor as mt
from ..kernels import runtime

GRAD_BITS = 3  # the FLAGS bits the grad preparation below reads; an optimizer's own bits start here

if runtime.available():
    import triton
    import triton.language as tl

    # Element math mirrors torch's op by op, with tl.fma exactly where torch's element-wise kernels fuse
    # (add with alpha, addcmul, lerp; not addcdiv, whose division comes last). Division and sqrt are the IEEE-rounded
    # ones (kernels/access.py's div_rn, sqrt_rn) like torch's, not the GPU's faster approximations. The math runs in
    # the compute dtype of the loaded values (float64 for float64 params): scalars are cast with x.to(p.dtype).
    MAXIMIZE, WD, DECOUPLED = mt.flag_bits(GRAD_BITS)

    @triton.jit
    def count_step(step, t1, t2, t3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # SCALARS for optimizers whose only per-tensor scalar is a step counter that the math never reads
        return step + 1.0, t1, t2, t3, 0.0, 0.0, 0.0, 0.0

    @triton.jit
    def effective_grad(p, g, wd, FLAGS: tl.constexpr):
        """maximize, then L2 weight decay fused as torch's foreach add with alpha (Adagrad, RMSprop, Adadelta,
        Rprop)."""
        if FLAGS & MAXIMIZE:
            g = -g
        if FLAGS & WD:
            g = tl.fma(wd.to(p.dtype), p, g)
        return g

    @triton.jit
    def decayed_grad(p, g, decay, wd, FLAGS: tl.constexpr):
        """maximize, then L2 (into g, unfused as torch's single-tensor ops) or decoupled (p * decay,
        decay = 1 - lr * wd) weight decay (the Adam family, Adamax, NAdam, RAdam, ASGD, SGD, NovoGrad)."""
        if FLAGS & MAXIMIZE:
            g = -g
        if FLAGS & WD:
            if FLAGS & DECOUPLED:
                p = p * decay
            else:
                g = g + wd.to(p.dtype) * p
        return p, g

    @triton.jit
    def lerp(a, b, w):
        """torch's lerp, a + w * (b - a), in ATen's two forms: from the nearer end (a weight >= 0.5 is exact at b
        too), fused as torch's; w a scalar (cast to a's dtype)."""
        w = w.to(a.dtype)
        d = b - a
        return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, a), tl.fma(w - 1.0, d, b))

    @triton.jit
    def bias_corrections(step, beta1, beta2):
        """(step + 1, 1 - beta1^(step + 1), 1 - beta2^(step + 1)): the new step and Adam's bias corrections, fp64."""
        step = step + 1.0
        return step, 1.0 - tl.exp2(step * tl.log2(beta1)), 1.0 - tl.exp2(step * tl.log2(beta2))

    @triton.jit
    def adam_scalars(step, t1, t2, t3, lr, beta1, beta2, eps, wd, h5, h6, h7, FLAGS: tl.constexpr):
        # (step + 1, -lr / bc1, sqrt(bc2), 1 - lr * wd): Adam's per-tensor coefficients (also Adamax, Adahessian)
        step, bc1, bc2 = bias_corrections(step, beta1, beta2)
        return step, t1, t2, t3, -lr / bc1, tl.sqrt(bc2), 1.0 - lr * wd, 0.0

    @triton.jit
    def adam_moments(g, m, v, beta1, beta2):
        """First moment (lerp towards g) and second moment (EMA of g*g)."""
        m = m + (1.0 - beta1).to(g.dtype) * (g - m)
        v = v * beta2.to(g.dtype) + (1.0 - beta2).to(g.dtype) * g * g
        return m, v

    @triton.jit
    def adam_start(p, g, m, v, decay, wd, beta1, beta2, FLAGS: tl.constexpr):
        """The start of an Adam-style update (Adam, NAdam, RAdam): decayed_grad, then adam_moments. Returns the
        (decayed) p, the prepared g and the new moments."""
        p, g = decayed_grad(p, g, decay, wd, FLAGS)
        m, v = adam_moments(g, m, v, beta1, beta2)
        return p, g, m, v

    @triton.jit
    def caution_mask(u, g):
        """timm's cautious mask: 1 where the update agrees in sign with the grad, else 0. The per-tensor mean of
        it is a Rule's ``stats``."""
        return tl.where(u * g > 0, 1.0, 0.0).to(u.dtype)

    @triton.jit
    def caution_scale(mean):
        """The mask's divisor from its per-tensor mean (fp64 SCALARS math): max(mean, 1e-3)."""
        return tl.maximum(mean, 1e-3)

    @triton.jit
    def cautious(u, g, scale):
        """The update masked where it disagrees with the grad, the mask divided by ``caution_scale`` first (as timm)."""
        return u * (caution_mask(u, g) / scale.to(u.dtype))


class OwnKernels:
    """Mixin for the optimizers whose fused path runs kernels of their own rather than a generic _kernel_rule."""

    @classmethod
    def _has_kernel(cls) -> bool:
        return True


class KeptStateDtypes:
    """Mixin for the optimizers that keep some states in a dtype other than their param's (as timm does):
    ``_kept_dtypes(group, p)`` maps those state keys to their dtype, which a loaded checkpoint keeps too."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict, self._kept_dtypes)


def cautious_updates(updates, grads, full_sums=None, numels=None):
    """timm's caution (Cautious Optimizers, arXiv:2411.16085), per tensor, in its op order: mask = (u * g > 0) in
    the grad's dtype, mask /= max(mean(mask), 1e-3), returns the new tensors u * mask. FSDP2 shards: ``full_sums``
    (sharded.Layout.full_sums of these tensors) sums the local masks' counts over the shards, and the mean is that
    count / ``numels`` (the full tensors'), rounded to the mask's dtype once as mean() rounds."""
    masks = [(m > 0).to(g.dtype) for m, g in zip(torch._foreach_mul(updates, grads), grads)]
    if full_sums is None:
        scales = [m.mean() for m in masks]
    else:  # (fp64 counts: exact; no host sync)
        counts = full_sums(torch.stack([m.sum(dtype=torch.float64) for m in masks]))
        scales = [s.to(m.dtype) for s, m in zip(torch._foreach_div(counts.unbind(), list(numels)), masks)]
    torch._foreach_maximum_(scales, 1e-3)
    torch._foreach_div_(masks, scales)
    return torch._foreach_mul(updates, masks)


def whole_tensors(shards, tensors):
    """cautious_updates' (full_sums, numels) for ``tensors``, the local shards of the tensors of ``shards`` (a
    sharded.Layout), or (None, None) without shards."""
    return (None, None) if shards is None else (shards.full_sums, shards.numels(tensors))


def step_params_(params, updates, lr):
    """params -= lr * updates, in place; a Tensor lr is multiplied in (foreach alpha takes numbers only)."""
    if isinstance(lr, torch.Tensor):
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


def amp_unscale_(grads, grad_scale, found_inf) -> bool:
    """AMP on a reference path: True when found_inf is set (skip the step: nothing changes), else False with the
    grads divided by grad_scale in place (p.grad holds the unscaled grads afterwards)."""
    if found_inf is not None and found_inf.item() != 0:
        return True
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale.to(grads[0].device))
    return False


def grad_flags(group, decoupled: bool = False) -> int:
    """FLAGS bits read by effective_grad / decayed_grad for a group's maximize and weight decay options."""
    wd = scalar(group.get("weight_decay", 0)) != 0
    return mt.pack((MAXIMIZE, group.get("maximize", False)), (WD, wd), (DECOUPLED, wd and decoupled))


def adam_hyper(group, **extra):
    """The HYPER of an Adam-style kernel rule: lr, betas, eps and weight decay under the kernels' names, then extra."""
    beta1, beta2 = (scalar(b) for b in group["betas"])
    return dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"], **extra)


def reference_hypers(group, *keys, **extra):
    """The keyword arguments of a reference function (adam_hyper's reference half): lr, the betas as beta1 and beta2
    (as given: floats or 0-d Tensors), weight_decay and maximize, then the group's entries named in keys, then extra."""
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                maximize=group["maximize"], **{k: group[k] for k in keys}, **extra)


def effective_grads(grads, params, maximize: bool, weight_decay: float):
    """The grads the update sees: negated for maximize, plus L2 weight decay fused (foreach add with alpha). New
    tensors where changed: p.grad is never modified."""
    return decayed_grads(params, grads, lr=None, weight_decay=weight_decay, maximize=maximize)


def decayed_grads(params, grads, *, lr, weight_decay, maximize, decoupled=False):
    """maximize, then L2 weight decay (returns new grads) or decoupled decay (scales params in place), in torch's
    order. ``lr``: a float or a 0-d Tensor (whose dtype torch's scalar math runs in, as here)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, scalar(1 - lr * weight_decay))
        elif maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)  # already a copy
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


def adam_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2):
    """In place: exp_avg lerps towards grad by 1 - beta1, exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2.
    The betas: floats or 0-d Tensors (torch's scalar math in their dtype)."""
    torch._foreach_lerp_(exp_avgs, grads, scalar(1 - beta1))
    torch._foreach_mul_(exp_avg_sqs, scalar(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, scalar(1 - beta2))


def timm_moments_(states, grads, second, beta1, beta2, second_key="exp_avg_sq"):
    """timm's Adam-style start (AdamP, Adahessian), in its op order: each state's Python-int step += 1, exp_avg =
    exp_avg * beta1 + (1 - beta1) * grad, state[second_key] = its * beta2 + (1 - beta2) * second^2 (second: the grads,
    or Adahessian's Hessian estimate). Returns (exp_avg list, second-moment list, new step numbers as floats)."""
    m = [st["exp_avg"] for st in states]
    v = [st[second_key] for st in states]
    for st in states:
        st["step"] += 1
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, second, second, value=1 - beta2)
    return m, v, [float(st["step"]) for st in states]


def begin_step(params, grads, states, *, lr, weight_decay, maximize, decoupled):
    """The start every Adam-family reference shares: advance the step counters, then the grads with maximize and
    weight decay applied. Returns (grads, exp_avg list, exp_avg_sq list, new step numbers as floats)."""
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    grads = decayed_grads(params, grads, lr=lr, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled)
    return grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [s.item() for s in steps]
