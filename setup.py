"""fused_optim: pure Python (Triton kernels) plus two optional C++/CUDA extension modules from csrc/.

The extensions are built by CMake + pybind11 (Ninja generator) through scripts/build_csrc.sh, the one driver of
that build; ``build_ext`` below only tells it where setuptools wants each module:

* ``fused_optim._fused_optim_host``  always declared; optional: a failed build (no C++ compiler, no pybind11, no
  cmake and no fallback compiler) prints why and the install goes on (fused_optim.csrc falls back to torch ops).
* ``fused_optim._fused_optim_cuda``  declared when nvcc is found (CUDACXX, PATH or /usr/local/cuda/bin/nvcc),
  unless FUSED_OPTIM_CUDA=0; FUSED_OPTIM_CUDA=1 requires it (a failed build fails the install).

pybind11 (and cmake, ninja) must be importable at build time: pyproject.toml declares them, so an isolated
``pip install .`` has them; scripts/setup.sh installs that list and then runs
``pip install --no-build-isolation -e .[test,examples]``.
"""
import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.abspath(__file__))
HOST, CUDA = "fused_optim._fused_optim_host", "fused_optim._fused_optim_cuda"


def _find_nvcc():
    for cand in (os.environ.get("CUDACXX"), "nvcc", "/usr/local/cuda/bin/nvcc"):
        path = cand and shutil.which(cand)
        if path:
            return path
    return None


def _extensions():
    exts = [Extension(HOST, sources=["csrc/host_module.cpp"], optional=True)]
    want = os.environ.get("FUSED_OPTIM_CUDA", "").strip()
    nvcc = _find_nvcc()
    if want == "0":
        skip = "FUSED_OPTIM_CUDA=0"
    elif nvcc is None and want != "1":
        skip = "nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin)"
    else:
        skip = None
        exts.append(Extension(CUDA, sources=["csrc/cuda_module.cpp", "csrc/cuda_kernels.cu"], optional=want != "1"))
    return exts, skip


EXTENSIONS, CUDA_SKIPPED = _extensions()


def _drop_stale_cmake_cache(build_dir):
    """Forget a CMake configuration made with tools that are gone (an earlier isolated build's temporary cmake,
    ninja or pybind11): configuring or building on top of it fails."""
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            text = f.read()
    except OSError:
        return
    paths = re.findall(r"^(?:CMAKE_COMMAND|CMAKE_MAKE_PROGRAM|pybind11_DIR):\w+=(.+)$", text, re.M)
    if any(not os.path.exists(path) for path in paths):
        print(f"fused_optim: {build_dir} was configured with tools that are gone: configuring afresh", flush=True)
        os.remove(os.path.join(build_dir, "CMakeCache.txt"))
        shutil.rmtree(os.path.join(build_dir, "CMakeFiles"), ignore_errors=True)


class BuildCsrc(build_ext):
    """Builds each csrc extension with ``scripts/build_csrc.sh`` (CMake + Ninja) into setuptools' output path."""

    def run(self):
        if importlib.util.find_spec("pybind11") is None:  # a --no-build-isolation build without pyproject's requires
            if any(not ext.optional for ext in self.extensions):
                raise CompileError("fused_optim: pybind11 is not installed: cannot build the required C++ engine")
            print("fused_optim: WARNING: pybind11 is not installed, so no C++ engine is built (fused_optim.csrc "
                  "falls back to torch ops); pip install pybind11 cmake ninja, then reinstall", flush=True)
            return
        if CUDA_SKIPPED:
            print(f"fused_optim: {CUDA_SKIPPED} -> skipping the CUDA extension {CUDA}; "
                  "CUDA tensors use the Triton path or the reference")
        super().run()

    def build_extension(self, ext):
        cuda = ext.name == CUDA
        target = self.get_ext_fullpath(ext.name)  # build_lib/..., copied to the source tree by editable installs
        sub = "csrc" if cuda else "csrc-host"
        # Editable installs get a throwaway build_temp: build in build/ (build_csrc.sh's own dirs) to stay incremental.
        tmp = os.path.join(ROOT, "build") if getattr(self, "editable_mode", False) else os.path.abspath(self.build_temp)
        env = dict(os.environ, PYTHON=sys.executable, OUT_DIR=os.path.dirname(os.path.abspath(target)),
                   BUILD_DIR=os.path.join(tmp, sub))
        _drop_stale_cmake_cache(env["BUILD_DIR"])
        if self.parallel:
            env["JOBS"] = str(self.parallel)
        cmd = ["bash", os.path.join(ROOT, "scripts", "build_csrc.sh"), "--cuda-only" if cuda else "--host-only"]
        print(f"fused_optim: building {ext.name}: {' '.join(cmd[1:])} (BUILD_DIR={env['BUILD_DIR']})", flush=True)
        tail = collections.deque(maxlen=25)
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
            for line in proc.stdout:
                print(line, end="", flush=True)
                tail.append(line)
            rc = proc.wait()
        except OSError as e:
            rc, tail = None, [str(e)]
        fallback = ""
        if ext.optional:
            fallback = " (CUDA tensors use Triton / torch ops)" if cuda else " (fused_optim.csrc falls back to torch ops)"
        if rc != 0:
            raise CompileError(f"{' '.join(cmd[1:])} failed ({rc}): {ext.name} not built{fallback}:\n" + "".join(tail))
        if not os.path.exists(target):
            raise CompileError(f"{' '.join(cmd[1:])} did not write {target}: {ext.name} not built{fallback}")


setup(
    name="fused_optim",
    version="0.1.0",
    description="Fused GPU optimizers for PyTorch: torch.optim / timm.optim drop-ins with Triton and CUDA kernels",
    packages=find_packages(include=["fused_optim", "fused_optim.*"]),
    python_requires=">=3.10",
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, the fused paths on CPU tensors) imports it
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        # Everything the tests import except timm (an anchor): timm requires torchvision, whose PyPI builds need
        # the CUDA torch build of the same release, so scripts/setup.sh installs timm with --no-deps.
        "test": ["pytest", "pytest-xdist>=3.2", "numpy", "pyyaml", "transformers", "accelerate>=1.1.0", "lightning"],
        "examples": ["pyyaml"],  # examples/train_gpt.py reads a YAML config
        "bench": ["matplotlib", "tqdm"],
    },
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildCsrc},
)
