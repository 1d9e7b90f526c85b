"""Muon: momentum, Newton-Schulz orthogonalization of each 2-D update, decoupled weight decay and a shape-dependent
learning rate (anchor: torch.optim.Muon)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .._base import FusedOptimizer
from .._registry import register
from .._tensors import check, zeros_like
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from ..kernels.tables import TableCache
from .common import GRAD_BITS
from .muon_shards import matrix_owners, owned_chain, shape_groups

NS_DTYPE = torch.bfloat16  # torch's Muon orthogonalizes in bf16 whatever the param dtype
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch's defaults: the quintic of Keller Jordan's Muon
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

if runtime.available():
    import triton
    import triton.language as tl

    from .common import lerp

    NESTEROV, MATCH_RMS = mt.flag_bits(2, first=GRAD_BITS)

    @triton.jit
    def _muon_momentum(out, g, buf, s1, s2, s3, c0, c1, c2, c3, lr, momentum, h2, h3, h4, h5, h6, h7,
                       FLAGS: tl.constexpr):
        # the param slot holds the bf16 Newton-Schulz input: the update is written there, the param is not touched
        buf = lerp(buf, g, (1.0 - momentum).to(buf.dtype))
        if FLAGS & NESTEROV:
            out = lerp(g, buf, momentum.to(buf.dtype))
        else:
            out = buf
        return out, buf, s1, s2, s3

    @triton.jit
    def _muon_scalars(rows, cols, t2, t3, lr, momentum, weight_decay, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # the per-tensor scalars are the matrix's dims: torch's adjusted lr, in fp64 as torch's Python math
        if FLAGS & MATCH_RMS:
            ratio = 0.2 * tl.sqrt(tl.maximum(rows, cols))
        else:
            ratio = tl.sqrt(tl.maximum(rows / cols, 1.0))
        return rows, cols, t2, t3, -(lr * ratio), 1.0 - lr * weight_decay, 0.0, 0.0

    @triton.jit
    def _muon_update(p, o, s0, s1, s2, s3, neg_lr, decay, c2, c3, lr, momentum, weight_decay, h3, h4, h5, h6, h7,
                     FLAGS: tl.constexpr):
        # the grad slot holds the orthogonalized update (bf16)
        p = p * decay.to(p.dtype)
        return tl.fma(neg_lr.to(p.dtype), o, p), s0, s1, s2, s3  # torch's add with alpha: fused


def adjusted_ratio(adjust_lr_fn, shape) -> float:
    """torch's lr scale for an [A, B] matrix: sqrt(max(1, A / B)) ("original", the default) or
    0.2 * sqrt(max(A, B)) ("match_rms_adamw")."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def newton_schulz(x, coefficients, steps: int, eps: float, out=None):
    """torch.optim.Muon's orthogonalization of one bf16 matrix [A, B], or of a stack [k, A, B] of same-shape matrices
    in batched matmuls (bmm / baddbmm: one chain for the stack), in torch's op order: a tall matrix is transposed,
    divided by its Frobenius norm (at least eps), then ``steps`` iterations X <- a X + (b G + c G G) X, G = X X^T.
    ``x`` is normalized in place; ``out`` (same shape as x): where the result goes."""
    a, b, c = coefficients
    batched = x.dim() == 3
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) if batched else x.norm()
    x.div_(norm.clamp(min=eps))
    for i in range(steps):
        gram = mm(x, x.mT)
        gram = addmm(gram, gram, gram, beta=b, alpha=c)
        # the last product straight into `out`, unless transposed: a transposed out= rounds differently (CPU)
        x = addmm(x, gram, x, beta=a, out=out if i == steps - 1 and not tall else None)
    if tall:
        x = x.mT
    return x if out is None or x is out else out.copy_(x)


def muon_reference(params, grads, bufs, *, lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
                   adjust_lr_fn, shards=None):
    """The numbers: torch.optim.Muon's step, param by param (lr: a float or a 0-d Tensor, as torch takes it). The
    orthogonalization works on a copy, so a bf16 momentum buffer is never normalized in place (torch 2.13 does
    that when nesterov=False; fixed in torch after pytorch/pytorch#194664). ``shards``: the sharded.Layout of FSDP2
    params given as their local rows (see orthogonalized_shards; the lr scale is the full shape's)."""
    def apply(p, o, shape):
        p.mul_(1 - lr * weight_decay)
        p.add_(o, alpha=-(lr * adjusted_ratio(adjust_lr_fn, shape)))

    ns, updates = (ns_coefficients, ns_steps, eps), []
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - momentum)
        update = (g.lerp(buf, momentum) if nesterov else buf).to(NS_DTYPE, copy=True)
        if shards is None:  # (one bf16 copy alive at a time)
            apply(p, newton_schulz(update, *ns), p.shape)
        else:
            updates.append(update)
    if shards is not None:
        for p, o, shape in zip(params, orthogonalized_shards(updates, shards, ns), shards.shapes):
            apply(p, o, shape)


def orthogonalized_shards(updates, shards, ns) -> list:
    """newton_schulz(*ns) of each bf16 update over FSDP2 dim-0 shards (local rows), per matrix as one process does;
    a sharded matrix on its owner only (owned_chain)."""
    outs, groups = list(updates), shape_groups(shards.shapes, shards.sharded)
    owners = matrix_owners(groups, shards.world)
    per_matrix = lambda stack: torch.stack([newton_schulz(x, *ns) for x in stack])  # noqa: E731
    for (shape, sharded), idx in groups.items():
        local = [updates[i] for i in idx]
        done = owned_chain(shards, torch.stack(local), shape, owners[shape, sharded], per_matrix).unbind() \
            if sharded else [newton_schulz(x, *ns) for x in local]
        for i, o in zip(idx, done):
            outs[i] = o
    return outs


@dataclass
class _Stack:
    """The matrices of one distinct shape: [k, A, B] bf16 views ([k, local rows, B] on FSDP2 shards)."""
    inputs: torch.Tensor   # the updates (the momentum launch writes them)
    results: torch.Tensor  # the chain's results (the update launch reads them)
    whole: tuple | None    # sharded matrices: their full shape [A, B]; None when they are not sharded
    owners: list | None    # sharded matrices: their owner ranks (matrix_owners)


@dataclass
class _Workspace:
    """The fused path's Newton-Schulz buffers of one group, a _Stack per distinct shape; each matrix starts on a
    16-byte boundary so the element-wise launches keep their aligned variant."""
    key: tuple
    stacks: list   # _Stack per distinct shape
    inputs: list   # per param: its matrix of an input stack
    results: list  # per param: its matrix of a result stack
    rows: list     # per param: 0-d fp32 device tensors holding A and B (the update launch's per-tensor scalars)
    cols: list


def _strided_stack(k, rows, cols, device):
    stride = -(-rows * cols // 8) * 8  # 8 bf16 = 16 bytes
    flat = torch.zeros(k * stride, dtype=NS_DTYPE, device=device)
    return flat.as_strided((k, rows, cols), (stride, cols, 1))


def _workspace(key, params, shapes, sharded, world) -> _Workspace:
    """params: what the kernels see (local shards), of the full ``shapes``; sharded: which are dim-0 shards."""
    device = params[0].device
    inputs, results, stacks = [None] * len(params), [None] * len(params), []
    groups = shape_groups(shapes, sharded)
    owners = matrix_owners(groups, world)
    for (shape, shard), idx in groups.items():
        rows, cols = params[idx[0]].shape  # (the local rows: alike for one full shape)
        stack = _Stack(_strided_stack(len(idx), rows, cols, device), _strided_stack(len(idx), rows, cols, device),
                       shape if shard else None, owners.get((shape, shard)))
        stacks.append(stack)
        for j, i in enumerate(idx):
            inputs[i], results[i] = stack.inputs[j], stack.results[j]
    dims = torch.tensor([list(s) for s in shapes], dtype=torch.float32, device=device)
    return _Workspace(key, stacks, inputs, results, list(dims[:, 0]), list(dims[:, 1]))


@register
class Muon(FusedOptimizer):
    """Muon for 2-D params (hidden layers' weight matrices): momentum (optionally Nesterov), Newton-Schulz
    orthogonalization of the update in bf16 (``ns_steps`` quintic iterations with ``ns_coefficients``), decoupled
    weight decay, and the update scaled by ``adjust_lr_fn``'s shape-dependent lr. Anchor: torch.optim.Muon (same
    signature, defaults, state and numbers; it refuses 1-D params, complex params and sparse grads, as torch does).
    Biases, norms and embeddings belong in another optimizer (e.g. AdamW).

    Fused path, per param group and step: 1 launch of the shared element-wise kernel (momentum, Nesterov, AMP
    unscaling, writes each bf16 update into a stack of its shape), then per distinct param shape one batched
    Newton-Schulz chain (a norm, then per iteration 1 bmm + 2 baddbmm over all matrices of that shape; wide or tall
    as torch transposes), then 1 launch of the shared element-wise kernel (decoupled weight decay and the update with
    each matrix's adjusted lr; master weights, stochastic rounding): 2 launches and 1 + 3 * ns_steps batched
    matmul ops per shape, whatever the param count. The matmuls run in bf16 as torch's do: batched and per-matrix
    kernels may sum in another order, so an orthogonalized entry can differ from torch's by a bf16 ulp (tested: 2
    ulps, 2^-7, per chain; over 20 steps the params stay within 2e-4 of the reference's). state_dtype="int8": the
    momentum launch reads and writes the momentum buffer as codes + per-256-block fp32 scales (signed map), the
    reference path dequantizes, runs the fp32 math and requantizes (tested: the same codes over 20 steps); bf16
    states are taken. FSDP2 (DTensor dim-0 shards, both paths): each
    sharded matrix's chain runs on one owner rank (round-robin over the sharded matrices in shape order); per distinct
    sharded shape and step one all_to_all sends each matrix's rows to its owner, the owner runs one process's chain
    on its matrices (batched on the fused path) and one all_to_all sends every rank its rows of each result;
    replicated matrices are orthogonalized on every rank; the lr scale is the full shape's."""
    supports_complex = False
    elementwise = False  # Newton-Schulz needs whole matrices: FSDP2 rows go to an owner rank (owned_chain)
    shardable = True
    kernel_layout = "contiguous"  # the momentum launch writes the Newton-Schulz stacks in the params' logical order
    matrices_only = True  # 2-D params only, as torch's Muon (so not registered as a timm factory twin)
    scalar_keys = ()
    kernel_subvariants = ("momentum", "update")  # the two launches of a step (the AOT inventory compiles both)
    kernel_variants = ({}, {"nesterov": False}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"})  # AOT

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None, *, fused=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        # torch's checks and wording (it checks ns_steps and ns_coefficients only inside its step, after updating
        # the first momentum buffer; here they are checked before anything changes)
        check(0.0 <= group["lr"], f"Learning rate should be >= 0 but is: {group['lr']}")
        check(0.0 <= group["momentum"], f"momentum should be >= 0 but is: {group['momentum']}")
        check(0.0 <= group["weight_decay"], f"weight decay should be >= 0 but is: {group['weight_decay']}")
        check(group["adjust_lr_fn"] in ADJUST_LR_FNS,
              f"Adjust learning rate function {group['adjust_lr_fn']} is not supported")
        self._check_ns(group)
        # torch takes any eps; a negative or NaN one turns a zero update into NaN
        check(0.0 <= group["eps"], f"Invalid epsilon value: {group['eps']}")

    @staticmethod
    def _check_ns(group):
        check(group["ns_steps"] < 100, "Number of steps must be less than 100 for computational efficiency")
        check(len(group["ns_coefficients"]) == 3, "Coefficients must be a tuple of exactly 3 values")

    def _check_params(self, group):
        if any(p.is_complex() for p in group["params"]):  # torch's type and wording (torch raises it in step())
            raise RuntimeError("Muon does not support complex parameters")
        super()._check_params(group)
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")

    def _grads_of(self, group):
        self._check_ns(group)  # a group edited since construction (torch checks these in every step)
        return super()._grads_of(group)

    def _init_state(self, p, group):
        return {"momentum_buffer": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        muon_reference(params, grads, [st["momentum_buffer"] for st in states], lr=group["lr"],
                       weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                       ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
                       adjust_lr_fn=group["adjust_lr_fn"], shards=self._shards)

    def _kernel_rule(self, group, variant=None):
        flags = mt.pack((NESTEROV, group["nesterov"]), (MATCH_RMS, group["adjust_lr_fn"] == "match_rms_adamw"))
        hypers = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
        if variant == "update":
            return mt.Rule(_muon_update, _muon_scalars, flags, hypers), (), ("rows", "cols")
        return mt.Rule(_muon_momentum, None, flags, hypers), ("momentum_buffer",), ()

    @staticmethod
    def aot_launch(variant, dts, amp, master, sr):
        """What a launch of ``variant`` is for a group whose (param, grad, state) dtypes are ``dts`` (AOT inventory):
        the momentum launch writes the bf16 stack in the param slot and unscales the grads, the update launch reads
        the bf16 result in the grad slot, sees only AMP's found_inf and writes the params (master copy, rounding)."""
        if variant == "momentum":
            return (NS_DTYPE, dts[1], dts[2]), amp, False, False
        return (dts[0], NS_DTYPE, dts[0]), ("inf" if amp is True else False), master, sr

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf, variant=None):
        caches, shards = self._kernel_caches, self._shards
        masters = self._masters(states)
        params, grads, (bufs, *masters), back = self._kernel_tensors(params, grads, states, ("momentum_buffer",),
                                                                     grad_scale, extra=[masters] if masters else ())
        shapes = [p.shape for p in params] if shards is None else shards.shapes
        sharded = [False] * len(params) if shards is None else shards.sharded
        key = (params[0].device, *map(operator.attrgetter("shape"), params),
               *(() if shards is None else (*shapes, *sharded)))  # (unsharded: the shapes are the params')
        ws = caches.get((id(group), "workspace"))
        if ws is None or ws.key != key:
            ws = caches[(id(group), "workspace")] = _workspace(key, params, shapes, sharded,
                                                               1 if shards is None else shards.world)
        rule, _, _ = self._kernel_rule(group, "momentum")
        mt.apply(rule, caches.setdefault((id(group), "momentum"), TableCache()), ws.inputs, grads, [bufs], [],
                 grad_scale=grad_scale, found_inf=found_inf, **self._quant_args(states, ("momentum_buffer",)))
        # after an AMP overflow the momentum launch wrote nothing: the chain runs on stale inputs and the update
        # launch skips too (no host sync)
        ns = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        for st in ws.stacks:
            if st.whole is None:
                newton_schulz(st.inputs, *ns, out=st.results)
            else:  # FSDP2: each matrix's chain on its owner, batched over the owned ones
                st.results.copy_(owned_chain(shards, st.inputs, st.whole, st.owners, lambda x: newton_schulz(x, *ns)))
        rule, _, _ = self._kernel_rule(group, "update")
        lr = group["lr"]
        mt.apply(rule, caches.setdefault((id(group), "update"), TableCache()), params, ws.results, [],
                 [ws.rows, ws.cols], lr_tensor=lr if isinstance(lr, torch.Tensor) else None, found_inf=found_inf,
                 **self._precision_args(masters[0] if masters else None))
        self._write_back(back)
