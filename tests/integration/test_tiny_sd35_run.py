"""End to end on the tiny SD3.5-Medium-shaped model: attn2 is pruned, its heads are recorded, reloads."""

import csv
import json

import pytest

from obsdiff.run import run

pytestmark = pytest.mark.slow
SMALL = [
    "model=tiny_sd35", "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4",
    "eval.num_prompts=4", "eval.num_steps=3", "eval.batch_size=4", "eval.reference_seed=null",
    "logger=none",
]  # fmt: skip


def test_unstructured_prunes_attn2_with_its_own_hessians(compose_cfg, tmp_path):
    metrics = run(compose_cfg(*SMALL, "eval=none"), tmp_path)
    names = {r["name"] for r in csv.DictReader((tmp_path / "layers.csv").open())}
    attn2 = {f"transformer_blocks.1.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert attn2 <= names  # blocks 0-2 of 4 have attn2; the default blocks include block 1
    assert not any("transformer_blocks.3.attn2" in n for n in names)  # block 3 has none
    assert abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.01


def test_structured_removes_attn2_heads_and_the_artifact_rebuilds(compose_cfg, tmp_path):
    out, again = tmp_path / "run", tmp_path / "artifact"
    out.mkdir(), again.mkdir()
    metrics = run(compose_cfg(*SMALL, "sparsity=structured"), out)
    structure = json.loads((out / "pruned" / "manifest.json").read_text())["structure"]
    for block in ("1", "2"):  # the structured default: every block but the first and last
        shape = structure["architecture"][block]
        assert shape["attn"] == shape["attn2"] == 3  # 30 % of 4 heads, each attention on its own
        assert len(structure["removed"][f"{block}.attn2"]) == 1
    assert metrics["model/params"] < metrics["model/params_dense"]
    reloaded = run(compose_cfg(*SMALL, f"artifact={out / 'pruned'}"), again)
    assert (again / "samples.png").read_bytes() == (out / "samples.png").read_bytes()
    assert reloaded["eval/fid"] == metrics["eval/fid"]


def test_two_of_four_through_the_cli(cli, tmp_path):
    out = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith("eval.")]
    proc = cli([*small, "sparsity=nm", "eval=none", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune/pattern"] == "2:4" and abs(metrics["prune/sparsity_achieved"] - 0.5) < 1e-6
