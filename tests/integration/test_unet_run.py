"""End to end on the tiny SDXL and SD2.1 UNets: every granularity and baseline, save and reload."""

import csv
import json

import pytest

from obsdiff.run import run

pytestmark = pytest.mark.slow
SMALL = [
    "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4",
    "eval.num_prompts=4", "eval.num_steps=3", "eval.batch_size=4", "eval.reference_seed=null",
    "logger=none",
]  # fmt: skip
UNETS = ["tiny_sdxl", "tiny_sd21"]


def layers(run_dir):
    return {r["name"]: r for r in csv.DictReader((run_dir / "layers.csv").open())}


@pytest.mark.parametrize("model", UNETS)
@pytest.mark.parametrize(
    ("overrides", "target"),
    [
        ([], 0.5),
        (["sparsity=nm"], 0.5),
        (["pruner=magnitude"], 0.5),
        (["pruner=wanda"], 0.5),
        (["pruner=sparsegpt"], 0.5),
        (["pruner=dsnot"], 0.5),
    ],
    ids=["obs_diff", "2of4", "magnitude", "wanda", "sparsegpt", "dsnot"],
)
def test_layerwise_methods_prune_every_block(compose_cfg, tmp_path, model, overrides, target):
    metrics = run(compose_cfg(f"model={model}", *SMALL, "eval=none", *overrides), tmp_path)
    rows = layers(tmp_path)
    kv = [n for n in rows if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert kv and {rows[n]["package"] for n in kv} == {"0"}  # the model-wide K/V: package 1, once
    assert abs(metrics["prune/sparsity_achieved"] - target) < 0.01


@pytest.mark.parametrize("model", UNETS)
def test_structured_removes_heads_and_geglu_neurons_and_reloads(compose_cfg, tmp_path, model):
    out, again = tmp_path / "run", tmp_path / "artifact"
    out.mkdir(), again.mkdir()
    metrics = run(compose_cfg(f"model={model}", *SMALL, "sparsity=structured", "sparsity.ratio=0.5"), out)
    structure = json.loads((out / "pruned" / "manifest.json").read_text())["structure"]
    assert structure["architecture"]  # every block but the first and last shrank
    for block, shape in structure["architecture"].items():
        assert set(shape) == {"attn1", "attn2", "ff"}
        assert len(structure["removed"][f"{block}.attn1"]) == len(structure["removed"][f"{block}.attn2"])
    assert metrics["model/params"] < metrics["model/params_dense"]
    reloaded = run(compose_cfg(f"model={model}", *SMALL, f"artifact={out / 'pruned'}"), again)
    assert (again / "samples.png").read_bytes() == (out / "samples.png").read_bytes()
    assert reloaded["eval/fid"] == metrics["eval/fid"]


@pytest.mark.parametrize("model", UNETS)
def test_structured_l1_norm_baseline(compose_cfg, tmp_path, model):
    metrics = run(
        compose_cfg(f"model={model}", *SMALL, "eval=none", "sparsity=structured", "pruner=l1_norm"), tmp_path
    )
    assert metrics["prune/mask"] == "l1"


def test_unstructured_artifact_reloads_identically(compose_cfg, tmp_path):
    out, again = tmp_path / "run", tmp_path / "artifact"
    out.mkdir(), again.mkdir()
    metrics = run(compose_cfg("model=tiny_sd21", *SMALL), out)
    reloaded = run(compose_cfg("model=tiny_sd21", *SMALL, f"artifact={out / 'pruned'}"), again)
    assert (again / "samples.png").read_bytes() == (out / "samples.png").read_bytes()
    assert reloaded["eval/fid"] == metrics["eval/fid"]


def test_proj_in_and_proj_out_are_optional_targets(compose_cfg, tmp_path):
    targets = "pruner.targets=[proj_in,proj_out,attn1.to_q]"
    run(compose_cfg("model=tiny_sdxl", *SMALL, "eval=none", targets), tmp_path)
    names = set(layers(tmp_path))
    assert "down_blocks.1.attentions.0.proj_in" in names and "up_blocks.0.attentions.2.proj_out" in names
    assert not any(n.endswith("attn1.to_k") for n in names)


@pytest.mark.parametrize("model", UNETS)
def test_obsdiff_model_through_the_cli(cli, tmp_path, model):
    out = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith("eval.")]
    proc = cli([f"model={model}", *small, "sparsity=nm", "eval=none", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune/pattern"] == "2:4" and abs(metrics["prune/sparsity_achieved"] - 0.5) < 1e-6
