"""Structured runs through the CLI, and evaluating a saved artifact without pruning again."""

import csv
import json

import pytest

pytestmark = pytest.mark.slow
DEBUG = ["+experiment=debug"]


def test_structured_run_then_evaluate_the_artifact(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli([f"hydra.run.dir={out}", *DEBUG, "sparsity=structured", "sparsity.ratio=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune/head_ratio"] == metrics["prune/ffn_ratio"] == 0.5
    # blocks [1, 3) of 4 lose half their heads and FFN neurons: half of every target weight
    assert metrics["prune/sparsity_achieved"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["model/params"] < metrics["model/params_dense"]
    assert metrics["model/tflops_per_step"] < metrics["model/tflops_per_step_dense"]
    assert {"eval/fid", "eval/clip_score", "dense/fid"} <= set(metrics)
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert [r["name"].split(".", 2)[2] for r in rows] == [
        "attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2",
    ] * 2  # fmt: skip
    manifest = json.loads((out / "pruned" / "manifest.json").read_text())
    assert set(manifest["structure"]["architecture"]) == {"1", "2"}
    assert (out / "samples.png").stat().st_size > 0

    again = tmp_path / "eval"
    proc = cli([f"hydra.run.dir={again}", *DEBUG, f"artifact={out / 'pruned'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((again / "metrics.json").read_text())
    assert not (again / "pruned").exists()  # nothing pruned or saved again
    assert evaluated["artifact"] == str(out / "pruned")
    for key in (
        "eval/fid",
        "eval/clip_score",
        "prune/sparsity_achieved",
        "model/params",
        "model/tflops_per_step",
    ):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert (again / "layers.csv").read_text() == (out / "layers.csv").read_text()
