"""Cross-program synchronization, in one place: "arrive" counters (the last program of a set finishes the work),
fixed-order partial sums (deterministic reductions, no float atomics), and the grid barrier of persistent launches
with its host side. A kernel holding a grid barrier is launched with ``runtime.launch_phases`` (cooperative, or
one launch per phase where the device refuses)."""
from __future__ import annotations

import torch

from . import runtime

if runtime.available():
    import triton
    import triton.language as tl

    # ---- deterministic cross-program reductions (NovoGrad's per-layer norms, Adafactor's row/col means) ----------
    # Each program stores its partial result, then "arrives" at a counter; the last of the expected programs sums the
    # partials in a fixed order and resets the counter. No float atomics: the result does not depend on scheduling.

    @triton.jit
    def arrive(counter, expected):
        """Count this program in at `counter`; True in the last of `expected` programs (which must reset it to 0).

        The barrier makes every thread's earlier stores precede the device-scope acquire-release atomic, so the last
        program sees all partials stored before the other programs arrived."""
        tl.debug_barrier()
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        return done == expected - 1

    @triton.jit
    def sum_partials(ptr, n, PB: tl.constexpr):
        """Sum of the n values at ptr (fp32, or fp64 for fp64 partials), PB lanes at a time, in a fixed order. Loads
        bypass L1 (.cg): the values were written by other programs of this launch."""
        acc = tl.zeros([PB], ptr.dtype.element_ty)
        for start in range(0, n, PB):
            offs = start + tl.arange(0, PB)
            acc += tl.load(ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
        return tl.sum(acc, axis=0)

    # ---- grid barrier for persistent launches (grid <= SM count, so every program is resident) ---------------------
    # The counter counts arrivals cumulatively over a launch: barrier k (k = 1, 2, ...) waits for k * G arrivals, and
    # grid_barrier_exit (one more arrival per program) lets the last program out reset it for the next launch.

    GRID_SPIN_LIMIT = tl.constexpr(1 << 24)  # ~seconds of polling: a barrier that never completes gives up

    @triton.jit
    def grid_barrier(counter, target):
        """Wait until `target` arrivals (this one included) are counted at `counter`; 1 if they were, 0 if the spin
        limit gave up. Cooperative groups' grid sync: the CTA barrier orders every thread's earlier stores before the
        acquire-release atomic at GPU scope, so after it they are visible to every program (loads of them must
        bypass L1: cache_modifier=".cg")."""
        tl.debug_barrier()
        seen = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") + 1
        spins = 0
        while (seen < target) & (spins < GRID_SPIN_LIMIT):
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.debug_barrier()
        return (seen >= target).to(tl.int32)

    @triton.jit
    def grid_barrier_exit(counter, total, ok):
        """Every program calls this once after its last grid_barrier (total = (barriers + 1) * G): the last one out
        resets the counter to 0 (all others are past every spin). A program whose barrier gave up (ok == 0) sets
        counter[1], a sticky failure flag for the host to inspect."""
        if ok == 0:
            tl.atomic_xchg(counter + 1, 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        left = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if left == total - 1:
            tl.atomic_xchg(counter, 0, sem="acq_rel", scope="gpu")

    @triton.jit
    def run_phases(barrier, PASSES: tl.constexpr, NPASS: tl.constexpr, ITEM: tl.constexpr, COUNT: tl.constexpr,
                   args):
        """The persistent launch's body: each pass k set in PASSES (bits, run in order 0 .. NPASS-1) over its work
        items pid, pid + G, ... (``COUNT(PASS, args)`` of them, each done by ``ITEM(item, PASS, args)``), with a grid
        barrier between consecutive passes. One pass with one program per item is a plain launch."""
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        nb = 0  # barriers passed (compile-time)
        ok = 1
        for PASS in tl.static_range(NPASS):
            if PASSES & (1 << PASS):
                if PASSES & ((1 << PASS) - 1):  # an earlier pass ran in this launch: wait until all of it did
                    ok = ok & grid_barrier(barrier, (nb + 1) * G)
                    nb += 1
                for item in range(pid, COUNT(PASS, args), G):
                    ITEM(item, PASS, args)
        if nb > 0:
            grid_barrier_exit(barrier, (nb + 1) * G, ok)


class GridBarrier:
    """The host side of a table's persistent launches: ``words`` (int32 [2] on the device: the grid barrier's arrival
    count, and a sticky "a barrier gave up" flag) and the lazy report of that flag.

    Persistent launches are cooperative (runtime.launch_phases), so the driver makes every program resident and a
    barrier cannot wait forever; the spin limit and this report stay as a guard against a broken promise."""

    def __init__(self, device):
        self.words = torch.zeros(2, dtype=torch.int32, device=device)
        self._flag_host = None  # pinned copy of words[1] after the last persistent launch
        self._event = None

    def watch(self, who: str) -> None:
        """Call after every persistent launch on CUDA. Reported without a host sync: the flag is copied to pinned
        memory after the launch, and a later step raises once that copy has landed. ``who`` names the optimizer."""
        if self.words.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return  # CUDA graphs: no event queries while capturing
        if self._flag_host is None:
            self._flag_host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self._event = torch.cuda.Event()
        elif self._event.query() and int(self._flag_host[0]) != 0:  # a host tensor: no device sync
            raise RuntimeError(f"{who}(fused=True): a grid barrier gave up waiting for the kernel's programs, so "
                               "recent steps are wrong; use fused=False on this setup")
        self._flag_host.copy_(self.words[1:], non_blocking=True)
        self._event.record()
