#!/usr/bin/env bash
# Every run behind docs/results/prerec.md, resumable (a run whose metrics.json exists is skipped).
#   scripts/prerec_runs.sh <experiment dir> [seed ...]          (default seeds: 0 1 2)
# EXTRA="key=value ..." adds overrides to every job (the smoke test uses it for a one-step run).
# Then: python scripts/prerec_tables.py <experiment dir> --seeds <seeds>
set -euo pipefail
E=${1:?usage: scripts/prerec_runs.sh <experiment dir> [seed ...]}
shift
SEEDS=${*:-0 1 2}
PY=${PYTHON:-.venv/bin/python}
TC=$(realpath -m "$E")/text_cache  # MiniLM vectors, encoded once and shared by every run (model and SBERT)
COMMON="model.text_cache=$TC eval.keep_rows=true eval.groups=[unseen,new_user,new_item] ${EXTRA:-}"
HELD="data.train_domains=[] data.eval_domains=[zip3,zip8] model.inference=zero_shot ps.backend=local"
ML100K="data.dataset=ml-1m+ml-100k data.domains=platform data.train_domains=[] data.eval_domains=[ml-100k]
        data.source_domains=[ml-1m] model.inference=zero_shot ps.backend=local"

run() {  # run <run dir name> <module> <overrides...>
  local dir=$1 mod=$2
  shift 2
  if [ -f "$E/$dir/metrics.json" ]; then echo "[prerec_runs] $dir: done, skipped"; return; fi
  echo "[prerec_runs] $dir: $mod $*"
  local t0=$SECONDS
  # shellcheck disable=SC2086
  $PY -m "$mod" "$@" run_dir="$E/$dir" $COMMON
  echo "[prerec_runs] $dir: $((SECONDS - t0)) s"
}
checkpoint() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$E/$1/metrics.json"; }

for seed in $SEEDS; do
  for m in prerec prerec_n; do
    C="--config configs/${m}_ml1m_zip.yaml"
    # pre-training on 8 markets (2 workers, 2-shard Ray PS)
    run "pre_${m}_s$seed" jobs.pretrain $C train.seed="$seed"
    CK=$(checkpoint "pre_${m}_s$seed")
    # zero-shot on the held-out markets; on ML-100K as a new platform
    run "zs_${m}_s$seed" jobs.evaluate $C init_from="$CK" $HELD
    run "zs100k_${m}_s$seed" jobs.evaluate $C init_from="$CK" $ML100K
    # fine-tuning on the held-out markets
    run "ft_${m}_s$seed" jobs.finetune $C init_from="$CK" train.seed="$seed" data.train_domains=[zip3,zip8] \
      data.eval_domains=[zip3,zip8] train.epochs=10 train.max_minutes=6 train.patience=2
  done
done
# Twin-free new platform: pre-train without the ML-1M movies whose title ML-100K has too.
for seed in $SEEDS; do
  for m in prerec prerec_n; do
    C="--config configs/${m}_ml1m_zip.yaml"
    run "pretf_${m}_s$seed" jobs.pretrain $C train.seed="$seed" data.exclude_title_twins=ml-100k
    CK=$(checkpoint "pretf_${m}_s$seed")
    run "zs100ktf_${m}_s$seed" jobs.evaluate $C init_from="$CK" $ML100K
  done
done
