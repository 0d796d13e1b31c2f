"""obsdiff-report on hand-written run folders: which metrics show, the dense row, ablation labels;
only finished runs (status.json) are in the table, the others are listed."""

import csv
import json

import pytest

from obsdiff.report import METRICS, collect, main, markdown, split_done, write_report
from obsdiff.runstate import write_status


def fake_result(root, name, method, pattern, schedule="log_decrease", packages=4, **metrics):
    run = root / name
    run.mkdir(parents=True)
    values = {
        "prune/method": method, "prune/mask": "obs", "prune/update": "obs", "prune/pattern": pattern,
        "prune/schedule": schedule, "prune/num_packages": packages, "dense/fid_real": 30.0,
        "dense/prompt_accuracy": 0.9, "eval/clip_network": "random CLIP (plumbing check)",
        "eval/clip_score": 0.2, "dense/clip_score": 0.2, **metrics,
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(values))
    write_status(run, "done", "0123456789ab")  # the report shows finished runs only
    with (run / "layers.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["name", "loss"], ["a", "0.1"], ["b", "0.3"]])


def test_tables_show_present_metrics_with_a_dense_row_and_label_ablations(tmp_path):
    fake_result(
        tmp_path, "a", "obs_diff", "unstructured 50%", **{"eval/fid_real": 35.0, "eval/prompt_accuracy": 0.8}
    )
    fake_result(tmp_path, "b", "obs_diff", "unstructured 50%", schedule="uniform",
                **{"eval/fid_real": 40.0, "eval/prompt_accuracy": 0.7})  # fmt: skip
    rows = collect([tmp_path])
    assert [r["layer_loss"] for r in rows] == [0.2, 0.2]
    md = markdown(rows)
    assert "### FID to real images" in md and "### prompt accuracy" in md
    assert "FID to the dense model" not in md  # no run has it
    assert "CLIP score" not in md  # a random plumbing CLIP is not a result
    assert "| dense | 30 |" in md and "| dense | 0.9 |" in md
    assert "| obs_diff, log_decrease | 35 |" in md and "| obs_diff, uniform | 0.7 |" in md


def fake_run(root, name, state=None, **status):
    run = root / name
    run.mkdir(parents=True)
    metrics = {"prune/method": "obs_diff", "prune/mask": "obs", "prune/update": "obs",
               "prune/pattern": "unstructured 50%", "eval/fid_dense": 12.0}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    if state:
        write_status(run, state, "0123456789ab", **status)
    return run


def test_runs_that_are_not_done_are_left_out_and_listed(tmp_path, capsys):
    done = fake_run(tmp_path, "a", "done")
    fake_run(tmp_path, "b", "failed", error="ConfigError: pruner.blocks out of range")
    fake_run(tmp_path, "c", "running")  # killed, or still going
    fake_run(tmp_path, "d")  # no status.json: metrics.json may be half written
    (tmp_path / "e").mkdir()
    write_status(tmp_path / "e", "failed", "0123456789ab", error="before run()")  # no metrics at all

    finished, left_out = split_done([tmp_path])
    assert finished == [done]
    assert {p.name: why.split(":")[0] for p, why in left_out} == {
        "b": "failed", "c": "running", "d": "no status.json (unfinished, or from before obsdiff recorded it)",
        "e": "failed",
    }  # fmt: skip
    assert [r["run"] for r in collect([tmp_path])] == [str(done)]

    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "4 run(s) not done" in out and "pruner.blocks out of range" in out
    md = (tmp_path / "report.md").read_text()
    assert "FID to the dense model" in md and "| obs_diff | 12 |" in md
    assert "`" + str(tmp_path / "c") + "`: running" in md
    assert len((tmp_path / "report.csv").read_text().splitlines()) == 2  # header + the done run


def test_no_finished_run_writes_nothing_and_says_so(tmp_path):
    fake_run(tmp_path, "b", "failed", error="boom")
    rows, left_out = write_report([tmp_path], tmp_path)
    assert rows == [] and len(left_out) == 1 and not (tmp_path / "report.md").exists()
    with pytest.raises(SystemExit, match="no finished obsdiff runs"):
        main([str(tmp_path)])


def test_headings_take_names_and_arrows_from_the_metric_registry_and_cells_show_intervals(tmp_path):
    from obsdiff.evaluation.metrics.base import METRICS as REGISTERED

    for name in REGISTERED:
        metric = REGISTERED[name]
        assert METRICS[f"eval/{name}"] == f"{metric.label} {'↑' if metric.higher_is_better else '↓'}"
    fake_result(
        tmp_path, "a", "obs_diff", "unstructured 50%",
        **{"eval/ssim_dense": 0.81, "eval/ssim_dense_ci95": [0.78, 0.84], "eval/fid_real": 35.0,
           "eval/fid_real_ci95": [33.0, 38.5], "dense/fid_real_ci95": [28.0, 32.0]},
    )  # fmt: skip
    md = markdown(collect([tmp_path]))
    assert "### SSIM to the dense model ↑" in md and "### FID to real images ↓" in md
    assert "| obs_diff | 0.81 [0.78, 0.84] |" in md and "| obs_diff | 35 [33, 38.5] |" in md
    assert "| dense | 30 [28, 32] |" in md
