"""SGD with momentum, dampening, Nesterov, weight decay and maximize (anchor: torch.optim.SGD)."""
from __future__ import annotations

import operator
from itertools import repeat

import torch

from .._base import FusedOptimizer
from .._tensors import GRAD, IS_SPARSE, check_nonneg, scalar
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import GRAD_BITS, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from .common import decayed_grad

    NESTEROV, MOMENTUM, FIRST = mt.flag_bits(3, first=GRAD_BITS)

    @triton.jit
    def momentum_direction(g, buf, momentum, dampening, FLAGS: tl.constexpr):
        """(the step's direction, the new momentum buffer) of SGD's heavy-ball momentum (also LARS): FLAGS bits
        MOMENTUM, NESTEROV, FIRST (the buffer starts at the first grad, undamped)."""
        if FLAGS & MOMENTUM:
            if FLAGS & FIRST:
                buf = g
            else:
                buf = buf * momentum.to(g.dtype) + (1.0 - dampening).to(g.dtype) * g
            if FLAGS & NESTEROV:
                g = g + momentum.to(g.dtype) * buf
            else:
                g = buf
        return g, buf

    @triton.jit
    def _sgd_update(p, g, buf, s1, s2, s3, c0, c1, c2, c3, lr, momentum, dampening, wd, h4, h5, h6, h7,
                    FLAGS: tl.constexpr):
        p, g = decayed_grad(p, g, 1.0, wd, FLAGS)  # L2 only: DECOUPLED is never set
        g, buf = momentum_direction(g, buf, momentum, dampening, FLAGS)
        p = p - lr.to(p.dtype) * g
        return p, buf, s1, s2, s3


def momentum_reference(grads, states, *, momentum, dampening, nesterov):
    """torch's heavy-ball momentum on lists (SGD, LARS): each state's momentum_buffer (made on its first step from
    the grad) is updated in place; returns the step's directions."""
    old = [(st["momentum_buffer"], g) for st, g in zip(states, grads) if "momentum_buffer" in st]
    if old:
        torch._foreach_mul_([b for b, _ in old], momentum)
        torch._foreach_add_([b for b, _ in old], [g for _, g in old], alpha=1 - dampening)
    for g, st in zip(grads, states):
        if "momentum_buffer" not in st:  # the first momentum step starts the buffer at the grad
            st["momentum_buffer"] = torch.clone(g).detach()
    bufs = [st["momentum_buffer"] for st in states]
    return torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs


def momentum_launches(params, states, new_buffer):
    """[(param indices, first)]: the launches of a fused momentum step. A param's first momentum step copies the
    grad into a new buffer (made here by new_buffer(param), zero): those params go in a launch of their own (only on the step where they
    first get a grad). The buffer starts at zero, so if AMP skips that step the next one is an ordinary momentum
    step (identical to torch unless dampening != 0)."""
    if all(map(operator.contains, states, repeat("momentum_buffer"))):  # the steady state: one launch
        return [(range(len(params)), False)]
    fresh = [i for i, st in enumerate(states) if "momentum_buffer" not in st]
    for i in fresh:
        states[i]["momentum_buffer"] = new_buffer(params[i])
    rest = sorted(set(range(len(params))) - set(fresh))
    return [(fresh, True)] + ([(rest, False)] if rest else [])


def _sparse_sgd_step(p, grad, st, *, lr, momentum, dampening, nesterov, maximize):
    """torch's single-tensor SGD for a sparse grad (nn.Embedding(sparse=True)); the momentum buffer is sparse, as
    torch keeps it."""
    if maximize:
        grad = -grad
    if momentum != 0:
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    p.add_(grad, alpha=-lr)


@register
class SGD(FusedOptimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum, L2 weight decay and
    maximize; sparse grads (nn.Embedding(sparse=True)) as in torch. Anchor: torch.optim.SGD (same signature,
    defaults, state and numbers).

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step, +1 on the step where params
    first get a momentum buffer (it starts at their grad, as in torch). A group with sparse grads runs the reference
    path (torch has no fused sparse SGD either)."""

    dense_only = False  # sparse grads run the reference path, as in torch (which has no fused sparse SGD either)
    scalar_keys = ()
    kernel_subvariants = (False, True)  # the `first` argument of _kernel_rule (AOT inventory compiles both)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                     dampening=group["dampening"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _grads_of(self, group):
        params, grads = super()._grads_of(group)
        if scalar(group["weight_decay"]) != 0 and any(map(IS_SPARSE, grads)):  # torch fails on it mid-step
            raise RuntimeError("SGD: weight_decay with sparse gradients: add(sparse, dense) is not supported "
                               "(torch.optim.SGD refuses it too)")
        return params, grads

    def _use_kernel(self, group, params) -> bool:
        return super()._use_kernel(group, params) and not any(map(IS_SPARSE, map(GRAD, params)))

    def _reference(self, group, params, grads, states):
        lr, momentum, dampening = scalar(group["lr"]), group["momentum"], group["dampening"]
        wd = scalar(group["weight_decay"])
        if any(map(IS_SPARSE, grads)):
            dense = []
            for i, (p, g, st) in enumerate(zip(params, grads, states)):
                if g.is_sparse:
                    _sparse_sgd_step(p, g, st, lr=lr, momentum=momentum, dampening=dampening,
                                     nesterov=group["nesterov"], maximize=group["maximize"])
                else:
                    dense.append(i)
            params, grads, states = ([xs[i] for i in dense] for xs in (params, grads, states))
            if not params:
                return
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            grads = momentum_reference(grads, states, momentum=momentum, dampening=dampening,
                                       nesterov=group["nesterov"])
        torch._foreach_add_(params, grads, alpha=-lr)

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        if group["momentum"] == 0:
            return super()._kernel_step(group, params, grads, states, grad_scale, found_inf)
        for idx, first in momentum_launches(params, states, self._new_state_buffer):
            if len(idx) == len(params):
                super()._kernel_step(group, params, grads, states, grad_scale, found_inf, variant=first)
            else:
                super()._kernel_step(group, [params[i] for i in idx], [grads[i] for i in idx],
                                     [states[i] for i in idx], grad_scale, found_inf, variant=first)

    def _kernel_rule(self, group, first=None):
        momentum = group["momentum"]
        flags = grad_flags(group) | mt.pack((NESTEROV, group["nesterov"]), (MOMENTUM, momentum != 0),
                                            (FIRST, momentum != 0 and first))
        rule = mt.Rule(_sgd_update, flags=flags,
                       hypers=dict(lr=scalar(group["lr"]), momentum=momentum, dampening=group["dampening"],
                                   wd=scalar(group["weight_decay"])))
        return rule, (("momentum_buffer",) if momentum != 0 else ()), ()
