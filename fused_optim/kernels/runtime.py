"""The one launch path: Triton's import, every interpreter knob, compile options, launch counting, and persistent
(cooperative) launches with their fallback.

Every kernel launch of the package, Triton or the C++ engine, goes through ``dispatch``: it is the one place that
counts launches (tests assert launches per step) and the one place ``bench/host_overhead.py`` stubs to measure the
host cost of a step.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: BaseException | None = None
except Exception as e:  # pragma: no cover - the reference path still works
    triton = tl = None
    IMPORT_ERROR = e

# Elements per program of the element-wise kernels: BLOCK lanes x ITERS iterations = 16K elements (64 KB fp32 per
# tensor). With 8 warps a thread holds 8 elements per tensor per iteration: two 128-bit fp32 accesses.
BLOCK = int(os.environ.get("FUSED_OPTIM_BLOCK", 2048))
ITERS = int(os.environ.get("FUSED_OPTIM_ITERS", 8))
NUM_WARPS = 8
# FMA contraction: explicit so triton 3.9's changing default does not change our last bits.
FP_FUSION = True

launch_count = 0  # launches made (Triton and the C++ engine); tests assert launches per group and step
engine_launch_count = 0  # of which on the C++ engine


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    return triton is not None


def _major_minor(version: str) -> tuple:
    return tuple(int(x) for x in version.split(".")[:2])


def interpreter_problem() -> str:
    """Why Triton's interpreter cannot run these kernels here, or "": triton < 3.7's interpreter converts a
    one-element array to an int with int(), which numpy >= 2.4 refuses, so every kernel with a run-time loop
    bound fails (triton 3.6 + numpy 2.3 and triton 3.9 + numpy 2.4 run them)."""
    if triton is None or not interpreter_enabled():
        return ""
    import numpy
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy "
                f"{numpy.__version__} (it needs numpy < 2.4, or triton >= 3.7): pip install 'numpy<2.4'")
    return ""


def unavailable_reason() -> str:
    """Why the kernels cannot run here (for error messages): the import error's real cause."""
    if IMPORT_ERROR is None:
        return ""
    if isinstance(IMPORT_ERROR, ModuleNotFoundError) and IMPORT_ERROR.name == "triton":
        return "triton is not installed (pip install triton)"
    return f"importing triton failed: {type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}"


if triton is not None:
    TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                 torch.float64: tl.float64, torch.uint8: tl.uint8}  # uint8: int8 states' codes


def tl_dtype(dtype: torch.dtype):
    return TL_DTYPES[dtype]


def compile_options(num_warps: int = NUM_WARPS) -> dict:
    """What every compiled launch (and the AOT inventory) passes: warps and FMA contraction."""
    return {"num_warps": num_warps, "enable_fp_fusion": FP_FUSION}


def dispatch(fn, args: tuple, kwargs: dict, *, engine: bool = False):
    """Make a launch, ``fn(*args, **kwargs)``: the one launch counting site, and the one stubbing point of
    bench/host_overhead.py. ``engine``: a launch of the C++ engine (fused_optim/csrc.py)."""
    global launch_count, engine_launch_count
    launch_count += 1
    engine_launch_count += engine
    return fn(*args, **kwargs)


class CooperativeLaunchRefused(RuntimeError):
    """The driver (or the interpreter) cannot make every program of a grid-barrier launch resident."""


def launch(kernel, grid: int, *args, num_warps: int = NUM_WARPS, cooperative: bool = False, **constexprs) -> None:
    """Launch a Triton kernel on a 1-D grid. ``cooperative``: the kernel holds a grid barrier, so all its programs
    must be resident at once; the driver either guarantees it or refuses (CooperativeLaunchRefused)."""
    if interpreter_enabled():
        if cooperative and grid > 1:  # the interpreter runs programs one after another: a barrier would hang
            raise CooperativeLaunchRefused(f"the interpreter cannot run {grid} programs at once")
        dispatch(kernel[(grid,)], args, constexprs)
        return
    options = compile_options(num_warps)
    if cooperative:
        options["launch_cooperative_grid"] = True
    try:
        dispatch(kernel[(grid,)], args, {**constexprs, **options})
    except RuntimeError as e:
        if cooperative and "cooperative" in str(e).lower():
            raise CooperativeLaunchRefused(str(e)) from e
        raise


def persistent_grid(n_items: int, device) -> int:
    """Programs of a multi-phase (grid-barrier) launch: one per SM at most, so a cooperative launch of them fits."""
    if interpreter_enabled() or torch.device(device).type != "cuda":
        return 1
    return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, n_items))


refused_devices: set = set()  # devices that refused a cooperative launch: later steps go straight to the fallback


def launch_phases(kernel, phases: list, *args, grid_of, device, constexprs_of, num_warps: int = NUM_WARPS,
                  between=None) -> None:
    """Run dependent ``phases`` (a list of pass ids) in order. One phase: one launch of ``grid_of(phase)``
    programs. Several: one persistent cooperative launch, phases separated by grid barriers inside the kernel; if
    the device refuses it, one launch per phase (the launch boundary is the barrier), never a barrier that might
    wait on a program that is not running (Note [cooperative launches]). ``constexprs_of(phases)`` gives the
    compile-time arguments of a launch running those phases. ``between(phase)``: host work after each phase but
    the last (a collective over FSDP2 shards, which no kernel may hold): one launch per phase then."""
    if len(phases) > 1 and between is None:
        grid = persistent_grid(max(grid_of(p) for p in phases), device)
        key = str(device)
        if key not in refused_devices:
            try:
                launch(kernel, grid, *args, num_warps=num_warps, cooperative=grid > 1, **constexprs_of(phases))
                return
            except CooperativeLaunchRefused:
                refused_devices.add(key)
    for i, phase in enumerate(phases):
        if i and between is not None:
            between(phases[i - 1])
        launch(kernel, grid_of(phase), *args, num_warps=num_warps, **constexprs_of([phase]))
