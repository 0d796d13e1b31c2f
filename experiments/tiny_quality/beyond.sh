#!/usr/bin/env bash
# Beyond OBS-Diff (issue 16): OBS-Diff vs each option at 50/60/70/80 % unstructured and 2:4, three
# calibration seeds each, on the embedded digits model (see README.md next to this file):
#   bash experiments/tiny_quality/beyond.sh OUT [OPTION ...]    (default: every option below)
#   MODEL=tiny_digits_flux bash experiments/tiny_quality/beyond.sh OUT ...   (the Flux.1 twin)
# writes OUT/<option>/<level>_s<seed>/ run folders, then OUT/seeds.md (mean ± sd over the seeds).
set -euo pipefail
OUT=${1:?usage: beyond.sh OUT [OPTION ...]}
shift
declare -A OPTIONS=(
  [obs_diff]=""
  [admm]="pruner.update=admm"
  [swaps]="pruner.refine=swaps"
  [rose]="pruner.order=rose"
  [owl]="sparsity.allocation=owl"
  [rose_admm]="pruner.order=rose pruner.update=admm"
  [swaps_admm]="pruner.refine=swaps pruner.update=admm"
  [owl_admm]="sparsity.allocation=owl pruner.update=admm"
)
SELECTED=("$@")
[ ${#SELECTED[@]} -gt 0 ] || SELECTED=(obs_diff admm swaps rose owl rose_admm swaps_admm owl_admm)
MODEL=${MODEL:-tiny_digits}
COMMON=(+experiment=tiny_quality "model=$MODEL" eval.bootstrap=0 "eval.metrics=[fid_real,fid_dense,prompt_accuracy]"
        calibration.seed=0,100,200)  # 16 prompts: noise seeds 0–15, 100–115, 200–215
for option in "${SELECTED[@]}"; do
  # shellcheck disable=SC2086  # the option's overrides are words
  obsdiff -m "${COMMON[@]}" +compare=obs_diff-u50 sparsity.ratio=0.5,0.6,0.7,0.8 ${OPTIONS[$option]} \
    hydra.sweep.dir="$OUT/$option" hydra.sweep.subdir='u${sparsity.ratio}_s${calibration.seed}'
  case $option in owl*) continue ;; esac  # OWL allocates unstructured sparsity only
  # shellcheck disable=SC2086
  obsdiff -m "${COMMON[@]}" +compare=obs_diff-2of4 ${OPTIONS[$option]} \
    hydra.sweep.dir="$OUT/$option" hydra.sweep.subdir='2of4_s${calibration.seed}'
done
python "$(dirname "$0")/seed_table.py" "$OUT"
