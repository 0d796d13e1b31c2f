"""End to end on the tiny PixArt-Σ model: every granularity and every method that applies, save, reload."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from obsdiff.run import run

pytestmark = pytest.mark.slow
SMALL = [
    "model=tiny_pixart", "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4",
    "eval.num_prompts=4", "eval.num_steps=3", "eval.batch_size=4", "eval.reference_seed=null",
    "logger=none",
]  # fmt: skip
CROSS_KV = {f"transformer_blocks.{b}.attn2.to_{n}" for b in range(4) for n in "kv"}
# name -> overrides (each runs with eval=none)
METHODS = {
    "obs_diff": "pruner=obs_diff",
    "2of4": "sparsity=nm",
    "magnitude": "pruner=magnitude",
    "magnitude-2of4": "pruner=magnitude sparsity=nm",
    "wanda": "pruner=wanda",
    "wanda-2of4": "pruner=wanda sparsity=nm",
    "sparsegpt": "pruner=sparsegpt",
    "sparsegpt-2of4": "pruner=sparsegpt sparsity=nm",
    "dsnot": "pruner=dsnot",
    "structured": "sparsity=structured",
    "l1_norm": "pruner=l1_norm",
}


@pytest.mark.parametrize("overrides", list(METHODS.values()), ids=list(METHODS))
def test_tiny_pixart_prunes_every_method(compose_cfg, tmp_path, overrides):
    metrics = run(compose_cfg(*SMALL, *overrides.split(), "eval=none"), tmp_path)
    rows = list(csv.DictReader((tmp_path / "layers.csv").open()))
    names = {r["name"] for r in rows}
    assert len(rows) == metrics["prune/num_layers"] > 0
    if "structured" in overrides or "l1_norm" in overrides:
        structure = json.loads((tmp_path / "pruned" / "manifest.json").read_text())["structure"]
        for block in ("1", "2"):  # the structured default: every block but the first and last
            assert structure["architecture"][block] == {"attn1": 2, "attn2": 2, "ff": 101}  # 30 % of 3 / 144
        assert metrics["model/params"] < metrics["model/params_dense"]
        assert metrics["model/tflops_per_step"] < metrics["model/tflops_per_step_dense"]
        return
    assert CROSS_KV <= names and len(names) == 4 * 10  # every block's targets, cross K/V included
    assert abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.01
    cross = [r for r in rows if r["name"] in CROSS_KV]
    assert {r["package"] for r in cross} == {"0"}  # one Hessian, calibrated in the first package
    if "nm" in overrides:
        state = load_file(str(tmp_path / "pruned" / "diffusion_pytorch_model.safetensors"))
        for r in rows:
            W = state[r["name"] + ".weight"]
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2), r["name"]


def test_structured_artifact_with_the_tiny_eval_reloads_to_identical_images(compose_cfg, tmp_path):
    out, again = tmp_path / "run", tmp_path / "artifact"
    out.mkdir(), again.mkdir()
    metrics = run(compose_cfg(*SMALL, "sparsity=structured"), out)  # the model's default tiny eval
    assert (out / "samples.png").is_file() and "eval/fid" in metrics
    reloaded = run(compose_cfg(*SMALL, f"artifact={out / 'pruned'}"), again)
    assert (again / "samples.png").read_bytes() == (out / "samples.png").read_bytes()
    assert reloaded["eval/fid"] == metrics["eval/fid"]
    assert reloaded["model/params"] == metrics["model/params"] < metrics["model/params_dense"]


def test_obsdiff_model_tiny_pixart_through_the_cli(cli, tmp_path):
    out = tmp_path / "cli"
    args = ["model=tiny_pixart", "logger=none", "calibration.num_prompts=4", "calibration.num_steps=3"]
    proc = cli([f"hydra.run.dir={out}", *args, "eval=none"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.01 and metrics["prune/num_packages"] == 4
