"""Benchmark: OBS solves of layers that read one input, each factorising H vs one shared factor.

For every shape group (layers reading one input, as the adapters group them) it times
``n × obs_solve(W_i, H)`` (each damps and factorises ``H``: the reference code's way) against
``factorize(H)`` once plus ``n × obs_solve(W_i, H, factor=...)`` (what ``LayerwiseStrategy`` does),
checks the results are bit-identical, and reports min / median over ``--repeats`` of both times and
of their ratio, measured alternately in the same process (the machines are shared and noisy).

    python bench/solve.py                              # CPU: the SD3-Medium and Flux shapes below 4096 cols
    python bench/solve.py --shapes all --device cuda   # every shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from obsdiff.evaluation.speed import device_name
from obsdiff.solvers.obs import Pattern, factorize, obs_solve

# name -> (rows of each layer reading the input, cols)
SHAPES = {
    "sd3m_qkv": ((1536, 1536, 1536), 1536),  # SD3-Medium attn.to_q/k/v
    "sd3m_ff_down": ((1536,), 6144),  # SD3-Medium ff.net.2
    "flux_qkv": ((3072, 3072, 3072), 3072),  # Flux double-block attn.to_q/k/v
    "flux_single_in": ((3072, 3072, 3072, 12288), 3072),  # Flux single block q, k, v, proj_mlp
    "flux_single_out": ((3072,), 15360),  # Flux single block proj_out
    "sdxl_cross_kv": ((640, 640, 1280, 1280), 2048),  # a few of SDXL's 140 cross-attention K/V
}
CPU_DEFAULT = ("sd3m_qkv", "flux_qkv", "sdxl_cross_kv")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_shape(name: str, repeats: int, device: torch.device, pattern: Pattern) -> dict:
    rows, cols = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * cols, cols, generator=g)
    H = (2 * X.T @ X / X.shape[0]).to(device)
    Ws = [torch.randn(r, cols, generator=g).to(device) for r in rows]
    separate, shared = [], []
    for _ in range(repeats):  # alternate, so drifts in machine load hit both
        t_sep, a = timed(lambda: [obs_solve(W, H, pattern) for W in Ws], device)

        def with_factor():
            factor = factorize(H, 0.01)
            return [obs_solve(W, H, pattern, factor=factor) for W in Ws]

        t_sh, b = timed(with_factor, device)
        if not all(torch.equal(x.weight, y.weight) for x, y in zip(a, b, strict=True)):
            raise AssertionError(f"{name}: the shared factor changed the result")
        separate.append(t_sep)
        shared.append(t_sh)
    ratios = [s / t for s, t in zip(separate, shared, strict=True)]
    return {
        "shape": name, "layers": len(rows), "rows": list(rows), "cols": cols,
        "separate_s_min": min(separate), "separate_s_median": statistics.median(separate),
        "shared_s_min": min(shared), "shared_s_median": statistics.median(shared),
        "speedup_min": min(ratios), "speedup_median": statistics.median(ratios),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names or 'all' ({', '.join(SHAPES)})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pattern", default="0.5", help="unstructured ratio or N:M (2:4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("solve.jsonl"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 solves, as the reference
    names = list(SHAPES) if args.shapes == ["all"] else (args.shapes or list(CPU_DEFAULT))
    if ":" in args.pattern:
        n, m = map(int, args.pattern.split(":"))
        pattern = Pattern("nm", n=n, m=m)
    else:
        pattern = Pattern("unstructured", ratio=float(args.pattern))
    print(
        f"{'shape':<16} {'layers':>6} {'cols':>6} {'separate s':>11} {'shared s':>9} {'speedup min/med':>16}"
    )
    for name in names:
        row = bench_shape(name, args.repeats, device, pattern)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row |= {"device": device_name(device), "pattern": args.pattern, "repeats": args.repeats,
                "torch": torch.__version__, "time": stamp}  # fmt: skip
        times = f"{row['separate_s_median']:>11.3f} {row['shared_s_median']:>9.3f}"
        speedup = f"{row['speedup_min']:>7.2f}x/{row['speedup_median']:.2f}x"
        print(f"{name:<16} {row['layers']:>6} {row['cols']:>6} {times} {speedup}")
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
