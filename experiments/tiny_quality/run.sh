#!/usr/bin/env bash
# The pruning-quality tables of the embedded digits model (see README.md next to this file):
#   bash experiments/tiny_quality/run.sh [OUT]      (default OUT: multirun/tiny_quality/<time>)
# 1. every method × 30/50/60/70 % unstructured, 2:4, structured 20/30 %  -> OUT/methods
# 2. OBS-Diff 50 %: the five timestep schedules                            -> OUT/schedules
# 3. OBS-Diff 50 %: 1/2/4/8 module packages                                -> OUT/packages
# then one report per part (report.md / report.csv / report.png in each folder).
set -euo pipefail
OUT=${1:-multirun/tiny_quality/$(date +%Y-%m-%d_%H-%M-%S)}
obsdiff -m +experiment=tiny_quality '+compare=glob(*)' hydra.sweep.dir="$OUT/methods" \
  hydra.sweep.subdir='${hydra.job.num}_${hydra.runtime.choices.compare}'
obsdiff -m +experiment=tiny_quality +compare=obs_diff-u50 \
  schedule=uniform,linear_increase,linear_decrease,log_increase hydra.sweep.dir="$OUT/schedules"
obsdiff -m +experiment=tiny_quality +compare=obs_diff-u50 pruner.num_packages=1,2,8 \
  hydra.sweep.dir="$OUT/packages"
# the methods grid's obs_diff-u50 run (log_decrease, 4 packages) completes both ablations
obsdiff-report "$OUT/methods" --out "$OUT/methods"
obsdiff-report "$OUT/schedules" "$OUT"/methods/*_obs_diff-u50 --out "$OUT/schedules"
obsdiff-report "$OUT/packages" "$OUT"/methods/*_obs_diff-u50 --out "$OUT/packages"
