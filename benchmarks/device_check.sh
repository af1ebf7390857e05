#!/usr/bin/env bash
# The one GPU check: build against the machine's own torch, run the GPU tests, run the benchmarks at
# the anchor shapes, print a short table last. Full logs go to $OUT (or ./device_out).
# Usage on a GPU machine, from the repo root:  bash benchmarks/device_check.sh
# It keeps to a wall-clock budget (DEADLINE_S, default 330 s: a session's 15 device minutes, start
# included, then hold a rerun; the whole default list took 407 s on a fresh H200, so give
# DEADLINE_S=420 when one run is all there will be): each stage's timeout is cut to what is left, and
# a benchmark that would start with under 45 s left is skipped and named, so the call always ends with
# the summary. Benchmarks run in BENCHES order. NO_COMPILE defaults to 1 (the torch.compile rows'
# compiles would take most of the budget); NO_COMPILE=0 times them.
# Measured on an H200 (2026-11-27, NO_COMPILE=1, a fresh machine; the start took about 30 s more):
# build 82 s, GPU tests 99 s (8 xdist workers; one test alone 60 s), grpo 54 s, moe 57 s, logprobs
# 28 s, rollout 58 s, model 28 s: 407 s in all. Without NO_COMPILE=1 the torch.compile rows add their
# compiles, so then run the rest in a second call on the same warm machine, e.g.
#   SKIP_BUILD=1 SKIP_TESTS=1 BENCHES="moe rollout model train" bash benchmarks/device_check.sh
# PROFILE=1 adds a torch.profiler table of ours to grpo, rollout and model (moe prints its own always; the rollout's needs
# about 40 s more). "train": six GRPO steps of `reasonrl grpo` on the GPU (23 s). "moe-tune": the MoE
# Triton kernels' block configs one kernel at a time (bench_moe.py --tune; ~17 compiles: a call of its own).
# The Liger-Kernel wheel in .whl/ (git-ignored) reaches the machine only when the call carries it
# (the device tool's carry: [".whl"]); without it every Liger reference row is skipped.
# Every benchmark prints "# measured {...}" per row as it finishes, so a stage cut off by its cap
# keeps its finished rows in $OUT/NAME.log. Past 7 files in $OUT the logs are packed into logs.tgz
# (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 REASONRL_GPU_TESTS=1
unset TRITON_INTERPRET
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
DEADLINE_S=${DEADLINE_S:-330}
left() { echo $(( DEADLINE_S - ($(date +%s) - t0) )); }
cap() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }  # min(cap, left)
if ls .whl/*.whl >/dev/null 2>&1; then  # optional peers (liger-kernel) carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
BENCHES=${BENCHES:-"logprobs grpo moe rollout model"}
nc=(); [ "${NO_COMPILE:-1}" = 1 ] && nc=(--no-compile)  # skip the torch.compile rows (their compiles take longest)
pf=(); [ "${PROFILE:-0}" = 1 ] && pf=(--profile)  # grpo, rollout, model: a torch.profiler table of ours
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stamp "build"
  REASONRL_CUDA_ARCHS=${REASONRL_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} timeout "$(cap 300)" \
    python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { stamp "CUDA BUILD FAILED: once more without the CUDA kernels (the Triton and C++ paths still run)"
         tail -40 "$OUT/build.log"; cp "$OUT/build.log" "$OUT/build-cuda-failed.log"
         REASONRL_SKIP_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-16} timeout "$(cap 200)" \
           python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
           || { stamp "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }; }
fi
python3 -c "import torch, reasonrl._C as c; print('built_with_cuda', c.built_with_cuda())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "gpu tests"
  # the GPU tests spend most of their time compiling Triton kernels (CPU work): spread them over workers
  xd=(); python3 -c "import xdist" 2>/dev/null && xd=(-n "${TEST_WORKERS:-8}")
  kk=(); [ -n "${TESTS_K:-}" ] && kk=(-k "$TESTS_K")  # e.g. TESTS_K="grpo or moe": a subset, for a short rerun
  # -v: each test's PASSED/FAILED line as it finishes (with xdist too), so a run cut off at its cap still
  # names the failures (the -rfE summary comes only at the end); 231 GPU tests took ~100 s of 8 workers
  timeout "$(cap "${TEST_TIMEOUT:-180}")" python3 -m pytest -v -m gpu tests -p no:cacheprovider "${xd[@]}" "${kk[@]}" \
    -rfE --tb=short --durations=10 >"$OUT/tests.log" 2>&1
  echo "tests exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)| (FAILED|ERROR) " "$OUT/tests.log" | head -20
fi
run_bench() {  # name, timeout, command...
  local name=$1 lim=$2; shift 2
  if [ "$(left)" -lt 45 ]; then stamp "SKIPPED bench $name: $(left) s of DEADLINE_S left"; return 0; fi
  stamp "bench $name"
  timeout "$(cap "$lim")" "$@" >"$OUT/$name.log" 2>&1 || echo "bench $name exit $?"
}
for name in $BENCHES; do  # in the order given
  case $name in
    logprobs) run_bench logprobs "${BENCH_TIMEOUT:-150}" python3 benchmarks/bench_logprobs.py --gpu "${nc[@]}" --json "$OUT/logprobs.json";;
    grpo) run_bench grpo 180 python3 benchmarks/bench_grpo.py --gpu "${nc[@]}" "${pf[@]}" --json "$OUT/grpo.json";;
    # moe: always with its profile (a few seconds): which Triton kernel holds the backward's time (never measured yet)
    moe) run_bench moe 120 python3 benchmarks/bench_moe.py --gpu --profile --json "$OUT/moe.json";;
    rollout) run_bench rollout 150 python3 benchmarks/bench_rollout.py --gpu --rep 2 "${pf[@]}" --json "$OUT/rollout.json"
      if [ ! -s "$OUT/rollout.json" ]; then  # no result: once more without the sampling kernel (first GPU run of it)
        REASONRL_SAMPLE_KERNEL=0 run_bench rollout-nokernel 150 python3 benchmarks/bench_rollout.py --gpu --rep 2 \
          --json "$OUT/rollout.json"
      fi;;
    model) run_bench model 90 python3 benchmarks/bench_model.py --gpu "${pf[@]}" --json "$OUT/model.json"
           run_bench model-ops 60 python3 benchmarks/bench_model.py --gpu --count-ops --json "$OUT/model-ops.json";;
    moe-tune) run_bench moe-tune 300 python3 benchmarks/bench_moe.py --gpu --tune --rep 10 --json "$OUT/moe-tune.json";;
    train)  # the trainer itself on the GPU (device cuda, bf16 autocast): s/step in its log
      # random weights score 0 everywhere: without --dynamic_sampling false every group is dropped and
      # nothing trains; mu 2 and beta > 0 take the old-policy and reference paths too
      run_bench train 150 python3 -m reasonrl grpo --model tiny --steps 6 --device cuda --dynamic_sampling false \
        --mu 2 --beta 0.05 --out_dir /tmp/grpo_gpu
      cp /tmp/grpo_gpu/metrics.jsonl "$OUT/train-metrics.jsonl" 2>/dev/null;;  # not the checkpoints: the tool's file limit
    *) echo "unknown bench '$name' (logprobs grpo moe rollout model train moe-tune)";;
  esac
done
stamp "summary"
shopt -s nullglob
for f in "$OUT"/*.log; do
  case $f in *build.log|*tests.log) continue;; esac
  echo "== $(basename "$f")"; grep -v '^{' "$f" | tail -n 14
done
# the device tool brings back at most 8 files: pack the logs and JSON into one archive beside the GPU line
if [ "${PACK:-1}" = 1 ] && [ "$(find "$OUT" -type f | wc -l)" -gt 7 ]; then
  (cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz --exclude=gpu.txt -- * && find . -mindepth 1 ! -name logs.tgz ! -name gpu.txt -delete)
  echo "logs packed: $OUT/logs.tgz"
fi
