"""SGDP / AdamP's projection (optimizers/projection.py's ``project``) over FSDP2 dim-0 shards: each rank holds some
rows of a tensor, so a row's statistics are local and what spans rows is combined by one collective."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.projection import CHANNEL, LAYER, NONE


def project_shards(params, grads, perturbs, shards, *, delta, wd_ratio, eps, caution):
    """``project`` of every tensor, on dim-0 shards (local rows; ``shards``: the base class's sharded.Layout with
    the full shapes, whose ``full_sums`` combines across ranks). A row's statistics are local; what spans rows goes
    through one collective of packed per-tensor sums: the count of rows that fail the channel test (timm: the max
    row |cos| below the threshold), <p,g>, |g|^2, |p|^2 and <p,d> over the tensor; with caution a second one (the
    mask depends on the decision): the mask's count and <p, masked d>."""
    shapes = shards.shapes
    n_full = [math.prod(shape) for shape in shapes]
    cands = [len(shape) > 1 and n > 0 for shape, n in zip(shapes, n_full)]
    width = [n // shape[0] if c else 1 for shape, n, c in zip(shapes, n_full, cands)]
    view = lambda x, t: x.reshape(x.size(0), width[t])  # noqa: E731  (an empty shard keeps its row length)
    stats = []
    for t, (p, g, d) in enumerate(zip(params, grads, perturbs)):
        pv, gv = view(p, t), view(g, t)
        cos = F.cosine_similarity(gv, pv, dim=1, eps=eps).abs() if cands[t] else p.new_zeros(0)
        fails = (cos >= delta / math.sqrt(width[t])).sum().to(p.dtype)
        stats.append(torch.stack([fails, (p * g).sum(), (g * g).sum(), (p * p).sum(), (p * d).sum()]))
    stats = shards.full_sums(torch.stack(stats)).tolist() if stats else []  # the decision is made on the host,
    # as timm's (a sync per step here, per tensor there)
    modes, ratios, units = [], [], []
    for t, (p, st) in enumerate(zip(params, stats)):
        fails, pg, gg, pp, pd = st
        mode = NONE
        if cands[t] and fails == 0:
            mode = CHANNEL
        elif cands[t] and abs(pg) / (max(math.sqrt(gg), eps) * max(math.sqrt(pp), eps)) < delta / math.sqrt(n_full[t]):
            mode = LAYER
        modes.append(mode)
        ratios.append(1.0 if mode == NONE else wd_ratio)
        shape = (-1,) + (1,) * (p.dim() - 1)
        units.append(p / view(p, t).norm(p=2, dim=1).add_(eps).reshape(shape) if mode == CHANNEL else
                     p / (math.sqrt(pp) + eps) if mode == LAYER else None)

    def radials(xs, layer_dots):  # the component of each x along its unit weight (layer_dots: <p_n, x> of LAYER)
        out = []
        for t, (x, p_n) in enumerate(zip(xs, units)):
            if modes[t] == CHANNEL:
                out.append(p_n * view(p_n * x, t).sum(dim=1).reshape((-1,) + (1,) * (x.dim() - 1)))
            else:
                out.append(None if modes[t] == NONE else p_n * layer_dots[t])
        return out

    layer = [st[4] / (math.sqrt(st[3]) + eps) for st in stats]
    perturbs = [d if r is None else d - r for d, r in zip(perturbs, radials(perturbs, layer))]
    if not caution:
        return perturbs, ratios
    # the cautious mask (against the tangential grad where projected), its kept fraction over the whole tensor
    refs = [g if r is None else g - r for g, r in zip(grads, radials(grads, [st[1] / (math.sqrt(st[3]) + eps)
                                                                           for st in stats]))]
    keeps = [(d * ref > 0).to(d.dtype) for d, ref in zip(perturbs, refs)]
    masked = [d * k for d, k in zip(perturbs, keeps)]
    sums = shards.full_sums(torch.stack([torch.stack([k.sum(), (p * m).sum()])
                                         for p, k, m in zip(params, keeps, masked)])).tolist()
    perturbs = [m / max(k / max(n, 1), 1e-3) for m, (k, _), n in zip(masked, sums, n_full)]
    return [d if r is None else d - r for d, r in zip(perturbs, radials(
        perturbs, [pm / max(k / max(n, 1), 1e-3) / (math.sqrt(st[3]) + eps)
                   for (k, pm), st, n in zip(sums, stats, n_full)]))], ratios
