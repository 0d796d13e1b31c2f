"""The issue-16 measurement scripts: experiments/tiny_quality/seed_table.py and bench/update.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_run(folder: Path, fid: float, acc: float, losses: list[float], seconds: float = 1.0) -> None:
    folder.mkdir(parents=True)
    metrics = {"eval/fid_dense": fid, "eval/prompt_accuracy": acc, "prune/seconds": seconds}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with (folder / "layers.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "loss"])
        writer.writeheader()
        writer.writerows({"layer": f"l{i}", "loss": loss} for i, loss in enumerate(losses))


def test_seed_table_marks_only_differences_beyond_noise(tmp_path):
    for seed, jitter in ((0, 0.0), (100, 0.2), (200, -0.2)):
        write_run(tmp_path / "obs_diff" / f"u0.8_s{seed}", 75 + jitter, 0.64, [0.06, 0.06])
        write_run(tmp_path / "admm" / f"u0.8_s{seed}", 61 + jitter, 0.64 + jitter / 10, [0.04, 0.04])
        write_run(tmp_path / "noisy" / f"u0.8_s{seed}", 75 + 10 * jitter, 0.64, [0.06, 0.06])
    write_run(tmp_path / "admm" / "2of4_s0", 30, 0.9, [0.01])  # one seed: never marked
    write_run(tmp_path / "obs_diff" / "2of4_s0", 35, 0.9, [0.01])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments/tiny_quality/seed_table.py"), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = (tmp_path / "seeds.md").read_text()
    assert proc.stdout.strip() == text.strip()
    fid = text.split("### prompt accuracy")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in fid.splitlines() if line.startswith("| ")}
    assert rows["obs_diff"].split(" | ")[1:] == ["75 ± 0.2", "35 (n=1) |"]  # levels: u0.8, then 2of4
    assert "61 ± 0.2 **(better)**" in rows["admm"] and "30 (n=1) |" in rows["admm"]
    assert "(better)" not in rows["noisy"] and "(worse)" not in rows["noisy"]  # same mean, more spread
    assert "0.04 ± 0 **(better)**" in text  # layer loss


def test_bench_update_reports_the_options_against_obs(tmp_path):
    out = tmp_path / "update.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/update.py"), "--shapes", "tiny_qkv", "--repeats", "2",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "tiny_qkv" in proc.stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["obs_loss_over_obs"] == 1.0 and row["obs_over_obs_median"] == 1.0
    assert row["admm_loss_over_obs"] < 1.0  # the ADMM re-fit on the OBS mask never loses to OBS
    assert row["rose_loss_over_obs"] == 1.0  # 96 columns: one block, ROSE keeps the natural order
    assert row["admm_s_min"] > 0 and row["swaps_s_min"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench/update.py"), "--options", "alps"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown option or shape: alps" in bad.stderr
