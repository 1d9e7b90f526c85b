"""FSDP2 (DTensor) params for the steps that reduce over whole tensors: the placements they handle exactly, and the
one collective that turns per-tensor partial sums over the local shards into the sums over the full tensors.

A statistic that is a sum over a tensor's elements (a squared norm, a dot product, a column sum, a count) is the
sum of that statistic over the tensor's shards. So a step computes its partial sums on the local shards, packs
them into one buffer, and ``Layout.full_sums`` combines the buffer across the shards' process group with one
collective: an all-gather of every rank's buffer, then a sum over the ranks in rank order. Every rank gets the
same bits, and the result does not depend on the collective's algorithm (ring, tree) nor on timing. Entries of
replicated params (and of plain tensors) are taken from the local buffer: every rank holds the whole tensor.

Handled: Shard(0) on a 1-D mesh (FSDP2's fully_shard, uneven shards included: a rank's shard may be empty) and
Replicate. Everything else (another dim, 2-D meshes as with tensor parallelism, Partial) is refused before any
state changes, naming the param and its placement.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._tensors import any_dtensor, is_dtensor, keep_replaced, local
from .kernels import quant

# torch 2.13 renamed all_gather_into_tensor (the old name warns there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _placement_ok(t, any_shard_dim: bool) -> bool:
    if t.device_mesh.ndim != 1:
        return False
    (pl,) = t.placements
    return pl.is_replicate() or (pl.is_shard() and (any_shard_dim or pl.dim == 0))


def check_placements(who: str, groups, *, any_shard_dim: bool = False) -> None:
    """Raise NotImplementedError naming the first DTensor param of ``groups`` (lists of params, one per param
    group) whose placement is not handled: Shard(0) (any Shard(d) with any_shard_dim) on a 1-D mesh, or
    Replicate. Params of one step must share one process group."""
    pgs = set()
    for gi, params in enumerate(groups):
        for i, p in enumerate(params):
            if not is_dtensor(p):
                continue
            if not _placement_ok(p, any_shard_dim):
                allowed = "Shard(d)" if any_shard_dim else "Shard(0)"
                raise NotImplementedError(
                    f"{who}: param {i} of param group {gi} (shape {tuple(p.shape)}) is a DTensor with placements "
                    f"{p.placements} on a mesh of shape {tuple(p.device_mesh.shape)}; its statistics over the whole "
                    f"tensor are exact only for {allowed} on a 1-D mesh (FSDP2's fully_shard) or Replicate")
            pgs.add(p.device_mesh.get_group())
    if len(pgs) > 1:
        raise NotImplementedError(f"{who}: DTensor params on {len(pgs)} different process groups; the statistics "
                                  f"over whole tensors need them all on one mesh")


class Layout:
    """Which tensors of a list are sharded, and over which process group."""

    def __init__(self, params):
        self.sharded = [is_dtensor(p) and p.placements[0].is_shard() for p in params]
        self.shapes = [tuple(p.shape) for p in params]  # the full tensors' (a DTensor's shape is the global one)
        first = next((p for p, s in zip(params, self.sharded) if s), None)
        self.mesh = None if first is None else first.device_mesh
        self.group = None if first is None else first.device_mesh.get_group()
        self.world = 1 if first is None else first.device_mesh.size()
        self._mask = self._packed = None  # masks of replicated entries, made once (an upload is a host sync)

    def pick(self, idx) -> "Layout":
        """The Layout of the tensors at ``idx`` (e.g. one dtype bucket of them); no process group when none of them
        is sharded (every rank decides alike: placements are the same on every rank)."""
        sub = object.__new__(Layout)
        sub.sharded, sub.shapes = [self.sharded[i] for i in idx], [self.shapes[i] for i in idx]
        sub.mesh, sub.group, sub.world = (self.mesh, self.group, self.world) if any(sub.sharded) else (None, None, 1)
        sub._mask = sub._packed = None
        return sub

    def full_sums(self, partials):
        """partials [T, ...] (row t: tensor t's sums over its local shard) -> the sums over the full tensors; or a
        list of T 1-D tensors of any lengths (packed into one buffer) -> a list. One collective per call (none when
        nothing is sharded); no host sync."""
        if self.group is None or self.world == 1:
            return partials
        if isinstance(partials, (list, tuple)):
            lengths = [t.numel() for t in partials]
            if self._packed is None or self._packed[0] != lengths or self._packed[1].device != partials[0].device:
                self._packed = lengths, torch.tensor(self.sharded, device=partials[0].device).repeat_interleave(
                    torch.tensor(lengths, device=partials[0].device))
            return list(self._combine(torch.cat(partials), self._packed[1]).split(lengths))
        if all(self.sharded):
            return self._combine(partials, None)
        if self._mask is None or self._mask.device != partials.device:
            self._mask = torch.tensor(self.sharded, device=partials.device)
        return self._combine(partials, self._mask.view(-1, *([1] * (partials.dim() - 1))))

    def numels(self, tensors) -> list:
        """The full tensors' numels, for ``tensors`` laid out as the local shards (a complex param's real view: 2x)."""
        return [math.prod(s) * (2 if t.dim() > len(s) else 1) for s, t in zip(self.shapes, tensors)]

    def to_owners(self, stack, shape, owners):
        """stack [k, r, ...]: this rank's rows of k tensors of the full ``shape`` [A, ...] (dim-0 shards);
        owners[j]: the rank that takes tensor j whole -> the whole tensors this rank owns, [m, A, ...] in the order
        of j (one all_to_all; the bits as sent)."""
        counts, chunk, order = self._routes(shape, owners)
        send = stack.new_zeros((stack.shape[0], chunk, *shape[1:]))
        send[:, :stack.shape[1]] = stack  # (DTensor's uneven shards: ceil(A / W) rows, the last ones shorter)
        m = counts[dist.get_rank(self.group)]
        recv = stack.new_empty((self.world, m, chunk, *shape[1:]))
        self._all_to_all(recv, send[order], [m] * self.world, counts, len(shape))
        return recv.transpose(0, 1).reshape(m, self.world * chunk, *shape[1:])[:, :shape[0]]

    def from_owners(self, owned, shape, owners, rows):
        """to_owners' way back: owned [m, A, ...] (this rank's tensors whole) -> this rank's ``rows`` rows of
        every tensor, [k, rows, ...] (one all_to_all)."""
        counts, chunk, order = self._routes(shape, owners)
        padded = owned.new_zeros((owned.shape[0], self.world * chunk, *shape[1:]))
        padded[:, :shape[0]] = owned
        send = padded.view(owned.shape[0], self.world, chunk, *shape[1:]).transpose(0, 1)
        recv = owned.new_empty((len(owners), chunk, *shape[1:]))
        self._all_to_all(recv, send, counts, [owned.shape[0]] * self.world, len(shape))
        out = owned.new_empty((len(owners), rows, *shape[1:]))
        out[order] = recv[:, :rows]
        return out

    def _routes(self, shape, owners):
        """Per rank the count of tensors it owns, the padded shard rows, and the tensors grouped by owner."""
        counts = [0] * self.world
        for o in owners:
            counts[o] += 1
        return counts, -(-shape[0] // self.world), sorted(range(len(owners)), key=owners.__getitem__)

    def _all_to_all(self, recv, send, recv_counts, send_counts, dims):
        """all_to_all_single of whole [chunk, ...] shards (send's last ``dims`` dims), ``*_counts`` of them from /
        to each rank, moved as bytes (any dtype on any backend)."""
        send = send.contiguous()
        per = math.prod(send.shape[send.dim() - dims:]) * send.element_size()
        dist.all_to_all_single(recv.view(-1).view(torch.uint8), send.view(-1).view(torch.uint8),
                               [c * per for c in recv_counts], [c * per for c in send_counts], group=self.group)

    def _combine(self, partials, mask):
        flat = partials.detach().contiguous()
        gathered = torch.empty((self.world, *flat.shape), dtype=flat.dtype, device=flat.device)
        _all_gather(gathered.view(-1), flat.view(-1), group=self.group)
        total = gathered[0].clone()
        for r in range(1, self.world):  # rank order: the same bits on every rank, every run
            total += gathered[r]
        # replicated: every rank already holds the full sums
        return total if mask is None else torch.where(mask, total, flat)


def layout(params) -> Layout | None:
    """The Layout of ``params`` when some are DTensors, else None (nothing to combine)."""
    return Layout(params) if any(map(is_dtensor, params)) else None


def full_norms(full_sums, *columns) -> list:
    """The L2 norms of the full tensors whose local shards ``columns`` lists (each a list of T tensors, row t of
    every column one tensor of full_sums' Layout): one [T] tensor per column (fp32, fp64 if any tensor is fp64), from
    the shards' squared norms combined by ``full_sums`` (one collective for all the columns)."""
    acc = torch.float64 if any(t.dtype == torch.float64 for col in columns for t in col) else torch.float32
    sq = torch.stack([torch.stack(torch._foreach_norm(col, 2, dtype=acc)) for col in columns], dim=1).square()
    return list(full_sums(sq).sqrt().unbind(1))


def zeros_reduced(p, shape, dtype, keeps_dim0: bool):
    """A fresh state of the full ``shape`` for param p, placed like p: a DTensor param's state is a DTensor too (so
    checkpoints reshard it), sharded on dim 0 like p when it keeps p's dim 0 (a row statistic), else replicated (a
    statistic over dim 0: every rank holds all of it)."""
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import Replicate, zeros

    placements = p.placements if keeps_dim0 else [Replicate()]
    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=placements)


def built_by_zero() -> bool:
    """Whether torch's ZeroRedundancyOptimizer is constructing this optimizer (as its per-rank local optimizer, over
    the rank's partition of the params only): a look up the few frames above the constructor."""
    import sys

    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "ZeroRedundancyOptimizer":
            return True
    return False


def like(p, shard: torch.Tensor):
    """``shard`` (laid out like p's local shard) as a DTensor placed like the DTensor p."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


class ShardedSteps:
    """FusedOptimizer's DTensor (FSDP2) params: placement checks, whole-tensor sums of local statistics, the
    reference math on the local shards."""

    # reductions (elementwise False) whose whole-tensor statistics combine over shards (via _full_sums) say so;
    # the others are refused on DTensor params rather than computing statistics of the local shard only
    shardable = False
    sharded_kernel = True  # False: over DTensor shards, the reference math runs on the local shards
    _shards = None  # the Layout of the group being stepped (reductions over DTensor params), else None
    _full_numels: dict = {}  # id(local shard) -> the full tensor's numel, while the reference runs on shards

    def _check_shards(self, work) -> None:
        """DTensor params: refuse, before anything changes, the placements whose whole-tensor statistics (this
        optimizer's, max_grad_norm's) the local shards cannot give exactly (fused_optim/_sharded.py)."""
        groups = [params for _, params, _ in work]
        if not any(map(any_dtensor, groups)):
            return
        who = type(self).__name__
        if self.state_dtype == quant.INT8:  # each shard's blocks must be the full tensor's blocks of that shard
            for gi, params in enumerate(groups):
                for i, p in enumerate(params):
                    why = quant.shard_problem(p) if self._lean_dtype(p) == quant.CODE_DTYPE else None
                    if why is not None:
                        raise NotImplementedError(
                            f"{who}: state_dtype='int8' on param {i} of param group {gi} (shape {tuple(p.shape)}), "
                            f"a DTensor with placements {p.placements}: {why}; its states' blocks and scales would "
                            f"not be the full tensor's. Raise int8_min_numel above its size (fp32 states) or use "
                            f"torch.bfloat16 states")
        if not self.elementwise:
            if not self.shardable:
                raise NotImplementedError(f"{who}: not supported on DTensor (FSDP2) params; use DDP")
            check_placements(who, groups)
        if self.max_grad_norm is not None:
            check_placements(f"{who} (max_grad_norm)", groups, any_shard_dim=True)

    def _full_sums(self, partials: torch.Tensor) -> torch.Tensor:
        """Per-tensor partial sums over the local shards of the group being stepped -> the full tensors' sums (one
        collective; the identity without DTensor params). Reductions call it once per statistic they need."""
        shards = self._shards
        return partials if shards is None else shards.full_sums(partials)

    def _reference_on_shards(self, group, params, grads, states, grad_scale, found_inf):
        """The reference on the local shards (an element-wise update of the shard is the full tensor's; reductions
        combine through _full_sums); replaced entries are written back."""
        work_states = [{k: local(v) for k, v in st.items()} for st in states]
        before = [dict(ws) for ws in work_states]
        local_params = list(map(local, params))
        # a state the reference makes now takes the lean dtype of the full tensor (int8_min_numel counts its size)
        self._full_numels = {id(lp): p.numel() for p, lp in zip(params, local_params)}
        try:
            self._reference_path(group, local_params, list(map(local, grads)), work_states, grad_scale, found_inf)
        finally:
            self._full_numels = {}
        for p, lp, ws, old in zip(params, local_params, work_states, before):
            for k, v in ws.items():  # a state made now (e.g. SGD's first momentum buffer) is a shard like p
                if old.get(k) is v or not isinstance(v, torch.Tensor):
                    continue
                if quant.is_scale_key(k):  # (its int8 scales: the shard's blocks)
                    ws[k] = quant.shard_scales(v, p)
                elif v.shape == lp.shape and v.dim():
                    ws[k] = like(p, v)
        keep_replaced(states, work_states, before)
