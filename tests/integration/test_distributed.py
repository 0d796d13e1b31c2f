"""Data-parallel calibration: two gloo ranks under torchrun prune as one process does (obsdiff.distributed).

Each test runs the embedded model once as a plain process and once as ``torchrun --nproc-per-node
2`` (CPU, gloo) and compares: the same files in the run directory (rank 1 writes none), the same
masks / removed structure, the pruned weights equal to fp32 round-off, and ``layers.csv`` with every
layer once, in the same order.
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from obsdiff.artifacts import WEIGHTS

pytestmark = pytest.mark.slow
SMALL = ["+experiment=debug", "eval=none", "logger=none"]  # 4 prompts, 4 steps, 2 packages
# The solve amplifies fp32 round-off of the Hessians: in one process, another thread count or
# batch size moves the context-stream weights by up to ~1e-4 (and with 2 steps even flips mask
# entries at the threshold); the masks must match exactly.
ATOL = 3e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def obsdiff(run_dir: Path, overrides: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OBSDIFF_CACHE": str(run_dir.parent / "cache"), "HF_HUB_OFFLINE": "1",
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}  # fmt: skip
    head = [sys.executable, "-m", "obsdiff.cli"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port()), "-m", "obsdiff.cli"]  # fmt: skip
    cmd = [*head, *SMALL, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.mark.parametrize("sparsity", ["unstructured", "structured"])
def test_two_ranks_prune_like_one_process(tmp_path, sparsity):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    obsdiff(single, [f"sparsity={sparsity}"])
    obsdiff(parallel, [f"sparsity={sparsity}"], nproc=2)
    assert files(parallel) == files(single)  # rank 1 added nothing (no .hydra/, no log, no outputs)
    assert "rank 0 of 2 (gloo)" in (parallel / "cli.log").read_text()

    want, got = load_file(str(single / "pruned" / WEIGHTS)), load_file(str(parallel / "pruned" / WEIGHTS))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name  # the same heads / neurons removed
        assert ((got[name] == 0) == (want[name] == 0)).all(), name  # the same mask
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=ATOL, msg=name)
    diff = max(float((got[n] - want[n]).abs().max()) for n in want)
    print(f"{sparsity}: max |W_2 ranks - W_1 process| = {diff:.2e}")

    rows = {d: list(csv.DictReader((d / "layers.csv").open())) for d in (single, parallel)}
    names = [r["name"] for r in rows[parallel]]
    assert names == [r["name"] for r in rows[single]] and len(set(names)) == len(names)
    for a, b in zip(rows[single], rows[parallel], strict=True):
        assert [a[k] for k in ("rows", "cols", "package", "sparsity")] == [
            b[k] for k in ("rows", "cols", "package", "sparsity")
        ]
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-3, abs=1e-6)


def test_a_sweep_under_torchrun_is_refused(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    cmd = [sys.executable, "-m", "obsdiff.cli", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "not data-parallel" in proc.stderr
    assert not any(tmp_path.iterdir())
