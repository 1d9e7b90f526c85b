"""The options beyond the anchors that every optimizer takes keyword-only: ``master_weights``,
``stochastic_rounding`` and ``max_grad_norm`` (global grad-norm clipping). They are optimizer attributes, not
param-group keys, so checkpoints keep the anchor's group layout."""
from __future__ import annotations

import functools
import inspect
import math

import torch

from . import _sharded as sharded
from ._tensors import LOW_PRECISION, as_real, check, local, stochastic_round_bf16
from .kernels import reduce


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
            options = {n: kw.pop(n) for n in ("master_weights", "stochastic_rounding", "max_grad_norm")
                       if n not in own and n in kw}
            if options.get("master_weights") is not None:  # None: keep what an outer constructor already set
                self.master_weights = bool(options["master_weights"])
            if options.get("stochastic_rounding") is not None:
                self.stochastic_rounding = bool(options["stochastic_rounding"])
            if options.get("max_grad_norm") is not None:
                self.max_grad_norm = options["max_grad_norm"]
            init(self, *args, **kw)

        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default)
                 for n, default in (("master_weights", False), ("stochastic_rounding", False),
                                    ("max_grad_norm", None)) if n not in sig.parameters]
        __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
        cls.__init__ = __init__

    def _check_precision_options(self) -> None:
        """The constructor's checks of the options (before any state exists)."""
        if (self.master_weights or self.stochastic_rounding) and not self.supports_precision_options:
            raise ValueError(f"{type(self).__name__} does not support master_weights / stochastic_rounding")
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

    def _low_precision_options(self, params) -> bool:
        """master_weights / stochastic_rounding apply to some param of this list."""
        return (self.master_weights or self.stochastic_rounding) and any(p.dtype in LOW_PRECISION for p in params)

    def _reference_low_precision(self, group, params, grads, states):
        """master_weights / stochastic_rounding on the reference path: fp32 math on the master copy (or an fp32
        copy of the param), low-precision states rounded to nearest, the param rounded to nearest or
        stochastically. The fused path does the same in one pass."""
        work_p = [st["master_param"] if "master_param" in st else p.float() for p, st in zip(params, states)]
        work_st = [{k: v.float() if isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION else v
                    for k, v in st.items() if k != "master_param"} for st in states]
        self._reference(group, work_p, [g.float() for g in grads], work_st)
        for p, wp, st, ws in zip(params, work_p, states, work_st):
            for k, v in ws.items():
                if isinstance(st[k], torch.Tensor) and st[k].dtype in LOW_PRECISION:
                    st[k].copy_(v)  # low-precision state: round to nearest
                elif st[k] is not v:
                    st[k] = v
            if p.dtype == torch.bfloat16 and self.stochastic_rounding:
                p.copy_(stochastic_round_bf16(wp))
            elif wp is not p:
                p.copy_(wp)

    def _precision_args(self, masters) -> dict:
        """mt.apply's master_weights / stochastic_rounding arguments for a launch that writes the params (masters:
        the master copies the kernels see, or None)."""
        return dict(masters=masters, stochastic_rounding=self.stochastic_rounding, who=type(self).__name__,
                    # host RNG (torch.manual_seed makes it reproducible); no device sync
                    seed=int(torch.randint(0, 2**31 - 1, ())) if self.stochastic_rounding else 0)
