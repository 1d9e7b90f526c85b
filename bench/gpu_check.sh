#!/usr/bin/env bash
# ONE command for a machine lent a GPU (one device call of at most 10 minutes): the self-check
# (python -m fused_optim.check), the same under compute-sanitizer (memcheck, racecheck, synccheck; reduced problems),
# the csrc/ build with CUDA, the test suite on CUDA and the benchmarks. Everything (logs, device name, versions,
# a summary) goes to one folder to commit: bench/results/<date>-<gpu>, also copied to $OUT when that is set.
#   bash bench/gpu_check.sh [--quick] [--dry-run]
# --quick: fewer benchmark reps. --dry-run: print the stages and their time caps, run nothing.
# Every stage runs under `timeout`, capped by what is left of BUDGET seconds (default 570), so a failing or slow
# stage cannot eat the others' time and the whole script ends within the budget. Stages that need CUDA (or nvcc,
# compute-sanitizer) say so and are skipped where it is missing, e.g. on a CPU machine.
# Wheels the GPU image lacks (timm for the anchors) can travel in .whl/ (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=0 DRY=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        *) echo "usage: bash bench/gpu_check.sh [--quick] [--dry-run]" >&2; exit 2 ;;
    esac
done
START=$SECONDS
DEADLINE=$((START + ${BUDGET:-570}))
SUMMARY=()

has_cuda() { $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }

# stage NAME CAP_SECONDS LOG COMMAND...: run COMMAND under timeout (CAP, or what is left if less), output to LOG
stage() {
    local name=$1 cap=$2 log=$3; shift 3
    local left=$((DEADLINE - SECONDS))
    (( cap > left )) && cap=$left
    if (( DRY )); then echo "== $name (cap ${cap}s) > $log: $*"; return; fi
    if (( cap < 10 )); then SUMMARY+=("$name: skipped (time budget spent)"); echo "== $name: skipped (time budget spent)"; return; fi
    echo "== $name (cap ${cap}s)"
    local t0=$SECONDS rc
    timeout -k 10 "$cap" "$@" > "$dest/$log" 2>&1
    rc=$?
    local status="ok"
    (( rc == 124 || rc == 137 )) && status="TIMEOUT (cap ${cap}s)" || { (( rc != 0 )) && status="FAILED (exit $rc)"; }
    SUMMARY+=("$name: $status in $((SECONDS - t0))s ($log)")
    tail -n 4 "$dest/$log"
}

skip() { SUMMARY+=("$1: skipped ($2)"); echo "== $1: skipped ($2)"; }

# run_if OK REASON NAME CAP LOG COMMAND...: the stage if OK is 1, else a line saying why it is skipped
run_if() {
    local ok=$1 why=$2; shift 2
    if (( ok || DRY )); then stage "$@"; else skip "$1" "$why"; fi  # a dry run shows every stage
}

CUDA=0 NVCC=0 SANITIZER=0
has_cuda && CUDA=1
command -v nvcc >/dev/null && NVCC=1
(( CUDA )) && command -v compute-sanitizer >/dev/null && SANITIZER=1

gpu=cpu
command -v nvidia-smi >/dev/null && gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu=$(echo "${gpu:-cpu}" | tr -c 'A-Za-z0-9\n' '_')
dest=${RESULTS:-bench/results/$(date +%Y-%m-%d)-$gpu}
if (( DRY )); then
    echo "results would go to $dest"
else
    mkdir -p "$dest"
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    # the editable install builds csrc/ (with CUDA where nvcc is found); the check runs on what it built
    timeout 60 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$dest/install.log" 2>&1 \
        || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
    { command -v nvidia-smi >/dev/null && nvidia-smi
      $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
              'cuda', torch.version.cuda, 'triton', triton.__version__)"
      command -v nvcc >/dev/null && nvcc --version | tail -n 2
      command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1; } > "$dest/env.txt" 2>&1
    cat "$dest/env.txt"
fi

# 1. the self-check (under Triton's interpreter where there is no CUDA); it also fills Triton's kernel cache, so
# the sanitizer runs below mostly skip JIT compilation
stage "self-check" 90 check.log $PY -m fused_optim.check

# 2. compute-sanitizer on the reduced problems: memcheck over every optimizer; racecheck and synccheck (much slower)
# over one optimizer per kind of kernel: the shared element-wise kernel, the C++ engine's reductions (NovoGrad),
# the persistent launches with grid barriers (Adafactor, AdamP), LBFGS's direction kernel
SAN="compute-sanitizer --error-exitcode 3 --print-limit 20"
NO_SAN="needs CUDA and compute-sanitizer"
run_if $SANITIZER "$NO_SAN" "memcheck" 60 memcheck.log $SAN --tool memcheck $PY -m fused_optim.check --quick
for tool in racecheck synccheck; do
    run_if $SANITIZER "$NO_SAN" "$tool" 35 "$tool.log" $SAN --tool "$tool" $PY -m fused_optim.check --quick \
        --only adamw,novograd,adafactor,adamp,lbfgs
done

# 3. csrc/ rebuilt in place with CUDA (the log keeps the compiler's report)
run_if $NVCC "no nvcc" "build csrc (CUDA)" 40 build_csrc.log bash scripts/build_csrc.sh

# 4. the test suite on CUDA (8 workers: with cold Triton caches compilation is the long pole, done in parallel)
# and 5. the benchmarks (speed claims come only from GPU runs); stages past the budget are skipped, so the later
# ones are the ones that can wait
reps=50; (( QUICK )) && reps=10
run_if $CUDA "no CUDA device" "tests on CUDA" 140 tests.log $PY -m pytest -q -n 8 tests -p no:cacheprovider
run_if $CUDA "no CUDA device" "benchmarks" 60 bench.log $PY bench/run.py --workload large gpt tiny \
    --dtype float32 bfloat16 --reps $reps --no-compile --out "$dest/bench"
# memory-lean states: the fused step with int8 / bf16 states against the anchor's states on the 100M-param
# workload, bytes moved (the states' own) / time against the copy bandwidth
run_if $CUDA "no CUDA device" "benchmarks (lean states)" 30 bench-lean.log $PY bench/run.py --workload large \
    --dtype float32 bfloat16 --states int8 bfloat16 --impls ours-fused --reps $reps --no-compile \
    --only Adam,AdamW,SGD,RMSprop,Lion,Lamb,Adafactor --out "$dest/bench-lean"
# FSDP2 at world size 1: the DTensor code paths (local shards, the reductions' combine, the clip's global norm)
# against the unsharded step, each row checked for the two models ending at the same params
run_if $CUDA "no CUDA device" "FSDP2 step (world size 1)" 30 fsdp.log $PY bench/fsdp_step.py --paths fused \
    --only AdamW,AdamW+clip,NovoGrad,SGDP,Lamb,Adafactor,Muon --reps $reps --out "$dest/fsdp"
# torch.compile'd torch steps compile once per optimizer and workload (tens of seconds each): the optimizers with a
# torch fused path, fp32, in a run of their own so the main table is never cut short by compile time
run_if $CUDA "no CUDA device" "benchmarks (torch.compile)" 25 bench-compile.log $PY bench/run.py --workload large gpt \
    --dtype float32 --reps $reps --compile --only Adam,AdamW,SGD,Adagrad --out "$dest/bench-compile"
# training quality of lean states on the fused path (train_gpt's GPT, 200 steps; the interpreter cannot on CPU)
run_if $CUDA "no CUDA device" "lean states on train_gpt (fused)" 30 lean-gpt.log $PY bench/lean_gpt.py \
    --paths fused --out "$dest/lean-gpt.md"

(( DRY )) && exit 0
{ echo "summary ($((SECONDS - START))s of ${BUDGET:-570}s), results in $dest"; printf -- '- %s\n' "${SUMMARY[@]}"; } \
    | tee "$dest/summary.txt"
[ -n "${OUT:-}" ] && cp -r "$dest"/. "$OUT"/ 2>/dev/null
# exit status: failed if any stage failed or timed out
! printf '%s\n' "${SUMMARY[@]}" | grep -qE "FAILED|TIMEOUT"
