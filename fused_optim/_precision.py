"""The options beyond the anchors that every optimizer takes keyword-only: ``master_weights``,
``stochastic_rounding``, ``max_grad_norm`` (global grad-norm clipping), and the memory-lean ``param_remainders``,
``state_dtype`` and ``int8_min_numel``: optimizer attributes, not group keys (checkpoints keep the anchor's groups)."""
from __future__ import annotations

import functools
import inspect
import math

import torch

from . import _sharded as sharded
from ._tensors import LOW_PRECISION, as_real, check, dense, is_dtensor, local, same_order, stochastic_round_bf16
from .kernels import lean, quant, reduce, runtime

# the keyword options and their defaults, in signature order
_OPTIONS = (("master_weights", False), ("stochastic_rounding", False), ("max_grad_norm", None),
            ("param_remainders", False), ("state_dtype", None), ("int8_min_numel", quant.MIN_NUMEL))
_SWITCHES = {"master_weights", "stochastic_rounding", "param_remainders"}  # stored as bools
STATE_DTYPES = (None, torch.bfloat16, quant.INT8)


class PrecisionOptions:
    """Mixin of FusedOptimizer: the keyword-only options, their checks, clipping, and the reference path's
    low-precision handling."""

    master_weights = False       # bf16/fp16 params get an fp32 master copy (state['master_param']) that the math updates
    stochastic_rounding = False  # bf16 params are written with stochastic rounding (unbiased, keeps small updates)
    precision_in_kernel = True   # the fused path implements the two options above (else they use the reference path)
    supports_precision_options = True  # False: the two options are refused (LBFGS)
    # Global grad-norm clipping, keyword-only on every dense first-order optimizer (an attribute too): the step
    # clips the grads as torch.nn.utils.clip_grad_norm_(params, max_grad_norm) would, on the device, inside the same
    # kernels (see _clip_grads). ``last_grad_norm`` holds the norm before clipping (0-d tensor) after each step.
    max_grad_norm: float | None = None
    supports_max_grad_norm = True  # False: refused (SparseAdam's sparse grads, LBFGS's line search)
    last_grad_norm: torch.Tensor | None = None
    anchor_max_grad_norm = False  # True: max_grad_norm is the anchor's own constructor argument (timm's Lamb)
    # bf16 params + an int16 remainder (state['param_remainder']) = the exact fp32 master (kernels/lean.py): 2 bytes
    param_remainders = False
    # the dtype of every element-wise state buffer (None: the anchor's); see _lean_state
    state_dtype = None
    # state_dtype="int8" (kernels/quant.py): blockwise 8-bit states for tensors of >= int8_min_numel elements
    int8_min_numel = quant.MIN_NUMEL
    nonnegative_states: tuple = ()  # the states never negative: the unsigned code map
    supports_int8 = True  # False: refused (a fused path whose launches carry no block scales)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)
        # an option the anchor itself takes (timm's Lamb: max_grad_norm) stays the constructor's own argument
        own = set(sig.parameters)
        if "max_grad_norm" in own:
            cls.anchor_max_grad_norm = True

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            options = {n: kw.pop(n) for n, _ in _OPTIONS if n not in own and n in kw}
            for n, v in options.items():
                if v is not None:  # None: keep what an outer (subclass) constructor already set
                    setattr(self, n, bool(v) if n in _SWITCHES else v)
            init(self, *args, **kw)

        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default)
                 for n, default in _OPTIONS if n not in sig.parameters]
        __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
        cls.__init__ = __init__

    def _check_precision_options(self) -> None:
        """The constructor's checks of the options (before any state exists)."""
        name = type(self).__name__
        lean_opts = self.param_remainders or self.state_dtype is not None
        if (self.master_weights or self.stochastic_rounding or lean_opts) and not self.supports_precision_options:
            raise ValueError(f"{name} does not support master_weights / stochastic_rounding / param_remainders / "
                             f"state_dtype")
        check(any(self.state_dtype is d or (type(self.state_dtype) is type(d) and self.state_dtype == d)
                  for d in STATE_DTYPES),
              f"{name}: invalid state_dtype {self.state_dtype!r} (expected None, torch.bfloat16 or 'int8')")
        n = self.int8_min_numel
        check(type(n) is int and n >= 0, f"{name}: invalid int8_min_numel {n!r} (expected an int >= 0)")
        if self.state_dtype == quant.INT8:
            check(self.supports_int8, f"{name} does not support state_dtype='int8'")
            check(runtime.BLOCK % quant.QBLOCK == 0, f"{name}: state_dtype='int8' needs the kernels' BLOCK "
                                                     f"({runtime.BLOCK}) to be a multiple of {quant.QBLOCK}")
        check(not (self.param_remainders and self.master_weights),
              f"{name}: param_remainders and master_weights are two ways of keeping an exact fp32 master: pick one")
        if self.max_grad_norm is not None:
            if not self.supports_max_grad_norm:
                raise ValueError(f"{type(self).__name__} does not support max_grad_norm")
            norm = self.max_grad_norm
            check(isinstance(norm, (int, float)) and not isinstance(norm, bool) and 0.0 < norm < math.inf,
                  f"Invalid max_grad_norm value: {norm} (expected a positive finite number)")
            self.max_grad_norm = float(norm)
            if sharded.built_by_zero():
                raise ValueError(f"{type(self).__name__}: max_grad_norm is not supported under "
                                 f"ZeroRedundancyOptimizer: each rank's optimizer holds only its partition of the "
                                 f"params, so its norm would not be the global one; call "
                                 f"torch.nn.utils.clip_grad_norm_ before step() instead")

    def _clip_grads(self, work, grad_scale, found_inf):
        """max_grad_norm: clip the global norm of all grads as torch.nn.utils.clip_grad_norm_ does (eps 1e-6), on
        AMP-unscaled grads. Returns (the grad_scale to step with, whether to skip the step).

        Fused: one reduction launch and one tiny launch turn the grads' norm into an effective scale,
        grad_scale / min(1, max_norm / (norm + 1e-6)), that the kernels apply while they read the grads (and write
        back, as they write back AMP-unscaled grads): no host sync, no extra pass. Reference path: unscale in place,
        then clip_grad_norm_ itself. (bf16/fp16 grads: clip_grad_norm_ rounds each tensor's norm to the grad's
        dtype; the fused norm stays fp32, so the two agree to that rounding.)"""
        if self.max_grad_norm is None:
            return grad_scale, False
        params = [p for _, ps, _ in work for p in ps]
        grads = [g for _, _, gs in work for g in gs]
        if not grads:
            return grad_scale, False
        if len(set(map(torch.Tensor.get_device, grads))) > 1:  # -1 on CPU, the index on CUDA
            raise ValueError(f"{type(self).__name__}: max_grad_norm needs all grads on one device, got "
                             f"{sorted({str(g.device) for g in grads})}")
        # DTensor (FSDP2) grads: per-tensor sums of squares of the local shards, one collective for the full sums
        shards = sharded.layout(params)
        if shards is not None:
            grads = list(map(local, grads))
        if all(self._kernel_path(group, ps) for group, ps, _ in work if ps):
            if any(map(torch.Tensor.is_complex, grads)):
                grads = [as_real(g) for g in grads]
            out = reduce.clip_scale(self._kernel_caches.setdefault("clip", {}), grads, self.max_grad_norm, grad_scale,
                                    full_sums=shards and shards.full_sums)
            self.last_grad_norm = out[0]
            return out[1:], False
        if found_inf is not None and found_inf.item() != 0:
            return None, True
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale.to(grads[0].device))
        if shards is None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:  # clip_grad_norm_'s math on the local shards, with the norm over all of them
            sq = torch.stack(torch._foreach_norm([as_real(g) for g in grads])).float().square()
            self.last_grad_norm = shards.full_sums(sq).sum().sqrt()
            coef = (self.max_grad_norm / (self.last_grad_norm + reduce.CLIP_EPS)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return None, False

    def _check_lean_params(self, group) -> None:
        """param_remainders needs bf16 params, state_dtype real ones (checked as each group is added)."""
        name = type(self).__name__
        if self.param_remainders:
            bad = sorted({str(p.dtype) for p in group["params"] if p.dtype != torch.bfloat16})
            check(not bad, f"{name}: param_remainders holds the low 16 bits of an fp32 master under a bf16 param; "
                           f"got params of dtype {', '.join(bad)}")
        if self.state_dtype is not None:
            check(not any(p.is_complex() for p in group["params"]),
                  f"{name}: state_dtype={self.state_dtype} does not support complex params")

    def _lean_state(self, st: dict, p) -> None:
        """A fresh state dict made lean in place: master_weights / param_remainders give a low-precision param fp32
        states (what the exact master is updated with), then state_dtype sets every element-wise state's dtype
        (floating, shaped like the param; not the per-tensor scalars); the remainder starts at 0."""
        for k, v in list(st.items()):
            if (self.master_weights or self.param_remainders) and isinstance(v, torch.Tensor) and \
                    v.dtype in LOW_PRECISION:
                st[k] = v = v.float()
            if self.state_dtype is not None and self._is_elementwise_state(k, v, p):
                self._set_lean(st, k, v, p)
        if self.param_remainders:
            st["param_remainder"] = torch.zeros_like(p, dtype=lean.REMAINDER_DTYPE)

    def _set_lean(self, st: dict, k: str, v: torch.Tensor, p) -> None:
        """st[k] = the element-wise state v in p's lean dtype (int8: codes, and scales under k + '_absmax')."""
        if self._lean_dtype(p) == quant.CODE_DTYPE:
            quant.store_state(st, k, v, k in self.nonnegative_states, p)
        else:
            st[k] = v.to(self._lean_dtype(p))

    def _fp32_state(self, st: dict, k: str, v):
        """The fp32 values of state k (int8: dequantized), or v itself where it is not a low-precision state."""
        if isinstance(v, torch.Tensor) and v.dtype == quant.CODE_DTYPE and k + quant.SUFFIX in st:
            return quant.load_state(st, k, k in self.nonnegative_states)
        return v.float() if getattr(v, "dtype", None) in LOW_PRECISION else v

    def anchor_state_dict(self) -> dict:
        """``state_dict()`` in the anchor's layout, for torch/timm to load: element-wise states in fp32 (torch casts
        them to its params' dtype on load; int8 ones dequantized, without their scales) and no remainders (the params
        hold the masters rounded). The way back is ``load_state_dict``: an anchor checkpoint loads into lean states
        (rounded to state_dtype or quantized, remainders 0)."""
        sd = self.state_dict()
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}  # state_dict() shares the state dicts
        params = [p for g in self.param_groups for p in g["params"]]
        for i, st in list(sd["state"].items()):
            st.pop("param_remainder", None)
            if self.state_dtype is not None:
                sd["state"][i] = {k: self._fp32_state(st, k, v).float() if self._is_elementwise_state(k, v, params[i])
                                  else v for k, v in st.items() if not quant.is_scale_key(k)}
        return sd

    def _restore_lean_states(self, state_dict) -> None:
        """After Optimizer.load_state_dict (which casts every state to its param's dtype): the master copy back to
        fp32, the remainder to int16, element-wise states to the dtypes _lean_state gives, re-read from the saved
        values. A checkpoint without remainders (torch's, timm's) starts them at 0: the bf16 param is the master."""
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(pid)
                if not saved:
                    continue
                st = self.state[p]
                fresh = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) and k != "step" else v
                         for k, v in saved.items() if k in st}
                if "master_param" in fresh:
                    st["master_param"] = fresh.pop("master_param").float()
                if "param_remainder" in fresh:
                    st["param_remainder"] = fresh.pop("param_remainder").to(lean.REMAINDER_DTYPE)
                elif self.param_remainders:
                    st["param_remainder"] = torch.zeros_like(p, dtype=lean.REMAINDER_DTYPE)
                if self._lean_dtype(p) is not None:
                    for k, v in fresh.items():
                        if quant.is_scale_key(k) or getattr(v, "dtype", None) == quant.CODE_DTYPE:
                            st[k] = v.float() if quant.is_scale_key(k) else v  # as saved (torch cast them)
                            if quant.is_scale_key(k) and not is_dtensor(v) and \
                                    v.numel() == math.prod(quant.scale_shape(p)):  # (a flat run: older layout)
                                st[k] = st[k].reshape(quant.scale_shape(p))
                        elif self._is_elementwise_state(k, v, p):
                            self._set_lean(st, k, v, p)
                    for k in [k for k, v in st.items() if getattr(v, "dtype", None) == quant.CODE_DTYPE]:
                        if not (dense(st[k]) and same_order(st[k], p)):  # the kernels walk one storage order
                            quant.relay_(st, k, k in self.nonnegative_states, p)

    def _new_state_buffer(self, p) -> torch.Tensor:
        """A zero element-wise state made after the first step (SGD's momentum buffer), in _lean_dtype."""
        return torch.zeros_like(p, dtype=self._lean_dtype(p) or p.dtype, memory_format=torch.preserve_format)

    def _lean_dtype(self, p):
        """The dtype of p's element-wise states: state_dtype, else fp32 for a low-precision param with an exact
        master (master_weights / param_remainders), else None (the anchor's)."""
        if self.state_dtype == quant.INT8:
            numel = self._full_numels.get(id(p), p.numel()) if self._full_numels else p.numel()
            return quant.CODE_DTYPE if numel >= self.int8_min_numel else torch.float32
        exact_master = (self.master_weights or self.param_remainders) and p.dtype in LOW_PRECISION
        return self.state_dtype or (torch.float32 if exact_master else None)

    def _is_elementwise_state(self, key, v, p) -> bool:
        return (isinstance(v, torch.Tensor) and (v.is_floating_point() or v.dtype == quant.CODE_DTYPE)
                and v.shape == p.shape and key not in self.scalar_keys and key not in ("step", "master_param")
                and not quant.is_scale_key(key))

    def _low_precision_options(self, params) -> bool:
        """master_weights / stochastic_rounding apply to some param of this list, or the lean options are on."""
        return ((self.master_weights or self.stochastic_rounding) and any(p.dtype in LOW_PRECISION for p in params)
                or self.param_remainders or self.state_dtype is not None)

    def _reference_low_precision(self, group, params, grads, states):
        """master_weights / stochastic_rounding on the reference path: fp32 math on the master copy (or an fp32
        copy of the param), low-precision states rounded to nearest, the param rounded to nearest or
        stochastically; with param_remainders the master is the param joined with its remainder, and split back.
        state_dtype=bf16 states are rounded stochastically under stochastic_rounding; int8 ones dequantized and
        requantized. The fused path does the same in one pass."""
        lean_keys = ("master_param", "param_remainder")
        work_p = [st["master_param"] if "master_param" in st else
                  lean.join_remainder(p, st["param_remainder"]) if "param_remainder" in st else p.float()
                  for p, st in zip(params, states)]
        work_st = [{k: self._fp32_state(st, k, v) for k, v in st.items()
                    if k not in lean_keys and not quant.is_scale_key(k)} for st in states]
        self._reference(group, work_p, [g.float() for g in grads], work_st)
        sr_states = self.stochastic_rounding and self.state_dtype == torch.bfloat16
        for p, wp, st, ws in zip(params, work_p, states, work_st):
            for k, v in ws.items():
                old = st.get(k)
                if isinstance(old, torch.Tensor) and old.dtype == quant.CODE_DTYPE and k + quant.SUFFIX in st:
                    quant.requantize_(st, k, v, k in self.nonnegative_states)
                elif isinstance(old, torch.Tensor) and old.dtype in LOW_PRECISION:
                    # low-precision state: round to nearest (or stochastically for state_dtype=bf16)
                    old.copy_(stochastic_round_bf16(v) if sr_states and self._is_elementwise_state(k, v, p) else v)
                elif old is None and self.state_dtype is not None and self._is_elementwise_state(k, v, p):
                    self._set_lean(st, k, v, p)  # a state the reference made (SGD's first momentum buffer)
                elif old is not v:
                    st[k] = v  # a state the reference replaced
            if "param_remainder" in st:
                hi, lo = lean.split_remainder(wp)
                p.copy_(hi)
                st["param_remainder"].copy_(lo)
            elif p.dtype == torch.bfloat16 and self.stochastic_rounding:
                p.copy_(stochastic_round_bf16(wp))
            elif wp is not p:
                p.copy_(wp)

    def _masters(self, states):
        """The master slot of each param's launch: its fp32 master copy (master_weights), its int16 remainder
        (param_remainders), or None."""
        key = "master_param" if self.master_weights else "param_remainder" if self.param_remainders else None
        return None if key is None else [st.get(key) for st in states]

    def _quant_args(self, states, keys) -> dict:
        """mt.apply's int8 arguments: each state column's block scales (None for fp32 states), the unsigned bits."""
        if self.state_dtype != quant.INT8:
            return {}
        return dict(scales=[[quant.scales_of(st, k) for st in states] for k in keys],
                    unsigned=quant.unsigned_slots(keys, self.nonnegative_states))

    def _precision_args(self, masters) -> dict:
        """mt.apply's master / rounding arguments for a launch that writes the params (masters: the master slots
        the kernels see, or None)."""
        return dict(masters=masters, stochastic_rounding=self.stochastic_rounding, who=type(self).__name__,
                    state_stochastic_rounding=self.stochastic_rounding and self.state_dtype == torch.bfloat16,
                    # host RNG (torch.manual_seed makes it reproducible); no device sync
                    seed=int(torch.randint(0, 2**31 - 1, ())) if self.stochastic_rounding else 0)
