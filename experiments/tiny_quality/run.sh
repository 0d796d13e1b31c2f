#!/usr/bin/env bash
# The pruning-quality tables of the embedded digits model (see README.md next to this file):
#   bash experiments/tiny_quality/run.sh [OUT]      (default OUT: multirun/tiny_quality/<time>)
# 1. every method × 30/50/60/70 % unstructured, 2:4, structured 20/30 %  -> OUT/methods
# 2. OBS-Diff 50 %: the five timestep schedules                            -> OUT/schedules
# 3. OBS-Diff 50 %: 1/2/4/8 module packages                                -> OUT/packages
# 4. the Flux.1 twin (tiny_digits_flux): the methods at 50/60/70 %, 2:4, s30 -> OUT/methods_flux
# then one report per part (report.md / report.csv / report.png in each folder; a multirun writes its own).
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
# 4. the Flux.1 twin: every method × 50/60/70 %, 2:4, structured 30 %      -> OUT/methods_flux
FLUX_CELLS=dsnot-2of4,dsnot-u50,dsnot-u60,dsnot-u70,l1_norm-s30,magnitude-2of4,magnitude-u50,magnitude-u60
FLUX_CELLS=$FLUX_CELLS,magnitude-u70,obs_diff-2of4,obs_diff-s30,obs_diff-u50,obs_diff-u60,obs_diff-u70
FLUX_CELLS=$FLUX_CELLS,sparsegpt-2of4,sparsegpt-u50,sparsegpt-u60,sparsegpt-u70,wanda-2of4,wanda-u50,wanda-u60,wanda-u70
obsdiff -m +experiment=tiny_quality model=tiny_digits_flux "+compare=$FLUX_CELLS" hydra.sweep.dir="$OUT/methods_flux"
