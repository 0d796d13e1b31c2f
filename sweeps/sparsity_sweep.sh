#!/usr/bin/env bash
# Sparsity × schedule grid with Hydra multirun. Pass extra overrides, e.g. model=sd3_medium
# calibration=file calibration.path=... hydra/launcher=slurm hydra.launcher.partition=gpu
# With a fixed hydra.sweep.dir=multirun/<name>, rerunning this script redoes only the jobs that
# are not done yet (see sweeps/README.md).
set -euo pipefail
obsdiff -m sparsity.ratio=0.3,0.5,0.6 schedule=uniform,log_decrease "$@"
