"""Blockwise 8-bit optimizer states (state_dtype="int8"): the numerics in one place, the reference half (torch)
beside the kernel half (Triton), bit-identical codes and scales.

* A state of n elements is cut into blocks of QBLOCK = 256 consecutive elements in storage order (the order the
  kernels walk). Each block keeps its fp32 absmax (``<key>_absmax``, [ceil(n / 256)]) and one uint8 code per
  element: the index of a value in a 256-entry map on [-1, 1] (signed states) or [0, 1] (non-negative states:
  second moments, accumulators, declared per optimizer by ``nonnegative_states``). Element = map[code] * absmax.
* The maps are dynamic-exponent maps (the idea behind bitsandbytes' 8-bit optimizers): decade k below 1 holds
  2^k linearly spaced values (midpoints of its 2^k equal intervals of [0.1, 1] * 10^-d), so every value keeps a
  relative precision that depends on its decade, not on the block's range: 7 decades (1e-7 .. 1) with 1..64
  values each, and +-1, for signed states (128 positive, 127 negative values, and 0); 8 decades with 1..64 and 127
  values, and 1, for non-negative ones (255 values and 0). Both hold 0 exactly (an all-zero block has absmax 0 and
  decodes to 0) and +-1, so each block's absmax element decodes exactly.
* Quantize: x = v / absmax (IEEE fp32 division; 0 where absmax is 0), code = the number of decision thresholds
  below x, the thresholds being the fp32 midpoints of adjacent map values (a tie, x equal to a threshold, takes
  the lower code). The kernel finds it by an 8-step binary search over the thresholds (gathers from a 2 KB device
  table, ``code_maps``); the reference by torch.searchsorted over the same fp32 thresholds.
* The absmax of a block is taken in registers: a kernel block of BLOCK lanes (a multiple of 256) is reshaped to
  [BLOCK / 256, 256], so a 256-block never straddles two programs or iterations.
* The scales have one row per row of a contiguous tensor whose rows are whole blocks ([rows, row / 256]), else
  they are one flat run. FSDP2 (DTensor dim-0 shards): the codes are a DTensor like the param, the scales a
  DTensor of the local shard's blocks, which are the full tensor's blocks of that shard when each shard starts on
  a block boundary (always with rows of whole blocks; a flat run needs shards of whole blocks split as
  torch.chunk splits the scales: ``shard_problem``). So the kernels and the reference walk the local shard as they
  walk a whole tensor, the codes and scales are one process's, and DCP reshards both by the same rows.
"""
from __future__ import annotations

import torch

from . import runtime

INT8 = "int8"
QBLOCK = 256
CODE_DTYPE = torch.uint8
SUFFIX = "_absmax"  # the state key of a quantized state's block scales
MIN_NUMEL = 4096    # default int8_min_numel: smaller tensors keep fp32 states
MAP_WIDTH = 512     # code_maps rows: 256 values, then 255 thresholds (+1 pad) per map


def _magnitudes(counts) -> torch.Tensor:
    """Decade k (of len(counts), the last ending at 1) holds counts[k] midpoints of equal intervals; then 1."""
    top = len(counts) - 1
    parts = []
    for k, n in enumerate(counts):
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        parts.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - top))
    return torch.cat([*parts, torch.ones(1, dtype=torch.float64)])


_POS = _magnitudes([1, 2, 4, 8, 16, 32, 64])                             # 128 values in (0, 1]
SIGNED_MAP = torch.cat([-_POS[1:].flip(0), torch.zeros(1, dtype=torch.float64), _POS]).float()
UNSIGNED_MAP = torch.cat([torch.zeros(1, dtype=torch.float64),
                          _magnitudes([1, 2, 4, 8, 16, 32, 64, 127])]).float()
assert SIGNED_MAP.numel() == UNSIGNED_MAP.numel() == 256
assert bool((SIGNED_MAP.diff() > 0).all()) and bool((UNSIGNED_MAP.diff() > 0).all())


def thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 decision thresholds of a map: fp32 midpoints of adjacent values."""
    return ((qmap[:-1].double() + qmap[1:].double()) / 2).float()


def map_of(unsigned: bool) -> torch.Tensor:
    return UNSIGNED_MAP if unsigned else SIGNED_MAP


_TABLE = torch.stack([torch.cat([m, thresholds(m), torch.full((1,), float("inf"))])
                      for m in (SIGNED_MAP, UNSIGNED_MAP)])


_DEVICE_TABLES: dict = {}


def code_maps(device) -> torch.Tensor:
    """The kernels' table: fp32 [2, MAP_WIDTH], row 0 the signed map, row 1 the unsigned one; one copy per device,
    uploaded once and kept (a launch may pass its address without holding the tensor)."""
    device = torch.device(device)
    if device not in _DEVICE_TABLES:
        _DEVICE_TABLES[device] = _TABLE.to(device)
    return _DEVICE_TABLES[device]


def unsigned_slots(keys, nonnegative) -> int:
    """The bits of the state slots (in ``keys`` order) that hold non-negative states (the unsigned map's)."""
    return sum(1 << i for i, k in enumerate(keys) if k in nonnegative)


def quant_bits(unsigned: int) -> int:
    """A launch's QUANT constexpr with int8 states: bit 0 on, bit 1 + K for each unsigned slot K (``unsigned``:
    unsigned_slots' bits)."""
    return 1 + 2 * unsigned


def n_blocks(n: int) -> int:
    return -(-n // QBLOCK)


def storage_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in storage order (the order the kernels walk and the blocks follow)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).view(-1)


def quantize(v: torch.Tensor, unsigned: bool):
    """(uint8 codes [n], fp32 absmax [ceil(n / 256)]) of a flat tensor."""
    v = v.float()
    n = v.numel()
    nb = n_blocks(n)
    absmax = torch.nn.functional.pad(v.abs(), (0, nb * QBLOCK - n)).view(nb, QBLOCK).amax(1)
    scale = absmax.repeat_interleave(QBLOCK)[:n]
    x = torch.where(scale > 0, v / scale, torch.zeros((), dtype=v.dtype))
    qmap = map_of(unsigned).to(v.device)
    codes = torch.searchsorted(thresholds(qmap), x)  # thresholds strictly below x: ties take the lower code
    return codes.to(CODE_DTYPE), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """fp32 values of flat codes and their block scales."""
    qmap = map_of(unsigned).to(codes.device)
    return qmap[codes.long()] * absmax.repeat_interleave(QBLOCK)[:codes.numel()]


# ---- a state dict's quantized entries (key holds the codes, key + SUFFIX the scales) ----

def is_scale_key(key) -> bool:
    return isinstance(key, str) and key.endswith(SUFFIX)


def scale_shape(like: torch.Tensor) -> tuple:
    """The shape of the block scales of a state laid out like ``like`` (a DTensor: the full tensor's): one row of
    scales per row of a contiguous tensor whose rows are whole blocks (so FSDP2's dim-0 shards of the state and of
    its scales are the same rows, and a checkpoint reshards), else one flat run of blocks."""
    n = like.numel()
    if like.dim() >= 2 and like.shape[0] and like.is_contiguous() and (n // like.shape[0]) % QBLOCK == 0:
        return (like.shape[0], n // like.shape[0] // QBLOCK)
    return (n_blocks(n),)


def shard_problem(like) -> str | None:
    """Why the blocks of a DTensor state laid out like ``like`` cannot follow the full tensor's (None: they can).
    Each dim-0 shard must start on a block boundary of the full tensor, and its blocks must be the shard of the
    scales that DTensor gives the rank (torch.chunk's split of the scales' dim 0)."""
    from .._tensors import is_dtensor
    if not is_dtensor(like) or not like.placements[0].is_shard():
        return None
    if like.placements[0].dim != 0 or not like.is_contiguous():
        return f"placement {like.placements} (the blocks follow dim 0 of a contiguous tensor)"
    shape, world = scale_shape(like), like.device_mesh.size()
    if len(shape) == 2 or like.numel() == 0:
        return None  # rows of whole blocks: the scales shard by the same rows
    rows = like.shape[0] if like.dim() else 1
    per_rank = -(-rows // world) * (like.numel() // max(rows, 1))  # elements of a full shard
    if per_rank % QBLOCK or -(-shape[0] // world) != per_rank // QBLOCK:
        return (f"its shards over {world} ranks hold {per_rank} elements each, not whole {QBLOCK}-element blocks "
                f"split as its {shape[0]} block scales are")
    return None


def new_scales(like: torch.Tensor) -> torch.Tensor:
    """Zero block scales for a state laid out like ``like``; for a DTensor, a DTensor holding the local shard's
    blocks (shard_problem(like) must be None: they are then the full tensor's blocks of that shard)."""
    from .._tensors import is_dtensor, local
    if not is_dtensor(like):
        return torch.zeros(scale_shape(like), dtype=torch.float32, device=like.device)
    shard, full = local(like), scale_shape(like)
    rows = shard.shape[0] if len(full) == 2 else n_blocks(shard.numel())
    return shard_scales(torch.zeros((rows, *full[1:]), dtype=torch.float32, device=shard.device), like)


def shard_scales(mine: torch.Tensor, like) -> torch.Tensor:
    """The scales of the local shard of the DTensor ``like``'s state as a DTensor placed like it."""
    from torch.distributed.tensor import DTensor
    full = scale_shape(like)
    return DTensor.from_local(mine.view(-1, *full[1:]), like.device_mesh, like.placements, run_check=False,
                              shape=full, stride=(full[1], 1) if len(full) == 2 else (1,))


def _local(t):
    from .._tensors import local
    return local(t)


def store_state(st: dict, key: str, v: torch.Tensor, unsigned: bool, like: torch.Tensor) -> None:
    """st[key] = the codes of v (new, laid out like ``like``), st[key + SUFFIX] = its scales."""
    st[key] = torch.empty_like(like, dtype=CODE_DTYPE)
    st[key + SUFFIX] = new_scales(like)
    requantize_(st, key, v, unsigned)


def requantize_(st: dict, key: str, v: torch.Tensor, unsigned: bool) -> None:
    """The codes and scales of st[key] overwritten in place with v's (v shaped and laid out like the codes; with
    DTensors, the local shards')."""
    codes, v = _local(st[key]), _local(v)
    q, absmax = quantize(storage_flat(torch.empty_like(codes, dtype=v.dtype).copy_(v)), unsigned)
    storage_flat(codes).copy_(q)
    _local(st[key + SUFFIX]).view(-1).copy_(absmax)


def relay_(st: dict, key: str, unsigned: bool, like: torch.Tensor) -> None:
    """Codes in another storage order than ``like`` (a checkpoint saved with other strides): blocks follow the
    storage order, so the values are dequantized in the codes' order and requantized in ``like``'s."""
    store_state(st, key, load_state(st, key, unsigned), unsigned, like)


def scales_of(st: dict, key: str):
    """The block scales of st[key] (the local shard's, with DTensors) if it holds int8 codes (made zero for a buffer
    made as zero codes at its first step: SGD's momentum), else None."""
    v = st[key]
    if v.dtype != CODE_DTYPE:
        return None
    if key + SUFFIX not in st:
        st[key + SUFFIX] = new_scales(v)
    return _local(st[key + SUFFIX])


def load_state(st: dict, key: str, unsigned: bool) -> torch.Tensor:
    """The fp32 values of the quantized st[key], shaped and laid out like its codes (a DTensor like them)."""
    codes = _local(st[key])
    out = torch.empty_like(codes, dtype=torch.float32)
    storage_flat(out).copy_(dequantize(storage_flat(codes), _local(st[key + SUFFIX]).reshape(-1), unsigned))
    if codes is st[key]:
        return out
    from torch.distributed.tensor import DTensor
    full = st[key]
    return DTensor.from_local(out, full.device_mesh, full.placements, run_check=False, shape=full.shape,
                              stride=full.stride())


if runtime.available():
    import triton
    import triton.language as tl

    from .access import load, store, store_bf16_stochastic
    from .lean import load_raw, store_raw

    QB = tl.constexpr(QBLOCK)
    MAP_W = tl.constexpr(MAP_WIDTH)

    @triton.jit
    def _qptrs(qrow, K: tl.constexpr, QUANT: tl.constexpr):
        # qrow: the row's code-map column, then one scale column per state slot; QUANT bit 1 + K: slot K unsigned
        scales = tl.load(qrow + 1 + K).to(tl.pointer_type(tl.float32))
        qmap = tl.load(qrow).to(tl.pointer_type(tl.float32)) + ((QUANT >> (1 + K)) & 1) * MAP_W
        return scales, qmap

    @triton.jit
    def _dequantize(ptr, qrow, K: tl.constexpr, QUANT: tl.constexpr, offs, mask, FULL: tl.constexpr):
        scales, qmap = _qptrs(qrow, K, QUANT)
        codes = load_raw(ptr, offs, mask, FULL).to(tl.int32)
        if FULL:
            s = tl.load(scales + offs // QB)  # the lanes of a block read one address
        else:
            s = tl.load(scales + offs // QB, mask=mask, other=0.0)
        return tl.load(qmap + codes) * s

    @triton.jit
    def _quantize_store(ptr, qrow, K: tl.constexpr, QUANT: tl.constexpr, offs, val, mask, FULL: tl.constexpr):
        scales, qmap = _qptrs(qrow, K, QUANT)
        v = val.to(tl.float32)
        if not FULL:
            v = tl.where(mask, v, 0.0)  # lanes past the end stay out of their block's absmax
        NB: tl.constexpr = offs.shape[0] // QB
        absmax = tl.max(tl.reshape(tl.abs(v), [NB, QB]), axis=1)
        s = tl.reshape(tl.broadcast_to(absmax[:, None], [NB, QB]), [offs.shape[0]])
        x = tl.where(s > 0, tl.div_rn(v, tl.where(s > 0, s, 1.0)), 0.0)
        code = tl.zeros(offs.shape, tl.int32)
        for i in tl.static_range(8):  # binary search: the number of thresholds below x
            step = 128 >> i
            t = tl.load(qmap + QB + code + (step - 1))
            code = tl.where(t < x, code + step, code)
        store_raw(ptr, offs, code.to(tl.uint8), mask, FULL)
        block = tl.max(tl.reshape(offs // QB, [NB, QB]), axis=1)
        if FULL:
            tl.store(scales + block, absmax)
        else:
            live = tl.max(tl.reshape(mask.to(tl.int32), [NB, QB]), axis=1) > 0
            tl.store(scales + block, absmax, mask=live)

    @triton.jit
    def load_slot(ON: tl.constexpr, K: tl.constexpr, ptr, offs, mask, FULL: tl.constexpr, like, qrow,
                  QUANT: tl.constexpr):
        """State slot K of an element block in the compute dtype (zeros if absent; QUANT: dequantized)."""
        if ON:
            if QUANT:
                return _dequantize(ptr, qrow, K, QUANT, offs, mask, FULL).to(like.dtype)
            else:
                return load(ptr, offs, mask, FULL)
        else:
            return tl.zeros_like(like)

    @triton.jit
    def store_slot(ON: tl.constexpr, K: tl.constexpr, ptr, offs, val, mask, FULL: tl.constexpr, SR: tl.constexpr,
                   seed, qrow, QUANT: tl.constexpr):
        """Store state slot K: quantized (QUANT), bf16 stochastically rounded (SR, state_dtype=bf16 with
        stochastic_rounding), or rounded to nearest in its dtype."""
        if ON:
            if QUANT:
                _quantize_store(ptr, qrow, K, QUANT, offs, val, mask, FULL)
            elif SR:
                store_bf16_stochastic(ptr, offs, val, mask, seed, FULL)
            else:
                store(ptr, offs, val, mask, FULL)
