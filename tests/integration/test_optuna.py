"""hparams_search=optuna: a 3-trial study on the embedded model through the CLI; each trial is a
job folder, the task function returns its FID to the dense model, Optuna keeps the best."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from obsdiff.runstate import read_status

pytestmark = pytest.mark.slow

# The cheapest run with an FID to the dense model: one block pruned, 4 images of 2 steps each.
CHEAP = [
    "+experiment=debug", "calibration.num_prompts=2", "calibration.num_steps=2", "calibration.batch_size=2",
    "pruner.blocks=[0]", "eval.num_prompts=4", "eval.num_steps=2", "eval.batch_size=4", "eval.num_grid=2",
    "eval.real_images=null", "eval.clip_model=null", "eval.prompt_judge=null",
]  # fmt: skip


def test_a_three_trial_study_minimises_the_fid_to_the_dense_model(tmp_path):
    sweep = tmp_path / "study"
    env = {**os.environ, "OBSDIFF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "obsdiff.cli", "-m", "hparams_search=optuna", *CHEAP,
           "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    trials = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(trials) == 3
    fids = []
    for trial in trials:
        assert read_status(trial)["state"] == "done"
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        assert {o.partition("=")[0] for o in overrides} >= {
            "schedule.alpha_min", "schedule.alpha_max", "pruner.num_packages"
        }  # fmt: skip
        metrics = json.loads((trial / "metrics.json").read_text())
        fids.append(metrics["eval/fid_dense"])
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(fids))
    assert set(result["best_params"]) == {"schedule.alpha_min", "schedule.alpha_max", "pruner.num_packages"}
    assert "FID to the dense model" in (sweep / "report.md").read_text()  # the sweep's summary
