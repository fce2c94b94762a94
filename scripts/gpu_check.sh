#!/usr/bin/env bash
# The GPU path, on a machine with one CUDA device and this repo's dependencies importable:
#   PY=python3 bash scripts/gpu_check.sh OUT_DIR [SECONDS_FOR_TESTS]
# 1. the demo's engine config trained on the GPU (1 worker, 2-shard Ray PS): NDCG@10 vs popularity;
# 2. bench/train_bench.py --gpu: CPU phases and GPU phases in the same run, samples/s and PS rows/s;
# 3. the default-suite engine tests (CPU) on that machine's Python and torch.
# Each step runs under its own timeout and writes its log to OUT_DIR; a failing step does not stop the next.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS_FOR_TESTS]}
test_seconds=${2:-120}
py=${PY:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

step() {  # step NAME SECONDS CMD...: run, keep the log, print its tail and exit status
  local name=$1 secs=$2 t0=$SECONDS rc
  shift 2
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, ray, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'ray', ray.__version__, \
'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
step demo_gpu 240 "$py" -m jobs.pretrain --config configs/demo.yaml run_dir=/tmp/xdtrain_gpu_demo \
  scale.workers=1 scale.use_gpu=true train.max_minutes=2
step train_bench 360 "$py" -m bench.train_bench --dataset ml-1m --epochs 2 --gpu --json "$out/train_bench.json"
step engine_tests "$test_seconds" "$py" -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_engine.py
