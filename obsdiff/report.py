"""``obsdiff-report``: collect runs' ``metrics.json`` into one table (CSV + Markdown) and a plot.

    obsdiff-report multirun/compare_methods/2026-11-27_10-00-00 [more dirs] [--out DIR]

Every folder below the given ones that holds a ``status.json`` or a ``metrics.json`` is one run;
only runs whose status is ``done`` are in the table (a ``metrics.json`` is complete only then), the
others (running, killed, failed, or older runs with no ``status.json``) are listed under it. The
table is method × sparsity pattern for each metric, with its bootstrap 95 % interval over prompts
(``[low, high]``) where the run has one; quality metrics' names and arrows (↑ higher is better,
↓ lower) come from the metric registry (``obsdiff.evaluation.metrics.base.METRICS``);
``layer_loss`` is the mean of ``layers.csv``'s ``loss`` (the timestep-weighted relative
reconstruction error, the same for every method). Every multirun writes this report into its sweep
folder when it ends.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

from obsdiff.evaluation.metrics.base import METRICS as QUALITY
from obsdiff.runstate import read_status


def arrow(higher_is_better: bool) -> str:
    """``↑`` for a metric where higher is better, ``↓`` where lower is."""
    return "↑" if higher_is_better else "↓"


# Shown when any run has them: every registered quality metric, then the pruning numbers.
# ``eval/fid`` is left out: it is ``fid_real`` or ``fid_dense``.
METRICS = {
    f"eval/{name}": f"{QUALITY[name].label} {arrow(QUALITY[name].higher_is_better)}" for name in QUALITY
}
METRICS |= {
    "layer_loss": "mean layer loss ↓",
    "prune/sparsity_achieved": "sparsity achieved",
    "prune/seconds": "prune seconds",
}
SETTINGS = ["method", "mask", "update", "pattern", "schedule", "num_packages"]
DENSE = [f"dense/{k[5:]}" for k in METRICS if k.startswith("eval/")]
INTERVALS = [f"{k}_ci95" for k in [*DENSE, *METRICS] if k.startswith(("eval/", "dense/"))]
COLUMNS = ["run", *SETTINGS, *DENSE, *METRICS, *INTERVALS]
PATTERN_ORDER = ["unstructured", ":", "structured"]  # unstructured levels, then N:M, then structured


def run_dirs(roots: list[Path]) -> list[Path]:
    """Every folder below ``roots`` (or one of them) that holds a ``status.json`` or ``metrics.json``."""
    found = {p.parent for root in roots for name in ("status.json", "metrics.json") for p in root.rglob(name)}
    return sorted(found)


def split_done(roots: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The finished runs, and every other run with why it is left out."""
    done, left_out = [], []
    for run_dir in run_dirs(roots):
        status = read_status(run_dir)
        if status is None:
            left_out.append((run_dir, "no status.json (unfinished, or from before obsdiff recorded it)"))
        elif status["state"] != "done":
            error = f": {status['error']}".replace("\n", " ") if status.get("error") else ""
            left_out.append((run_dir, f"{status['state']}{error}"))
        elif not (run_dir / "metrics.json").is_file():
            left_out.append((run_dir, "done but metrics.json is missing"))
        else:
            done.append(run_dir)
    return done, left_out


def collect(roots: list[Path]) -> list[dict]:
    """One row per finished run (sorted by method and pattern)."""
    rows = []
    for run_dir in split_done(roots)[0]:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if "prune/method" not in metrics:
            continue  # not a pruning run
        layers = run_dir / "layers.csv"
        losses = [float(r["loss"]) for r in csv.DictReader(layers.open())] if layers.is_file() else []
        row = {k: metrics.get(k, math.nan) for k in COLUMNS}
        row |= {k: metrics.get(f"prune/{k}", "") for k in SETTINGS}
        row |= {"run": str(run_dir), "layer_loss": statistics.fmean(losses) if losses else math.nan}
        if "plumbing" in metrics.get("eval/clip_network", ""):  # a random CLIP: not a result
            row["eval/clip_score"] = row["dense/clip_score"] = math.nan
        rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], _pattern_key(r["pattern"])))


def _pattern_key(pattern: str) -> tuple[int, str]:
    group = next(i for i, tag in enumerate(PATTERN_ORDER) if tag in pattern)
    return group, pattern


def _label(row: dict, varying: set[str] = frozenset()) -> str:
    """The method's name; a mask-vs-update ablation (OBS update on another mask, or an OBS mask
    without its update) also names its mask and update; schedule and packages when they vary."""
    label = row["method"]
    if (row["mask"] == "obs") != (row["update"] == "obs"):
        label += f" ({row['mask']} mask + {row['update']} update)"
    extras = []
    if "schedule" in varying:
        extras.append(str(row["schedule"]))
    if "num_packages" in varying:
        packages = row["num_packages"]
        extras.append(f"{packages} package{'' if packages == 1 else 's'}")
    return ", ".join([label, *extras])


def _varying(rows: list[dict]) -> set[str]:
    """The settings (schedule, packages) that differ between runs of one method at one pattern."""
    varying = set()
    for key in ("schedule", "num_packages"):
        values: dict[tuple, set] = {}
        for r in rows:
            values.setdefault((r["method"], r["mask"], r["update"], r["pattern"]), set()).add(r[key])
        if any(len(v) > 1 for v in values.values()):
            varying.add(key)
    return varying


def _shown(rows: list[dict]) -> list[str]:
    """The metrics at least one run has."""
    return [k for k in METRICS if any(not _missing(r[k]) for r in rows)]


def _missing(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _cell(value, interval) -> str:
    """``35.2``, or ``35.2 [33.1, 37.4]`` with a 95 % interval; empty when missing."""
    if value is None or _missing(value):
        return ""
    if isinstance(interval, list | tuple) and len(interval) == 2:
        return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"
    return f"{value:.4g}"


def markdown(rows: list[dict]) -> str:
    """One Markdown table per metric: methods down (and the dense model, when all runs share it),
    sparsity patterns across."""
    patterns = sorted({r["pattern"] for r in rows}, key=_pattern_key)
    varying = _varying(rows)
    labels = sorted({_label(r, varying) for r in rows})
    parts = []
    for key in _shown(rows):
        cell = {(_label(r, varying), r["pattern"]): _cell(r[key], r.get(f"{key}_ci95")) for r in rows}
        lines = [
            f"### {METRICS[key]}",
            "",
            "| method | " + " | ".join(patterns) + " |",
            "|---" * (len(patterns) + 1) + "|",
        ]
        dense = {_dense_cell(r, key) for r in rows} if key.startswith("eval/") else set()
        if len(dense) == 1 and (value := dense.pop()):
            lines.append("| dense | " + " | ".join(value for _ in patterns) + " |")
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(cell.get((label, p), "") for p in patterns) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _dense_cell(row: dict, key: str) -> str:
    """The dense model's cell for ``eval/<name>``: ``dense/<name>`` and its interval."""
    name = f"dense/{key[5:]}"
    return _cell(row.get(name, math.nan), row.get(f"{name}_ci95"))


def plot(rows: list[dict], path: Path) -> None:
    """Quality metrics and mean layer loss per sparsity pattern, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({r["pattern"] for r in rows}, key=_pattern_key)
    varying = _varying(rows)
    keys = [k for k in _shown(rows) if k.startswith("eval/") or k == "layer_loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for method in sorted({_label(r, varying) for r in rows}):
            points = [(patterns.index(r["pattern"]), r[key]) for r in rows if _label(r, varying) == method]
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xticks(range(len(patterns)), patterns, rotation=30, ha="right")
        ax.set_title(METRICS[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def left_out_text(left_out: list[tuple[Path, str]]) -> str:
    """The runs that are not in the table, one line each (Markdown)."""
    if not left_out:
        return ""
    lines = [f"### not in the table: {len(left_out)} run(s) not done", ""]
    lines += [f"- `{run_dir}`: {why}" for run_dir, why in left_out]
    return "\n".join(lines) + "\n"


def write_report(roots: list[Path], out: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Write ``report.csv``, ``report.md`` and ``report.png`` of the finished runs into ``out``.

    Returns:
        The table's rows and the runs left out (nothing is written when no run is finished).
    """
    rows, left_out = collect(roots), split_done(roots)[1]
    if not rows:
        return rows, left_out
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text("\n".join(filter(None, [markdown(rows), left_out_text(left_out)])))
    plot(rows, out / "report.png")
    return rows, left_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="obsdiff-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument("--out", type=Path, help="where report.{csv,md,png} go (default: the first dir)")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0]
    rows, left_out = write_report(args.dirs, out)
    if left_out:
        print(left_out_text(left_out))
    if not rows:
        raise SystemExit(
            f"no finished obsdiff runs (status.json done, metrics.json with prune/method) under "
            f"{[str(d) for d in args.dirs]}"
        )
    print(markdown(rows))
    print(f"wrote {out / 'report.csv'}, {out / 'report.md'}, {out / 'report.png'} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
