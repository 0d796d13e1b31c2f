"""Mean ± spread over calibration seeds of the runs under ``ROOT/<option>/<cell>_s<seed>/``.

    python experiments/tiny_quality/seed_table.py ROOT [--baseline obs_diff] [--out ROOT/seeds.md]

Every run folder holds ``metrics.json`` and ``layers.csv`` (an obsdiff run); ``<option>`` names the
method variant (the folder ``beyond.sh`` wrote), ``<cell>`` the compare cell or level
(``obs_diff-u50``, ``u80``, …). For each option × level the table gives the mean and the sample
standard deviation over the seeds of FID to dense, prompt accuracy, the mean layer loss and the
prune time, and marks a difference to the baseline option at the same level as beyond noise when
the means differ by more than two standard errors of the difference (``|Δ| > 2·sqrt(s₁²/n₁ +
s₀²/n₀)``): a crude test with three seeds, stated as such in the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from pathlib import Path

COLUMNS = (  # (key, heading, lower is better)
    ("fid_dense", "FID to dense ↓", True),
    ("prompt_accuracy", "prompt accuracy ↑", False),
    ("layer_loss", "mean layer loss ↓", True),
    ("prune_seconds", "prune time (s) ↓", True),
)
RUN = re.compile(r"^(?:[^-]+-)?(?P<level>[^_]+)_s(?P<seed>\d+)$")


def read_run(folder: Path) -> dict[str, float]:
    """The four numbers of one run folder."""
    metrics = json.loads((folder / "metrics.json").read_text())
    with (folder / "layers.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return {
        "fid_dense": float(metrics["eval/fid_dense"]),
        "prompt_accuracy": float(metrics["eval/prompt_accuracy"]),
        "layer_loss": statistics.fmean(losses),
        "prune_seconds": float(metrics["prune/seconds"]),
    }


def collect(root: Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """``(option, level) -> [run numbers per seed]`` of every finished run under ``root``."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for metrics in sorted(root.glob("*/*/metrics.json")):
        match = RUN.match(metrics.parent.name)
        if match is None:
            continue
        runs.setdefault((metrics.parent.parent.name, match["level"]), []).append(read_run(metrics.parent))
    return runs


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def beyond_noise(a: list[float], b: list[float]) -> bool:
    """``|mean a − mean b| > 2 · SE`` of the difference (False with fewer than two seeds each)."""
    if len(a) < 2 or len(b) < 2:
        return False
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) > 2 * se


def table(runs: dict[tuple[str, str], list[dict[str, float]]], baseline: str) -> str:
    """One markdown table per column: options as rows, levels as columns."""
    options = sorted({o for o, _ in runs}, key=lambda o: (o != baseline, o))
    levels = sorted({lv for _, lv in runs}, key=lambda lv: (not lv.startswith("u"), lv))
    out = []
    for key, heading, lower in COLUMNS:
        out += [f"### {heading}", "", "| option | " + " | ".join(levels) + " |"]
        out.append("|---" * (len(levels) + 1) + "|")
        for option in options:
            cells = []
            for level in levels:
                values = [r[key] for r in runs.get((option, level), [])]
                if not values:
                    cells.append("")
                    continue
                mean, sd = summary(values)
                cell = f"{mean:.4g} ± {sd:.2g}" if not math.isnan(sd) else f"{mean:.4g}"
                base = [r[key] for r in runs.get((baseline, level), [])]
                if option != baseline and base and beyond_noise(values, base):
                    better = (mean < statistics.fmean(base)) == lower
                    cell += " **(better)**" if better else " *(worse)*"
                cells.append(f"{cell} (n={len(values)})" if len(values) != 3 else cell)
            out.append(f"| {option} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--baseline", default="obs_diff")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = collect(args.root)
    if not runs:
        raise SystemExit(f"no finished runs under {args.root}/<option>/<cell>_s<seed>/")
    text = table(runs, args.baseline)
    (args.out or args.root / "seeds.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
