"""Benchmark: how fast does ``obsdiff`` answer ``--help`` and refuse a bad config?

Runs each case in a fresh subprocess (``python -m obsdiff.cli …``, so the interpreter start and
every import count), ``--repeat`` times, and prints min / median seconds, the exit status, and the
machine. Nothing is pruned or loaded: every case exits before a model would load (refusals: status
2). Timings on a shared machine include other processes' load (the 1-minute load is printed).

    python bench/startup.py                 # 5 runs per case
    python bench/startup.py --repeat 10 --out bench/startup.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# name -> (CLI arguments, what it checks). Every case exits before a model would load: the field
# checks import no torch; the model-dependent ones read the model's config.json through its adapter.
CASES: dict[str, tuple[list[str], str]] = {
    "help": (["--help"], "Hydra help, every config group listed"),
    "bad_value": (["sparsity.ratio=1.5"], "field check (no model)"),
    "unknown_option": (["pruner=nope"], "Hydra compose error (no such group option)"),
    "nan_guidance": (["calibration.guidance_scale=nan"], "field check: NaN refused"),
    "negative_guidance_eval": (["eval.guidance_scale=-1"], "field check"),
    "nan_alpha_min": (["schedule.alpha_min=nan"], "field check: NaN refused"),
    "inf_damp_frac": (["pruner.damp_frac=inf"], "field check: Inf refused"),
    "negative_dsnot_cycles": (["pruner=dsnot", "pruner.dsnot.max_cycles=-1"], "field check (DSnoT option)"),
    "duplicate_blocks": (["pruner.blocks=[1,1]"], "field check: duplicate list entries"),
    "empty_targets": (["pruner.targets=[]"], "field check: an empty list"),
    "digits_on_general_model": (["model=sd3_medium"], "field check: digits prompts on a general model"),
    "blocks_out_of_range": (["pruner.blocks=[99]"], "model-dependent check (block count)"),
    "resolution_too_large": (["calibration.resolution=64"], "model-dependent check (position embedding)"),
    "bad_max_sequence_length": (["model.options.max_sequence_length=-1"], "model-dependent (options)"),
}
LIMIT_S = 3.0  # the target for every case (2 idle cores)


def time_case(args: list[str], run_dir: Path) -> tuple[float, int, str]:
    """Seconds, exit status and the error line (else the last line) of one ``obsdiff`` call."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "obsdiff.cli", *args]
    if "--help" not in args:
        cmd += [f"hydra.run.dir={run_dir}", "logger=none"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    errors = [line for line in lines if "[ERROR]" in line]  # a refusal's one line
    return seconds, proc.returncode, (errors or lines or [""])[-1]


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """Platform, CPU, Python, core count and the 1-minute load average (other processes skew timings)."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line here")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info['platform']}, {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"1-min load {info['loadavg_1min']}")  # fmt: skip
    print(f"{'case':<25} {'min s':>7} {'median s':>9} {'rc':>3}  error (else last) line")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            cli_args, what = CASES[name]
            runs = [time_case(cli_args, Path(tmp) / f"{name}-{i}") for i in range(args.repeat)]
            seconds = [s for s, _, _ in runs]
            _, rc, last = runs[-1]
            results[name] = {
                "what": what,
                "args": cli_args,
                "seconds": seconds,
                "min_s": min(seconds),
                "median_s": statistics.median(seconds),
                "returncode": rc,
                "last_line": last,
            }
            print(f"{name:<25} {min(seconds):>7.2f} {statistics.median(seconds):>9.2f} {rc:>3}  {last[:90]}")
    slow = [n for n in results if results[n]["median_s"] >= LIMIT_S]
    print(f"target: median < {LIMIT_S:.0f} s for every case; "
          + (f"missed by: {', '.join(slow)}" if slow else "met"))  # fmt: skip
    if args.out is not None:
        record = {"time": datetime.now(timezone.utc).isoformat(), "machine": info, "repeat": args.repeat,
                  "results": results}  # fmt: skip
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
