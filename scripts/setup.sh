#!/usr/bin/env bash
# Install fused_optim with its test and example dependencies into the active python (a venv's, CI's, a GPU
# image's). What gets installed is what setup.py and pyproject.toml declare; only torch and timm are special.
# Run it, or source it (main.sh, test.sh): it leaves the shell at the repository root with $PY set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q)
# torch: keep an installed build (GPU images ship their own); else the CPU build (a local file on the CI image):
# left to the resolver, a plain `torch` would be the newest multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
# pyproject.toml's build requirements (pybind11, cmake, ninja, ...): the editable build below uses this
# environment (--no-build-isolation), so csrc/'s build dirs under build/ stay valid and incremental.
mapfile -t build_reqs < <("$PY" - <<'PYEOF'
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PYEOF
)
"${PIP[@]}" "${build_reqs[@]}"
# The package with the declared extras. setup.py also builds csrc/'s extensions (scripts/build_csrc.sh: the host
# module, plus the CUDA module where nvcc is found; FUSED_OPTIM_CUDA=0 skips it). A failed build does not fail
# the install.
"${PIP[@]}" --no-build-isolation -e ".[test,examples]"
# timm is an anchor for the tests only. --no-deps: it requires torchvision, whose PyPI builds need the CUDA torch
# of the same release (pip would replace a CPU torch); tests/anchors.py imports timm.optim without timm's __init__.
"${PIP[@]}" --no-deps timm
built=$(cd fused_optim && ls _fused_optim_*.so 2>/dev/null | sed 's/\..*//' | paste -sd' ' -)
echo "fused_optim csrc extensions: ${built:-none} (pip install -v --no-build-isolation -e . shows the build log); setup took ${SECONDS}s"
