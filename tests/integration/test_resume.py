"""Runs survive a kill: a rerun in the same dir resumes by package and ends with the same bytes.

Each test kills a real ``obsdiff`` subprocess with SIGKILL at a named stage (``OBSDIFF_KILL_AT``,
see ``obsdiff/faults.py``), reruns the same command in the same dir, and compares the pruned
weights and ``layers.csv`` (timings dropped) with an uninterrupted run of the same config.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from obsdiff.artifacts import WEIGHTS

pytestmark = pytest.mark.slow

# Small and quick: 3 packages, so a kill can land before, inside and after a middle package.
BASE = ["+experiment=debug", "pruner.num_packages=3", "logger=none"]
STAGES = ["calibrate:0", "calibrate:1", "solve:1", "checkpoint:1", "save", "dense_cache", "evaluate", "log"]


def obsdiff(run_dir, cache, *overrides, kill_at=None):
    env = {**os.environ, "OBSDIFF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    env.pop("OBSDIFF_KILL_AT", None)
    if kill_at:
        env["OBSDIFF_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "obsdiff.cli", *BASE, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def digests(run_dir):
    """sha256 of the pruned weights and of ``layers.csv`` without its ``seconds`` column."""
    weights = hashlib.sha256((run_dir / "pruned" / WEIGHTS).read_bytes()).hexdigest()
    rows = list(csv.reader(io.StringIO((run_dir / "layers.csv").read_text())))
    drop = rows[0].index("seconds")
    kept = "\n".join(",".join(r[:drop] + r[drop + 1 :]) for r in rows)
    return weights, hashlib.sha256(kept.encode()).hexdigest()


def state(run_dir):
    return json.loads((run_dir / "status.json").read_text())["state"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dense cache for the module (the real-image statistics take a minute to build)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """Digests of uninterrupted runs, unstructured and structured."""
    out = {}
    for name, overrides in {"unstructured": [], "structured": ["sparsity=structured"]}.items():
        root = tmp_path_factory.mktemp(f"reference_{name}")
        proc = obsdiff(root / "run", cache, *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert state(root / "run") == "done"
        out[name] = digests(root / "run")
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_rerun_gives_the_uninterrupted_bytes(tmp_path, cache, reference, stage):
    run_dir = tmp_path / "run"
    if stage == "dense_cache":  # the dense entry must be built (and killed) by this run
        shutil.rmtree(cache / "dense")
    killed = obsdiff(run_dir, cache, kill_at=stage)
    assert killed.returncode == -9, f"not killed at {stage}: {killed.stderr[-2000:]}"
    assert state(run_dir) == "running"  # a killed run never looks finished
    rerun = obsdiff(run_dir, cache)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert state(run_dir) == "done"
    assert digests(run_dir) == reference["unstructured"]
    names = [row[0] for row in csv.reader((run_dir / "layers.csv").open())][1:]
    assert len(names) == len(set(names)) > 0  # every layer exactly once
    assert not (run_dir / "checkpoints").exists()
    if stage.startswith(("solve:1", "checkpoint:1", "save", "evaluate", "log")):
        assert "resumed: packages 1-" in rerun.stdout + rerun.stderr  # finished packages were not redone


def test_structured_resume_restores_the_removed_heads(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    assert obsdiff(run_dir, cache, "sparsity=structured", kill_at="calibrate:2").returncode == -9
    rerun = obsdiff(run_dir, cache, "sparsity=structured")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed: packages 1-2 of 3" in rerun.stdout + rerun.stderr
    assert digests(run_dir) == reference["structured"]


def test_a_used_dir_refuses_another_config_and_resume_false_starts_clean(tmp_path, cache):
    run_dir = tmp_path / "run"
    assert obsdiff(run_dir, cache, kill_at="calibrate:1").returncode == -9
    other = obsdiff(run_dir, cache, "sparsity.ratio=0.6")
    assert other.returncode == 2
    assert "holds a running run of another config" in other.stdout + other.stderr
    assert "resume=false" in other.stdout + other.stderr
    clean = obsdiff(run_dir, cache, "sparsity.ratio=0.6", "resume=false")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resumed" not in clean.stdout + clean.stderr and state(run_dir) == "done"
    again = obsdiff(run_dir, cache, "sparsity.ratio=0.6")  # done: nothing is redone
    assert again.returncode == 0 and "nothing to redo" in again.stdout + again.stderr
    finished = (run_dir / "status.json").read_text()
    redo = obsdiff(run_dir, cache, "sparsity.ratio=0.6", "skip_done=false")  # asked to: done again
    assert redo.returncode == 0 and "redoing it from scratch" in redo.stdout + redo.stderr
    assert state(run_dir) == "done" and (run_dir / "status.json").read_text() != finished
