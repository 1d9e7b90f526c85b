"""Test set-up: without CUDA, every Triton kernel runs under the interpreter on CPU tensors (never skipped).

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before fused_optim is imported. Small
chunks make every test tensor span several programs, so chunk boundaries and masked tails are exercised.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSED_OPTIM_BLOCK", "256")
    os.environ.setdefault("FUSED_OPTIM_ITERS", "2")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if not torch.cuda.is_available():
    # the tests' tensors are tiny: intra-op threads only contend with the other pytest worker for the cores
    torch.set_num_threads(1)

import pytest  # noqa: E402


from interpreter import patch_language_once_per_launch  # noqa: E402

patch_language_once_per_launch()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["csrc", "triton"])
def reductions(request, monkeypatch):
    """Runs a test with each implementation of the per-tensor reductions (fused_optim/kernels/reduce.py): the C++
    engine (its host build on CPU) and Triton."""
    from fused_optim.kernels import reduce

    if request.param == "csrc" and not reduce.use_csrc(torch.device(DEVICE)):
        pytest.skip("the csrc module is not built here (bash scripts/build_csrc.sh)")
    monkeypatch.setattr(reduce, "BACKEND", request.param)
    return request.param
