"""The LBFGS direction kernel family: one launch computes a whole direction update (the new curvature pair, its test
and the ring update, both loops of the two-loop recursion in torch's order, g.d and max|d|). Its buffers
(``DirectionBuffers``), launcher and AOT entries. See Note [LBFGS one-launch two-loop] and Note [LBFGS cross-program
dots] in kernels/README.md; the host side is optimizers/lbfgs_history.py."""
from __future__ import annotations

import torch

from . import runtime, sync
from .tables import fields

BLOCK = runtime.BLOCK if runtime.interpreter_enabled() else 1024  # elements per program and loop trip
NUM_WARPS = 4
PB = 1 if runtime.interpreter_enabled() else 256  # partials per trip (>= the SM count: one trip)
MIN_CHUNK = 8 * 1024  # elements per program at least: a barrier costs more than streaming a small chunk
CURVATURE_THRESHOLD = 1e-10  # torch's `if ys > 1e-10`

# named fields of the small vectors: ring meta (logical pair i at row (head + i) % (H + 1)), the launch's inputs
# (hp) and its results (out)
META_HEAD, META_COUNT, META_WIDTH = fields("head", "count")
HP_T, HP_THRESHOLD, HP_WIDTH = fields("t", "threshold")
OUT_KEPT, OUT_GTD, OUT_DMAX, OUT_WIDTH = fields("kept", "gtd", "dmax")

if runtime.available():
    import triton
    import triton.language as tl

    from .sync import grid_barrier, grid_barrier_exit  # a kernel calls only jit functions among its module's globals

    @triton.jit
    def _reduce(part, phase, pid, G, a, b, barrier, ok, PB: tl.constexpr):
        """Publish this program's partials (a, b) of a phase, wait for all G programs, and return (sum of a, sum of b,
        max of b) over them in a fixed order, so every program gets the same numbers, and ok (cleared if the barrier
        gave up). Not sync.sum_partials: these sums are fp64 and come with a max."""
        slot = part + 2 * (phase * G + pid)
        tl.store(slot, a)
        tl.store(slot + 1, b)
        ok = ok & grid_barrier(barrier, (phase + 1) * G)
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
        return tl.sum(sa, 0), tl.sum(sb, 0), tl.max(mb, 0), ok

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
    def _new_pair(g, pg_in, pg_out, d_in, Y, S, rho, part, barrier, head, count, hdiag, t, threshold, n, H, pid, G,
                  lo, hi, DT: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
        """Phase 0: the candidate pair into the spare row, and torch's `if ys > 1e-10` (keep it: rho, H_diag = y.s /
        y.y, dropping the oldest pair when full). Returns the new (head, count, H_diag), kept, ok."""
        ring = H + 1
        spare = (head + count) % ring
        a, b = _pair_sweep(g, pg_in, pg_out, d_in, Y + spare * n, S + spare * n, t, lo, hi, BLOCK)
        ys, yy, _, ok = _reduce(part, 0, pid, G, a, b, barrier, 1, PB)
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
        return head, count, hdiag, kept, ok

    @triton.jit
    def _first_loop(d_out, g, Y, S, rho, al_out, part, barrier, head, count, hdiag, ok, n, H, pid, G, lo, hi,
                    DT: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
        """Phases 1 .. count + 1, newest pair first: pass k applies pair j + 1 (k > 0) and dots pair j's s with q; the
        last pass also scales by H_diag and dots the oldest y with r (the second loop's first dot), or without pairs
        gives (g.d, max|d|). Returns the next coefficient, g.d, max|d|, ok."""
        ring = H + 1
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
            sa, _, mb, ok = _reduce(part, k + 1, pid, G, a, b, barrier, ok, PB)
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
        return coef, gtd, dmax, ok

    @triton.jit
    def _second_loop(d_out, g, Y, S, rho, al_out, part, barrier, head, count, coef, gtd, dmax, ok, n, H, pid, G, lo,
                     hi, DT: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
        """Phases count + 2 .. 2 count + 1, oldest pair first: pass m applies pair m - 1 and dots pair m's y with r;
        the last one leaves d and gives (g.d, max|d|). Returns g.d, max|d|, ok."""
        ring = H + 1
        for m in range(1, count + 1):
            final = m == count
            a, b = _sweep(d_out, g, S + ((head + m - 1) % ring) * n, coef, tl.full((), 1.0, DT),
                          Y + ((head + m) % ring) * n, False, final, lo, hi, BLOCK)
            sa, _, mb, ok = _reduce(part, count + 1 + m, pid, G, a, b, barrier, ok, PB)
            if final:
                gtd = sa
                dmax = mb
            else:
                al_m = tl.load(al_out + m, cache_modifier=".cg")
                coef = al_m - sa.to(DT) * tl.load(rho + (head + m) % ring, cache_modifier=".cg")
        return gtd, dmax, ok

    @triton.jit
    def _lbfgs_direction_kernel(g, pg_in, pg_out, d_in, d_out, Y, S, rho, hd_in, hd_out, al_out, meta_in, meta_out,
                                hp, out, part, barrier, n, H, G,
                                DT: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
        """One L-BFGS direction update (torch's 'compute gradient descent direction' block), in one launch.

        In: grad g, previous grad pg_in, previous direction d_in, the ring (Y, S, rho, meta_in), H_diag hd_in, and
        hp (the last step length, the curvature threshold). Out: the new pair in the spare row (if kept: rho,
        meta_out, hd_out), pg_out = g, the direction d_out, the first loop's coefficients al_out, and out (kept, g.d,
        max|d|). Scalars are rounded to DT where torch holds them as DT 0-d tensors; dots accumulate in fp64.
        Each program owns a contiguous chunk of n; phases are separated by grid barriers."""
        pid = tl.program_id(0)
        per = tl.cdiv(tl.cdiv(n, G), BLOCK) * BLOCK
        lo = pid.to(tl.int64) * per
        hi = tl.minimum(lo + per, n)
        head, count, hdiag, kept, ok = _new_pair(
            g, pg_in, pg_out, d_in, Y, S, rho, part, barrier, tl.load(meta_in + META_HEAD),
            tl.load(meta_in + META_COUNT), tl.load(hd_in), tl.load(hp + HP_T).to(DT),
            tl.load(hp + HP_THRESHOLD).to(DT), n, H, pid, G, lo, hi, DT, BLOCK, PB)
        coef, gtd, dmax, ok = _first_loop(d_out, g, Y, S, rho, al_out, part, barrier, head, count, hdiag, ok, n, H,
                                          pid, G, lo, hi, DT, BLOCK, PB)
        gtd, dmax, ok = _second_loop(d_out, g, Y, S, rho, al_out, part, barrier, head, count, coef, gtd, dmax, ok, n,
                                     H, pid, G, lo, hi, DT, BLOCK, PB)
        if pid == 0:
            tl.store(out + OUT_KEPT, kept.to(tl.float64))
            tl.store(out + OUT_GTD, gtd.to(DT).to(tl.float64))
            tl.store(out + OUT_DMAX, dmax)
            tl.store(meta_out + META_HEAD, head)
            tl.store(meta_out + META_COUNT, count)
            tl.store(hd_out, hdiag)
        grid_barrier_exit(barrier, (2 * count + 3) * G, ok)  # 2 count + 2 barriers passed


def constexprs(dtype) -> dict:
    return dict(DT=runtime.tl_dtype(dtype), BLOCK=BLOCK, PB=PB)


def grid_size(n: int, device) -> int:
    """Programs of a direction launch: one per MIN_CHUNK elements, at most one per SM (so all can be resident)."""
    return runtime.persistent_grid(-(-n // MIN_CHUNK), device)


class DirectionBuffers:
    """The device vectors the kernel reads and writes for n-element flat vectors and history H: the ring Y, S
    [H + 1, n] and rho [H + 1] (one spare row takes the candidate pair, so a discarded candidate never overwrites a
    kept one), and double buffers d, pg (previous grad), hd (H_diag), al, meta: a launch reads parity c and writes
    1 - c. ``kept``, ``gtd``, ``dmax`` are views of the results, ``meta_head``/``meta_count`` of the ring meta."""

    def __init__(self, n: int, H: int, dtype, device):
        self.n, self.H, self.dtype, self.device = n, H, dtype, device
        z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)
        self.Y, self.S, self.rho = z(H + 1, n), z(H + 1, n), z(H + 1)
        self.d, self.pg, self.hd, self.al = z(2, n), z(2, n), z(2), z(2, H)
        self.meta = z(2, int(META_WIDTH), dt=torch.int64)
        self.meta_head, self.meta_count = self.meta[:, int(META_HEAD)], self.meta[:, int(META_COUNT)]
        self.hp = z(int(HP_WIDTH), dt=torch.float64)
        self.hp[int(HP_THRESHOLD)] = CURVATURE_THRESHOLD
        self.out = z(int(OUT_WIDTH), dt=torch.float64)
        self.kept, self.gtd, self.dmax = (self.out[int(i)] for i in (OUT_KEPT, OUT_GTD, OUT_DMAX))
        self.G = grid_size(n, device)
        self.part = z((2 * H + 2) * self.G * 2, dt=torch.float64)  # (a, b) per phase and program
        self.barrier = sync.GridBarrier(device)

    def launch(self, g: torch.Tensor, t, c: int) -> bool:
        """The direction update from grad g and the last step length t (a number or a 0-d tensor, copied on the
        device), reading parity c, writing 1 - c. False, launching nothing, where the device refuses a cooperative
        launch of G programs (now or at an earlier step): the caller computes the direction another way."""
        key = str(self.device)
        if self.G > 1 and key in runtime.refused_devices:
            return False
        if isinstance(t, torch.Tensor):  # a loaded state's t (a 0-d tensor): copied, not read on the host
            self.hp[int(HP_T)].copy_(t)
        else:
            self.hp[int(HP_T)].fill_(float(t))
        o = 1 - c
        try:
            runtime.launch(
                _lbfgs_direction_kernel, self.G,
                g, self.pg[c], self.pg[o], self.d[c], self.d[o], self.Y, self.S, self.rho, self.hd[c], self.hd[o],
                self.al[o], self.meta[c], self.meta[o], self.hp, self.out, self.part, self.barrier.words, self.n,
                self.H, self.G, num_warps=NUM_WARPS, cooperative=self.G > 1, **constexprs(self.dtype))
        except runtime.CooperativeLaunchRefused:
            runtime.refused_devices.add(key)
            return False
        return True


def aot_kernels():
    """The direction kernel for fused_optim.tools.aot: float32 and float64 flat vectors."""
    types = {"meta_in": "*i64", "meta_out": "*i64", "hp": "*fp64", "out": "*fp64", "part": "*fp64",
             "barrier": "*i32", "n": "i64", "H": "i32", "G": "i32"}
    entries = []
    for dt, ptr in ((torch.float32, "*fp32"), (torch.float64, "*fp64")):
        cx = constexprs(dt)
        sig = {a: "constexpr" if a in cx else types.get(a, ptr) for a in _lbfgs_direction_kernel.arg_names}
        entries.append(dict(name=f"LBFGS[direction] {str(dt).replace('torch.', '')}", fn=_lbfgs_direction_kernel,
                            signature=sig, constexprs=cx, options=runtime.compile_options(NUM_WARPS)))
    return entries
