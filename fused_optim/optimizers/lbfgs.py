"""L-BFGS with an optional strong-Wolfe line search (anchor: torch.optim.LBFGS).

Reference path (``fused=False``; the default off CUDA): host-driven like torch, same op order, so trajectories agree
to the last bit on CPU. Fused path (``fused=True``; ``fused=None`` picks it when all params are CUDA): the same
algorithm with the same decisions and closure calls, restructured so the device never waits on the host:

* the flat grad and the direction are flat device vectors (one gather per closure call); params move by one
  ``_foreach_add_`` per move;
* the history lives in preallocated ring buffers Y, S of shape [history_size + 1, n] (one spare row takes the
  candidate pair, so a discarded candidate never overwrites a kept one) and rho [history_size + 1];
* ``_lbfgs_direction_kernel`` does a whole direction update in ONE launch: the new pair (y, s, y.s, y.y), the
  curvature test ``y.s > 1e-10`` and the ring update, both loops of the two-loop recursion in torch's order, and
  g.d and max|d|. Each program owns a contiguous chunk of n; the 2 * history + 2 dot products of the recursion are
  reduced across programs through fixed-order partial sums and a grid barrier (grid <= SM count, so all programs
  are resident). Why the two-loop and not the compact (Byrd-Nocedal-Schnabel) form: the compact form replaces the
  recursion by triangular solves with R = triu(S^T Y), whose conditioning amplifies rounding where the pairs are
  nearly dependent, so decisions near a tolerance could differ from torch; the two-loop in torch's order keeps each
  direction at rounding distance from torch's, and per pair it streams 4 n-vectors (torch: 5) with no host sync
  (torch: 2). ``DIRECTION = "torch"`` swaps in the same contract in torch ops (a cross-check; fast CPU tests);
* every decision torch makes on the host (tolerance tests, curvature test, line-search acceptance) is made on the
  host from values fetched by one transfer per decision point (``_fetch``); the line search runs on host copies of
  torch's 0-d tensors (``_host_scalar``: same IEEE type, same promotion rules), so it takes torch's branches.

Host syncs (device -> host transfers), counted in ``LBFGS.host_syncs``:
  * 1 at the start of step(): initial loss, initial optimality test and the first direction's tests;
  * without line search: 1 per iteration that calls the closure (its loss, the optimality / tolerance tests, and
    the next direction computed speculatively with its curvature and descent tests; a stop discards it), none in
    the last iteration (no closure, or the eval budget is spent: nothing is left to decide);
  * with strong_wolfe: 1 per line-search evaluation (loss, g.d, optimality) plus 1 per following iteration (its
    direction's tests); the stopping tests after a line search need none (they use fetched values).
(A CUDA tensor lr adds one read per step.) torch.optim.LBFGS syncs about 2 * len(history) + 5 times per iteration
(each ``alpha=`` tensor of its two-loop is an ``.item()``).

State is exactly torch's (global state under the first param). The fused path keeps it as views of its buffers
(refreshed after each step); ``state_dict()`` snapshots them, and a loaded (or reference-path) state is copied into
fresh buffers at the next fused step, so checkpoints move between torch and both paths.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .._base import FusedOptimizer, check, check_nonneg
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime, sync

try:
    import numpy as np
except ImportError:  # pragma: no cover - the fused path then emulates torch's scalars with CPU 0-d tensors
    np = None

_CARRIED = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _lr_of(group):
    """lr as torch's LBFGS uses it: a tensor lr stays a (0-d) tensor, so t = lr is one too (its dtype rounds the
    line search's arithmetic, and the state keeps it)."""
    lr = group["lr"]
    return lr.squeeze() if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


def _sqrt(x):
    # host stand-ins: IEEE sqrt, as torch's on CUDA (its vectorized CPU sqrt can be 1 ulp off)
    return x.sqrt() if isinstance(x, torch.Tensor) else np.sqrt(x) if np is not None and isinstance(x, np.generic) \
        else math.sqrt(x)


def _rdiv(a, b):
    """a / b for a Python number a, as torch evaluates it when b is a 0-d tensor: Tensor.__rtruediv__ is
    b.reciprocal() * a (two roundings). A host stand-in b (numpy scalar) gets the same two steps."""
    if np is not None and isinstance(b, np.generic):
        return (b.dtype.type(1) / b) * a
    return a / b


def _host_scalar(dtype):
    """Host stand-in for torch's 0-d device tensors of ``dtype`` in the line search and tolerance tests: a numpy
    scalar of the same IEEE type (numpy 2's promotion of Python scalars is torch's wrapped-number rule: float32 op
    float -> float32, comparisons in float32), else a CPU 0-d tensor (bfloat16). Host arithmetic on these takes the
    exact branches torch takes on the device, without a sync."""
    np_type = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16"}.get(dtype)
    if np is not None and np_type is not None and int(np.__version__.split(".")[0]) >= 2:
        return getattr(np, np_type)
    return lambda v: torch.tensor(v, dtype=dtype)


_TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


def cubic_minimizer(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, slope g1) and (x2, f2, slope g2), clamped to ``bounds`` (default:
    the interval between the points); the midpoint when the cubic has no real minimizer (or on NaN)."""
    if bounds is None:
        bounds = (x1, x2) if x1 <= x2 else (x2, x1)
    lo, hi = bounds
    d1 = g1 + g2 - _rdiv(3 * (f1 - f2), x1 - x2)
    disc = d1 * d1 - g1 * g2  # torch's d1 ** 2: a tensor's square is exactly d1 * d1
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = _sqrt(disc)
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


def strong_wolfe(evaluate, t, d_max, f0, g0, gtd0, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """Line search along d (d_max = max |d|) from the point with loss f0, grad g0 and slope gtd0 = g0.d (< 0).

    ``evaluate(t)`` returns (loss, grad, slope grad.d) at x + t d. Grads are only passed along (never mutated, so
    never cloned): the reference hands flat grad tensors, the fused path handles of device buffers. The slopes may
    be 0-d tensors (reference) or their host stand-ins (fused path, see ``_host_scalar``): the arithmetic is the
    same. Returns (loss, grad, t, number of evaluations) of the accepted point: one meeting the strong Wolfe
    conditions, or the best point found within ``max_ls`` evaluations.
    """
    f, g, gtd = evaluate(t)
    n_evals = 1

    def armijo_fails(t, f):
        return f > f0 + c1 * t * gtd0

    def curvature_ok(gtd):
        return abs(gtd) <= -c2 * gtd0

    # Phase 1: grow t until [t_prev, t] brackets an acceptable point (or t itself is one).
    t_prev, f_prev, g_prev, gtd_prev = 0, f0, g0, gtd0
    found = False
    n_ls = 0
    while n_ls < max_ls:
        decreased = not (armijo_fails(t, f) or (n_ls > 1 and f >= f_prev))
        if decreased and curvature_ok(gtd):
            ts, fs, gs = [t], [f], [g]
            found = True
            break
        if not decreased or gtd >= 0:  # the minimum lies between t_prev and t
            ts, fs = [t_prev, t], [f_prev, f]
            gs, gtds = [g_prev, g], [gtd_prev, gtd]
            break
        t_next = cubic_minimizer(t_prev, f_prev, gtd_prev, t, f, gtd, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f, g, gtd
        t = t_next
        f, g, gtd = evaluate(t)
        n_evals += 1
        n_ls += 1
    if n_ls == max_ls:  # budget spent while still descending: fall back to [0, last t]
        ts, fs, gs = [0, t], [f0, f], [g0, g]

    # Phase 2 (zoom): shrink the bracket by cubic interpolation until the strong Wolfe conditions hold.
    low, high = (0, 1) if fs[0] <= fs[-1] else (1, 0)
    near_edge_before = False
    while not found and n_ls < max_ls:
        if abs(ts[1] - ts[0]) * d_max < tolerance_change:
            break
        t = cubic_minimizer(ts[0], fs[0], gtds[0], ts[1], fs[1], gtds[1])
        left, right = min(ts), max(ts)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            # too close to an end: accept once, then (or if outside) move to 10% of the width inside
            if near_edge_before or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                near_edge_before = False
            else:
                near_edge_before = True
        else:
            near_edge_before = False
        f, g, gtd = evaluate(t)
        n_evals += 1
        n_ls += 1
        if armijo_fails(t, f) or f >= fs[low]:
            ts[high], fs[high], gs[high], gtds[high] = t, f, g, gtd
            low, high = (0, 1) if fs[0] <= fs[1] else (1, 0)
        else:
            if curvature_ok(gtd):
                found = True
            elif gtd * (ts[high] - ts[low]) >= 0:
                ts[high], fs[high], gs[high], gtds[high] = ts[low], fs[low], gs[low], gtds[low]
            ts[low], fs[low], gs[low], gtds[low] = t, f, g, gtd
    return fs[low], gs[low], ts[low], n_evals


def two_loop(flat_grad, old_dirs, old_stps, ro, H_diag, al):
    """The L-BFGS direction -H g from the curvature pairs (y = old_dirs, s = old_stps, ro = 1 / y.s), oldest
    first; ``al`` (length >= len(old_dirs)) receives the first loop's coefficients (torch keeps them in state)."""
    q = flat_grad.neg()
    for i in reversed(range(len(old_dirs))):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, H_diag)
    for i in range(len(old_dirs)):
        be = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - be)
    return r


# ---- fused path: the direction kernel ------------------------------------------------------------------------------
_BLOCK = runtime.BLOCK if runtime.interpreter_enabled() else 1024  # elements per program and loop trip
_NUM_WARPS = 4
_PB = 1 if runtime.interpreter_enabled() else 256  # partials per trip (>= the SM count: one trip)
_MIN_CHUNK = 8 * 1024  # elements per program at least: a barrier costs more than streaming a small chunk

if runtime.available():
    import triton
    import triton.language as tl

    grid_barrier = sync.grid_barrier  # a kernel calls only jit functions among its module's globals

    @triton.jit
    def _reduce(part, phase, pid, G, a, b, counter, ok, PB: tl.constexpr):
        """Publish this program's partials (a, b) of a phase, wait for all G programs (grid barrier), and return
        (sum of a, sum of b, max of b) over them, summed in a fixed order so every program gets the same numbers (no
        float atomics), and ok (cleared if the barrier gave up).

        The barrier is cooperative groups' grid sync: a CTA barrier, then acquire-release atomics at GPU scope, so
        stores before it are visible to loads after it in every program (the grid is at most the SM count, so all
        programs are resident). Partials load with .cg (bypassing L1): other programs wrote them."""
        slot = part + 2 * (phase * G + pid)
        tl.store(slot, a)
        tl.store(slot + 1, b)
        done = grid_barrier(counter, (phase + 1) * G)
        base = part + 2 * phase * G
        sa = tl.zeros([PB], tl.float64)
        sb = tl.zeros([PB], tl.float64)
        mb = tl.zeros([PB], tl.float64)
        for start in range(0, G, PB):
            i = start + tl.arange(0, PB)
            m = i < G
            sa += tl.load(base + 2 * i, mask=m, other=0.0, cache_modifier=".cg")
            x = tl.load(base + 2 * i + 1, mask=m, other=0.0, cache_modifier=".cg")
            sb += x
            mb = tl.maximum(mb, x)
        return tl.sum(sa, 0), tl.sum(sb, 0), tl.max(mb, 0), ok & done

    @triton.jit
    def _pair_sweep(g, pg_in, pg_out, d_in, y_row, s_row, t, lo, hi, BLOCK: tl.constexpr):
        """y = g - g_prev, s = d * t into the spare ring row, g_prev <- g; partial y.s and y.y (fp64)."""
        ys = tl.zeros([BLOCK], tl.float64)
        yy = tl.zeros([BLOCK], tl.float64)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            gv = tl.load(g + offs, mask=m, other=0.0)
            y = gv - tl.load(pg_in + offs, mask=m, other=0.0)
            s = tl.load(d_in + offs, mask=m, other=0.0) * t
            tl.store(y_row + offs, y, mask=m)
            tl.store(s_row + offs, s, mask=m)
            tl.store(pg_out + offs, gv, mask=m)
            ys += y.to(tl.float64) * s.to(tl.float64)
            yy += y.to(tl.float64) * y.to(tl.float64)
        return tl.sum(ys, 0), tl.sum(yy, 0)

    @triton.jit
    def _sweep(v, g, up_row, coef, scale, dot_row, first, final, lo, hi, BLOCK: tl.constexpr):
        """One step of the recursion on this program's chunk: v = (-g if first else v + coef * up_row) * scale
        (torch's ``q.add_(y, alpha=-al)`` / ``r.add_(s, alpha=al - be)`` / ``q * H_diag``), stored; returns the
        partial dot(dot_row, v), or on the final pass (dot(g, v), max|v|)."""
        acc = tl.zeros([BLOCK], tl.float64)
        big = tl.zeros([BLOCK], tl.float64)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            if first:
                x = -tl.load(g + offs, mask=m, other=0.0)
            else:
                x = tl.load(v + offs, mask=m, other=0.0) + coef * tl.load(up_row + offs, mask=m, other=0.0)
            x = x * scale
            tl.store(v + offs, x, mask=m)
            if final:
                w = tl.load(g + offs, mask=m, other=0.0)
                big = tl.maximum(big, tl.abs(x).to(tl.float64))
            else:
                w = tl.load(dot_row + offs, mask=m, other=0.0)
            acc += w.to(tl.float64) * x.to(tl.float64)
        return tl.sum(acc, 0), tl.max(big, 0)

    @triton.jit
    def _lbfgs_direction_kernel(g, pg_in, pg_out, d_in, d_out, Y, S, rho, hd_in, hd_out, al_out, meta_in, meta_out,
                                hp, out, part, counter, n, H, G,
                                DT: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
        """One L-BFGS direction update (torch's 'compute gradient descent direction' block), in one launch.

        In: grad g, previous grad pg_in, previous direction d_in, previous step length t = hp[0], the ring (rows
        Y, S, rho; logical pair i at row (head + i) % (H + 1), meta_in = [head, count]), H_diag hd_in.
        Out: the new pair in the spare row (kept if y.s > hp[1]: rho, head/count -> meta_out, H_diag -> hd_out),
        pg_out = g, the direction d_out, the first loop's coefficients al_out, and out = [kept, g.d, max|d|,
        barrier failure]. Scalars are rounded to DT where torch holds them as DT 0-d tensors; dots accumulate in fp64.
        """
        pid = tl.program_id(0)
        per = tl.cdiv(tl.cdiv(n, G), BLOCK) * BLOCK
        lo = pid.to(tl.int64) * per
        hi = tl.minimum(lo + per, n)
        ring = H + 1
        head = tl.load(meta_in)
        count = tl.load(meta_in + 1)
        hdiag = tl.load(hd_in)
        t = tl.load(hp).to(DT)
        threshold = tl.load(hp + 1).to(DT)

        # the candidate pair, and torch's `if ys > 1e-10` (keep it, dropping the oldest when full)
        spare = (head + count) % ring
        a, b = _pair_sweep(g, pg_in, pg_out, d_in, Y + spare * n, S + spare * n, t, lo, hi, BLOCK)
        ys, yy, _, ok = _reduce(part, 0, pid, G, a, b, counter, 1, PB)
        ys = ys.to(DT)
        yy = yy.to(DT)
        kept = ys > threshold
        if kept:
            # every program stores the same value; it is read only after the next barrier
            tl.store(rho + spare, (1.0 / ys.to(tl.float64)).to(DT))
            hdiag = (ys.to(tl.float64) / yy.to(tl.float64)).to(DT)  # fp64 division: Triton's fp32 one is approximate
            if count == H:
                head = (head + 1) % ring
            else:
                count = count + 1

        # first loop, newest pair first: pass k applies pair j + 1 (k > 0) and dots pair j's s with q. Its last pass
        # also scales by H_diag and dots the oldest y with r (the second loop's first dot).
        phase = 1
        coef = tl.full((), 0.0, DT)
        al_last = coef
        gtd = tl.full((), 0.0, tl.float64)
        dmax = gtd
        for k in range(0, count + 1):
            j = count - 1 - k
            scale = tl.full((), 1.0, DT)
            if k == count:
                scale = hdiag
            dot_row = Y + head * n
            if j >= 0:
                dot_row = S + ((head + j) % ring) * n
            final = (k == count) & (count == 0)
            a, b = _sweep(d_out, g, Y + ((head + j + 1) % ring) * n, coef, scale, dot_row, k == 0, final, lo, hi,
                          BLOCK)
            sa, _, mb, ok = _reduce(part, phase, pid, G, a, b, counter, ok, PB)
            phase += 1
            if j >= 0:
                al_j = sa.to(DT) * tl.load(rho + (head + j) % ring, cache_modifier=".cg")
                tl.store(al_out + j, al_j)  # the same value from every program
                coef = -al_j
                al_last = al_j
            else:
                if count > 0:
                    coef = al_last - sa.to(DT) * tl.load(rho + head, cache_modifier=".cg")
                else:
                    gtd = sa
                    dmax = mb
        # second loop, oldest first: pass m applies pair m - 1 and dots pair m's y with r; the last one writes d
        for m in range(1, count + 1):
            final = m == count
            a, b = _sweep(d_out, g, S + ((head + m - 1) % ring) * n, coef, tl.full((), 1.0, DT),
                          Y + ((head + m) % ring) * n, False, final, lo, hi, BLOCK)
            sa, _, mb, ok = _reduce(part, phase, pid, G, a, b, counter, ok, PB)
            phase += 1
            if final:
                gtd = sa
                dmax = mb
            else:
                al_m = tl.load(al_out + m, cache_modifier=".cg")
                coef = al_m - sa.to(DT) * tl.load(rho + (head + m) % ring, cache_modifier=".cg")

        if pid == 0:
            tl.store(out, kept.to(tl.float64))
            tl.store(out + 1, gtd.to(DT).to(tl.float64))
            tl.store(out + 2, dmax)
            tl.store(meta_out, head)
            tl.store(meta_out + 1, count)
            tl.store(hd_out, hdiag)
        if ok == 0:
            tl.store(out + 3, 1.0)
        # the last program out resets the barrier counter for the next launch (all others are past every spin)
        tl.debug_barrier()
        left = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if left == (phase + 1) * G - 1:
            tl.atomic_xchg(counter, 0, sem="acq_rel", scope="gpu")


def _direction_constexprs(dtype) -> dict:
    return dict(DT=runtime.tl_dtype(dtype), BLOCK=_BLOCK, PB=_PB)


def aot_kernels():
    """The direction kernel for fused_optim.tools.aot: float32 and float64 flat vectors."""
    entries = []
    for dt, ptr in ((torch.float32, "*fp32"), (torch.float64, "*fp64")):
        types = {"meta_in": "*i64", "meta_out": "*i64", "hp": "*fp64", "out": "*fp64", "part": "*fp64",
                 "counter": "*i32", "n": "i64", "H": "i32", "G": "i32"}
        cx = _direction_constexprs(dt)
        sig = {a: "constexpr" if a in cx else types.get(a, ptr) for a in _lbfgs_direction_kernel.arg_names}
        entries.append(dict(name=f"LBFGS[direction] {str(dt).replace('torch.', '')}", fn=_lbfgs_direction_kernel,
                            signature=sig, constexprs=cx, options={"num_warps": _NUM_WARPS,
                                                                   "enable_fp_fusion": runtime.FP_FUSION}))
    return entries


# How the fused path computes a direction: "triton" (one launch of _lbfgs_direction_kernel) or "torch" (the same
# contract in torch ops, see _DeviceHistory._direction_torch).
DIRECTION = "triton"


def _grid_size(n: int, device) -> int:
    if runtime.interpreter_enabled() or device.type != "cuda":
        return 1  # the interpreter runs programs one after another: a grid barrier needs a single program
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms, -(-n // _MIN_CHUNK)))


class _DeviceHistory:
    """The fused path's device state: ring buffers, double-buffered direction / previous grad / H_diag / al / ring
    meta (the kernel reads parity ``cur`` and writes the other; ``commit`` flips), and the host's mirror of the ring
    (head, count) so torch's state layout can be materialized without a sync."""

    def __init__(self, n: int, H: int, dtype, device):
        self.n, self.H, self.dtype, self.device = n, H, dtype, device
        z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)
        self.Y, self.S, self.rho = z(H + 1, n), z(H + 1, n), z(H + 1)
        self.d, self.pg, self.hd, self.al = z(2, n), z(2, n), z(2), z(2, H)
        self.meta = z(2, 2, dt=torch.int64)
        self.hp = torch.tensor([0.0, 1e-10], dtype=torch.float64, device=device)  # t, curvature threshold
        self.out = z(4, dt=torch.float64)
        self.G = _grid_size(n, device)
        self.part = z((2 * H + 2) * self.G * 2, dt=torch.float64)
        self.counter = z(1, dt=torch.int32)
        self.cur, self.head, self.count = 0, 0, 0
        self.hd_value = 1      # torch's H_diag until the first kept pair: the int 1 (then the 0-d tensor hd[cur])
        self.has_al = False
        self.x0 = None         # line-search snapshot of the params
        self.state_token = None

    def load(self, state: dict) -> None:
        """Copy a torch-layout state (a checkpoint, or the reference path's lists) into the buffers."""
        dirs, stps, ro = state.get("old_dirs") or [], state.get("old_stps") or [], state.get("ro") or []
        if len(dirs) > self.H:
            raise RuntimeError(f"LBFGS: the state holds {len(dirs)} curvature pairs, more than history_size={self.H}")
        c = self.count = len(dirs)
        if c:
            self.Y[:c].copy_(torch.stack(list(dirs)))
            self.S[:c].copy_(torch.stack(list(stps)))
            self.rho[:c].copy_(torch.stack([torch.as_tensor(r, dtype=self.dtype) for r in ro]))
        self.meta[self.cur].copy_(torch.tensor([0, c]))
        for key, buf in (("d", self.d), ("prev_flat_grad", self.pg)):
            if isinstance(state.get(key), torch.Tensor):
                buf[self.cur].copy_(state[key])
        hd = state.get("H_diag", 1)
        if isinstance(hd, torch.Tensor):
            self.hd[self.cur].copy_(hd)
            self.hd_value = None
        else:
            self.hd[self.cur].fill_(1 if hd is None else hd)
            self.hd_value = 1 if hd is None else hd
        al = state.get("al")
        self.has_al = al is not None
        for i, a in enumerate((al or [])[:c]):
            if a is not None:
                self.al[self.cur, i].copy_(torch.as_tensor(a))

    def launch(self, g: torch.Tensor, t) -> None:
        """The next direction from grad g and the last step length t, into the other parity (not committed)."""
        if DIRECTION == "torch":
            self._direction_torch(g, t)
            return
        c, o = self.cur, 1 - self.cur
        if isinstance(t, torch.Tensor):  # a loaded state's t (a 0-d tensor): copied, not read on the host
            self.hp[0].copy_(t)
        else:
            self.hp[0].fill_(float(t))
        runtime.launch(
            _lbfgs_direction_kernel, self.G,
            g, self.pg[c], self.pg[o], self.d[c], self.d[o], self.Y, self.S, self.rho, self.hd[c], self.hd[o],
            self.al[o], self.meta[c], self.meta[o], self.hp, self.out, self.part, self.counter, self.n, self.H, self.G,
            num_warps=_NUM_WARPS, cooperative=self.G > 1, **_direction_constexprs(self.dtype))

    def _direction_torch(self, g: torch.Tensor, t) -> None:
        """The kernel's contract in plain torch ops, also without a sync: the curvature test is never branched on;
        the pair dropped by it (the new one, or the evicted oldest) gets rho = 0, which turns its two-loop updates
        into exact no-ops (v + 0 * x == v). ~6 launches per pair: a cross-check of the kernel, and what CPU tests use
        where the interpreter would be too slow."""
        c, o, ring = self.cur, 1 - self.cur, self.H + 1
        head, count = self.head, self.count  # the host mirror of meta[c]
        spare = (head + count) % ring
        y = torch.sub(g, self.pg[c], out=self.Y[spare])
        s = torch.mul(self.d[c], t if isinstance(t, torch.Tensor) else float(t), out=self.S[spare])
        self.pg[o].copy_(g)
        ys = y.dot(s)
        kept = ys > 1e-10
        self.rho[spare] = 1.0 / ys
        self.hd[o] = torch.where(kept, ys / y.dot(y), self.hd[c])
        full = count == self.H
        rows = [(head + i) % ring for i in range(count)] + [spare]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        live = [self.rho[r] for r in rows[:-1]] + [torch.where(kept, self.rho[spare], zero)]  # rho, 0 if dropped
        if full:
            live[0] = torch.where(kept, zero, live[0])
        q = torch.neg(g, out=self.d[o])
        al = [None] * len(rows)
        for i in reversed(range(len(rows))):
            al[i] = self.S[rows[i]].dot(q) * live[i]
            q.sub_(self.Y[rows[i]] * al[i])
        r = q.mul_(self.hd[o])
        for i in range(len(rows)):
            be = self.Y[rows[i]].dot(r) * live[i]
            r.add_(self.S[rows[i]] * (al[i] - be))
        al = torch.stack(al)
        evict = kept & full
        al = torch.where(evict, al.roll(-1), al)  # al of the new window, oldest first
        m = min(len(rows), self.H)
        self.al[o, :m] = al[:m]
        self.meta[o, 0] = torch.where(evict, (head + 1) % ring, head)
        self.meta[o, 1] = count if full else torch.where(kept, count + 1, count)
        self.out[0] = kept
        self.out[1] = g.dot(r)
        self.out[2] = r.abs().max()

    def fresh(self, g: torch.Tensor) -> torch.Tensor:
        """torch's first iteration: d = -g, empty history, H_diag = 1 (other parity, not committed)."""
        o = 1 - self.cur
        torch.neg(g, out=self.d[o])
        self.pg[o].copy_(g)
        self.meta[o].zero_()
        self.hd[o].fill_(1)
        return self.d[o]

    def commit(self, kept) -> None:
        """Make the other parity current; kept: the kernel's curvature test (None: a fresh start)."""
        self.cur = 1 - self.cur
        if kept is None:
            self.head, self.count, self.hd_value = 0, 0, 1
            return
        self.has_al = True
        if kept:
            self.hd_value = None
            if self.count == self.H:
                self.head = (self.head + 1) % (self.H + 1)
            else:
                self.count += 1

    def views(self, parity: int, reals) -> list:
        """d[parity] split into views shaped like the params' real views (for one _foreach_add_ per move)."""
        out, start = [], 0
        for r in reals:
            out.append(self.d[parity, start:start + r.numel()].view_as(r))
            start += r.numel()
        if start != self.n:
            raise RuntimeError(f"LBFGS: direction has {self.n} elements, params {start}")
        return out

    def materialize(self, state: dict) -> None:
        """torch's state layout, as views of the current buffers."""
        c = self.cur
        rows = [(self.head + i) % (self.H + 1) for i in range(self.count)]
        state["d"] = self.d[c]
        state["old_dirs"] = [self.Y[r] for r in rows]
        state["old_stps"] = [self.S[r] for r in rows]
        state["ro"] = [self.rho[r] for r in rows]
        state["H_diag"] = self.hd[c] if self.hd_value is None else self.hd_value
        state["prev_flat_grad"] = self.pg[c]
        if self.has_al:
            state["al"] = [self.al[c, i] for i in range(self.count)] + [None] * (self.H - self.count)
        self.state_token = (state, state["old_dirs"])


def _flat_dtype(params):
    """dtype of the flat vectors (torch.cat of the real views of the grads)."""
    dt = None
    for p in params:
        r = p.dtype.to_real()
        dt = r if dt is None else torch.promote_types(dt, r)
    return dt


def _snapshot(v):
    """A deep copy of state values (tensors cloned): the fused state holds views of buffers later steps overwrite."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _snapshot(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_snapshot(x) for x in v]
    return v


@register
class LBFGS(FusedOptimizer):
    """torch.optim.LBFGS (same signature, state, closure calls and trajectory), plus keyword-only ``fused``.

    ``fused=True`` (``None``: when every param is on CUDA) runs the device path described in the module docstring:
    one launch per direction update, and device -> host syncs only at the algorithm's decisions:
    1 per iteration without line search; 1 + (line-search evaluations) per iteration with strong_wolfe; plus 1 per
    step() call (``host_syncs`` counts them). float32 and float64 params (complex as real pairs).
    """
    requires_closure = True
    elementwise = False  # dot products over the whole flat vector
    supports_precision_options = False  # line search and history assume the params' own precision
    supports_max_grad_norm = False  # the line search and the curvature pairs need the true gradient
    scalar_keys = ()
    _step_supports_amp_scaling = False
    kernel_variants = ()  # no multi-tensor rule: aot_kernels() lists the direction kernel
    host_syncs = 0        # device -> host transfers made by the fused path (tests count them)
    _dev = None           # the fused path's _DeviceHistory

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None, *, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults, fused=fused)

    def add_param_group(self, param_group):
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(param_group)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], tolerance_grad=group["tolerance_grad"],
                     tolerance_change=group["tolerance_change"])
        for key in ("max_iter", "max_eval"):
            v = group[key]
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf,
                  f"Invalid {key} value: {v}")
        h = group["history_size"]
        check(isinstance(h, int) and not isinstance(h, bool) and h >= 1, f"Invalid history_size value: {h}")
        ls = group["line_search_fn"]
        check(ls in (None, "strong_wolfe"), f"Invalid line_search_fn value: {ls!r} (None or 'strong_wolfe')")

    # ---- flat views of the params (one vector over all params, complex as real pairs) ----------------------------
    @staticmethod
    def _gather_flat_grad(params):
        views = []
        for p in params:
            if p.grad is None:
                v = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            elif p.grad.is_sparse:
                v = p.grad.to_dense().view(-1)
            else:
                v = p.grad.view(-1)
            views.append(torch.view_as_real(v).view(-1) if v.is_complex() else v)
        return torch.cat(views, 0)

    @staticmethod
    def _add_dir(params, t, d):
        """params += t * d (d flat)."""
        start = 0
        for p in params:
            p = torch.view_as_real(p) if p.is_complex() else p
            n = p.numel()
            p.add_(d[start:start + n].view_as(p), alpha=t)
            start += n
        if start != d.numel():
            raise RuntimeError(f"LBFGS: direction has {d.numel()} elements, params {start}")

    # ---- the step -----------------------------------------------------------------------------------------------
    @classmethod
    def _has_kernel(cls) -> bool:
        return runtime.available()

    def _use_kernel(self, group, params) -> bool:
        if group.get("fused") is None and _flat_dtype(params) not in (torch.float32, torch.float64):
            return False
        return super()._use_kernel(group, params)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("LBFGS.step() requires a closure that re-evaluates the loss (and its grads)")
        group, closure = self.param_groups[0], torch.enable_grad()(closure)
        if self._use_kernel(group, group["params"]):
            return self._fused_step(group, closure)
        self._dev = None  # the reference path edits the state's lists: the fused buffers no longer mirror them
        return self._reference_step(group, closure)

    def state_dict(self):
        sd = super().state_dict()
        if self._dev is not None:
            sd["state"] = _snapshot(sd["state"])
        return sd

    @staticmethod
    def _remember(state, y, s, ys, history_size):
        """Append a curvature pair (dropping the oldest when full)."""
        if len(state["old_dirs"]) == history_size:
            for k in ("old_dirs", "old_stps", "ro"):
                state[k].pop(0)
        state["old_dirs"].append(y)
        state["old_stps"].append(s)
        state["ro"].append(1.0 / ys)

    def _reference_step(self, group, closure):
        params = group["params"]
        lr = _lr_of(group)
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        history_size = group["history_size"]
        # torch keeps the (global) state under the first param, so load_state_dict casts it with that param
        state = self.state[params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        flat_grad = self._gather_flat_grad(params)
        if flat_grad.abs().max() <= tol_grad:
            return orig_loss  # already optimal: nothing else is recorded

        st = {k: state.get(k) for k in _CARRIED}
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # -- direction
            if state["n_iter"] == 1:
                st.update(d=flat_grad.neg(), old_dirs=[], old_stps=[], ro=[], H_diag=1)
            else:
                y = flat_grad.sub(st["prev_flat_grad"])
                s = st["d"].mul(st["t"])
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only if it has positive curvature
                    self._remember(st, y, s, ys, history_size)
                    st["H_diag"] = ys / y.dot(y)
                al = state.setdefault("al", [None] * history_size)
                st["d"] = two_loop(flat_grad, st["old_dirs"], st["old_stps"], st["ro"], st["H_diag"], al)
            d = st["d"]
            if st["prev_flat_grad"] is None:
                st["prev_flat_grad"] = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                st["prev_flat_grad"].copy_(flat_grad)
            st["prev_loss"] = prev_loss = loss

            # -- step length
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tol_change:  # not a descent direction (to tolerance)
                st["t"] = t
                break
            n_ls = 0
            if group["line_search_fn"] == "strong_wolfe":
                x0 = [p.clone(memory_format=torch.contiguous_format) for p in params]

                def evaluate(t_try):
                    self._add_dir(params, t_try, d)
                    f = float(closure())
                    g = self._gather_flat_grad(params)
                    for p, p0 in zip(params, x0):
                        p.copy_(p0)
                    return f, g, g.dot(d)

                loss, flat_grad, t, n_ls = strong_wolfe(evaluate, t, d.abs().max(), loss, flat_grad, gtd,
                                                        max_ls=max_eval - evals)
                self._add_dir(params, t, d)
                opt_cond = flat_grad.abs().max() <= tol_grad
            else:
                self._add_dir(params, t, d)
                opt_cond = False
                if n_iter != max_iter:  # the last iteration's loss is never looked at: skip that evaluation
                    loss = float(closure())
                    flat_grad = self._gather_flat_grad(params)
                    opt_cond = flat_grad.abs().max() <= tol_grad
                    n_ls = 1
            st["t"] = t
            evals += n_ls
            state["func_evals"] += n_ls

            # -- stopping tests
            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
                break

        state.update(st)
        return orig_loss

    # ---- the fused path ---------------------------------------------------------------------------------------------
    def _fetch(self, device, *values):
        """The values (0-d tensors on ``device``, or host numbers) as Python floats, in ONE device -> host transfer."""
        on_dev = [v.detach().reshape(1).to(torch.float64) for v in values
                  if isinstance(v, torch.Tensor) and v.device == device]
        host = iter(torch.cat(on_dev).tolist() if on_dev else ())
        self.host_syncs += 1
        return [next(host) if isinstance(v, torch.Tensor) and v.device == device else float(v) for v in values]

    def _fetch_direction(self, dev, *extra):
        """extra values + (kept, g.d, max|d|) of the direction kernel just launched, in one transfer."""
        *vals, failed = self._fetch(dev.device, *extra, *dev.out)
        if failed:
            dev.out.zero_()
            dev.counter.zero_()
            raise RuntimeError("LBFGS: the direction kernel's grid barrier timed out (were all its programs resident "
                               "on the GPU?)")
        return vals

    def _device_history(self, state, group, g) -> _DeviceHistory:
        """The buffers, (re)built from the state unless they are what the last fused step left in it."""
        dev = self._dev
        if not (dev is not None and dev.state_token is not None and dev.state_token[0] is state
                and dev.state_token[1] is state.get("old_dirs") and dev.n == g.numel() and dev.dtype == g.dtype
                and dev.device == g.device and dev.H == group["history_size"]):
            dev = self._dev = _DeviceHistory(g.numel(), group["history_size"], g.dtype, g.device)
            dev.load(state)
        return dev

    def _fused_step(self, group, closure):
        params = group["params"]
        if _flat_dtype(params) not in (torch.float32, torch.float64):
            raise RuntimeError(f"LBFGS: fused=True supports float32 and float64 params, got {_flat_dtype(params)}")
        lr_t = _lr_of(group)  # torch's lr object (what state["t"] holds after a plain iteration)
        lr = _host_scalar(lr_t.dtype)(lr_t.item()) if isinstance(lr_t, torch.Tensor) else lr_t
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        wolfe = group["line_search_fn"] == "strong_wolfe"
        state = self.state[params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        reals = [torch.view_as_real(p) if p.is_complex() else p for p in params]

        orig_loss = closure()
        evals = 1
        state["func_evals"] += 1
        g = self._gather_flat_grad(params)
        dev = self._device_history(state, group, g)
        hs = _host_scalar(g.dtype)  # host stand-in of torch's 0-d tensors in g's dtype
        dev_ = dev.device
        optimal = g.abs().max() <= tol_grad
        if state["n_iter"] == 0:  # torch's first iteration: d = -g, t = min(1, 1 / |g|_1) * lr
            d_new = dev.fresh(g)
            inv = 1.0 / g.abs().sum()
            loss, opt, gtd, dmax, inv_h, t_first = self._fetch(
                dev_, orig_loss, optimal, g.dot(d_new), d_new.abs().max(), inv, inv * lr_t)
            t_first = _host_scalar(torch.result_type(inv, lr_t))(t_first)
            kept = None
        else:
            dev.launch(g, state["t"])
            loss, opt, kept, gtd, dmax = self._fetch_direction(dev, orig_loss, optimal)
        if opt:
            return orig_loss  # already optimal: nothing else is recorded (the computed direction is dropped)

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            dev.commit(kept)
            views = dev.views(dev.cur, reals)
            prev_loss = loss
            # torch's min(1.0, inv) * lr is a 0-d tensor when inv < 1
            t = (t_first if inv_h < 1.0 else 1.0 * lr) if state["n_iter"] == 1 else lr
            if hs(gtd) > hs(-tol_change):  # not a descent direction (to tolerance)
                break
            if wolfe:
                if dev.x0 is None:
                    dev.x0 = [torch.empty_like(r) for r in reals]
                torch._foreach_copy_(dev.x0, reals)
                d = dev.d[dev.cur]

                def evaluate(t_try):
                    torch._foreach_add_(reals, views, alpha=float(t_try))
                    f = closure()
                    g_try = self._gather_flat_grad(params)
                    torch._foreach_copy_(reals, dev.x0)
                    f, slope, opt_try = self._fetch(dev_, f, g_try.dot(d), g_try.abs().max() <= tol_grad)
                    return f, (g_try, opt_try), hs(slope)

                with np.errstate(all="ignore") if np is not None else contextlib.nullcontext():
                    # numpy warns where torch silently rounds (a huge loss cast to float32 is inf in both)
                    loss, (g, opt), t, n_ls = strong_wolfe(evaluate, t, hs(dmax), loss, (g, False), hs(gtd),
                                                           max_ls=max_eval - evals)
                torch._foreach_add_(reals, views, alpha=float(t))
            else:
                torch._foreach_add_(reals, views, alpha=float(t))
                n_ls, opt = 0, False
                if n_iter != max_iter:  # the last iteration's loss is never looked at: skip that evaluation
                    new_loss = closure()
                    g = self._gather_flat_grad(params)
                    n_ls = 1
            evals += n_ls
            state["func_evals"] += n_ls

            # -- stopping tests (torch's order; all of them stop, so only whether one holds matters)
            if n_iter == max_iter or evals >= max_eval:
                break
            small_step = hs(hs(dmax) * hs(t)) <= hs(tol_change)  # d.mul(t).abs().max() <= tolerance_change
            if not wolfe:
                # the next direction, speculatively: its tests ride on this transfer; a stop below discards it
                dev.launch(g, t)
                loss, opt, kept, gtd_next, dmax_next = self._fetch_direction(dev, new_loss, g.abs().max() <= tol_grad)
            if opt or small_step or abs(loss - prev_loss) < tol_change:
                break
            if wolfe:
                dev.launch(g, t)
                kept, gtd, dmax = self._fetch_direction(dev)
            else:
                gtd, dmax = gtd_next, dmax_next

        dev.materialize(state)
        state["t"] = lr_t if t is lr else t if type(t) in (int, float) else t.to(dev_) if isinstance(
            t, torch.Tensor) else torch.tensor(t.item(), dtype=_TORCH_DTYPE[t.dtype.name], device=dev_)
        state["prev_loss"] = prev_loss
        return orig_loss
