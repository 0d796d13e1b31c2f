"""obsdiff-report on hand-written run folders: which metrics show, the dense row, ablation labels."""

import csv
import json

from obsdiff.report import collect, markdown


def fake_run(root, name, method, pattern, schedule="log_decrease", packages=4, **metrics):
    run = root / name
    run.mkdir(parents=True)
    values = {
        "prune/method": method, "prune/mask": "obs", "prune/update": "obs", "prune/pattern": pattern,
        "prune/schedule": schedule, "prune/num_packages": packages, "dense/fid_real": 30.0,
        "dense/prompt_accuracy": 0.9, "eval/clip_network": "random CLIP (plumbing check)",
        "eval/clip_score": 0.2, "dense/clip_score": 0.2, **metrics,
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(values))
    with (run / "layers.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["name", "loss"], ["a", "0.1"], ["b", "0.3"]])


def test_tables_show_present_metrics_with_a_dense_row_and_label_ablations(tmp_path):
    fake_run(
        tmp_path, "a", "obs_diff", "unstructured 50%", **{"eval/fid_real": 35.0, "eval/prompt_accuracy": 0.8}
    )
    fake_run(tmp_path, "b", "obs_diff", "unstructured 50%", schedule="uniform",
             **{"eval/fid_real": 40.0, "eval/prompt_accuracy": 0.7})  # fmt: skip
    rows = collect([tmp_path])
    assert [r["layer_loss"] for r in rows] == [0.2, 0.2]
    md = markdown(rows)
    assert "### FID to real images" in md and "### prompt accuracy" in md
    assert "FID to the dense model" not in md  # no run has it
    assert "CLIP score" not in md  # a random plumbing CLIP is not a result
    assert "| dense | 30 |" in md and "| dense | 0.9 |" in md
    assert "| obs_diff, log_decrease | 35 |" in md and "| obs_diff, uniform | 0.7 |" in md
