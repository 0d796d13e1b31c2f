"""Benchmark: OBS solves of layers that read one input: textbook per layer, separate, row-stacked.

For every shape group (layers reading one input, as the adapters group them) it times, alternately
in one process (the machines are shared and noisy):

- ``reference``: a plain SparseGPT solve per layer, written out below (each damps and factorises
  ``H``: the reference code's way);
- ``separate``: ``factorize(H)`` once plus ``n × obs_solve(W_i, H, factor=...)`` (obsdiff before
  the row-stacked sweep);
- ``stacked``: ``obs_solve_stacked(Ws, H, factor=factorize(H))``: one column sweep over the
  row-stacked weights (what ``LayerwiseStrategy`` does now),

checks that stacked and separate are bit-identical, reports how far the reference is from them,
and prints min / median over ``--repeats`` of the times and of the ratios ``separate / stacked``
and ``reference / stacked``, each ratio taken within one repeat.

    python bench/solve.py --quick                      # CPU: every shape at 1/4 of its rows and cols
    python bench/solve.py --device cuda --repeats 5    # GPU: the real shapes
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
from obsdiff.solvers.obs import Pattern, factorize, obs_solve, obs_solve_stacked

# name -> (rows of each layer reading the input, cols)
SHAPES = {
    "sd3m_qkv": ((1536, 1536, 1536), 1536),  # SD3-Medium attn.to_q/k/v
    "sd3m_ff_up": ((6144,), 1536),  # SD3-Medium ff.net.0.proj: alone on its input
    "sd35l_qkv": ((2432, 2432, 2432), 2432),  # SD3.5-Large attn.to_q/k/v (38 heads × 64)
    "flux_qkv": ((3072, 3072, 3072), 3072),  # Flux double-block attn.to_q/k/v
    "flux_single_in": ((3072, 3072, 3072, 12288), 3072),  # Flux single block q, k, v, proj_mlp
    "flux_single_out": ((3072,), 15360),  # Flux single block proj_out
    "sdxl_cross_kv": ((640, 640, 1280, 1280), 2048),  # a few of SDXL's 140 cross-attention K/V
}


def sparsegpt_reference(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, block_size: int = 128):
    """The textbook SparseGPT solve of one layer (docs/METHOD.md §1), own factorisation included."""
    W, H = W.clone().float(), H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += 0.01 * torch.mean(torch.diag(H))  # damping λ = 0.01
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d1 = torch.diag(Hinv1)
        if pattern.kind == "unstructured":
            tmp = W1**2 / d1.reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * pattern.ratio)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / d1[i : i + pattern.m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, pattern.n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def separate(Ws: list[torch.Tensor], H: torch.Tensor, pattern: Pattern) -> list:
    """One shared factor, then one ``obs_solve`` (one column sweep) per layer."""
    factor = factorize(H)
    return [obs_solve(W, H, pattern, factor=factor) for W in Ws]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_shape(name: str, repeats: int, device: torch.device, pattern: Pattern, scale: int) -> dict:
    rows, cols = SHAPES[name]
    rows, cols = tuple(r // scale for r in rows), cols // scale
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * cols, cols, generator=g)
    H = (2 * X.T @ X / X.shape[0]).to(device)
    Ws = [torch.randn(r, cols, generator=g).to(device) for r in rows]
    runs = {
        "reference": lambda: [sparsegpt_reference(W, H, pattern) for W in Ws],
        "separate": lambda: separate(Ws, H, pattern),
        "stacked": lambda: obs_solve_stacked(Ws, H, pattern, factor=factorize(H)),
    }
    times = {k: [] for k in runs}
    for rep in range(repeats):  # rotate the order, so drifts in machine load hit every variant
        out = {}
        for k in list(runs)[rep % 3 :] + list(runs)[: rep % 3]:
            t, out[k] = timed(runs[k], device)
            times[k].append(t)
        for a, b in zip(out["separate"], out["stacked"], strict=True):
            if not (torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)):
                raise AssertionError(f"{name}: the stacked sweep changed the result")
    pairs = zip(out["reference"], out["stacked"], strict=True)
    ref_diff = max(float((ref - s.weight).abs().max()) for ref, s in pairs)
    row = {"shape": name, "layers": len(rows), "rows": list(rows), "cols": cols, "scale": scale}
    for k, t in times.items():
        row |= {f"{k}_s_min": min(t), f"{k}_s_median": statistics.median(t)}
    for k in ("separate", "reference"):
        ratios = [a / b for a, b in zip(times[k], times["stacked"], strict=True)]
        row |= {f"{k}_over_stacked_min": min(ratios), f"{k}_over_stacked_median": statistics.median(ratios)}
    return row | {"reference_max_abs_diff": ref_diff}


def solver_parser(doc: str, shapes: dict, out: str) -> argparse.ArgumentParser:
    """The options every per-layer solver benchmark takes (this script and ``update.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(shapes), help=f"names ({', '.join(shapes)})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="divide every row and column count by this")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: --scale 4 --repeats 3")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pattern", default="0.5", help="unstructured ratio or N:M (2:4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(out))
    return parser


def solver_setup(args: argparse.Namespace) -> tuple[torch.device, Pattern]:
    """Apply ``--quick`` and ``--threads``; fp32 matmuls; the device and the sparsity pattern."""
    if args.quick:
        args.scale, args.repeats = 4, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 solves, as the reference
    if ":" in args.pattern:
        n, m = map(int, args.pattern.split(":"))
        return torch.device(args.device), Pattern("nm", n=n, m=m)
    return torch.device(args.device), Pattern("unstructured", ratio=float(args.pattern))


def main() -> None:
    args = solver_parser(__doc__, SHAPES, "solve.jsonl").parse_args()
    device, pattern = solver_setup(args)
    secs_head = " ".join(f"{k:>7}" for k in ("ref s", "sep s", "stack s"))
    print(f"{'shape':<16} {'rows':>22} {'cols':>6} {secs_head}  sep/stack  ref/stack (min/median)")
    for name in args.shapes:
        row = bench_shape(name, args.repeats, device, pattern, args.scale)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row |= {"bench": "stacked", "device": device_name(device), "pattern": args.pattern,
                "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "time": stamp}  # fmt: skip
        secs = " ".join(f"{row[f'{k}_s_median']:>7.2f}" for k in ("reference", "separate", "stacked"))
        ratios = "  ".join(
            f"{row[f'{k}_over_stacked_min']:.2f}/{row[f'{k}_over_stacked_median']:.2f}x"
            for k in ("separate", "reference")
        )
        print(f"{name:<16} {str(row['rows']):>22} {row['cols']:>6} {secs}  {ratios}", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
