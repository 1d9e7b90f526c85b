#!/usr/bin/env bash
# Build fused_optim's C++/CUDA reductions in place (fused_optim/_fused_optim_host*.so, _fused_optim_cuda*.so).
#   bash scripts/build_csrc.sh               host module, plus the CUDA module when nvcc is found
#   bash scripts/build_csrc.sh --host-only   host module only (what tests/test_csrc.py runs)
#   bash scripts/build_csrc.sh --cuda-check  compile-only nvcc check for sm_80 + sm_90 (ptxas -v); fails on any error
# Env: PYTHON (default python3), JOBS (default 2), BUILD_DIR (default build/csrc[-host]), CMAKE_ARGS (extra).
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
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "build_csrc.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir)
case "$MODE" in
  host) BDIR=${BUILD_DIR:-build/csrc-host}; CUDA=OFF; TARGET=_fused_optim_host ;;
  check) BDIR=${BUILD_DIR:-build/csrc}; CUDA=ON; TARGET=cuda_check ;;
  *) BDIR=${BUILD_DIR:-build/csrc}; CUDA=AUTO; TARGET=all ;;
esac
# CMake looks for nvcc on PATH (or CUDACXX); also try the usual install prefix.
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if [ "$MODE" = check ] && ! command -v "${CUDACXX:-nvcc}" >/dev/null; then
  echo "build_csrc.sh --cuda-check: nvcc not found" >&2
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
  # Configure once per build dir (the build step re-runs CMake itself when CMakeLists.txt changes).
  if [ ! -f "$BDIR/CMakeCache.txt" ] || [ -n "${CMAKE_ARGS:-}" ] || ! grep -q "^FO_CUDA:STRING=$CUDA\$" "$BDIR/CMakeCache.txt"; then
    cmake -S . -B "$BDIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DFO_CUDA="$CUDA" \
      -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND11_DIR" ${CMAKE_ARGS:-} >"$BDIR/configure.log" 2>&1 \
      || { cat "$BDIR/configure.log" >&2; exit 1; }
    grep -E "fused_optim:" "$BDIR/configure.log" || true
  fi
  cmake --build "$BDIR" --target "$TARGET" -j "$JOBS"
else
  # No cmake: the host module alone, straight from the compiler (same flags as CMakeLists.txt).
  if [ "$MODE" = check ]; then echo "build_csrc.sh --cuda-check needs cmake" >&2; exit 1; fi
  echo "build_csrc.sh: cmake not found, compiling the host module directly (no CUDA module)"
  SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  ${CXX:-c++} -O3 -DNDEBUG -std=c++17 -shared -fPIC -fvisibility=hidden -ffp-contract=off \
    $("$PY" -m pybind11 --includes) -Icsrc csrc/host_module.cpp -o "fused_optim/_fused_optim_host$SUFFIX"
fi
