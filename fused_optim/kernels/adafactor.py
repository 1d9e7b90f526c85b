"""Adafactor's kernel family, host side: the step spec, the tables, the launcher and the AOT entries. The jit code is
adafactor_passes.py (one function per pass) and adafactor_tiles.py (table layout, shared helpers); how they fit:
"Note [adafactor passes]" in kernels/README.md."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .._tensors import LOW_PRECISION, device_index
from . import multi_tensor as mt, quant, reduce, runtime, sync
from .adafactor_passes import APPLY, CAUTIOUS_APPLY, FOLD, MOMENTS, NORMS, ROWCOL
from .adafactor_tiles import (META, M_CSRC_COL, M_CSRC_ROW, PTRS, SUB, T_LR, T_MASK_COUNT, T_PARAM_SQ, T_WIDTH, TA,
                              TB, X_GRAD)
from .rules import NO_MASTER, master_kind, sr_bits
from .tables import Tables, TableCache, buckets, dtype_of, pick, ptr, to_device

if runtime.available():
    from .adafactor_passes import adafactor_kernel
    from .adafactor_tiles import BETA1, RELATIVE, SCALE_PARAM, SHARDED, WARMUP, WD

CSRC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the C++ engine's grad dtypes
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
_MOMENT_SET = frozenset(MOMENT_KEYS)
_FACTORED_KEYS = frozenset(MOMENT_KEYS[2:])
PARAM_SHAPED_KEYS = MOMENT_KEYS[:2]  # moments of the param's shape (the others: factored rows / columns)
HYPERS = ("lr", "eps", "eps_scale", "clip", "decay_rate", "beta1", "wd")  # the kernel's fp64 arguments, in order
PLAIN, CAUTIOUS = (NORMS, APPLY), (NORMS, MOMENTS, CAUTIOUS_APPLY)  # the passes after the factored statistics
PASS_NAMES = ("fold", "rowcol", "norms", "moments", "apply", "cautious")


@dataclass
class Spec:
    """One group's step as the optimizer states it: the passes after the statistics (PLAIN or CAUTIOUS), FLAGS
    (options(...)), the hyper-parameters by name (HYPERS; lr is read from lr_tensor when given) and how a param
    factors (factored(shape) -> (A dim, B dim) or None; factored_key: what else that depends on)."""
    passes: tuple
    flags: int
    hypers: dict
    lr_tensor: torch.Tensor | None
    factored: Callable
    factored_key: object


def options(relative=False, warmup=False, scale_parameter=False, beta1=False, weight_decay=False) -> int:
    """The FLAGS bits of a launch."""
    return mt.pack((RELATIVE, relative), (WARMUP, warmup), (SCALE_PARAM, scale_parameter), (BETA1, beta1),
                   (WD, weight_decay))


@dataclass
class AdafactorTables(Tables):
    meta: torch.Tensor        # int64 [T, M_WIDTH] (adafactor_tiles.META)
    work: torch.Tensor        # int32 [items, W_WIDTH]: (tensor, plane, A-block, B-block), factored tensors first
    n_factored_work: int
    dims: list                # each tensor's factored dims or None
    tsc: torch.Tensor         # fp32 [T, T_WIDTH]: sums of update^2 and p^2, caution mask count, step size
    part: torch.Tensor        # fp32 [2, items]: per-item partial sums
    rcpart: torch.Tensor      # ROWCOL's partial row / column sums
    counters: torch.Tensor    # int32: per tensor, then per row / column block
    barrier: sync.GridBarrier  # the persistent launch's grid barrier and its failure report
    fdummy: torch.Tensor
    stats: torch.Tensor = None       # the csrc engine's whole fp32 output buffer (fixed address), once it has run
    stats_view: torch.Tensor = None  # its row / column means (meta's csrc_row / csrc_col index it)
    csrc_geo: tuple = None           # (factored tensor indices, their csrc geometry)
    shards: object = None            # over DTensor shards: the bucket's sharded.Layout (kept: masks made once)
    span: tuple = (0, 0, ())         # over shards: rcpart's region of sums spanning them, each tensor's share
    span_div: torch.Tensor = None    # ... and what turns each full sum into a mean (the full tensor's A)
    qmap: tuple = None               # int8 states: the code maps (quant.code_maps), the planes' mean row moments


def _cdiv(a, b):
    return -(-a // b)


def _build_tables(key, ps, gs, sts, factored, device, shards=None, masters=None, scales=None) -> AdafactorTables:
    """``shards``: the bucket's sharded.Layout over DTensor shards (ps: the local shards; one may be empty);
    ``masters``: each param's master slot or None; ``scales``: int8 states' block scales, per PARAM_SHAPED_KEYS."""
    shapes = [p.shape for p in ps] if shards is None else shards.shapes
    dims = [factored(shape) for shape in shapes]
    fdummy = torch.zeros(1, dtype=torch.float32, device=device)
    qmap = quant.code_maps(device) if scales else fdummy
    # int8 states: each factored plane's mean row moment (NORMS -> the storage-order walk), per tensor a region
    planes = [math.prod(p.shape[:d[0]]) * math.prod(p.shape[d[1] + 1:]) if d and scales else 0
              for p, d in zip(ps, dims)]
    rmeans = torch.zeros(sum(planes), dtype=torch.float32, device=device).split(planes)
    entries = []  # per tensor: (unfactored, t, address row, meta row, work items)
    rc_size, cnt_size, spans = 0, len(ps), []
    for t, (p, g, st, d) in enumerate(zip(ps, gs, sts, dims)):
        m = dict(numel=p.numel(), factored=int(d is not None), row_part=0, col_part=0, counters=0, csrc_row=0,
                 csrc_col=0, total=math.prod(shapes[t]), span=int(d is not None and d[0] == 0 and shards is not None and shards.sharded[t]),
                 span_row=0)
        if d is not None:  # viewed as [pre, A, B, post]: tiles of TA x TB of each (pre, post) plane
            da, db = d
            m.update(A=p.shape[da], B=p.shape[db], post=math.prod(p.shape[db + 1:]))
            m.update(planes=math.prod(p.shape[:da]) * m["post"], nab=max(_cdiv(m["A"], TA), 1), nbb=_cdiv(m["B"], TB))
            m.update(row_part=rc_size, col_part=rc_size + m["nbb"] * m["planes"] * m["A"], counters=cnt_size)
            rc_size += (m["nbb"] * m["A"] + m["nab"] * m["B"]) * m["planes"]
            cnt_size += m["planes"] * (m["nab"] + m["nbb"] + 1)
            if m["span"]:  # (placed after the partials below) its column sums, then its planes' row moment sums
                spans.append((t, m, (m["B"] + 1) * m["planes"], shapes[t][0]))
            row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
        else:  # rows of TB elements, one plane
            m.update(A=max(1, _cdiv(p.numel(), TB)), B=TB, post=1, planes=1, nbb=1)
            m["nab"] = _cdiv(m["A"], TA)
            row, col = st["exp_avg_sq"], p
        m["items"] = m["planes"] * m["nab"] * m["nbb"]
        m["chunk"] = _cdiv(_cdiv(p.numel(), m["items"]), quant.QBLOCK) * quant.QBLOCK  # whole blocks, <= a tile
        master = masters[t] if masters is not None and masters[t] is not None else p
        qs = [fdummy if sc is None or sc[t] is None else sc[t] for sc in (scales or (None, None))]
        addr = dict(param=p, grad=g, exp_avg=st.get("exp_avg", p), row=row, col=col, step=st["step"], rms=st["RMS"],
                    sq=st.get("exp_avg_sq", p), master=master,
                    rmean=rmeans[t] if planes[t] else fdummy, qmap=qmap, exp_avg_absmax=qs[0], sq_absmax=qs[1])
        items = [(t, pl, a, b) for pl in range(m["planes"]) for a in range(m["nab"]) for b in range(m["nbb"])]
        entries.append((d is None, t, [addr[k].data_ptr() for k in PTRS], m, items))
    span0, lengths, div = rc_size, [0] * len(ps), []
    for t, m, n, a_full in spans:
        m.update(csrc_col=rc_size, span_row=rc_size + m["B"] * m["planes"])
        lengths[t] = n
        div += [a_full] * n
        rc_size += n
    rows, meta, work, n_fact = [None] * len(ps), [None] * len(ps), [], 0
    for unfactored, t, row, m, items in sorted(entries, key=lambda e: e[:2]):
        m["first"] = len(work)
        rows[t], meta[t] = row, [m[k] for k in META]
        work.extend(items)
        n_fact += 0 if unfactored else len(items)
    zeros = torch.zeros
    return AdafactorTables(key=key, gkey=tuple(map(ptr, gs)), ptrs=to_device(rows, torch.int64, device),
                           aligned=False, grad_col=int(X_GRAD), meta=to_device(meta, torch.int64, device),
                           work=to_device(work, torch.int32, device), n_factored_work=n_fact, dims=dims,
                           tsc=zeros(len(ps), int(T_WIDTH), dtype=torch.float32, device=device),
                           part=zeros(2, len(work), dtype=torch.float32, device=device),
                           rcpart=zeros(max(rc_size, 1), dtype=torch.float32, device=device),
                           counters=zeros(cnt_size, dtype=torch.int32, device=device),
                           barrier=sync.GridBarrier(device), fdummy=fdummy, shards=shards,
                           span=(span0, rc_size, lengths), span_div=to_device(div, torch.float32, device), qmap=(qmap, rmeans))


def constexprs(passes, flags, dts, *, lr_tensor=False, has_scale=False, has_inf=False, sharded=False,
               master=NO_MASTER, sr=0, quant_bits=0) -> dict:
    """The compile-time arguments of a launch running ``passes`` (the launcher and the AOT inventory use this).
    dts: (param, grad, moment dtype[, element-wise states' dtype: the moments' when not given]); master: the
    master slot's kind (rules.NO_MASTER, MASTER_FP32, REMAINDER); sr: rules.SR_PARAM / SR_STATES bits;
    quant_bits: int8 states (1 + 2 * the unsigned slots' bits; then dts[3] is uint8)."""
    flags |= mt.pack((SHARDED, sharded))
    return dict(PASSES=sum(1 << int(x) for x in passes), FLAGS=flags, P_DT=runtime.tl_dtype(dts[0]),
                G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]), E_DT=runtime.tl_dtype(dts[-1]),
                LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf, MASTER=int(master), SR=int(sr),
                QUANT=int(quant_bits))


def launches(passes, has_factored: bool, csrc_stats: bool) -> list:
    """The Triton launches of a step, each a list of passes: the statistics (none without factored tensors; on the
    csrc engine the persistent launch folds its means in first), then the persistent rest."""
    if not has_factored:
        return [list(passes)]
    return [[FOLD, *passes]] if csrc_stats else [[ROWCOL], list(passes)]


def sharded_phases(passes, has_factored: bool, spans: bool) -> list:
    """The passes of a step over DTensor shards, one launch each, the host's combine after ROWCOL (where column
    statistics span the shards; FOLD then folds them), NORMS and MOMENTS (Note [adafactor shards])."""
    return [ROWCOL] * has_factored + [FOLD] * spans + list(passes)


def stats_only(passes) -> bool:
    """A launch of the factored statistics alone (ROWCOL, FOLD): it reads no param and no element-wise state, so
    it compiles without the precision and lean settings."""
    return set(passes) <= {ROWCOL, FOLD}


def prepare_moments(states, grads, device, lean_dtypes=None) -> list:
    """Each tensor's moment dtype (fp32 for fp16 / bf16 grads); its moments are moved to the device in it (a loaded
    checkpoint may hold others), the factored row / column moments made contiguous (the kernel reads them by
    address; those of the param's shape go through the optimizer's layout fitting instead). ``lean_dtypes``: per
    tensor the dtype its moments of the param's shape keep (state_dtype, int8 codes), or None."""
    index = device_index(device)
    sdts = [torch.float32 if dt in LOW_PRECISION else dt for dt in map(dtype_of, grads)]
    for st, sdt, edt in zip(states, sdts, lean_dtypes or [None] * len(states)):
        for k in _MOMENT_SET.intersection(st):
            v, want = st[k], sdt if edt is None or k in _FACTORED_KEYS else edt
            if v.dtype != want or v.get_device() != index or (k in _FACTORED_KEYS and not v.is_contiguous()):
                v = v.to(device=device, dtype=want)
                st[k] = v.contiguous() if k in _FACTORED_KEYS else v
    return sdts


def _bucket_keys(params, grads, states, sdts, masters):
    """Each tensor's (param, grad, moment, element-wise state dtype, master kind); a tensor without element-wise
    states (factored, no betas) takes the state dtype of the first that has one, so it shares its launches."""
    edts = [next((st[k].dtype for k in PARAM_SHAPED_KEYS if k in st), None) for st in states]
    first = next((e for e in edts if e is not None), None)
    kinds = list(map(master_kind, masters or [None] * len(params)))
    return [(dtype_of(p), dtype_of(g), s, e or first or s, k)
            for p, g, s, e, k in zip(params, grads, sdts, edts, kinds)]


def step(spec: Spec, caches: dict, slot, params, grads, states, sdts, grad_scale=None, found_inf=None, shards=None, *,
         masters=None, stochastic_rounding=False, seed=0, state_stochastic_rounding=False, scales=None, unsigned=0,
         who="Adafactor"):
    """One param group's fused step; per (param, grad, moment, element-wise state, master) dtype bucket at most 2
    launches (over DTensor shards, ``shards`` their sharded.Layout: sharded_phases). Its tables live in
    ``caches[slot]`` (the optimizer's storage); ``sdts``: prepare_moments' dtypes. The precision and lean options
    as mt.apply takes them (``scales``: per PARAM_SHAPED_KEYS the int8 states' block scales or None; ``unsigned``:
    their unsigned bits). Returns the last tensor's step size as a 0-d device view (timm leaves it in group['lr'])."""
    dev = params[0].device
    cache = caches.setdefault(slot, TableCache())
    hypers = tuple(spec.hypers[k] for k in HYPERS)
    last_lr = None
    for dts, idx in buckets(_bucket_keys(params, grads, states, sdts, masters)).items():
        ps, gs, sts = pick(idx, params, grads, states)
        ms = None if masters is None else pick(idx, masters)[0]
        qs = [pick(idx, col)[0] for col in scales] if dts[3] == quant.CODE_DTYPE else None
        # every address and size the tables hold but the grads': a replaced param or state rebuilds them (every
        # state is a tensor by now: the moments, and step and RMS on the device; masters: maybe layout copies)
        key = (tuple(map(ptr, ps)), tuple(map(torch.Tensor.size, ps)), spec.factored_key,
               tuple(map(ptr, itertools.chain.from_iterable(map(dict.values, sts)))), tuple(map(ptr, ms or ())))
        tab = cache.lookup(dts, key, gs, lambda: _build_tables(key, ps, gs, sts, spec.factored, dev,
                                                               None if shards is None else shards.pick(idx), ms, qs))
        if qs and (SUB * TB) % quant.QBLOCK:  # the storage-order walk steps over whole 256-element blocks
            raise RuntimeError(f"Adafactor: int8 states need the kernel's SUB * TB ({SUB * TB}) to be a multiple "
                               f"of {quant.QBLOCK}")
        lean = dict(master=dts[4], quant_bits=quant.quant_bits(unsigned) if qs else 0,
                    sr=sr_bits(dts[0], dts[3], dts[4], stochastic_rounding, state_stochastic_rounding))
        _launch(tab, spec, dts[:4], gs, hypers, grad_scale, found_inf, tab.shards, seed, lean)
        if idx[-1] == len(params) - 1:
            last_lr = tab.tsc[len(idx) - 1, int(T_LR)]
    return last_lr


def _combine(tab, shards, phase) -> None:
    """Between the phases of a sharded step: the local sums the phase wrote -> the full tensors' (one collective)."""
    if phase == ROWCOL and tab.span[1] > tab.span[0]:  # column sums, row moment sums -> means over the full dim 0
        region = tab.rcpart[tab.span[0]:tab.span[1]]
        region.copy_(torch.cat(shards.full_sums(list(region.split(tab.span[2]))))).div_(tab.span_div)
    elif phase in (NORMS, MOMENTS):  # sums of update^2 and p^2; the caution mask's count
        cols = slice(0, int(T_PARAM_SQ) + 1) if phase == NORMS else slice(int(T_MASK_COUNT), int(T_MASK_COUNT) + 1)
        tab.tsc[:, cols] = shards.full_sums(tab.tsc[:, cols])


def _launch(tab, spec, dts, gs, hypers, grad_scale, found_inf, shards=None, seed=0, lean=None) -> None:
    has_factored = tab.n_factored_work > 0
    # the statistics on the C++ engine where it is built (fp32 / bf16 / fp16 grads), else Triton's ROWCOL pass
    csrc_stats = has_factored and dts[1] in CSRC_DTYPES and reduce.use_csrc(gs[0].device) and shards is None
    stats = _csrc_stats(tab, gs, spec.hypers["eps"], grad_scale) if csrc_stats else tab.rcpart
    n_work = tab.work.shape[0]
    args = (tab.ptrs, tab.meta, tab.work, tab.tsc, tab.part[0], tab.part[1], stats, tab.counters, tab.barrier.words,
            spec.lr_tensor if spec.lr_tensor is not None else tab.fdummy,
            grad_scale if grad_scale is not None else tab.fdummy, found_inf if found_inf is not None else tab.fdummy,
            tab.n_factored_work, n_work, seed, *hypers)
    runs = ([(phases, None) for phases in launches(spec.passes, has_factored, csrc_stats)] if shards is None else
            [(sharded_phases(spec.passes, has_factored, tab.span[1] > tab.span[0]),
              lambda phase: _combine(tab, shards, phase))])
    for phases, between in runs:
        runtime.launch_phases(
            adafactor_kernel, phases, *args, device=gs[0].device, between=between,
            grid_of=lambda x: tab.n_factored_work if x in (ROWCOL, FOLD) else n_work,
            constexprs_of=lambda run: constexprs(
                run, spec.flags, dts[:3] if stats_only(run) else dts, lr_tensor=spec.lr_tensor is not None,
                has_scale=grad_scale is not None, has_inf=found_inf is not None, sharded=shards is not None,
                **({} if stats_only(run) else lean or {})))
        if len(phases) > 1 and between is None:
            tab.barrier.watch("Adafactor")


def _csrc_stats(tab, gs, eps, grad_scale):
    """The row / column means of (g / grad_scale)^2 + eps of every factored tensor of the bucket, in one csrc engine
    launch, into tab.stats (allocated by the first run, whose plan gives meta's csrc_row / csrc_col offsets)."""
    from .. import csrc

    if tab.csrc_geo is None:  # fixed with the tables' key (shapes, factored dims)
        fidx = [t for t, d in enumerate(tab.dims) if d is not None]
        # csrc's (B, R, C, S) for factoring dims (da, db = da + 1): its row means are [pre, A, post], the row
        # state's layout, and its column means [pre, B, post], the column state's
        tab.csrc_geo = fidx, [(math.prod(gs[t].shape[:da]), gs[t].shape[da], gs[t].shape[db],
                               math.prod(gs[t].shape[db + 1:])) for t in fidx for da, db in [tab.dims[t]]]
    fidx, geo = tab.csrc_geo
    fgs = [gs[t] for t in fidx]
    _, out_stats, _, plan = csrc.launch(csrc.KIND_FACTORED, csrc.engine_backend(fgs[0].device), fgs, None, geo, eps,
                                        scale=grad_scale, out=tab.stats,
                                        plan_key=(tab.key, fgs[0].dtype))  # a bucket: one grad dtype
    if tab.stats is None:
        assert plan.K == 1
        size = (plan.n_entries + plan.n_stats + 1) * plan.K
        tab.stats = out_stats.as_strided((size,), (1,), 0)  # the whole buffer: out= keeps its address from now on
        tab.stats_view = out_stats.view(-1)
        offs = [[0, 0] for _ in gs]
        for k, t in enumerate(fidx):
            offs[t] = [plan.row_out[k], plan.col_out[k]]
        assert int(M_CSRC_COL) == int(M_CSRC_ROW) + 1
        tab.meta[:, int(M_CSRC_ROW):int(M_CSRC_COL) + 1].copy_(torch.tensor(offs, dtype=torch.int64))
    return tab.stats_view
