"""The C++ reduction engine (csrc/, fused_optim/csrc.py), tested on CPU through its host build (the projection's
statistics and decision: test_csrc_projection.py).

The host build runs the device algorithm itself (same tiles, same fixed-order sums; see csrc/fo_engine.h), so these
tests check the kernels' indexing and math against float64 torch references without a GPU. The module is built
(incrementally, under build/) by the fixture; the tests skip only when no C++ toolchain / pybind11 is present.
With CUDA and the CUDA module, the device results must equal the host's bit for bit.
"""
from __future__ import annotations

import pathlib
import re
import types

import pytest
import torch

from csrc_helpers import assert_close, host_module, leaves, rand_tensor, shape_tensors  # noqa: F401 (the fixture)
from fused_optim import csrc
from fused_optim.kernels import runtime


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                    (torch.float32, torch.bfloat16, torch.float16)], ids=str)
def test_sumsq_and_norms(dtypes):
    ts = shape_tensors(dtypes)
    n0 = runtime.engine_launch_count
    per = csrc.sumsq_per_tensor(ts)
    norms, total = csrc.norms(ts)
    assert runtime.engine_launch_count == n0 + 2  # one launch per call, whatever the count and the dtypes
    ref = torch.stack([t.double().square().sum() for t in ts])
    assert per.dtype == torch.float32 and per.shape == (len(ts),)
    assert_close(per, ref, what="sumsq")
    assert_close(norms, ref.sqrt(), what="norms")
    assert_close(total, ref.sum().sqrt(), what="global norm")


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_sumsq_unscales_and_writes_into_out(backend):
    """AMP: elements count as x * (1 / scale); out= pins the results' addresses (the optimizers' apply tables
    point at them), and a wrong buffer is refused."""
    ts = shape_tensors((torch.float32, torch.bfloat16, torch.float16), seed=3)
    scale = torch.tensor([1024.0])
    out = torch.full((len(ts) + 1,), float("nan"))
    for _ in range(2):
        per, total = csrc.sumsq(ts, scale=scale, out=out, backend=backend)
        assert per.data_ptr() == out.data_ptr() and total.data_ptr() == out[-1:].data_ptr()
    ref = torch.stack([(t.float() * (1 / scale)).double().square().sum() for t in ts])
    assert_close(per, ref, what="unscaled sumsq")
    assert_close(total, ref.sum(), what="unscaled total")
    with pytest.raises(ValueError, match="out must be"):
        csrc.sumsq(ts, out=torch.zeros(len(ts)), backend="host")
    with pytest.raises(ValueError, match="scale must be"):
        csrc.sumsq(ts, scale=torch.tensor([1.0, 2.0]), backend="host")


@pytest.mark.parametrize("eps", [1e-30, 1e-3])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16, torch.bfloat16, torch.float32)], ids=str)
def test_factored_stats(eps, dtypes):
    ts = [t for t in shape_tensors(dtypes, seed=7) if t.dim() >= 2]
    # Trailing dims (timm's default) and conv-style leading dims (0, 1) in one call.
    dims = [None if i % 2 == 0 or t.dim() < 3 else (0, 1) for i, t in enumerate(ts)]
    n0 = runtime.engine_launch_count
    rows, cols = csrc.factored_stats(ts, eps, dims)
    assert runtime.engine_launch_count == n0 + 1
    for i, (t, d) in enumerate(zip(ts, dims)):
        dc, dr = (t.dim() - 2, t.dim() - 1) if d is None else d
        u = t.double().square() + eps
        assert_close(rows[i], u.mean(dr), what=f"row means {i} {tuple(t.shape)} dims {d}")
        assert_close(cols[i], u.mean(dc), what=f"col means {i} {tuple(t.shape)} dims {d}")


def test_kinds_have_one_source():
    """FO_KINDS (csrc/fo_kinds.h) is the one list of reduction kinds: the C++ codes are its order, the modules export
    it as KINDS, and the loader refuses a module whose list differs from the Python side's KIND_* codes."""
    header = (pathlib.Path(__file__).parents[2] / "csrc" / "fo_kinds.h").read_text()
    listing = header[header.index("#define FO_KINDS(X)"):].split("\n\n")[0]
    expected = {name: code for code, name in enumerate(re.findall(r"X\((\w+),", listing))}
    assert expected and csrc.KINDS == expected
    assert {name: getattr(csrc, f"KIND_{name}") for name in expected} == expected
    host = csrc.module("host")
    assert host.KINDS == expected and csrc.module_mismatch(host) is None
    other = types.SimpleNamespace(**{k: getattr(host, k) for k in ("ABI_VERSION", "DTYPE_F32", "DTYPE_BF16",
                                                                   "DTYPE_F16")})
    other.KINDS = {**expected, "EXTRA": len(expected)}
    assert "kinds" in csrc.module_mismatch(other)
    other.KINDS, other.ABI_VERSION = expected, host.ABI_VERSION - 1
    assert "ABI_VERSION" in csrc.module_mismatch(other)


def test_update_rms_via_sumsq():
    upd = [rand_tensor(s, seed=3) for s in [(128, 64), (7,), (64, 3, 3, 3)]]
    rms = (csrc.sumsq_per_tensor(upd) / torch.tensor([u.numel() for u in upd])).sqrt()
    assert_close(rms, torch.stack([u.double().norm() / u.numel() ** 0.5 for u in upd]))


def test_many_tensors_one_launch():
    ts = [rand_tensor((i % 37 + 1, i % 5 + 1), seed=i) for i in range(700)] + [rand_tensor((70000,), seed=1)]
    n0 = runtime.engine_launch_count
    per = csrc.sumsq_per_tensor(ts)
    rows, cols = csrc.factored_stats(ts[:-1])
    assert runtime.engine_launch_count == n0 + 2
    assert_close(per, torch.stack([t.double().square().sum() for t in ts]))
    for t, r, c in zip(ts, rows, cols):
        assert_close(r, t.double().square().mean(1))
        assert_close(c, t.double().square().mean(0))


def test_geometry_is_covered():
    """The shapes above reach every path: several tiles per tensor, split rows (nct > 1), split columns (nrt > 1)."""
    ts = shape_tensors()
    host = csrc.module("host")
    ws = host.META_W

    def records(kind, descs):
        meta, n_entries, n_items, *_ = host.plan(kind, descs)
        m = torch.frombuffer(bytearray(meta), dtype=torch.int64)
        return m[n_entries + 1:].view(n_entries, ws), n_items, n_entries

    def desc(numel, B, R, C, S, inputs=1):  # plan()'s tuple: addresses a..d and step, dtype codes, geometry
        return (1, int(inputs > 1), int(inputs > 2), int(inputs > 2), 0, 0, 0, 0, numel, B, R, C, S)

    d_proj = [desc(t.numel(), 1, t.shape[0], t.numel() // t.shape[0], 1, 4) for t in ts if t.dim() >= 2 and t.numel()]
    rec, n_items, n_entries = records(csrc.KIND_PROJ, d_proj)  # the projection's hook needs split rows final
    assert n_items > n_entries and (rec[:, host.M_NCT] > 1).any()
    f = [t for t in ts if t.dim() >= 2]
    d_fac = [desc(t.numel(), t.shape[:-2].numel(), t.shape[-2], t.shape[-1], 1) for t in f]
    rec, _, _ = records(csrc.KIND_FACTORED, d_fac)
    batched = rec[:, host.M_B] > 1  # split rows / columns of a batch use per-(matrix, band) tickets
    assert (batched & (rec[:, host.M_NRT] > 1)).any() and (batched & (rec[:, host.M_NCT] > 1)).any()
    d_conv = [desc(t.numel(), 1, t.shape[0], t.shape[1], t.shape[2:].numel()) for t in f if t.dim() >= 3]
    rec, _, _ = records(csrc.KIND_FACTORED, d_conv)  # dims (0, 1): two column-only entries per tensor
    assert len(rec) == 2 * len(d_conv) and (rec[:, host.M_NRT] > 1).any()
    rec, n_items, _ = records(csrc.KIND_SUMSQ, [desc(t.numel(), 1, 1, 1, 1) for t in ts])
    assert n_items > len(ts)


def test_deterministic_and_reusable():
    ts = shape_tensors((torch.float32, torch.bfloat16), seed=11)
    f = [t for t in ts if t.dim() >= 2]
    pj = [t for t in f if t.numel()]
    pp = [t * 0.5 for t in pj]

    def run():
        proj = csrc.projection_stats(pj, pp, [[t] for t in pj], adam=False, momentum=0.9)
        return csrc.norms(ts), csrc.factored_stats(f, 1e-3), proj[:4]

    first = run()
    n_plans = csrc.plan_cache_size()
    again = run()
    assert csrc.plan_cache_size() == n_plans  # cached plans, nothing rebuilt
    for x, y in zip(leaves(first), leaves(again), strict=True):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())  # bit-identical
    for p in csrc.cached_plans():
        assert int(p.counters.abs().sum()) == 0  # every launch leaves its tickets at zero


def test_torch_fallback_agrees():
    ts = shape_tensors((torch.float32,), seed=5)
    f = [t for t in ts if t.dim() >= 2]
    assert_close(csrc.sumsq_per_tensor(ts, backend="torch"), csrc.sumsq_per_tensor(ts), rtol=1e-5)
    for x, y in zip(sum(csrc.factored_stats(f, 0.1, backend="torch"), []), sum(csrc.factored_stats(f, 0.1), [])):
        assert_close(x, y)
    # float64 (not an engine dtype) goes to torch by itself
    assert_close(csrc.sumsq_per_tensor([ts[8].double()]), ts[8].double().square().sum().view(1))


def test_inputs_checked():
    with pytest.raises(ValueError, match="shapes"):
        csrc.projection_stats([torch.ones(3, 2)], [torch.ones(3, 4)], [[torch.ones(3, 2)]], adam=False)
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
    nc = rand_tensor((6, 8)).t()  # non-contiguous: copied first
    assert_close(csrc.sumsq_per_tensor([nc]), nc.double().square().sum().view(1))
    assert_close(csrc.factored_stats([nc])[0][0], nc.double().square().mean(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_host_bitwise():
    if not csrc.cuda_available():
        csrc.build(host_only=False, timeout=600)
    if not csrc.cuda_available():
        pytest.skip(f"CUDA module not built: {csrc.load_errors()}")
    ts = shape_tensors((torch.float32, torch.bfloat16, torch.float16), seed=21)
    f = [t for t in ts if t.dim() >= 2]
    dims = [None if i % 2 else (0, 1) if t.dim() >= 3 else None for i, t in enumerate(f)]
    dev = [t.cuda() for t in ts]
    devf = [t.cuda() for t in f]
    pairs = [
        (csrc.norms(ts), csrc.norms(dev)),
        (csrc.factored_stats(f, 1e-3, dims), csrc.factored_stats(devf, 1e-3, dims)),
    ]
    pj = [t for t in f if t.numel()]
    pp = [rand_tensor(t.shape, t.dtype, seed=70 + i) for i, t in enumerate(pj)]
    for adam in (False, True):
        st = [[t, t.abs()] if adam else [t] for t in pj]
        steps = [torch.tensor([3.0]) for _ in pj] if adam else None
        kw = dict(adam=adam, nesterov=True, momentum=0.9, betas=(0.9, 0.99), eps=1e-8, delta=0.1)
        on = lambda ts: [t.cuda() for t in ts]  # noqa: E731
        pairs.append((csrc.projection_stats(pj, pp, st, steps, **kw)[:4],
                      csrc.projection_stats(on(pj), on(pp), [on(x) for x in st], steps and on(steps), **kw)[:4]))
    torch.cuda.synchronize()
    for host_r, dev_r in pairs:
        for h, d in zip(leaves(host_r), leaves(dev_r), strict=True):
            assert d.is_cuda
            assert torch.equal(h.nan_to_num(), d.cpu().nan_to_num()), "device result differs from the host build"
