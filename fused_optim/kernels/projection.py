"""SGDP / AdamP's kernel family, host side: the tables (laid out as kernels/projection_passes.py reads them), the
launcher (the C++ engine's projection statistics, then the passes) and the AOT entries. The notes named here are in
fused_optim/kernels/README.md, "Projection (SGDP, AdamP)"."""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import quant, reduce, runtime, sync
from . import multi_tensor as mt
from .projection_passes import APPLY, CAUTION_STATS, HYPERS, STATS
from .projection_rows import C_W, CHANNEL, E_GRAD, K_W, LAYER, NONE, S_W, T_W
from .tables import Tables, TableCache, buckets, dtype_of, pick, ptr, to_device

if runtime.available():
    from .projection_passes import projection_kernel
    from .projection_rows import CAUTION, DECAY, NESTEROV, SHARDED

__all__ = ["NONE", "CHANNEL", "LAYER", "Spec", "ProjectionTables", "projectable", "step", "aot_kernels"]
ENGINE_DTYPES = {torch.float32, torch.bfloat16, torch.float16}  # what the C++ engine reads


@dataclass
class Spec:
    """What an optimizer of the family hands the kernel for one param group."""
    direction: object  # jit (g, s0, s1, bc2_sqrt, eps, h1, h2, nesterov) -> (d, s0, s1): this step's direction
    coefs: object      # jit (step, lr, eps, h1, h2) -> (new step, -step size, sqrt(bias correction 2)), in fp64
    state_keys: tuple  # the element-wise states s0 (, s1) the direction reads and writes
    adam: bool         # Adam's direction and a per-tensor step (else SGD's momentum): the C++ engine's choice too
    lr: float
    eps: float
    delta: float
    wd_ratio: float
    wd: float          # the weight decay the apply pass multiplies by lr (and by wd_ratio where projected)
    h: tuple           # the direction's two hyper-parameters (h1, h2)
    nesterov: bool
    caution: bool
    decay: bool


class EngineInputs(NamedTuple):
    """What the C++ engine's launch takes besides the grads and the hyper-parameters (fixed with the tables)."""
    backend: str
    dims: list
    params: list
    cd: tuple      # the states the engine recomputes the direction from: (first, last)
    steps: list | None
    out: tuple     # per-tensor totals (unused), the engine's rows of rowstat, global totals (unused)
    index: list | None  # the bucket index of each engine tensor (None: all of them, in order)


@dataclass
class ProjectionTables(Tables):
    """One dtype bucket's tables, in the bucket's tensor order (Note [projection rows])."""
    info: torch.Tensor      # [T, I_W] int64
    work: torch.Tensor      # [items, W_W] int32
    sptrs: torch.Tensor     # [T] int64: the step tensors (AdamP)
    counters: torch.Tensor  # [T] int32: Note [last program of a tensor]
    rowstat: torch.Tensor   # [rows, S_W]
    rowcoef: torch.Tensor   # [rows, C_W]
    rowcaut: torch.Tensor   # [rows, K_W]
    tmode: torch.Tensor     # [T] NONE / CHANNEL / LAYER, by mode slot
    tscale: torch.Tensor    # [T] the cautious mask's scale
    tpart: torch.Tensor     # [T, T_W] fp64: per-tensor sums over the local rows (DTensor shards)
    ttot: torch.Tensor      # [T, T_W] fp64: the same over the full tensors (Layout.full_sums of tpart)
    barrier: sync.GridBarrier
    fdummy: torch.Tensor    # stands for an absent grad_scale / found_inf
    rb: int
    bc: int
    slots: list             # the bucket index of each mode slot: the projectable tensors first, in bucket order
    engine: EngineInputs | None = None  # None: nothing projectable
    shards: object = None   # DTensor shards: the bucket's sharded.Layout (kept: its masks are made once)
    idx: object = ()        # this step's group param index of each bucket tensor
    dts: tuple = ()
    qmap: torch.Tensor | None = None  # int8 states: the code maps the address rows point to

    @property
    def order(self) -> tuple:
        """The group's param index of each tmode entry."""
        return tuple(self.idx[i] for i in self.slots)


def projectable(shape) -> bool:
    return len(shape) > 1 and math.prod(shape) > 0


def tile_shape(shapes) -> tuple[int, int]:
    """(RB, BC): BC covers the longest projected row (capped, longer rows loop), RB rows fill runtime.BLOCK lanes."""
    longest = max((s.numel() // s[0] for s in shapes if len(s) > 1 and s.numel() > 0), default=1)
    bc = min(1 << (longest - 1).bit_length(), max(runtime.BLOCK // 8, 16))
    return max(runtime.BLOCK // bc, 1), bc


def _build(key, params, grads, states, steps, device, shards, extra) -> ProjectionTables:
    """The tables of one bucket (rows laid out as the I_*, W_* and E_* columns name them, then each param's
    ``extra`` addresses: its master slot, int8 code maps and scales). ``shards``: the bucket's sharded.Layout (its
    full shapes: a local shard may be empty), None without shards (then the C++ engine's inputs too)."""
    from .. import csrc

    shapes = None if shards is None else shards.shapes
    rb, bc = tile_shape([torch.Size(s) for s in shapes or [p.shape for p in params]])
    proj = [projectable(s) for s in shapes or [p.shape for p in params]]
    slots = [i for i, f in enumerate(proj) if f] + [i for i, f in enumerate(proj) if not f]
    info, work, rows = [None] * len(params), [], 0
    for s, i in enumerate(slots):  # row buffers and modes in slot order: the engine's tensors first
        n = params[i].numel()
        # projected tensors: one row per output channel (an empty shard: one empty row); the others only need
        # whole-tensor sums: rows of BC
        r, c = (max(params[i].shape[0], 1), math.prod(params[i].shape[1:])) if proj[i] else (max(-(-n // bc), 1), bc)
        info[i] = [n, r, c, rows, int(proj[i]), s]
        rows += r
    for i, (n, r, *_) in enumerate(info):
        work.extend((i, b) for b in range(-(-r // rb)))

    def zeros(*size, dtype=torch.float32):
        return torch.zeros(size, dtype=dtype, device=device)

    tab = ProjectionTables(
        key=key, gkey=tuple(map(ptr, grads)), aligned=False, grad_col=int(E_GRAD),
        ptrs=to_device([[p.data_ptr(), g.data_ptr(), *map(ptr, st), *ex]
                        for p, g, st, ex in zip(params, grads, states, extra)], torch.int64, device),
        info=to_device(info, torch.int64, device), work=to_device(work, torch.int32, device),
        sptrs=to_device(list(map(ptr, steps)) or [0] * len(params), torch.int64, device),
        counters=zeros(len(params), dtype=torch.int32), rowstat=zeros(rows, int(S_W)),
        rowcoef=zeros(rows, int(C_W)), rowcaut=zeros(rows, int(K_W)), tmode=zeros(len(params)),
        tscale=zeros(len(params)), shards=shards, tpart=zeros(len(params), int(T_W), dtype=torch.float64),
        ttot=zeros(len(params), int(T_W), dtype=torch.float64), barrier=sync.GridBarrier(device), fdummy=zeros(1), rb=rb, bc=bc, slots=slots)
    n_proj = sum(proj)
    if n_proj and shapes is None:
        eng = slots[:n_proj]
        ps = [params[i] for i in eng]
        tab.engine = EngineInputs(
            csrc.engine_backend(device), csrc.projection_dims(ps), ps,
            ([states[i][0] for i in eng], [states[i][-1] for i in eng]), [steps[i] for i in eng] if steps else None,
            (zeros(n_proj * int(S_W)), tab.rowstat[:sum(info[i][1] for i in eng)].view(-1), zeros(int(S_W))),
            None if n_proj == len(params) else eng)
    return tab


def _engine_stats(spec: Spec, tab: ProjectionTables, grads, grad_scale) -> None:
    """Launch 1 on the C++ engine instead of pass 0: the same statistics and decision into the same buffers.
    csrc.launch directly with the inputs the tables keep (csrc.projection_stats is this launch plus input checks)."""
    from .. import csrc

    e = tab.engine
    proj = csrc.projection_args(spec.adam, spec.nesterov, *spec.h, spec.h, spec.delta, tab.rowcoef, tab.tmode)
    csrc.launch(csrc.KIND_PROJ, e.backend, grads if e.index is None else [grads[i] for i in e.index], e.params, e.dims,
                spec.eps, scale=grad_scale, out=e.out, cd=e.cd, steps=e.steps, proj=proj, plan_key=(tab.key, tab.dts))


def launches(caution: bool, stats: bool) -> list:
    """The passes of each Triton launch of a step (Note [projection passes])."""
    return ([[STATS]] if stats else []) + [[CAUTION_STATS, APPLY] if caution else [APPLY]]


def sharded_phases(caution: bool, stats: bool) -> list:
    """The passes of a step over DTensor shards, one launch each, the host's combine after each but the last
    (Note [projection shards])."""
    return [p for ps in launches(caution, stats) for p in ps]


def constexprs(spec: Spec, passes, dts, *, rb: int, bc: int, has_scale: bool, has_inf: bool,
               sharded: bool = False, master: int = mt.NO_MASTER, sr: int = 0, quant_bits: int = 0) -> dict:
    flags = mt.pack((NESTEROV, spec.nesterov), (CAUTION, spec.caution), (DECAY, spec.decay), (SHARDED, sharded))
    return dict(DIRECTION=spec.direction, COEFS=spec.coefs, FLAGS=flags, PASSES=sum(1 << p for p in passes),
                NS=len(spec.state_keys), HAS_STEP=spec.adam, MASTER=master, SR=sr, QUANT=quant_bits,
                P_DT=runtime.tl_dtype(dts[0]),
                G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]), HAS_SCALE=has_scale, HAS_INF=has_inf,
                RB=rb, BC=bc, FB=256)


def step(spec: Spec, cache: TableCache, params, grads, states, steps, grad_scale, found_inf, shards=None, *,
         who: str = "fused_optim", masters=None, stochastic_rounding=False, seed=0, state_stochastic_rounding=False,
         scales=None, unsigned=0) -> None:
    """One fused step of a param group. ``states``: each param's element-wise states (spec.state_keys);
    ``steps``: their step tensors (spec.adam); ``shards``: the group's sharded.Layout when its params are DTensor
    shards (local tensors here), else None. The lean options as mt.apply takes them: ``masters`` (fp32 master
    copies or int16 remainders, or None), ``stochastic_rounding`` / ``state_stochastic_rounding`` from ``seed``,
    ``scales`` (int8 states: per state column, each param's block scales) and ``unsigned`` (bit k: state k)."""
    masters = [None] * len(params) if masters is None else masters
    keys = list(zip(map(dtype_of, params), map(dtype_of, grads), map(dtype_of, map(operator.itemgetter(0), states)),
                    map(mt.master_kind, masters)))
    for (*dts, master), idx in buckets(keys).items():
        dts = tuple(dts)
        ps, gs, sts, ms = pick(idx, params, grads, states, masters)
        scs = pick(idx, steps)[0] if steps else []
        qbits = quant.quant_bits(unsigned) if dts[2] == quant.CODE_DTYPE else 0
        qs = list(zip(*pick(idx, *scales))) if qbits else [()] * len(ps)  # each param's scales, by state
        key = (tuple(map(ptr, ps)), tuple(map(ptr, itertools.chain.from_iterable(sts))), tuple(map(ptr, scs)),
               tuple(map(torch.Tensor.size, ps)), tuple(m.data_ptr() for m in ms if m is not None),
               tuple(map(ptr, itertools.chain.from_iterable(qs))))

        def build():
            qmap = quant.code_maps(ps[0].device) if qbits else None
            extra = [[*map(ptr, [m] if master else []), *map(ptr, [qmap, *q] if qbits else [])]
                     for m, q in zip(ms, qs)]
            tab = _build(key, ps, gs, sts, scs, ps[0].device, None if shards is None else shards.pick(idx), extra)
            tab.qmap = qmap
            return tab

        tab = cache.lookup((dts, master), key, gs, build)
        tab.idx, tab.dts, sub = idx, dts, tab.shards
        if qbits and tab.rb * tab.bc % quant.QBLOCK:
            raise RuntimeError(f"{who}: state_dtype='int8' needs the tile ({tab.rb} x {tab.bc}) to hold whole "
                               f"{quant.QBLOCK}-element blocks")
        # the C++ engine reads fp32 / bf16 / fp16 tensors: not int8 codes, nor a master split into param + remainder;
        # with either master, Triton's statistics pass reads it (so the two give the same masters bit for bit)
        engine = (tab.engine is not None and set(dts) <= ENGINE_DTYPES and master == mt.NO_MASTER
                  and reduce.use_csrc(ps[0].device))
        if engine:
            _engine_stats(spec, tab, gs, grad_scale)
        sr = mt.sr_bits(dts[0], dts[2], master, stochastic_rounding, state_stochastic_rounding)
        n_items = tab.work.shape[0]
        args = (tab.ptrs, tab.info, tab.work, tab.sptrs, tab.counters, tab.rowstat, tab.rowcoef, tab.rowcaut,
                tab.tmode, tab.tscale, tab.tpart, tab.tpart if sub is None else tab.ttot, tab.barrier.words,
                tab.fdummy if grad_scale is None else grad_scale, tab.fdummy if found_inf is None else found_inf,
                n_items, seed, float(spec.lr), float(spec.eps), float(spec.delta), float(spec.wd_ratio),
                float(spec.wd), *map(float, spec.h))

        def run(passes, between=None):
            runtime.launch_phases(
                projection_kernel, passes, *args, grid_of=lambda _: n_items, device=ps[0].device, between=between,
                constexprs_of=lambda run: constexprs(spec, run, dts, rb=tab.rb, bc=tab.bc, sharded=sub is not None,
                                                     has_scale=grad_scale is not None, has_inf=found_inf is not None,
                                                     master=master, sr=sr, quant_bits=qbits))

        if sub is not None:  # the local sums of each statistics pass -> the full tensors' (one collective each)
            run(sharded_phases(spec.caution, any(map(projectable, sub.shapes))),
                between=lambda _: tab.ttot.copy_(sub.full_sums(tab.tpart)))
            continue
        for passes in launches(spec.caution, tab.engine is not None and not engine):
            run(passes)
            if len(passes) > 1:
                tab.barrier.watch(who)


def aot_kernels() -> list:
    """Every launch of every optimizer with a ``projection_spec`` (pass 0; pass 2, or with caution the persistent
    pass 1+2), options off and all on, fp32 (and bf16 / fp16 with AMP for all options on; and for all options on,
    each pass of a step over DTensor shards, fp32). The lean options, for all options on: bf16 params with an fp32
    master copy and stochastic rounding, with remainders and bf16 states rounded stochastically, and int8 states
    (fp32 params, and bf16 params with remainders; int8 for options off too)."""
    if not runtime.available():
        return []
    from .. import REGISTRY  # the optimizers import this module: look them up when asked

    ptr_args = {"ptrs": "*i64", "info": "*i64", "work": "*i32", "sptrs": "*i64", "counters": "*i32",
                "tpart": "*fp64", "ttot": "*fp64", "barrier": "*i32", "n_items": "i32", "seed": "i32"}
    sig = {a: ptr_args.get(a, "constexpr" if a.isupper() else "fp64" if a in HYPERS else "*fp32")
           for a in projection_kernel.arg_names}
    rb, bc = tile_shape([torch.Size((512, 4608))])
    every = {"nesterov": True, "caution": True, "weight_decay": 0.1, "momentum": 0.9}
    f32, bf16, u8 = torch.float32, torch.bfloat16, quant.CODE_DTYPE
    out = []
    for cls in (c for c in REGISTRY.values() if hasattr(c, "projection_spec")):
        group0 = cls([torch.nn.Parameter(torch.ones(2))], fused=False, lr=0.1).param_groups[0]
        for options in ({}, {k: v for k, v in every.items() if k in group0}):
            spec = cls.projection_spec({**group0, **options})
            qbits = quant.quant_bits(quant.unsigned_slots(spec.state_keys, cls.nonnegative_states))
            label = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
            # (dtypes, AMP, master, SR bits, QUANT, name suffix)
            int8 = [((f32, f32, u8), False, mt.NO_MASTER, 0, qbits, " int8 states")]
            variants = [((f32,) * 3, False, mt.NO_MASTER, 0, 0, "")] + int8
            if options:
                variants += [((bf16,) * 3, True, mt.NO_MASTER, 0, 0, ""),
                             ((torch.float16,) * 3, True, mt.NO_MASTER, 0, 0, ""),
                             ((bf16, bf16, f32), False, mt.MASTER_FP32, mt.SR_PARAM, 0, " master sr"),
                             ((bf16,) * 3, False, mt.REMAINDER, mt.SR_STATES, 0, " remainders sr-states"),
                             ((bf16, bf16, u8), False, mt.REMAINDER, 0, qbits, " int8 states remainders")]
            runs = [(*v, passes, False) for v in variants for passes in launches(spec.caution, True)]
            if options:  # over DTensor shards: one launch per pass (fp32, and bf16 params with AMP)
                runs += [(*v, [p], True) for v in (variants[0], variants[2])
                         for p in sharded_phases(spec.caution, True)]
            for dts, amp, master, sr, quant_bits, suffix, passes, sharded in runs:
                out.append(dict(name=f"{cls.__name__}[{label}] pass {'+'.join(map(str, passes))} "
                                     f"{str(dts[0])[6:]}{' amp' * amp}{' sharded' * sharded}{suffix}",
                                fn=projection_kernel, signature=sig, options=runtime.compile_options(),
                                constexprs=constexprs(spec, passes, dts, rb=rb, bc=bc, has_scale=amp, has_inf=amp,
                                                      sharded=sharded, master=master, sr=sr, quant_bits=quant_bits)))
    return out
