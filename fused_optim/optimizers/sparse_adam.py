"""SparseAdam: Adam restricted to the rows a sparse (COO) gradient holds (anchor: torch.optim.SparseAdam).

Only the rows present in the coalesced gradient are read or written: moments and params of every other row stay
bit-identical. As in torch, ``step`` is a plain Python int per param, advanced whenever the param has a grad (even an
empty one), so the bias corrections are computed on the host and reach the kernel as one per-tensor step size.

Fused path: ONE launch of kernels/sparse_rows.py per dtype combination updates the coalesced rows of every param of
a group with the element rule ``_sparse_adam_update`` below, master_weights / param_remainders / bf16 states /
stochastic rounding included, and int8 states where a param's rows are whole 256-blocks (embedding dims 256, 512,
768, ...; contiguous): each row's blocks are requantized on their own. A param whose blocks span rows takes the
reference path with int8 states (a block holding rows absent from the grad is requantized whole).
"""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_betas, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import quant, runtime, sparse_rows

if runtime.available():
    import triton
    import triton.language as tl

    (MAXIMIZE,) = mt.flag_bits(1)

    @triton.jit
    def _sparse_adam_update(p, g, m, v, s2, s3, step_size, c1, c2, c3, lr, beta1, beta2, eps, h4, h5, h6, h7,
                            FLAGS: tl.constexpr):
        # torch's order: m += (1 - b1) (g - m); v += (1 - b2) (g^2 - v); p -= step_size * m / (sqrt(v) + eps)
        if FLAGS & MAXIMIZE:
            g = -g
        m = m + (g - m) * (1.0 - beta1).to(p.dtype)
        v = v + (g * g - v) * (1.0 - beta2).to(p.dtype)
        p = p - step_size * (m / (tl.sqrt(v) + eps.to(p.dtype)))
        return p, m, v, s2, s3

def aot_kernels():
    """The rows kernel's specializations for fused_optim.tools.aot: fp32 / bf16 / fp16 / fp64, with and without
    maximize, and with AMP unscaling (an absent grad_scale is passed as the int64 table, hence its pointer type);
    bf16 params with the precision options (an fp32 master + stochastic rounding; a remainder with bf16 states
    rounded stochastically; a remainder with int8 states), and fp32 params with int8 states (the precision options
    sum duplicate rows in fp32: fp32 grad values)."""
    bf16, f32, u8 = torch.bfloat16, torch.float32, quant.CODE_DTYPE
    lean = [((bf16, f32, f32), mt.MASTER_FP32, mt.SR_PARAM, " master sr"),
            ((bf16, f32, bf16), mt.REMAINDER, mt.SR_STATES, " remainders sr-states"),
            ((f32, f32, u8), mt.NO_MASTER, 0, " int8-states"), ((bf16, f32, u8), mt.REMAINDER, 0, " remainders int8")]
    specs = [((dt, dt, dt), mt.NO_MASTER, 0, "") for dt in (torch.float32, bf16, torch.float16, torch.float64)]
    entries = []
    for dts, master, sr, what in specs + lean:
        for maximize in (False, True):
            for amp in (False, True):
                rule = mt.Rule(_sparse_adam_update, flags=mt.pack((MAXIMIZE, maximize)),
                               hypers=dict(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0))  # compile-time only
                cx = sparse_rows.constexprs(rule, dts, amp, master, sr,
                                            quant.unsigned_slots(KEYS, SparseAdam.nonnegative_states))
                sig = {"hypers": "*fp64", "table": "*i64", "work": "*i64", "scale_ptr": "*fp32" if amp else "*i64",
                       "seed": "i32", **{k: "constexpr" for k in cx}}
                name = (f"SparseAdam[rows,maximize={maximize}] {str(dts[0]).replace('torch.', '')}"
                        f"{' amp' if amp else ''}{what}")
                entries.append(dict(name=name, fn=sparse_rows.sparse_rows_kernel, signature=sig, constexprs=cx,
                                    options=runtime.compile_options()))
    return entries


KEYS = ("exp_avg", "exp_avg_sq")  # the rows kernel's state slots


def _step_size(lr, beta1: float, beta2: float, step: int) -> float:
    """torch's step size; a Tensor lr: computed in its dtype, as torch does."""
    return scalar(lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step))


def _linear_rows(grad: torch.Tensor) -> torch.Tensor:
    """Row numbers of a coalesced COO grad in its param viewed as (prod(sparse sizes), prod(dense sizes))."""
    idx = grad._indices()
    if idx.shape[0] == 0:
        return idx.new_zeros(idx.shape[1])
    rows = idx[0]
    for d in range(1, idx.shape[0]):
        rows = rows * grad.shape[d] + idx[d]
    return rows.contiguous()


@register
class SparseAdam(FusedOptimizer):
    """SparseAdam: Adam that reads and writes only the rows a sparse (COO) grad holds (lazy Adam: every other
    row's moments and param stay as they are). Anchor: torch.optim.SparseAdam.

    Needs sparse grads (e.g. nn.Embedding(sparse=True)); a dense grad is an error, and dense params only. As in
    torch, GradScaler unscales its grads itself (``scaler.unscale_``) before a plain ``step()``. Fused path: 1
    launch per param group, step and dtype combination, over the coalesced rows present. max_grad_norm is
    refused (clip_grad_norm_ has no sparse counterpart to match)."""
    nonnegative_states = ("exp_avg_sq",)

    dense_only = False
    sparse_only = True
    supports_max_grad_norm = False  # torch.nn.utils.clip_grad_norm_ has no sparse-grad counterpart to match
    supports_complex = False
    scalar_keys = ()
    kernel_layout = "contiguous"  # its kernel indexes rows
    # like torch: GradScaler unscales sparse grads itself (unscale_) and then calls a plain step()
    _step_supports_amp_scaling = False
    kernel_variants = ()  # the shared multi-tensor kernel is never launched: aot_kernels() lists the rows kernel

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        betas = tuple(scalar(b) for b in betas) if isinstance(betas, (tuple, list)) else betas
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize), fused=fused)

    def _validate(self, group):
        lr, eps = scalar(group["lr"]), group["eps"]
        check(0.0 < lr < math.inf, f"Invalid learning rate: {lr}")
        check(isinstance(eps, (int, float)) and 0.0 < eps < math.inf, f"Invalid epsilon value: {eps}")
        check_betas(group["betas"])

    def _check_params(self, group):
        super()._check_params(group)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("SparseAdam requires dense parameter tensors (got a sparse param)")

    def _init_state(self, p, group):
        return {"step": 0, "exp_avg": zeros_like(p),
                "exp_avg_sq": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p, grad, st in zip(params, grads, states):
            st["step"] += 1  # advanced even for an empty grad, like torch
            g = (-grad if group["maximize"] else grad).coalesce()  # duplicates summed: the update is non-linear
            vals = g._values()
            if vals.numel() == 0:
                continue
            # a leading size-1 dim makes the index tuple non-empty even for sparse_dim == 0
            at = (g._indices().new_zeros(vals.shape[0]), *g._indices())
            m, v, p = st["exp_avg"].unsqueeze(0), st["exp_avg_sq"].unsqueeze(0), p.unsqueeze(0)
            m_old, v_old = m[at], v[at]
            dm = (vals - m_old).mul_(1 - beta1)
            dv = vals.pow(2).sub_(v_old).mul_(1 - beta2)
            m_new, v_new = m_old + dm, v_old + dv
            m.index_put_(at, m_new)
            v.index_put_(at, v_new)
            upd = (m_new / (v_new.sqrt_().add_(eps))) * -_step_size(lr, beta1, beta2, st["step"])
            p.index_put_(at, p[at] + upd)

    def _kernel_rule(self, group, variant=None):
        beta1, beta2 = group["betas"]
        rule = mt.Rule(_sparse_adam_update, flags=mt.pack((MAXIMIZE, group["maximize"])),
                       hypers=dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"]))
        return rule, KEYS, ()

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        if found_inf is not None and found_inf.item() != 0:
            return  # AMP overflow: nothing advances (the host sync is free: coalescing syncs anyway)
        # int8 codes whose blocks span rows: the reference (it requantizes whole blocks of the tensor)
        fit = [sparse_rows.fits(p, st["exp_avg"], g) for p, g, st in zip(params, grads, states)]
        if not all(fit):
            def part(xs, fits):
                return [x for x, f in zip(xs, fit) if f == fits]
            self._reference_path(group, part(params, False), part(grads, False), part(states, False), grad_scale,
                                 None)
            params, grads, states = part(params, True), part(grads, True), part(states, True)
            if not params:
                return
        rule, keys, _ = self._kernel_rule(group)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        originals = params
        # the kernel indexes rows of contiguous tensors: others go through contiguous copies (sparse grads are
        # read as coalesced values, whatever the param's layout)
        params, _, (exp_avgs, exp_avg_sqs), masters, back = self._kernel_tensors_with_masters(params, grads, states,
                                                                                               keys)
        masters = masters or [None] * len(params)
        q = self._quant_args(states, keys)  # int8 states: each slot's block scales (None for fp32 states)
        scales = list(zip(*q["scales"])) if q else [None] * len(params)
        # with the precision options the reference sums duplicate rows in fp32 (it takes fp32 grads): so do we
        fp32_grads = self._low_precision_options(params)
        buckets: dict = {}
        for p, orig, grad, st, m, v, w, sc in zip(params, originals, grads, states, exp_avgs, exp_avg_sqs, masters,
                                                  scales):
            st["step"] += 1
            g = (grad.float() if fp32_grads else grad).coalesce()
            if grad_scale is not None and g is not grad and g.dtype == grad.dtype:
                orig.grad = g  # the kernel unscales the coalesced values in place: make them p.grad
            vals = g._values()
            if vals.numel() == 0:
                continue
            vals = vals.contiguous()
            rows = _linear_rows(g)
            item = (p, m, v, vals, rows, _step_size(lr, beta1, beta2, st["step"]), w,
                    sc if m.dtype == quant.CODE_DTYPE else None)
            buckets.setdefault(sparse_rows.bucket_key(p, m, vals, w), []).append(item)
        precision = self._precision_args(masters)
        for key, items in buckets.items():
            sparse_rows.launch_rows(rule, key, items, grad_scale, seed=precision["seed"],
                                    stochastic_rounding=precision["stochastic_rounding"],
                                    state_stochastic_rounding=precision["state_stochastic_rounding"],
                                    unsigned=q.get("unsigned", 0))
        self._write_back(back)
