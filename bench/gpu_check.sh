#!/usr/bin/env bash
# ONE command for a session that is lent a GPU (the device tool's `run`): build csrc/ with CUDA, run the whole
# test suite on CUDA, run the benchmarks, and leave everything in one folder to commit (default
# bench/results/<date>-<gpu>; also copied to $OUT when the device tool sets it). Fits one 10-minute device call.
#   bash bench/gpu_check.sh [--quick]
# Wheels the GPU image lacks (timm for the anchors) can travel in .whl/ (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=${1:-}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '_')
dest=${RESULTS:-bench/results/$(date +%Y-%m-%d)-$gpu}
mkdir -p "$dest"
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$dest/env.txt" 2>&1
cat "$dest/env.txt"

echo "== build csrc (CUDA)"; time bash scripts/build_csrc.sh > "$dest/build_csrc.log" 2>&1; tail -n 3 "$dest/build_csrc.log"
echo "== tests on CUDA"
# 8 workers: cold Triton caches make compilation the long pole; workers compile in parallel
time timeout 330 $PY -m pytest -q -n 8 tests -p no:cacheprovider > "$dest/tests.log" 2>&1; tail -n 5 "$dest/tests.log"
echo "== benchmarks"
reps=50; [ "$QUICK" = "--quick" ] && reps=10
time timeout 170 $PY bench/run.py --workload large gpt tiny --dtype float32 bfloat16 --reps $reps --no-compile \
    --out "$dest/bench" > "$dest/bench.log" 2>&1; tail -n 25 "$dest/bench.log"
# torch.compile'd torch steps compile once per optimizer and workload (tens of seconds each): the optimizers with a
# torch fused path, fp32, in a run of their own so the main table is never cut short by compile time
time timeout 100 $PY bench/run.py --workload large gpt --dtype float32 --reps $reps --compile \
    --only Adam,AdamW,SGD,Adagrad --out "$dest/bench-compile" > "$dest/bench-compile.log" 2>&1
tail -n 12 "$dest/bench-compile.log"
[ -n "${OUT:-}" ] && cp "$dest"/* "$OUT"/ 2>/dev/null
echo "results in $dest"
