"""The C++ reduction engine (csrc/, fused_optim/csrc.py), tested on CPU through its host build.

The host build runs the device algorithm itself (same tiles, same fixed-order sums; see csrc/fo_engine.h), so these
tests check the kernels' indexing and math against float64 torch references without a GPU. The module is built
(incrementally, under build/) by the fixture; the tests skip only when no C++ toolchain / pybind11 is present.
With CUDA and the CUDA module, the device results must equal the host's bit for bit.
"""
from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch

from fused_optim.kernels import runtime

from fused_optim import csrc

# Odd sizes around the tile geometry: flat tiles of 8192, 256 lanes, wide rows (C > 256 / > 2048), tall
# columns (R > 32 * thread rows), batches (B > 1), 0-d, one element, empty, conv weights.
SHAPES = [(), (1,), (0,), (7,), (33,), (257,), (1000,), (8193,), (20001,), (3, 5), (1, 1), (5, 0), (0, 4),
          (17, 33), (40, 3000), (3, 2500), (257, 129), (3000, 5), (2100, 1), (64, 3, 3, 3), (32, 16, 3, 3),
          (2, 3, 300, 7), (24, 3, 3), (4, 1, 5, 5), (9, 2049), (2, 1500, 5), (3, 4, 300), (300, 40, 3, 3)]


@pytest.fixture(scope="module", autouse=True)
def host_module():
    if not (shutil.which("c++") or shutil.which("g++")) or importlib.util.find_spec("pybind11") is None:
        pytest.skip("cannot build the host module: no C++ compiler or no pybind11 (pip install pybind11)")
    csrc.build(host_only=True, timeout=600)  # a compile error fails the tests, it is never skipped
    assert csrc.host_available(), csrc.load_errors()


def _rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero everywhere, mixed signs and magnitudes.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x + torch.sign(x) * 0.05 + 0.01
    return x.to(dtype)


def _close(actual, expected, rtol=1e-5, what=""):
    a, e = actual.double().cpu(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: nan pattern differs"
    ok = ~e.isnan()
    err = ((a - e).abs()[ok] / e.abs()[ok].clamp_min(1e-30))
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= rtol, f"{what}: max rel err {worst:.3g}"


def _tensors(dtypes=(torch.float32,), seed=0):
    return [_rand(s, dtypes[i % len(dtypes)], seed + i) for i, s in enumerate(SHAPES)]


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                    (torch.float32, torch.bfloat16, torch.float16)], ids=str)
def test_sumsq_and_norms(dtypes):
    ts = _tensors(dtypes)
    n0 = runtime.engine_launch_count
    per = csrc.sumsq_per_tensor(ts)
    norms, total = csrc.norms(ts)
    assert runtime.engine_launch_count == n0 + 2  # one launch per call, whatever the count and the dtypes
    ref = torch.stack([t.double().square().sum() for t in ts])
    assert per.dtype == torch.float32 and per.shape == (len(ts),)
    _close(per, ref, what="sumsq")
    _close(norms, ref.sqrt(), what="norms")
    _close(total, ref.sum().sqrt(), what="global norm")


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_sumsq_unscales_and_writes_into_out(backend):
    """AMP: elements count as x * (1 / scale); out= pins the results' addresses (the optimizers' apply tables
    point at them), and a wrong buffer is refused."""
    ts = _tensors((torch.float32, torch.bfloat16, torch.float16), seed=3)
    scale = torch.tensor([1024.0])
    out = torch.full((len(ts) + 1,), float("nan"))
    for _ in range(2):
        per, total = csrc.sumsq(ts, scale=scale, out=out, backend=backend)
        assert per.data_ptr() == out.data_ptr() and total.data_ptr() == out[-1:].data_ptr()
    ref = torch.stack([(t.float() * (1 / scale)).double().square().sum() for t in ts])
    _close(per, ref, what="unscaled sumsq")
    _close(total, ref.sum(), what="unscaled total")
    with pytest.raises(ValueError, match="out must be"):
        csrc.sumsq(ts, out=torch.zeros(len(ts)), backend="host")
    with pytest.raises(ValueError, match="scale must be"):
        csrc.sumsq(ts, scale=torch.tensor([1.0, 2.0]), backend="host")


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float16)], ids=str)
def test_dot_per_tensor_and_row(dtypes):
    a = _tensors(dtypes, seed=1)
    b = _tensors(tuple(reversed(dtypes)), seed=100)
    n0 = runtime.engine_launch_count
    flat = csrc.dot_per_tensor(a, b)
    res = csrc.dot_per_tensor_and_row(a, b)
    assert runtime.engine_launch_count == n0 + 2
    rows = [(x.shape[0] if x.dim() else 1) for x in a]
    assert res.row_counts == rows and res.per_row.shape == (sum(rows), 3)
    for i, (x, y, pr) in enumerate(zip(a, b, res.per_row.split(rows))):
        x, y = x.double(), y.double()
        cols = math.prod(x.shape[1:]) if x.dim() else 1
        xr, yr = x.reshape(rows[i], cols), y.reshape(rows[i], cols)
        for got in (flat[i], res.per_tensor[i]):
            _close(got[1:], torch.stack([x.square().sum(), y.square().sum()]), what=f"norms {i}")
            # A dot product's rounding scales with |a||b|, not with the (possibly cancelling) result.
            assert (got[0].double() - (x * y).sum()).abs() <= 1e-5 * (x.norm() * y.norm()) + 1e-30, f"dot {i}"
        _close(pr[:, 1:], torch.stack([xr.square().sum(1), yr.square().sum(1)], 1), what=f"row norms {i}")
        scale = xr.norm(dim=1) * yr.norm(dim=1)
        assert ((pr[:, 0].double() - (xr * yr).sum(1)).abs() <= 1e-5 * scale + 1e-30).all(), f"row dots {i}"


@pytest.mark.parametrize("eps", [1e-30, 1e-3])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16, torch.bfloat16, torch.float32)], ids=str)
def test_factored_stats(eps, dtypes):
    ts = [t for t in _tensors(dtypes, seed=7) if t.dim() >= 2]
    # Trailing dims (timm's default) and conv-style leading dims (0, 1) in one call.
    dims = [None if i % 2 == 0 or t.dim() < 3 else (0, 1) for i, t in enumerate(ts)]
    n0 = runtime.engine_launch_count
    rows, cols = csrc.factored_stats(ts, eps, dims)
    assert runtime.engine_launch_count == n0 + 1
    for i, (t, d) in enumerate(zip(ts, dims)):
        dc, dr = (t.dim() - 2, t.dim() - 1) if d is None else d
        u = t.double().square() + eps
        _close(rows[i], u.mean(dr), what=f"row means {i} {tuple(t.shape)} dims {d}")
        _close(cols[i], u.mean(dc), what=f"col means {i} {tuple(t.shape)} dims {d}")


def test_update_rms_via_sumsq():
    upd = [_rand(s, seed=3) for s in [(128, 64), (7,), (64, 3, 3, 3)]]
    rms = (csrc.sumsq_per_tensor(upd) / torch.tensor([u.numel() for u in upd])).sqrt()
    _close(rms, torch.stack([u.double().norm() / u.numel() ** 0.5 for u in upd]))


def test_many_tensors_one_launch():
    ts = [_rand((i % 37 + 1, i % 5 + 1), seed=i) for i in range(700)] + [_rand((70000,), seed=1)]
    n0 = runtime.engine_launch_count
    per = csrc.sumsq_per_tensor(ts)
    rows, cols = csrc.factored_stats(ts[:-1])
    assert runtime.engine_launch_count == n0 + 2
    _close(per, torch.stack([t.double().square().sum() for t in ts]))
    for t, r, c in zip(ts, rows, cols):
        _close(r, t.double().square().mean(1))
        _close(c, t.double().square().mean(0))


def test_geometry_is_covered():
    """The shapes above reach every path: several tiles per tensor, split rows (nct > 1), split columns (nrt > 1)."""
    ts = _tensors()
    from fused_optim import _fused_optim_host as host
    ws = host.META_W

    def records(kind, descs):
        meta, n_entries, n_items, *_ = host.plan(kind, descs)
        m = torch.frombuffer(bytearray(meta), dtype=torch.int64)
        return m[n_entries + 1:].view(n_entries, ws), n_items, n_entries

    def desc(numel, B, R, C, S, inputs=1):  # plan()'s tuple: addresses a..d and step, dtype codes, geometry
        return (1, int(inputs > 1), int(inputs > 2), int(inputs > 2), 0, 0, 0, 0, numel, B, R, C, S)

    d_rows = [desc(t.numel(), 1, (t.shape[0] if t.dim() else 1), t.numel() // max(t.shape[0], 1) if t.dim() else 1,
                   1, 2) for t in ts]
    rec, n_items, n_entries = records(host.KIND_DOT_ROWS, d_rows)
    assert n_items > n_entries and (rec[:, host.M_NCT] > 1).any()
    d_proj = [desc(t.numel(), 1, t.shape[0], t.numel() // t.shape[0], 1, 4) for t in ts if t.dim() >= 2 and t.numel()]
    rec, n_items, n_entries = records(host.KIND_PROJ, d_proj)  # the projection's hook needs split rows final
    assert n_items > n_entries and (rec[:, host.M_NCT] > 1).any()
    f = [t for t in ts if t.dim() >= 2]
    d_fac = [desc(t.numel(), t.shape[:-2].numel(), t.shape[-2], t.shape[-1], 1) for t in f]
    rec, _, _ = records(host.KIND_FACTORED, d_fac)
    batched = rec[:, host.M_B] > 1  # split rows / columns of a batch use per-(matrix, band) tickets
    assert (batched & (rec[:, host.M_NRT] > 1)).any() and (batched & (rec[:, host.M_NCT] > 1)).any()
    d_conv = [desc(t.numel(), 1, t.shape[0], t.shape[1], t.shape[2:].numel()) for t in f if t.dim() >= 3]
    rec, _, _ = records(host.KIND_FACTORED, d_conv)  # dims (0, 1): two column-only entries per tensor
    assert len(rec) == 2 * len(d_conv) and (rec[:, host.M_NRT] > 1).any()
    rec, n_items, _ = records(host.KIND_SUMSQ, [desc(t.numel(), 1, 1, 1, 1) for t in ts])
    assert n_items > len(ts)


def _leaves(r):
    if isinstance(r, torch.Tensor):
        return [r]
    return [x for y in r if isinstance(y, (torch.Tensor, tuple, list)) for x in _leaves(y)]


def test_deterministic_and_reusable():
    ts = _tensors((torch.float32, torch.bfloat16), seed=11)
    f = [t for t in ts if t.dim() >= 2]
    first = (csrc.norms(ts), csrc.dot_per_tensor_and_row(ts, ts), csrc.factored_stats(f, 1e-3))
    n_plans = len(csrc._plans)
    again = (csrc.norms(ts), csrc.dot_per_tensor_and_row(ts, ts), csrc.factored_stats(f, 1e-3))
    assert len(csrc._plans) == n_plans  # cached plans, nothing rebuilt
    for x, y in zip(_leaves(first), _leaves(again), strict=True):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())  # bit-identical
    for p in csrc._plans.values():
        assert int(p.counters.abs().sum()) == 0  # every launch leaves its tickets at zero


def test_torch_fallback_agrees():
    ts = _tensors((torch.float32,), seed=5)
    f = [t for t in ts if t.dim() >= 2]
    _close(csrc.sumsq_per_tensor(ts, backend="torch"), csrc.sumsq_per_tensor(ts), rtol=1e-5)
    a, b = csrc.dot_per_tensor_and_row(ts, ts, backend="torch"), csrc.dot_per_tensor_and_row(ts, ts)
    _close(a.per_tensor, b.per_tensor)
    _close(a.per_row, b.per_row)
    for x, y in zip(sum(csrc.factored_stats(f, 0.1, backend="torch"), []), sum(csrc.factored_stats(f, 0.1), [])):
        _close(x, y)
    # float64 (not an engine dtype) goes to torch by itself
    _close(csrc.sumsq_per_tensor([ts[8].double()]), ts[8].double().square().sum().view(1))


def test_inputs_checked():
    with pytest.raises(ValueError, match="shapes"):
        csrc.dot_per_tensor([torch.ones(3)], [torch.ones(4)])
    with pytest.raises(ValueError, match=">= 2 dims"):
        csrc.factored_stats([torch.ones(3)])
    with pytest.raises(ValueError, match="adjacent"):
        csrc.factored_stats([torch.ones(3, 4, 5)], dims=[(0, 2)])
    assert csrc.sumsq_per_tensor([]).shape == (0,)
    with pytest.raises(ValueError, match=">= 2 dims"):
        csrc.projection_stats([torch.ones(3)], [torch.ones(3)], [[torch.ones(3)]], adam=False)
    with pytest.raises(ValueError, match="step tensor"):
        csrc.projection_stats([torch.ones(3, 2)], [torch.ones(3, 2)], [[torch.ones(3, 2)] * 2], adam=True)
    with pytest.raises(ValueError, match="one .exp_avg"):
        csrc.projection_stats([torch.ones(3, 2)], [torch.ones(3, 2)], [[torch.ones(3, 2)]], [torch.zeros(1)],
                              adam=True)
    nc = _rand((6, 8)).t()  # non-contiguous: copied first
    _close(csrc.sumsq_per_tensor([nc]), nc.double().square().sum().view(1))
    _close(csrc.factored_stats([nc])[0][0], nc.double().square().mean(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_host_bitwise():
    if not csrc.cuda_available():
        csrc.build(host_only=False, timeout=600)
    if not csrc.cuda_available():
        pytest.skip(f"CUDA module not built: {csrc.load_errors()}")
    ts = _tensors((torch.float32, torch.bfloat16, torch.float16), seed=21)
    f = [t for t in ts if t.dim() >= 2]
    dims = [None if i % 2 else (0, 1) if t.dim() >= 3 else None for i, t in enumerate(f)]
    dev = [t.cuda() for t in ts]
    devf = [t.cuda() for t in f]
    pairs = [
        (csrc.norms(ts), csrc.norms(dev)),
        (csrc.dot_per_tensor(ts, ts), csrc.dot_per_tensor(dev, dev)),
        (csrc.dot_per_tensor_and_row(ts, ts)[:2], csrc.dot_per_tensor_and_row(dev, dev)[:2]),
        (csrc.factored_stats(f, 1e-3, dims), csrc.factored_stats(devf, 1e-3, dims)),
    ]
    pj = [t for t in f if t.numel()]
    pp = [_rand(t.shape, t.dtype, seed=70 + i) for i, t in enumerate(pj)]
    for adam in (False, True):
        st = [[t, t.abs()] if adam else [t] for t in pj]
        steps = [torch.tensor([3.0]) for _ in pj] if adam else None
        kw = dict(adam=adam, nesterov=True, momentum=0.9, betas=(0.9, 0.99), eps=1e-8, delta=0.1)
        on = lambda ts: [t.cuda() for t in ts]  # noqa: E731
        pairs.append((csrc.projection_stats(pj, pp, st, steps, **kw)[:4],
                      csrc.projection_stats(on(pj), on(pp), [on(x) for x in st], steps and on(steps), **kw)[:4]))
    torch.cuda.synchronize()
    for host_r, dev_r in pairs:
        for h, d in zip(_leaves(host_r), _leaves(dev_r), strict=True):
            assert d.is_cuda
            assert torch.equal(h.nan_to_num(), d.cpu().nan_to_num()), "device result differs from the host build"


# ---- SGDP / AdamP projection statistics (KIND_PROJ) ------------------------------------------------------------
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
        p = _rand(shape, seed=300 + i)
        g = _orthogonal_grads(p, _rand(shape, seed=400 + i), ("channel", "layer", "random")[i % 3])
        ps.append(p.to(p_dt))
        gs.append(g.to(g_dt))
        sts.append([_rand(shape, seed=500 + i).to(s_dt)]
                   + ([_rand(shape, seed=600 + i).abs().to(s_dt)] if adam else []))
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
        _close(stat[:, 1:3], ref[:, 1:3], what=f"norms {what}")
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
