#!/usr/bin/env bash
# The one GPU check: build against the machine's own torch, run the GPU tests, run every benchmark at
# the anchor shapes, print a short table last. Full logs go to $OUT (or ./device_out).
# Usage on a GPU machine, from the repo root:  bash benchmarks/device_check.sh
# Budget: build ~3 min, GPU tests <= 150 s, benchmarks up to ~11 min in all: more than one 600 s
# device call. Split it over two calls on the same warm machine, e.g.
#   BENCHES="logprobs grpo moe" bash benchmarks/device_check.sh          # build, tests, 3 benches
#   SKIP_BUILD=1 SKIP_TESTS=1 BENCHES="rollout model train" bash benchmarks/device_check.sh
# ("train": six GRPO steps of `reasonrl grpo` on the GPU; not in the default list.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 REASONRL_GPU_TESTS=1
unset TRITON_INTERPRET
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then  # optional peers (liger-kernel) carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
BENCHES=${BENCHES:-"logprobs grpo rollout model moe"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stamp "build"
  REASONRL_CUDA_ARCHS=${REASONRL_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} timeout 300 \
    python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { stamp "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi
python3 -c "import torch, reasonrl._C as c; print('built_with_cuda', c.built_with_cuda())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "gpu tests"
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -m gpu tests -p no:cacheprovider >"$OUT/tests.log" 2>&1
  echo "tests exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi
run_bench() {  # name, timeout, command...   (only the names listed in $BENCHES)
  local name=$1 lim=$2; shift 2
  case " $BENCHES " in *" $name "*) ;; *) return 0;; esac
  stamp "bench $name"
  timeout "$lim" "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || echo "bench $name exit $?"
}
[ -f benchmarks/bench_logprobs.py ] && run_bench logprobs ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_logprobs.py --gpu
[ -f benchmarks/bench_grpo.py ] && run_bench grpo 180 python3 benchmarks/bench_grpo.py --gpu
[ -f benchmarks/bench_rollout.py ] && run_bench rollout 150 python3 benchmarks/bench_rollout.py --gpu --rep 2
[ -f benchmarks/bench_model.py ] && run_bench model 90 python3 benchmarks/bench_model.py --gpu
[ -f benchmarks/bench_moe.py ] && run_bench moe 120 python3 benchmarks/bench_moe.py --gpu
case " $BENCHES " in *" train "*)  # the trainer itself on the GPU (device auto, bf16 autocast): s/step in its log
  stamp "train"
  timeout 150 python3 -m reasonrl grpo --model tiny --steps 6 --device cuda --out_dir "$OUT/grpo_gpu" \
    >"$OUT/train.log" 2>&1 || echo "train exit $?";;
esac
stamp "summary"
for f in "$OUT"/*.log; do
  case $f in *build.log|*tests.log) continue;; esac
  echo "== $(basename "$f")"; grep -v '^{' "$f" | tail -n 14
done
