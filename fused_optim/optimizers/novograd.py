"""NovoGrad (the paper's update) and NvNovoGrad (anchor: timm.optim.NvNovoGrad): layer-wise second moments.

Both keep one second moment per param tensor ("layer"): an EMA of the squared L2 norm of its grad, a 0-d state.
The reference and the kernel rule below are shared; the two classes differ only in how a layer's first step is
recognised, in which dtype the 0-d moments live, and in NvNovoGrad's decoupled weight decay options.

Fused path, per param group: one launch of the shared per-tensor sum of squares (kernels/reduce.py: the C++/CUDA
engine where built, else Triton; ||g||^2 of every tensor, deterministic, on the device) and one launch of the shared
multi-tensor apply, whose per-tensor scalar slots carry (step, exp_avg_sq, ||g||^2, max_exp_avg_sq). No host syncs
(timm's NvNovoGrad tests ``exp_avg_sq == 0`` on the host).
"""
from __future__ import annotations

import operator

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_betas, check_nonneg, new_step, scalar, scalars_on_device
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from ..kernels.tables import TableCache
from ..kernels import reduce
from .common import GRAD_BITS, KeptStateDtypes

_LOW = (torch.float16, torch.bfloat16)
_NORM = "||g||^2"  # the scalar slot fed from the reduction pass, not a state

if runtime.available():
    import triton
    import triton.language as tl

    from .common import DECOUPLED, WD, decayed_grad  # no maximize option: MAXIMIZE is never set

    AMSGRAD, CORRECTED, GRAD_AVG, FIRST_IF_ZERO = mt.flag_bits(4, first=GRAD_BITS)
    MOMENT_F64 = mt.SCALAR_F64[1]  # the 0-d moments (slots 1 and 3) are float64

    @triton.jit
    def _in_state(x, F64: tl.constexpr):
        """x as torch's op on a 0-d moment leaves it: rounded to float32 unless the moment is float64. Exact
        emulation: x is the fp64 result of an op on float32 values (double rounding is innocuous for + * sqrt)."""
        if F64:
            return x
        else:
            return x.to(tl.float32).to(tl.float64)

    @triton.jit
    def _novograd_scalars(step, v, norm, vmax, lr, beta1, beta2, eps, wd, max_lr, h6, h7, FLAGS: tl.constexpr):
        # a layer's first step takes ||g||^2 as is (NvNovoGrad: whenever the moment is still 0, as timm does). Op by
        # op in the moments' dtype, as the reference: v * beta2 (beta2 in that dtype), + (1 - beta2) * ||g||^2
        # (computed in the wider of the two), sqrt, + eps
        F64: tl.constexpr = FLAGS & MOMENT_F64
        if FLAGS & FIRST_IF_ZERO:
            first = v == 0.0
        else:
            first = step == 0.0
        v = _in_state(tl.where(first, norm, _in_state(v * _in_state(beta2, F64), F64) + (1.0 - beta2) * norm), F64)
        if FLAGS & AMSGRAD:
            vmax = tl.maximum(vmax, v)
            denom = _in_state(_in_state(tl.sqrt(vmax), F64) + _in_state(eps, F64), F64)
        else:
            denom = _in_state(_in_state(tl.sqrt(v), F64) + _in_state(eps, F64), F64)
        decay = 1.0
        if FLAGS & CORRECTED:
            decay = 1.0 - wd * (lr * lr / max_lr)
        elif FLAGS & DECOUPLED:
            decay = 1.0 - wd * lr
        return step + 1.0, v, norm, vmax, denom, decay, 0.0, 0.0

    @triton.jit
    def _novograd_update(p, g, m, s1, s2, s3, denom, decay, c2, c3, lr, beta1, beta2, eps, wd, max_lr, h6, h7,
                         FLAGS: tl.constexpr):
        p, u = decayed_grad(p, g / denom, decay, wd, FLAGS)  # L2 decay adds to the normalised grad
        if FLAGS & GRAD_AVG:
            u = u * (1.0 - beta1).to(p.dtype)
        m = m * beta1.to(p.dtype) + u
        p = p - lr.to(p.dtype) * m
        return p, m, s1, s2, s3


def layer_second_moment_(v, norm, beta2, first) -> None:
    """v <- ||g||^2 on a layer's first step, else beta2 * v + (1 - beta2) * ||g||^2; in place, no host sync when
    `first` is a tensor. The blend is rounded in v's dtype before the add, as timm's in-place ops do."""
    blended = v.mul(beta2).add_(norm, alpha=1 - beta2)
    if isinstance(first, torch.Tensor):
        v.copy_(torch.where(first, norm, blended))
    else:
        v.copy_(norm if first else blended)


def novograd_reference(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, grad_averaging, amsgrad,
                       first_of, decoupled_scale=None, full_sums=None):
    """Both NovoGrads, tensor by tensor. first_of(state) says whether this is the layer's first step (evaluated
    before the update); decoupled_scale: None for L2 decay inside the moment, else p *= 1 - scale * weight_decay.
    Sharded tensors (local shards): ``full_sums`` turns the shards' stacked ||g||^2 into the full tensors'."""
    norms = [torch.sum(torch.pow(g, 2)) for g in grads]
    if full_sums is not None:
        norms = full_sums(torch.stack(norms)).to(norms[0].dtype).unbind()
    for p, g, st, norm in zip(params, grads, states, norms):
        first = first_of(st)
        st["step"] += 1
        v = st["exp_avg_sq"]
        layer_second_moment_(v, norm, beta2, first)
        if amsgrad:
            vmax = st["max_exp_avg_sq"]
            torch.maximum(vmax, v, out=vmax)
            denom = vmax.sqrt().add_(eps)
        else:
            denom = v.sqrt().add_(eps)
        update = g / denom
        if weight_decay != 0:
            if decoupled_scale is not None:
                p.mul_(1.0 - decoupled_scale * weight_decay)
            else:
                update.add_(p, alpha=weight_decay)
        if grad_averaging:
            update.mul_(1 - beta1)
        st["exp_avg"].mul_(beta1).add_(update)
        p.add_(st["exp_avg"], alpha=-lr)


class _LayerwiseMoments(KeptStateDtypes, FusedOptimizer):
    """What NovoGrad and NvNovoGrad share: validation, reference, kernel rule and the fused step."""

    scalar_keys = ("step", "exp_avg_sq", "max_exp_avg_sq")
    elementwise = False  # per-layer grad norms (over DTensor shards: local sums, one collective)
    shardable = True
    _slots = ("step", "exp_avg_sq", _NORM, "max_exp_avg_sq")  # the apply's per-tensor scalars, in SCALARS' order
    first_if_zero = False  # NvNovoGrad: a layer starts over whenever its moment is 0 (timm); else: at step 1

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"])
        check_betas(group["betas"])

    def _moment_dtype(self, p):
        raise NotImplementedError

    def _init_state(self, p, group):
        zero = lambda: torch.zeros((), dtype=self._moment_dtype(p), device=p.device)  # noqa: E731
        st = {"step": self._new_step(p, group), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
              "exp_avg_sq": zero()}
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = zero()
        return st

    def _kept_dtypes(self, group, p):
        return {k: self._moment_dtype(p) for k in ("exp_avg_sq", "max_exp_avg_sq")}

    def _decoupled_scale(self, group):
        return None

    def _reference(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        first_of = ((lambda st: st["exp_avg_sq"] == 0) if self.first_if_zero
                    else (lambda st: float(st["step"]) == 0))
        novograd_reference(params, grads, states, lr=scalar(group["lr"]), beta1=beta1, beta2=beta2,
                           eps=group["eps"], weight_decay=group["weight_decay"],
                           grad_averaging=group["grad_averaging"], amsgrad=group["amsgrad"], first_of=first_of,
                           decoupled_scale=self._decoupled_scale(group),
                           full_sums=None if self._shards is None else self._full_sums)

    def _kernel_rule(self, group, variant=None):
        beta1, beta2 = group["betas"]
        decoupled, corrected = group.get("decoupled_decay", False), group.get("corrected_weight_decay", False)
        wd = group["weight_decay"] != 0
        flags = mt.pack((AMSGRAD, group["amsgrad"]), (WD, wd), (DECOUPLED, wd and decoupled),
                        (CORRECTED, wd and decoupled and corrected), (GRAD_AVG, group["grad_averaging"]),
                        (FIRST_IF_ZERO, self.first_if_zero))
        rule = mt.Rule(_novograd_update, _novograd_scalars, flags,
                       dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"],
                            max_lr=group.get("max_lr_snapshot", 1.0)))
        skeys = self._slots if group["amsgrad"] else self._slots[:3]
        return rule, ("exp_avg",), skeys

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf, variant=None):
        rule, keys, skeys = self._kernel_rule(group)
        scalars_on_device(states, [k for k in skeys if k != _NORM], params[0].device)
        params, grads, columns, masters, back = self._kernel_tensors_with_masters(params, grads, states, keys,
                                                                                  grad_scale)
        cache = self._kernel_caches.setdefault((id(group), "sumsq"), {})
        # 0-d views of a buffer at a fixed address (the apply's tables stay valid), made once per buffer
        buf = reduce.sumsq(cache, grads, grad_scale, found_inf)
        if self._shards is not None:
            buf.copy_(self._full_sums(buf))  # in place: the apply's tables hold its address
        if cache.get("views", (None,))[0] != buf.data_ptr():
            cache["views"] = (buf.data_ptr(), buf.unbind())
        norms = cache["views"][1]
        lr = group["lr"]
        scalars = [norms if k == _NORM else list(map(operator.itemgetter(k), states)) for k in skeys]
        mt.apply(rule, self._kernel_caches.setdefault((id(group), None), TableCache()), params, grads, columns, scalars,
                 lr_tensor=lr if isinstance(lr, torch.Tensor) else None, grad_scale=grad_scale, found_inf=found_inf,
                 **self._precision_args(masters), **self._quant_args(states, keys))
        self._write_back(back)


@register
class NovoGrad(_LayerwiseMoments):
    """NovoGrad, Ginsburg et al. 2019, "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
    Deep Networks" (arXiv:1905.11286), Algorithm 1, per param tensor l ("layer"), with moments started at zero:

        v_1 = ||g_1||^2,   v_t = beta2 * v_{t-1} + (1 - beta2) * ||g_t||^2            (t > 1)
        v^_t = max(v^_{t-1}, v_t) and v^_t replaces v_t below              (amsgrad=True only)
        m_t = beta1 * m_{t-1} + s * (g_t / (sqrt(v_t) + eps) + weight_decay * w_t),   m_0 = 0,
              s = 1 - beta1 if grad_averaging else 1
        w_{t+1} = w_t - lr * m_t

    So the first step's moment is the paper's m_0 = g / sqrt(v) + d * w (with eps in the denominator); there is no
    bias correction and no separate initialisation pass. ||.|| is the L2 norm over the whole tensor (a complex param
    counts as its real view). The first step is counted per tensor (``step``), so a tensor that first gets a grad
    later starts then. State: ``step`` (float32 0-d, as torch's optimizers), ``exp_avg``, ``exp_avg_sq`` (0-d, in the
    param's dtype; float32 for fp16/bf16 params) and ``max_exp_avg_sq`` with amsgrad.

    Unlike timm's NvNovoGrad, the first step is recognised by the step count (NvNovoGrad: whenever v == 0) and
    v keeps the param's precision (NvNovoGrad: the default dtype). No current library anchors this class (timm
    dropped it); its anchor is the paper: the tests check it against a float64 transcription of the formulas
    above (tests/optimizers/test_novograd.py).

    Fused path: 2 launches per param group and step: the per-tensor sums of squares (C++/CUDA engine; Triton
    where it is not built), then the shared multi-tensor kernel."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0, grad_averaging=False,
                 amsgrad=False, *, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging,
                        amsgrad=amsgrad)
        super().__init__(params, defaults, fused=fused)

    _new_step = staticmethod(new_step)  # torch's step state

    def _moment_dtype(self, p):
        dt = p.dtype.to_real()
        return torch.float32 if dt in _LOW else dt


@register
class NvNovoGrad(_LayerwiseMoments):
    """NvNovoGrad (NVIDIA's NovoGrad from Jasper): Adam-like, with a per-layer (per-tensor) second moment of the
    grad's squared norm and the first moment of the normalised grad. Anchor: timm.optim.NvNovoGrad.

    The same layer-wise moments as NovoGrad, with timm's state layout
    (``step`` a Python int, 0-d moments in the default dtype) and its first-step rule (v == 0). Weight decay is
    added to the normalised grad (the paper) or, with decoupled_decay, applied to the weights as
    p *= 1 - lr * weight_decay (corrected_weight_decay: lr**2 / max_lr instead of lr, max_lr = the constructor's lr).

    The fused path keeps ``step`` as a float32 0-d device tensor (advanced in the kernel, so an AMP-skipped step
    does not count); the reference path keeps timm's int. Fused path: 2 launches per param group and step (the
    per-tensor sums of squares, then the shared multi-tensor kernel)."""

    supports_complex = False  # timm squares complex grads as complex numbers: no real-view equivalent
    first_if_zero = True
    anchor_numbers = {"step": int}

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0, grad_averaging=False,
                 amsgrad=False, decoupled_decay=False, corrected_weight_decay=False, *, fused=None):
        max_lr = scalar(lr) if isinstance(lr, (int, float, torch.Tensor)) else lr
        check(not corrected_weight_decay or (isinstance(max_lr, float) and max_lr > 0),
              f"Invalid lr for corrected weight decay: {lr} (needs the positive peak lr)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging,
                        amsgrad=amsgrad, decoupled_decay=decoupled_decay, corrected_weight_decay=corrected_weight_decay,
                        max_lr_snapshot=max_lr)
        super().__init__(params, defaults, fused=fused)

    @staticmethod
    def _new_step(p, group):
        return 0

    def _moment_dtype(self, p):
        return torch.get_default_dtype()

    def _decoupled_scale(self, group):
        if not group["decoupled_decay"]:
            return None
        lr = scalar(group["lr"])
        return lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
