"""Muon over FSDP2 dim-0 shards: which rank orthogonalizes each matrix, and the two collectives that bring a
matrix's rows to its owner and its result's rows back (fused_optim/_sharded.py Layout.to_owners / from_owners)."""
from __future__ import annotations


def shape_groups(shapes, sharded) -> dict:
    """(full shape, sharded) -> the indices of the matrices that have them, in order (every rank alike)."""
    groups: dict = {}
    for i, key in enumerate(zip(map(tuple, shapes), sharded)):
        groups.setdefault(key, []).append(i)
    return groups


def matrix_owners(groups, world) -> dict:
    """shape_groups' key -> the rank that orthogonalizes each of its matrices, when sharded: round-robin over the
    sharded matrices in shape_groups' order (every rank alike)."""
    owners, n = {}, 0
    for key, idx in groups.items():
        if key[1]:
            owners[key], n = [(n + j) % world for j in range(len(idx))], n + len(idx)
    return owners


def owned_chain(shards, local, shape, owners, chain):
    """FSDP2: local [k, r, B] (this rank's rows of k matrices of the full ``shape``) -> this rank's rows of each
    chain result, the chain run once per matrix, on its owner: the rows sent to the owners (one all_to_all), the
    owned matrices stacked whole as one process's (``chain`` of a [m, A, B] stack), the results' rows sent back
    (one all_to_all)."""
    mine = shards.to_owners(local, shape, owners)
    return shards.from_owners(chain(mine) if len(mine) else mine, shape, owners, local.shape[1])
