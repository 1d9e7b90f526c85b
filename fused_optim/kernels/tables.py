"""The one device-table cache every kernel family uses, and the named table layouts its kernels read.

A family describes its tensors to its kernel by device tables (addresses, sizes, work items). They are built once
and cached per (group, bucket) slot, keyed by every address and size they hold, so a steady-state step uploads
nothing. Grads are often new tensors every step (``zero_grad(set_to_none=True)``): a new grad address re-uploads
only the grad column. Alignment (the promise behind 128-bit accesses) is a property of the addresses, so it is
rechecked only when they change. A key is recomputed from the tensors every step: a param whose ``.data`` was
swapped for another tensor has a new address, and its tables are rebuilt.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch

from . import runtime

if runtime.available():
    import triton.language as tl

ptr = torch.Tensor.data_ptr  # map() over the C methods: per-tensor host cost matters at 1000s of tensors
numel = torch.Tensor.numel
dtype_of = operator.attrgetter("dtype")


def fields(*names: str):
    """Named columns of a table row, as constexprs a kernel can read (``tl.load(row + M_NUMEL)``), plus the row
    width: ``M_NUMEL, M_ROWS, M_WIDTH = fields("numel", "rows")``."""
    const = tl.constexpr if runtime.available() else int
    return (*(const(i) for i in range(len(names))), const(len(names)))


@dataclass
class Tables:
    """What the cache checks of a family's tables; each family's dataclass adds its own named buffers."""
    key: tuple
    gkey: tuple               # the grads' addresses the grad column holds
    ptrs: torch.Tensor        # int64 [T, W] address rows
    aligned: bool             # every address is 16-byte aligned (the kernels may promise tl.multiple_of(ptr, 16))
    grad_col: int             # the column of ptrs holding the grads


class TableCache:
    """Per param-group cache of device tables, one entry per slot (a dtype bucket, a variant)."""

    def __init__(self):
        self.tables: dict = {}
        self.plan = None       # a launcher's per-group plan (e.g. its dtype buckets) for the key it was made for
        self.builds = 0        # tables (re)built: tests check that a steady state builds nothing
        self.grad_uploads = 0  # only the grad column re-uploaded

    def lookup(self, slot, key: tuple, grads, build: Callable[[], Tables]) -> Tables:
        """The tables of ``slot`` for ``key`` (every address and size they hold but the grads'), built by ``build()``
        on a miss; the grad column re-uploaded if only the grads moved."""
        gkey = tuple(map(ptr, grads))
        tab = self.tables.get(slot)
        if tab is None or tab.key != key or (tab.gkey != gkey and tab.aligned and not all_aligned(grads)):
            tab = self.tables[slot] = build()
            self.builds += 1
        elif tab.gkey != gkey:
            # non-blocking: a pageable host -> device copy without it would sync the stream
            tab.ptrs[:, tab.grad_col].copy_(torch.tensor(gkey, dtype=torch.int64), non_blocking=True)
            tab.gkey = gkey
            self.grad_uploads += 1
        return tab


def all_aligned(*lists) -> bool:
    """Every tensor of every list starts on a 16-byte boundary. ``tl.multiple_of(ptr, 16)`` is a promise: one
    misaligned tensor (a view at an odd offset) sends its whole bucket to the kernel variant without the hint."""
    return all(p % 16 == 0 for ts in lists for p in map(ptr, ts))


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a device tensor (one upload)."""
    return torch.tensor(values, dtype=dtype).to(device)


def buckets(keys: list) -> dict:
    """Indices grouped by key (e.g. each tensor's dtypes), in first-seen order; one bucket without a Python loop in
    the usual case where all keys are equal."""
    if not keys:
        return {}
    first = keys[0]
    if keys.count(first) == len(keys):
        return {first: range(len(keys))}
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def pick(idx, *lists):
    """Each list restricted to the indices ``idx`` (the lists themselves when idx covers them all)."""
    if isinstance(idx, range) and (not lists or len(idx) == len(lists[0])):
        return lists
    return tuple([x[i] for i in idx] for x in lists)
