"""Shared by the C++ engine's tests (test_csrc*.py): the host module fixture, odd shapes, inputs, comparisons."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

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


def rand_tensor(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero everywhere, mixed signs and magnitudes.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x + torch.sign(x) * 0.05 + 0.01
    return x.to(dtype)


def assert_close(actual, expected, rtol=1e-5, what=""):
    a, e = actual.double().cpu(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: nan pattern differs"
    ok = ~e.isnan()
    err = ((a - e).abs()[ok] / e.abs()[ok].clamp_min(1e-30))
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= rtol, f"{what}: max rel err {worst:.3g}"


def shape_tensors(dtypes=(torch.float32,), seed=0):
    return [rand_tensor(s, dtypes[i % len(dtypes)], seed + i) for i, s in enumerate(SHAPES)]


def leaves(r):
    if isinstance(r, torch.Tensor):
        return [r]
    return [x for y in r if isinstance(y, (torch.Tensor, tuple, list)) for x in leaves(y)]
