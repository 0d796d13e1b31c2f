"""``sparsity.allocation=owl`` end to end on the embedded model: the exact global count, blocks that
differ, ``allocation.json``, and configs refused before any weights load."""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import pytest
from safetensors.torch import load_file

from obsdiff import faults
from obsdiff.run import run

pytestmark = pytest.mark.slow
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_owl_run_reaches_the_global_target_exactly_while_blocks_differ(compose_cfg, run_dir):
    cfg = compose_cfg("+experiment=debug", "eval=none", "logger=none", "sparsity.ratio=0.7",
                      "sparsity.allocation=owl")  # fmt: skip
    metrics = run(cfg, run_dir)
    allocation = json.loads((run_dir / "allocation.json").read_text())
    weights = load_file(run_dir / "pruned" / WEIGHTS)
    zeros, sizes = defaultdict(int), defaultdict(int)  # per block, counted on the saved weights
    for name in allocation["layers"]:
        W = weights[f"{name}.weight"]
        block = int(name.split(".")[1])  # transformer_blocks.<b>.…
        zeros[block] += int((W == 0).sum())
        sizes[block] += W.numel()
    total = sum(sizes.values())
    assert total == allocation["weights"]
    assert sum(zeros.values()) == math.floor(0.7 * total + 0.5)  # exact: not one weight off
    assert metrics["prune/sparsity_achieved"] == pytest.approx(sum(zeros.values()) / total, abs=1e-12)
    assert metrics["prune/allocation"] == "owl" and metrics["prune/sparsity_target"] == 0.7
    per_block = [zeros[b] / sizes[b] for b in sorted(sizes)]
    assert max(per_block) - min(per_block) > 0.01  # a non-uniform split
    assert all(0.62 - 1e-6 <= s <= 0.78 + 1e-6 for s in per_block)  # within 0.7 ± λ (0.08)
    groups = allocation["groups"]
    assert [g["name"] for g in groups] == [f"block {b}" for b in sorted(sizes)]
    for g, s in zip(groups, per_block, strict=True):  # the saved weights carry the recorded ratios
        assert s == pytest.approx(g["sparsity"], abs=1e-4)


@pytest.mark.parametrize("kind", ["nm", "structured"])
def test_owl_with_nm_or_structured_exits_2_before_any_weights_load(cli, tmp_path, kind):
    args = [f"hydra.run.dir={tmp_path / 'run'}", f"sparsity={kind}", "sparsity.allocation=owl"]
    proc = cli(args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "sparsity.allocation" in output and "unstructured only" in output
    assert "Loading pipeline" not in output and not (tmp_path / "run" / "allocation.json").exists()


def test_owl_run_killed_mid_prune_resumes_to_the_same_weights_and_split(tmp_path):
    """The pre-pass runs again on the reloaded dense model: the same split, the same bytes."""
    args = ["+experiment=debug", "eval=none", "logger=none", "pruner.num_packages=3", "sparsity.ratio=0.7",
            "sparsity.allocation=owl"]  # fmt: skip
    env = {**os.environ, "OBSDIFF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop(faults.ENV, None)

    def obsdiff(run_dir, **extra):
        cmd = [sys.executable, "-m", "obsdiff.cli", *args, f"hydra.run.dir={run_dir}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **extra})

    def outputs(run_dir):
        split = json.loads((run_dir / "allocation.json").read_text())
        split.pop("seconds")
        return (run_dir / "pruned" / WEIGHTS).read_bytes(), split

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert obsdiff(whole).returncode == 0
    first = obsdiff(killed, **{faults.ENV: "solve:1"})
    assert first.returncode != 0 and (killed / "checkpoints").is_dir()
    again = obsdiff(killed)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed: packages 1-1" in again.stdout + again.stderr
    assert outputs(killed) == outputs(whole)
