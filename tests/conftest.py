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


def _patch_triton_language_once_per_launch():
    """Triton's interpreter patches the language modules a kernel's globals name (triton.language, or .core for its
    own standard library) for a launch, then again on every nested @triton.jit call it runs (inspect.getmembers over
    the modules: over half of our kernels' interpreted run time), though the modules are already patched for that
    launch. Here a nested call patches only modules not yet patched in the launch: the same interpreted semantics,
    a fraction of the host time. Left as it is if the interpreter's internals differ from what this expects."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter as ti
    patch, grid_call = getattr(ti, "_patch_lang", None), getattr(getattr(ti, "GridExecutor", None), "__call__", None)
    if patch is None or grid_call is None or not hasattr(ti, "_LangPatchScope"):
        return
    patched: set = set()  # ids of the language modules the running launch has patched
    langs_of: dict = {}

    def _patch_lang(fn):
        if fn not in langs_of:
            langs_of[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs_of[fn] <= patched:
            return ti._LangPatchScope()  # nothing to restore: the launch restores its own patches
        patched.update(langs_of[fn])
        return patch(fn)

    def __call__(self, *args, **kwargs):
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.clear()

    ti._patch_lang, ti.GridExecutor.__call__ = _patch_lang, __call__


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _patch_triton_language_once_per_launch()

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
