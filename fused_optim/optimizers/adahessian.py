"""Adahessian (anchor: timm.optim.Adahessian; paper: arXiv 2006.00719): Adam whose second moment tracks the squared
Hutchinson estimate of the Hessian diagonal, E[z * (H z)] with Rademacher z, instead of the squared gradient.

The estimate needs the gradient's graph: call ``loss.backward(create_graph=True)`` (or set ``p.grad`` from
``torch.autograd.grad(..., create_graph=True)``) before ``step()``. Like timm, the estimate lives in ``p.hess``
(recomputed every ``update_each`` steps, from ``n_samples`` draws of a seeded generator), and is not part of the
state dict (a resumed run recomputes it on its first step).

Fused path: the generic one-launch kernel. ``p.hess`` rides as a third element-wise state slot (the kernel writes
it back unchanged; the grad slot stays the real grad, so a new grad each step only re-uploads the grad column). The
kernel's state slots share one dtype, so for fp16/bf16 params the fused path keeps ``p.hess`` in the states' dtype
(timm's promotion makes it fp32 there); fp32 / fp64 params are unaffected. AMP's grad_scale / found_inf are refused
(the estimate would need unscaling too).
"""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_betas, check_nonneg, scalar, scalars_on_device
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import timm_moments_

if runtime.available():
    import triton
    import triton.language as tl

    from .common import adam_scalars  # (step + 1, -lr / bc1, sqrt(bc2), 1 - lr * wd): the same per-tensor math

    (POWER_ONE,) = mt.flag_bits(1)

    @triton.jit
    def _adahessian_update(p, g, m, v, hess, s3, neg_step, bc2_sqrt, decay, c3, lr, beta1, beta2, eps, wd, power,
                           h6, h7, FLAGS: tl.constexpr):
        p = p * decay  # decoupled weight decay first, as in timm (a multiply by 1 when weight_decay == 0)
        m = m * beta1.to(p.dtype) + (1.0 - beta1).to(p.dtype) * g
        v = v * beta2.to(p.dtype) + (1.0 - beta2).to(p.dtype) * hess * hess
        # (v / bc2) ** (power / 2) = (sqrt(v) / sqrt(bc2)) ** power; 0 ** 0 is 1 like torch.pow
        x = tl.sqrt(v) / bc2_sqrt
        k = power.to(p.dtype)
        x_pow = tl.where(x > 0.0, tl.exp2(k * tl.log2(tl.where(x > 0.0, x, 1.0))), tl.where(k == 0.0, 1.0, 0.0))
        if FLAGS & POWER_ONE:  # the default: skip the exp2/log2 round trip
            x_pow = x
        p = p + neg_step * (m / (x_pow + eps.to(p.dtype)))
        return p, m, v, hess, s3


@register
class Adahessian(FusedOptimizer):
    """Adahessian: Adam whose second moment tracks the Hutchinson estimate of the Hessian diagonal,
    E[z * (H z)] with Rademacher z (``n_samples`` draws every ``update_each`` steps), instead of the squared grad;
    the step divides by (v / bias correction) ** (hessian_power / 2) + eps, with decoupled weight decay.
    Anchor: timm.optim.Adahessian.

    Needs the grads' graph: call ``loss.backward(create_graph=True)`` before ``step()``. AMP's grad_scale /
    found_inf are refused (the estimate would need unscaling too); so are DTensor (FSDP2) params. Fused path: 1
    launch of the shared multi-tensor kernel per param group and step (the estimate rides as a state slot)."""
    nonnegative_states = ("exp_hessian_diag_sq",)

    supports_complex = False
    elementwise = False  # the Hutchinson estimate (and avg_conv_kernel) is not written for DTensor shards
    shardable = False  # (its Hessian-vector products differentiate through FSDP2's all-gathers)
    anchor_numbers = {"step": int}  # timm's
    _step_supports_amp_scaling = False  # the Hessian estimate would need unscaling too: not supported
    kernel_variants = ({}, {"hessian_power": 0.5})  # AOT: the power-1 shortcut and the general power

    def __init__(self, params, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hessian_power=1.0,
                 update_each=1, n_samples=1, avg_conv_kernel=False, *, fused=None):
        check(update_each >= 1, f"Invalid update_each value: {update_each}")
        check(n_samples >= 1, f"Invalid n_samples value: {n_samples}")
        self.n_samples = n_samples
        self.update_each = update_each
        self.avg_conv_kernel = avg_conv_kernel
        # one fixed seed: every data-parallel rank draws the same z (timm's choice)
        self.seed = 2147483647
        self.generator = torch.Generator().manual_seed(self.seed)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"])
        check_betas(group["betas"])
        k = group["hessian_power"]
        check(0.0 <= k <= 1.0, f"Invalid Hessian power value: {k}")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:  # timm's initial state: no estimate yet, counter at 0
            if p.requires_grad:
                p.hess = 0.0
                self.state[p]["hessian step"] = 0

    @property
    def is_second_order(self):
        return True

    def get_params(self):
        """Every trainable param of every group."""
        return (p for group in self.param_groups for p in group["params"] if p.requires_grad)

    def zero_hessian(self):
        """Zero the estimates that set_hessian is about to recompute."""
        for p in self.get_params():
            if isinstance(p.hess, torch.Tensor) and self.state[p]["hessian step"] % self.update_each == 0:
                p.hess.zero_()

    def _due(self):
        """(params with a grad, those of them whose estimate is due now); raises if a due grad has no graph."""
        with_grad = [p for p in self.get_params() if p.grad is not None]
        # due every update_each steps, or when there is no estimate yet (first step, or after a resume)
        due = [p for p in with_grad
               if self.state[p]["hessian step"] % self.update_each == 0 or not isinstance(p.hess, torch.Tensor)]
        missing = sum(not p.grad.requires_grad for p in due)
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: the Hessian estimate differentiates the gradients, but {missing} param(s) "
                f"have a gradient without a graph: call loss.backward(create_graph=True) (or "
                f"torch.autograd.grad(..., create_graph=True)) before step(), with a loss that is not linear in them")
        return with_grad, due

    @torch.no_grad()
    def set_hessian(self):
        """Add the Hutchinson estimate of diag(H), mean over n_samples of z * (H z), to p.hess of the params due."""
        with_grad, due = self._due()
        for p in with_grad:
            self.state[p]["hessian step"] += 1
        if not due:
            return
        if self.generator.device != due[0].device:  # the draws must come from the params' device
            self.generator = torch.Generator(due[0].device).manual_seed(self.seed)
        grads = [p.grad for p in due]
        for i in range(self.n_samples):
            zs = [torch.randint(0, 2, p.size(), generator=self.generator, device=p.device) * 2.0 - 1.0 for p in due]
            hzs = torch.autograd.grad(grads, due, grad_outputs=zs, only_inputs=True,
                                      retain_graph=i < self.n_samples - 1)
            for p, hz, z in zip(due, hzs, zs):
                p.hess += hz * z / self.n_samples

    @torch.compiler.disable  # like the base class: step() runs eagerly
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError("Adahessian does not support AMP grad_scale / found_inf (the Hessian estimate is "
                               "not unscaled)")
        loss = self._closure_loss(closure)
        with torch.no_grad():
            work = [(group, *self._grads_of(group)) for group in self.param_groups]  # validate before any change
        self._check_shards(work)
        self._due()
        self.zero_hessian()
        self.set_hessian()
        with torch.no_grad():
            # max_grad_norm: after the Hessian products, which differentiate through the grads
            grad_scale, _ = self._clip_grads(work, None, None)
            for group, params, grads in work:
                keep = [i for i, p in enumerate(params) if isinstance(getattr(p, "hess", None), torch.Tensor)]
                params, grads = [params[i] for i in keep], [grads[i] for i in keep]
                if self.avg_conv_kernel:
                    for p in params:
                        if p.dim() == 4:  # one estimate per (out, in) kernel: the mean |diag| over its taps
                            p.hess.copy_(p.hess.abs().mean(dim=[2, 3], keepdim=True).expand_as(p.hess))
                if not params:
                    continue
                # the estimate is an attribute, not state: it joins the state dicts for the update only, so both
                # paths (and the base class's substitutes: fp32 copies, master weights) see it as one more state
                states = [self.state[p] for p in params]
                for p, st in zip(params, states):
                    st["hess"] = p.hess
                try:
                    self._step_group(group, params, grads, grad_scale, None)
                finally:
                    for p, st in zip(params, states):
                        p.hess = st.pop("hess")  # (the fused path may have changed its dtype)
        return loss

    def _states_of(self, group, params):
        # a first step's states are not empty ("hessian step", "hess"), which the base class's cached lookup reads
        # as made: ask _state_of for each
        return [self._state_of(p, group) for p in params]

    def _state_of(self, p, group):
        st = self.state[p]
        if "step" not in st:
            # timm's state starts with "hessian step" (and, during a step, our "hess"): let the base class create
            # the rest (master copy included) on an empty dict, then restore the order
            early = dict(st)
            st.clear()
            fresh = dict(super()._state_of(p, group))
            st.clear()
            st.update(early)
            st.update(fresh)
        return st

    def _init_state(self, p, group):
        return {"step": 0, "exp_avg": torch.zeros_like(p), "exp_hessian_diag_sq": torch.zeros_like(p)}

    def _reference(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr, k = scalar(group["lr"]), group["hessian_power"]
        hess = [st["hess"] for st in states]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        m, v, steps = timm_moments_(states, grads, hess, beta1, beta2, "exp_hessian_diag_sq")
        denom = torch._foreach_div(v, [1 - beta2 ** s for s in steps])
        torch._foreach_pow_(denom, k / 2)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** s) for s in steps])

    def _kernel_rule(self, group, variant=None):
        beta1, beta2 = group["betas"]
        rule = mt.Rule(_adahessian_update, adam_scalars, mt.pack((POWER_ONE, group["hessian_power"] == 1.0)),
                       dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"],
                            power=group["hessian_power"]))
        return rule, ("exp_avg", "exp_hessian_diag_sq", "hess"), ("step",)

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        scalars_on_device(states, ("step",), params[0].device)
        for st in states:
            if st["hess"].dtype != st["exp_avg"].dtype:  # half params: the kernel's state slots share one dtype
                st["hess"] = st["hess"].to(st["exp_avg"].dtype)
        super()._kernel_step(group, params, grads, states, grad_scale, found_inf)
