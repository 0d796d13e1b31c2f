"""Every method under one harness: the comparison multirun through the CLI, the report, and the
layer errors of OBS-based methods against magnitude and Wanda on the same captured Hessians."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.prompts import tiny_prompts
from obsdiff.calibration.timesteps import StepTracker
from obsdiff.compare import LEVELS, cells
from obsdiff.config import validate
from obsdiff.prune import Calibration, calibrate, prune_groupwise
from obsdiff.pruners.structured import StructuredStrategy
from obsdiff.report import main as report
from obsdiff.solvers import Pattern, layer_solver, reconstruction_error
from obsdiff.solvers.l1 import l1_heads
from obsdiff.solvers.structured import StructuredPattern

SMALL = [
    "calibration.num_prompts=2", "calibration.num_steps=2", "calibration.batch_size=2",
    "eval.num_prompts=4", "eval.num_steps=2", "eval.num_grid=2",
]  # fmt: skip


def calibration(adapter, pipe, num_prompts=4, steps=3):
    embeds = adapter.encode(pipe, tiny_prompts()[:num_prompts], 7.0, num_prompts)
    return Calibration(embeds, list(range(num_prompts)), steps, 7.0, 32, num_prompts, [1.2, 1.0, 0.8][:steps])


# One cell per method, covering every granularity (the full grid is the experiment itself).
CELLS = "magnitude-2of4,wanda-u30,sparsegpt-u60,dsnot-2of4,obs_diff-u50,obs_diff-s30,l1_norm-s20"


def test_every_cell_of_the_grid_composes_and_validates(compose_cfg):
    assert len(cells()) == 39
    for name in cells():
        cfg = compose_cfg(f"+compare={name}", "logger=none")
        validate(cfg)
        method, level = name.split("-")
        assert cfg.pruner.name == method and cfg.sparsity.kind == LEVELS[level]["kind"]


@pytest.mark.slow
def test_comparison_multirun_runs_every_method_and_reports(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "+experiment=compare_methods", f"+compare={CELLS}", *SMALL, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 7
    seen = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        seen.add((metrics["prune/method"], metrics["prune/pattern"]))
        assert metrics["eval/fid"] == metrics["eval/fid"]  # not NaN
        target, achieved = metrics["prune/sparsity_target"], metrics["prune/sparsity_achieved"]
        assert achieved == pytest.approx(target, abs=0.02), run.name
        rows = list(csv.DictReader((run / "layers.csv").open()))
        assert all(0 <= float(r["loss"]) < 1 for r in rows)
    assert (
        ("l1_norm", "structured 20%") in seen
        and ("dsnot", "2:4") in seen
        and ("sparsegpt", "unstructured 60%") in seen
    )
    sparsegpt = OmegaConf.load(next(sweep.glob("+compare=sparsegpt-u60*")) / ".hydra" / "config.yaml")
    assert (sparsegpt.schedule.name, sparsegpt.pruner.num_packages) == ("uniform", 1)  # the preset

    report([str(sweep)])
    table = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(table) == 7
    md = (sweep / "report.md").read_text()
    assert "| obs_diff |" in md and "2:4" in md and "mean layer loss" in md
    assert (sweep / "report.png").stat().st_size > 10_000


def captured(adapter, pipe, names):
    calib = calibration(adapter, pipe)
    tracker = StepTracker(calib.timestep_weights)
    with capture_hessians(pipe.transformer, [(n,) for n in names], tracker) as hessians:
        calibrate(adapter, pipe, calib, tracker, tqdm(disable=True))
    return hessians


@pytest.mark.slow  # seconds on an idle CPU, tens under load
@pytest.mark.parametrize("pattern", [Pattern("unstructured", ratio=0.5), Pattern("nm", n=2, m=4)])
def test_obs_methods_beat_magnitude_and_wanda_on_the_same_hessians(tiny_pipe, pattern):
    adapter, pipe = tiny_pipe
    names = [
        n for unit in adapter.units(pipe.transformer, [1], adapter.default_targets) for g in unit for n in g
    ]
    hessians = captured(adapter, pipe, names)
    for name in names:
        W, acc = pipe.transformer.get_submodule(name).weight.data, hessians[name]
        err = {}
        for mask, update in [("obs", "obs"), ("magnitude", "none"), ("wanda", "none"), ("wanda", "obs"),
                             ("magnitude", "obs"), ("dsnot", "none")]:  # fmt: skip
            result = layer_solver(mask, update)(W, acc.H, pattern, layer=name, moments=acc.moments())
            assert torch.equal(result.mask, result.weight == 0) or update == "obs"
            err[mask, update] = reconstruction_error(W, result.weight, acc.H)
        assert err["obs", "obs"] < err["magnitude", "none"], name
        assert err["obs", "obs"] < err["wanda", "none"], name
        assert err["wanda", "obs"] < err["wanda", "none"], name  # the update helps any mask
        assert err["magnitude", "obs"] < err["magnitude", "none"], name


def test_l1_norm_removes_the_smallest_norm_heads(tiny_pipe):
    adapter, pipe = tiny_pipe
    outs = ["transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out"]
    Ws = [pipe.transformer.get_submodule(n).weight.detach().clone() for n in outs]
    half = StructuredPattern(ratio=0.5, head_ratio=0.5, ffn_ratio=0.5)
    strategy = StructuredStrategy("l1", half, [1], compensate=False)
    records = prune_groupwise(adapter, pipe, calibration(adapter, pipe, 2, 2), strategy, 1)
    assert strategy.removed["1.attn"] == sorted(l1_heads(Ws, 16, 2))
    kept = [h for h in range(4) if h not in strategy.removed["1.attn"]]
    cols = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
    torch.testing.assert_close(pipe.transformer.get_submodule(outs[0]).weight, Ws[0][:, cols])  # no update
    assert all(r.loss > 0 for r in records)
