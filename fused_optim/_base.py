"""The base class every fused_optim optimizer derives from.

It owns everything that is the same for all optimizers: input validation, lazy state creation, complex params,
AMP (grad_scale / found_inf), and the choice between the reference math and the fused kernel. A subclass states
its math in one place: ``_reference`` (torch ops, defines the numbers) and, when it has one, ``_kernel_rule``
(the Triton rule computing the same thing, see kernels/multi_tensor.py).
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Callable

import torch
from torch.optim import Optimizer

from ._layouts import KernelTensors
from ._sharded import ShardedSteps, layout
from ._precision import PrecisionOptions
from ._tensors import (GRAD, IS_SPARSE, LOW_PRECISION, any_dtensor, as_real, keep_replaced, like_param,
                       numbers_as_anchor, scalars_on_device, writable_grads)
from .kernels import multi_tensor as mt
from .kernels import runtime
from .kernels.tables import TableCache

_FLOAT64 = frozenset((torch.float64, torch.complex128))
_DTYPE = operator.attrgetter("dtype")


class FusedOptimizer(KernelTensors, ShardedSteps, PrecisionOptions, Optimizer):
    """Base class. Subclasses set the class attributes below and implement ``_init_state`` and ``_reference``.

    Attributes:
        dense_only: grads must be dense (all but SparseAdam).
        supports_complex: complex params are updated as real views (torch's element-wise optimizers do this).
        requires_closure: ``step()`` without a closure is an error (LBFGS).
        elementwise: the fused update needs no per-tensor reduction (FSDP2 shards are fine).
        scalar_keys: per-param 0-d float32 states (``step``, ...) in kernel order.
        anchor_numbers: state / group keys the anchor keeps as Python numbers (timm's int ``step``) that the fused
            path keeps as 0-d device tensors: a checkpoint holds the anchor's type (see _tensors.numbers_as_anchor).
        float64_in_kernel: the fused kernels compute float64 params in float64; False for a family whose kernels
            compute in float32 only: its float64 (and complex128) params take the reference path, never fp32 math.
        kernel_layout: what the fused kernels can walk in place (see _layouts.KernelTensors).
        matrices_only: 2-D params only (Muon, as torch's).
    """

    dense_only = True
    sparse_only = False
    supports_complex = True
    requires_closure = False
    elementwise = True  # the fused update is element-wise (so it may run on FSDP2 shards); False for reductions
    scalar_keys: tuple = ("step",)
    anchor_numbers: dict = {}
    float64_in_kernel = True
    matrices_only = False
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf (unscale inside the step)

    def __init__(self, params, defaults: dict, *, fused: bool | None = None):
        defaults = dict(defaults)
        defaults.setdefault("fused", fused)
        self._check_precision_options()
        lr = defaults.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        if defaults.get("differentiable"):
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported by fused_optim")
        super().__init__(params, defaults)
        self._kernel_caches: dict = {}
        self._state_lists: dict = {}
        for group in filter(operator.itemgetter("fused"), self.param_groups):
            self._require_kernel(group)

    # ---- hooks for subclasses -------------------------------------------------------------------------------
    def _validate(self, group: dict) -> None:
        """Check a param group's hyper-parameters; raise ValueError naming the offending one."""

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Fresh state for param p (same keys, dtypes and devices as the anchor optimizer)."""
        return {}

    def _reference(self, group, params, grads, states) -> None:
        """Reference update of one group: lists of (real) params, grads and state dicts. In place."""
        raise NotImplementedError

    def _kernel_rule(self, group, variant=None):
        """(mt.Rule, element-wise state keys, scalar state keys) for this group; ``variant`` is what a subclass's
        ``_kernel_step`` passed (e.g. SGD's first momentum step)."""
        return None

    def _prepare(self, group, params, grads, states) -> None:
        """Per-step work before the kernel launch (e.g. a reduction pass); default none."""

    # ---- the step ----------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group)
        self._check_params(group)
        if getattr(self, "_kernel_caches", None) is not None and group.get("fused"):
            self._require_kernel(group)

    # `fused` is how this optimizer runs, not state. A checkpoint saves torch's default (None): torch takes the key on
    # load, and True would switch it onto its own fused path (which refuses sparse grads, among others). Loading
    # keeps each group's own value (torch's checkpoints carry fused=None too).
    def state_dict(self):
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["fused"] = None
        return numbers_as_anchor(sd, self.anchor_numbers)

    def load_state_dict(self, state_dict):
        saved = list(state_dict["param_groups"])
        for i, group in enumerate(self.param_groups[:len(saved)]):
            saved[i] = dict(saved[i], fused=group["fused"])
        super().load_state_dict({**state_dict, "param_groups": saved})
        for p, st in self.state.items():  # the saved strides: relaid like the param (see like_param)
            if isinstance(p, torch.Tensor):
                for k, v in st.items():
                    st[k] = like_param(v, p)
        self._restore_lean_states(state_dict)

    def __setstate__(self, state):
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        own_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not own_differentiable:  # torch adds it to defaults; optimizers whose anchor lacks it keep their group keys
            self.defaults.pop("differentiable", None)
        # checkpoints from torch/timm lack our extra keys: fill them from our defaults
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self.__dict__.setdefault("_kernel_caches", {})
        self.__dict__["_state_lists"] = {}

    def _check_params(self, group):
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__}: all params of a group must be on one device, got {devices}")
        for p in group["params"]:
            if p.is_complex() and not self.supports_complex:
                raise ValueError(f"{type(self).__name__} does not support complex params (got {p.dtype})")
            if p.layout == torch.strided and 0 in [st for st, n in zip(p.stride(), p.shape) if n > 1]:
                raise ValueError(f"{type(self).__name__}: a param of shape {tuple(p.shape)} has stride-0 dims "
                                 f"{p.stride()} (expanded): its elements share memory and cannot be updated in "
                                 f"place; make it a tensor of its own (.contiguous())")
        self._check_lean_params(group)

    @classmethod
    def _has_kernel(cls) -> bool:
        return cls._kernel_rule is not FusedOptimizer._kernel_rule

    def _require_kernel(self, group):
        name = type(self).__name__
        if not self._has_kernel():
            raise RuntimeError(f"{name}: fused=True is not available for this optimizer")
        if not runtime.available():
            raise RuntimeError(f"{name}: fused=True needs triton: {runtime.unavailable_reason()}")
        interpreter_problem = runtime.interpreter_problem()
        for p in group["params"]:
            if not (p.is_cuda or (p.device.type == "cpu" and runtime.interpreter_enabled())):
                raise RuntimeError(
                    f"{name}: fused=True needs CUDA params (or TRITON_INTERPRET=1 to run the kernels on CPU), "
                    f"got a param on {p.device}")
            if p.device.type == "cpu" and interpreter_problem:
                raise RuntimeError(f"{name}: fused=True on CPU params: {interpreter_problem}")

    def _use_kernel(self, group, params) -> bool:
        fused = group.get("fused")
        if fused is False:
            return False
        if fused:
            return True
        return self._has_kernel() and runtime.available() and all(p.is_cuda for p in params)

    def _grads_of(self, group):
        """The group's params that have a grad, checked (nothing is changed before every group passes)."""
        name = type(self).__name__
        params = group["params"]
        grads = list(map(GRAD, params))
        if not all(map(operator.is_not, grads, repeat(None))):  # whole-list checks: per-tensor Python is host cost
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        sparse = list(map(IS_SPARSE, grads))
        if self.dense_only and any(sparse):
            raise RuntimeError(f"{name} does not support sparse gradients")
        if self.sparse_only and not all(sparse):
            raise RuntimeError(f"{name} supports only sparse gradients (e.g. nn.Embedding(sparse=True))")
        # torch keeps a grad on its param's device; a param whose .data moved keeps its old grad (one look at all)
        if params and set(map(torch.Tensor.get_device, grads)) != {params[0].get_device()}:
            for p, g in zip(params, grads):
                if g.device != p.device:
                    raise RuntimeError(f"{name}: grad on {g.device} for a param on {p.device}")
        return params, grads

    # step() runs eagerly: under torch.compile, dynamo does not trace into it (the kernels are launched as they
    # are), so a compiled model's graphs stay whole and a compiled function calling step() breaks only there.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None):
        # torch.amp.GradScaler hands these over as attributes (its contract for _step_supports_amp_scaling)
        grad_scale = getattr(self, "grad_scale", None) if grad_scale is None else grad_scale
        found_inf = getattr(self, "found_inf", None) if found_inf is None else found_inf
        loss = self._closure_loss(closure)
        work = [(group, *self._grads_of(group)) for group in self.param_groups]  # validate everything first
        self._check_shards(work)
        if grad_scale is not None or self.max_grad_norm is not None:  # the step writes the unscaled grads
            work = [(group, params, writable_grads(params, grads)) for group, params, grads in work]
        grad_scale, skip = self._clip_grads(work, grad_scale, found_inf)
        if skip:
            return loss
        for group, params, grads in work:
            if params:
                self._step_group(group, params, grads, grad_scale, found_inf)
        return loss

    def _closure_loss(self, closure):
        """The closure's loss (grad enabled), or None; a missing closure where one is needed is an error."""
        if closure is None and self.requires_closure:
            raise RuntimeError(f"{type(self).__name__}.step() requires a closure that re-evaluates the loss")
        with torch.enable_grad():
            return None if closure is None else closure()

    def _kernel_path(self, group, params) -> bool:
        """Whether this group's step runs the fused kernels."""
        return self._use_kernel(group, params) and (
            self.precision_in_kernel or not self._low_precision_options(params)) and (
            self.float64_in_kernel or _FLOAT64.isdisjoint(map(_DTYPE, params))) and (
            self.sharded_kernel or self.elementwise or not any_dtensor(params)) and self._codes_fit(params)

    def _state_of(self, p, group) -> dict:
        st = self.state[p]
        if not st:
            st.update(self._init_state(p, group))
            self._lean_state(st, p)  # the element-wise states' dtypes, the remainder
            if self.master_weights and p.dtype in LOW_PRECISION:
                st["master_param"] = p.detach().float().clone()
        return st

    def _states_of(self, group, params) -> list:
        """The state dicts of ``params`` (made on first use), cached per group while ``self.state`` is the same dict
        of the same size and the params the same objects (hashing every param is a large per-tensor host cost)."""
        ids = tuple(map(id, params))
        cached = self._state_lists.get(id(group))
        if cached is not None and cached[0] is self.state and cached[1] == len(self.state) and cached[2] == ids:
            return cached[3]
        states = list(map(self.state.__getitem__, params))
        if not all(states):  # new params: their state is made on first use
            states = [self._state_of(p, group) for p in params]
        self._state_lists[id(group)] = (self.state, len(self.state), ids, states)
        return states

    def _step_group(self, group, params, grads, grad_scale, found_inf):
        states = self._states_of(group, params)
        dtensors = any_dtensor(params)
        # reductions over DTensor shards: local statistics, combined by self._full_sums
        self._shards = layout(params) if dtensors and not self.elementwise else None
        if self._kernel_path(group, params):
            self._kernel_step(group, params, grads, states, grad_scale, found_inf)
            return
        if not dtensors:
            self._reference_path(group, params, grads, states, grad_scale, found_inf)
            return
        self._reference_on_shards(group, params, grads, states, grad_scale, found_inf)

    def _reference_path(self, group, params, grads, states, grad_scale, found_inf):
        low = self._low_precision_options(params)
        if found_inf is not None and found_inf.item() != 0:
            return  # AMP overflow: skip, advance nothing (like torch's fused optimizers)
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale.to(grads[0].device))  # p.grad holds unscaled grads afterwards
        if low:
            self._reference_low_precision(group, params, grads, states)
        elif not any(p.is_complex() for p in params):
            self._reference(group, params, grads, states)
            return
        # complex params are updated as real views (like torch); states are passed as real views too, and any
        # entry a reference replaces (rather than mutates in place) is written back
        else:
            real_states = [{k: as_real(v) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                            for k, v in st.items()} for p, st in zip(params, states)]
            self._run_reference(group, [as_real(p) for p in params], [as_real(g) for g in grads], states,
                                real_states)

    def _run_reference(self, group, params, grads, states, work_states):
        """Run the reference on substitute tensors (real views, fp32 copies) and write back into ``states`` every
        entry the reference replaced rather than mutated in place."""
        before = [dict(ws) for ws in work_states]
        self._reference(group, params, grads, work_states)
        keep_replaced(states, work_states, before)

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf, variant=None):
        rule, keys, skeys = self._kernel_rule(group, variant)
        scalars_on_device(states, skeys, params[0].device)
        self._prepare(group, params, grads, states)
        params, grads, columns, masters, back = self._kernel_tensors_with_masters(params, grads, states, keys,
                                                                                  grad_scale)
        lr = group.get("lr")
        # a table hit is verified against every address, so a recycled id() can never reuse a stale table
        cache = self._kernel_caches.setdefault((id(group), variant), TableCache())
        mt.apply(rule, cache, params, grads, columns, [list(map(operator.itemgetter(k), states)) for k in skeys],
                 lr_tensor=lr if isinstance(lr, torch.Tensor) else None,
                 grad_scale=grad_scale, found_inf=found_inf, **self._precision_args(masters),
                 **self._quant_args(states, keys), shards=self._shards)
        self._write_back(back)
