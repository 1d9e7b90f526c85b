"""SGDP / AdamP's projection statistics and decision on the C++ engine (KIND_PROJ: fused_optim.csrc.projection_stats),
through its host build, against an fp64 transcription of fused_optim/optimizers/projection.py's math."""
from __future__ import annotations

import math

import pytest
import torch

from csrc_helpers import SHAPES, assert_close, host_module, rand_tensor  # noqa: F401 (the fixture)
from fused_optim import csrc
from fused_optim.kernels import runtime

PROJ_SHAPES = [s for s in SHAPES if len(s) >= 2 and math.prod(s) > 0]


def _orthogonal_grads(p, g, how):
    """g made orthogonal to p row by row ("channel") or only as a whole ("layer": row 0 is p_0 scaled, the other
    rows random): each view's projection branch is taken (fp64, before any cast)."""
    rows_p, rows_g = p.reshape(p.shape[0], -1), g.reshape(g.shape[0], -1).clone()
    if how == "channel" and rows_p.shape[1] > 1:
        rows_g -= rows_p * ((rows_p * rows_g).sum(1, keepdim=True) / (rows_p * rows_p).sum(1, keepdim=True))
    if how == "layer" and rows_p.shape[0] > 1:
        rows_g[0] = -rows_p[0] * (rows_p[1:] * rows_g[1:]).sum() / rows_p[0].square().sum()
    return rows_g.reshape(g.shape)


def _projection_reference(p, g, st, step, *, adam, nesterov, momentum, dampening, betas, eps, delta):
    """Per-row [p.g, g.g, p.p, p.d], the mode and the per-row (a, c) of projection.py's math, in fp64 except the
    direction d, computed in fp32 like every implementation (the reference optimizers too): fp64 would differ from
    all of them where d cancels (momentum against grad)."""
    f = [x.float() for x in (g, *st)]
    if adam:
        b1, b2 = betas
        m = f[1] + (1 - b1) * (f[0] - f[1])
        v = f[2] * b2 + (1 - b2) * f[0] * f[0]
        num = b1 * m + (1 - b1) * f[0] if nesterov else m
        d = num / (v.sqrt() / math.sqrt(1 - b2 ** (step + 1)) + eps)
    else:
        buf = f[1] * momentum + (1 - dampening) * f[0]
        d = f[0] + momentum * buf if nesterov else buf
    p, g, d = p.double(), g.double(), d.double()
    R = p.shape[0]
    pr, gr, dr = p.reshape(R, -1), g.reshape(R, -1), d.reshape(R, -1)
    stats = torch.stack([(pr * gr).sum(1), (gr * gr).sum(1), (pr * pr).sum(1), (pr * dr).sum(1)], 1)
    cos = stats[:, 0].abs() / (stats[:, 1].sqrt().clamp_min(eps) * stats[:, 2].sqrt().clamp_min(eps))
    tot = stats.sum(0)
    layer_cos = tot[0].abs() / (tot[1].sqrt().clamp_min(eps) * tot[2].sqrt().clamp_min(eps))
    if cos.max() < delta / math.sqrt(pr.shape[1]):
        mode, den = 1, (stats[:, 2].sqrt() + eps) ** 2
        coef = torch.stack([stats[:, 3] / den, stats[:, 0] / den], 1)
    elif layer_cos < delta / math.sqrt(p.numel()):
        mode, den = 2, (tot[2].sqrt() + eps) ** 2
        coef = torch.stack([tot[3] / den, tot[0] / den]).expand(R, 2)
    else:
        mode, coef = 0, torch.zeros(R, 2, dtype=torch.float64)
    # rounding bounds: a dot's error scales with |x||y| (it may cancel to ~0), per row and for the whole tensor
    pn, gn, dn = pr.norm(dim=1), gr.norm(dim=1), dr.norm(dim=1)
    return stats, mode, coef, (pn * gn, pn * dn), (p.norm() * g.norm(), p.norm() * d.norm())


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16, torch.float16, torch.bfloat16)], ids=str)
def test_projection_stats(adam, nesterov, dtypes):
    """Every projected shape, the three branches (channel-orthogonal grads, layer-orthogonal grads, random), AMP
    scale, Adam steps 1 and 6: the rows' statistics, the decision and the coefficients vs fp64."""
    p_dt, g_dt, s_dt = dtypes
    hyper = dict(adam=adam, nesterov=nesterov, momentum=0.9, dampening=0.1, betas=(0.8, 0.95), eps=1e-8, delta=0.1)
    ps, gs, sts, steps = [], [], [], []
    for i, shape in enumerate(PROJ_SHAPES):
        p = rand_tensor(shape, seed=300 + i)
        g = _orthogonal_grads(p, rand_tensor(shape, seed=400 + i), ("channel", "layer", "random")[i % 3])
        ps.append(p.to(p_dt))
        gs.append(g.to(g_dt))
        sts.append([rand_tensor(shape, seed=500 + i).to(s_dt)]
                   + ([rand_tensor(shape, seed=600 + i).abs().to(s_dt)] if adam else []))
        steps.append(torch.tensor([5.0 * (i % 2)]))
    scale = torch.tensor([1024.0])
    n0 = runtime.engine_launch_count
    res = csrc.projection_stats([g * 1024 for g in gs], ps, sts, steps if adam else None, scale=scale, **hyper)
    assert runtime.engine_launch_count == n0 + 1
    modes = []
    for i, (p, g, st, stat, cf) in enumerate(zip(ps, gs, sts, res.per_row.split(res.row_counts),
                                                 res.coef.split(res.row_counts))):
        ref, mode, coef, (pg_b, pd_b), (tpg_b, tpd_b) = _projection_reference(p, g, st, float(steps[i]), **hyper)
        what = f"{tuple(p.shape)}"
        assert_close(stat[:, 1:3], ref[:, 1:3], what=f"norms {what}")
        assert ((stat[:, 0].double() - ref[:, 0]).abs() <= 1e-5 * pg_b + 1e-30).all(), f"p.g {what}"
        assert ((stat[:, 3].double() - ref[:, 3]).abs() <= 1e-5 * pd_b + 1e-30).all(), f"p.d {what}"
        tot = res.per_tensor[i].double()
        assert (tot[0] - ref[:, 0].sum()).abs() <= 1e-5 * tpg_b and (tot[3] - ref[:, 3].sum()).abs() <= 1e-5 * tpd_b
        assert int(res.mode[i]) == mode, f"mode {what}"
        modes.append(mode)
        den = (p.double().reshape(p.shape[0], -1).norm(dim=1) if mode == 1 else p.double().norm()) ** 2
        bound = torch.stack([pd_b if mode == 1 else tpd_b.expand_as(pd_b),
                             pg_b if mode == 1 else tpg_b.expand_as(pg_b)], 1) / den.reshape(-1, 1)
        assert ((cf.double() - coef).abs() <= 2e-5 * bound + 1e-30).all(), f"coef {what}"
    assert set(modes) == {0, 1, 2}, modes  # every branch was taken
