"""``obsdiff-report``: collect runs' ``metrics.json`` into one table (CSV + Markdown) and a plot.

    obsdiff-report multirun/compare_methods/2026-11-27_10-00-00 [more dirs] [--out DIR]

Every folder below the given ones that holds a ``metrics.json`` is one run. The table is
method × sparsity pattern for each metric; ``layer_loss`` is the mean of ``layers.csv``'s
``loss`` (the timestep-weighted relative reconstruction error, the same for every method).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

METRICS = {
    "eval/fid": "FID ↓",
    "eval/clip_score": "CLIP score ↑",
    "layer_loss": "mean layer loss ↓",
    "prune/sparsity_achieved": "sparsity achieved",
    "prune/seconds": "prune seconds",
}
COLUMNS = ["run", "method", "mask", "update", "pattern", "dense/fid", "dense/clip_score", *METRICS]
PATTERN_ORDER = ["unstructured", ":", "structured"]  # unstructured levels, then N:M, then structured


def collect(roots: list[Path]) -> list[dict]:
    """One row per run folder (sorted by method and pattern)."""
    rows = []
    for root in roots:
        for path in sorted(root.rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            if "prune/method" not in metrics:
                continue  # not a finished obsdiff run
            losses = [float(r["loss"]) for r in csv.DictReader((path.parent / "layers.csv").open())]
            row = {k: metrics.get(k, math.nan) for k in COLUMNS}
            row |= {
                "run": str(path.parent),
                "method": metrics["prune/method"],
                "mask": metrics["prune/mask"],
                "update": metrics["prune/update"],
                "pattern": metrics["prune/pattern"],
                "layer_loss": statistics.fmean(losses) if losses else math.nan,
            }
            rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], _pattern_key(r["pattern"])))


def _pattern_key(pattern: str) -> tuple[int, str]:
    group = next(i for i, tag in enumerate(PATTERN_ORDER) if tag in pattern)
    return group, pattern


def _label(row: dict) -> str:
    """The method's name; a mask-vs-update ablation (OBS update on another mask, or an OBS mask
    without its update) also names its mask and update."""
    if (row["mask"] == "obs") == (row["update"] == "obs"):
        return row["method"]
    return f"{row['method']} ({row['mask']} mask + {row['update']} update)"


def markdown(rows: list[dict]) -> str:
    """One Markdown table per metric: methods down, sparsity patterns across."""
    patterns = sorted({r["pattern"] for r in rows}, key=_pattern_key)
    methods = sorted({_label(r) for r in rows})
    cell = {(_label(r), r["pattern"], k): r[k] for r in rows for k in METRICS}
    parts = []
    for key, title in METRICS.items():
        lines = [
            f"### {title}",
            "",
            "| method | " + " | ".join(patterns) + " |",
            "|---" * (len(patterns) + 1) + "|",
        ]
        for m in methods:
            values = [cell.get((m, p, key)) for p in patterns]
            lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
        parts.append("\n".join(lines))
    dense = {(r["dense/fid"], r["dense/clip_score"]) for r in rows}
    if len(dense) == 1:
        fid, clip = dense.pop()
        parts.insert(0, f"Dense model: FID {fid:.4g}, CLIP score {clip:.4g}.")
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """FID, CLIP score and mean layer loss per sparsity pattern, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({r["pattern"] for r in rows}, key=_pattern_key)
    keys = ["eval/fid", "eval/clip_score", "layer_loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for method in sorted({_label(r) for r in rows}):
            points = [(patterns.index(r["pattern"]), r[key]) for r in rows if _label(r) == method]
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xticks(range(len(patterns)), patterns, rotation=30, ha="right")
        ax.set_title(METRICS[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="obsdiff-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument("--out", type=Path, help="where report.{csv,md,png} go (default: the first dir)")
    args = parser.parse_args(argv)
    rows = collect(args.dirs)
    if not rows:
        raise SystemExit(
            f"no obsdiff runs (metrics.json with prune/method) under {[str(d) for d in args.dirs]}"
        )
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text(markdown(rows))
    plot(rows, out / "report.png")
    print(markdown(rows))
    print(f"wrote {out / 'report.csv'}, {out / 'report.md'}, {out / 'report.png'} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
