"""The fused LBFGS path's device history: the direction kernel's buffers plus the host's mirror of the ring, the
conversions to and from torch's state layout, and the kernel's contract in torch ops (a cross-check, and the
fallback where a device refuses the kernel's cooperative launch). See Note [LBFGS ring buffers] in
fused_optim/kernels/README.md."""
from __future__ import annotations

import torch

from ..kernels.lbfgs import CURVATURE_THRESHOLD, DirectionBuffers
from .lbfgs_search import flat_views


class DeviceHistory(DirectionBuffers):
    """The buffers (``cur`` is the current parity), the host's mirror of the ring (head, count), so torch's state
    layout can be materialized without a sync, and the line search's param snapshot ``x0``."""

    def __init__(self, n: int, H: int, dtype, device):
        super().__init__(n, H, dtype, device)
        self.cur, self.head, self.count = 0, 0, 0
        self.hd_value = 1      # torch's H_diag until the first kept pair: the int 1 (then the 0-d tensor hd[cur])
        self.has_al = False
        self.x0 = None
        self.state_token = None

    @classmethod
    def for_state(cls, dev, state: dict, g: torch.Tensor, H: int) -> DeviceHistory:
        """``dev`` if it holds what the last fused step left in ``state`` (for flat grads like g and history H),
        else new buffers loaded from the state."""
        token = dev.state_token if dev is not None else None
        if (token is not None and token[0] is state and token[1] is state.get("old_dirs") and dev.n == g.numel()
                and dev.dtype == g.dtype and dev.device == g.device and dev.H == H):
            return dev
        dev = cls(g.numel(), H, g.dtype, g.device)
        dev.load(state)
        return dev

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
        self.meta_head[self.cur], self.meta_count[self.cur] = 0, c
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

    def direction(self, g: torch.Tensor, t, kernel: bool = True) -> None:
        """The next direction from grad g and the last step length t, into the other parity (not committed):
        one kernel launch, or (``kernel=False``, or where the device refused the cooperative launch) the same
        contract in torch ops. That fallback costs ~6 launches and 5 streamed n-vectors per pair (the kernel: 4,
        in one launch), still without a sync."""
        if not (kernel and self.launch(g, t, self.cur)):
            self._direction_torch(g, t)

    def _direction_torch(self, g: torch.Tensor, t) -> None:
        """The kernel's contract in plain torch ops, without a sync: the curvature test is never branched on; the
        pair it drops (the new one, or the evicted oldest) gets rho = 0, which turns its two-loop updates into exact
        no-ops (v + 0 * x == v)."""
        c, o, ring = self.cur, 1 - self.cur, self.H + 1
        head, count = self.head, self.count  # the host mirror of meta[c]
        spare = (head + count) % ring
        y = torch.sub(g, self.pg[c], out=self.Y[spare])
        s = torch.mul(self.d[c], t if isinstance(t, torch.Tensor) else float(t), out=self.S[spare])
        self.pg[o].copy_(g)
        ys = y.dot(s)
        kept = ys > CURVATURE_THRESHOLD
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
        self.meta_head[o] = torch.where(evict, (head + 1) % ring, head)
        self.meta_count[o] = count if full else torch.where(kept, count + 1, count)
        self.kept.copy_(kept)
        self.gtd.copy_(g.dot(r))
        self.dmax.copy_(r.abs().max())

    def results(self) -> tuple:
        """The last direction's (kept, g.d, max|d|) and the barrier's failure flag, as 0-d device tensors."""
        return self.kept, self.gtd, self.dmax, self.barrier.words[1]

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
        return flat_views(self.d[parity], reals)

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


def snapshot(v):
    """A deep copy of state values (tensors cloned): the fused state holds views of buffers later steps overwrite."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: snapshot(x) for k, x in v.items()}
    if isinstance(v, list):
        return [snapshot(x) for x in v]
    return v
