#!/usr/bin/env bash
# Schedule and package ablations on the embedded tiny model, as Hydra
# multiruns; each job writes metrics.json + layers.csv under multirun/<date>/<time>/<job>/.
set -euo pipefail
obsdiff -m logger=none schedule=uniform,linear_increase,linear_decrease,log_increase,log_decrease "$@"
obsdiff -m logger=none pruner.num_packages=1,2,4,8 "$@"
