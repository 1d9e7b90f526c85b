#!/usr/bin/env bash
# Build fused_optim's C++/CUDA reductions in place (fused_optim/_fused_optim_host*.so, _fused_optim_cuda*.so).
#   bash scripts/build_csrc.sh               host module, plus the CUDA module when nvcc is found
#   bash scripts/build_csrc.sh --host-only   host module only (what tests/infra/test_csrc.py runs)
#   bash scripts/build_csrc.sh --cuda-check  compile-only nvcc check for sm_80 + sm_90 (ptxas -v); fails on any error
#   bash scripts/build_csrc.sh --cuda-only   the CUDA module only, nvcc required (setup.py's build_ext runs this)
# Env: PYTHON (default python3), JOBS (default 2), BUILD_DIR (default build/csrc[-host]), OUT_DIR (where the modules
# go, default fused_optim/), CMAKE_ARGS (extra). Relative BUILD_DIR / OUT_DIR are taken from the repo root.
# Incremental: build dirs are kept under build/, so a rebuild without changes takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
MODE=all
for arg in "$@"; do
  case "$arg" in
    --host-only) MODE=host ;;
    --cuda-check) MODE=check ;;
    --cuda-only) MODE=cuda ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build_csrc.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir) || { echo "build_csrc.sh: pybind11 not found for $PY (pip install pybind11)" >&2; exit 1; }
case "$MODE" in
  host) BDIR=${BUILD_DIR:-build/csrc-host}; CUDA=OFF; TARGET=_fused_optim_host ;;
  check) BDIR=${BUILD_DIR:-build/csrc}; CUDA=ON; TARGET=cuda_check ;;
  cuda) BDIR=${BUILD_DIR:-build/csrc}; CUDA=ON; TARGET=_fused_optim_cuda ;;
  *) BDIR=${BUILD_DIR:-build/csrc}; CUDA=AUTO; TARGET=all ;;
esac
mkdir -p "${OUT_DIR:-fused_optim}"
OUT=$(cd "${OUT_DIR:-fused_optim}" && pwd)
# CMake looks for nvcc on PATH (or CUDACXX); also try the usual install prefix.
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if { [ "$MODE" = check ] || [ "$MODE" = cuda ]; } && ! command -v "${CUDACXX:-nvcc}" >/dev/null; then
  echo "build_csrc.sh: nvcc not found (--cuda-check / --cuda-only need it)" >&2
  exit 1
fi

if command -v cmake >/dev/null; then
  GEN=()
  command -v ninja >/dev/null && GEN=(-G Ninja)
  # A build dir configured with another generator cannot be reused.
  if [ -f "$BDIR/CMakeCache.txt" ] && [ ${#GEN[@]} -gt 0 ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=Ninja" "$BDIR/CMakeCache.txt"; then
    rm -rf "$BDIR"
  fi
  mkdir -p "$BDIR"
  # One build at a time per build dir (setup.py and the tests' fixture may share one).
  if command -v flock >/dev/null; then exec 9>"$BDIR/.lock"; flock 9; fi
  # Configure once per build dir and output dir (the build step re-runs CMake itself when CMakeLists.txt changes).
  if [ ! -f "$BDIR/CMakeCache.txt" ] || [ -n "${CMAKE_ARGS:-}" ] || ! grep -q "^FO_CUDA:STRING=$CUDA\$" "$BDIR/CMakeCache.txt" \
     || ! grep -qxF "FO_OUTPUT_DIR:PATH=$OUT" "$BDIR/CMakeCache.txt"; then
    cmake -S . -B "$BDIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DFO_CUDA="$CUDA" -DFO_OUTPUT_DIR:PATH="$OUT" \
      -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND11_DIR" ${CMAKE_ARGS:-} >"$BDIR/configure.log" 2>&1 \
      || { cat "$BDIR/configure.log" >&2; rm -rf "$BDIR/CMakeCache.txt" "$BDIR/CMakeFiles"; exit 1; }  # retry afresh
    grep -E "fused_optim:" "$BDIR/configure.log" || true
  fi
  cmake --build "$BDIR" --target "$TARGET" -j "$JOBS"
else
  # No cmake: the host module alone, straight from the compiler (same flags as CMakeLists.txt).
  if [ "$MODE" = check ] || [ "$MODE" = cuda ]; then echo "build_csrc.sh: --cuda-check / --cuda-only need cmake" >&2; exit 1; fi
  echo "build_csrc.sh: cmake not found, compiling the host module directly (no CUDA module)"
  SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  ${CXX:-c++} -O3 -DNDEBUG -std=c++17 -shared -fPIC -fvisibility=hidden -ffp-contract=off \
    $("$PY" -m pybind11 --includes) -Icsrc csrc/host_module.cpp -o "$OUT/_fused_optim_host$SUFFIX"
fi
