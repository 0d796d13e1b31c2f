"""Benchmark: what the beyond-OBS-Diff options cost per layer group, against the OBS sweep.

For every shape group (layers reading one input, as the adapters group them) it times, alternately
in one process (the machines are shared and noisy), the group's solve as ``LayerwiseStrategy``
runs it (``factorize`` once, then ``stacked`` or one solve per layer):

- ``obs``: OBS-Diff's solver (``pruner=obs_diff``): one row-stacked OBS sweep;
- ``admm``: ``pruner.update=admm`` (``pruner=obs_admm``, 20 iterations): the OBS sweep chooses the
  mask, ADMM re-fits the kept weights (one more factorisation, matmul iterations);
- ``swaps``: ``pruner.refine=swaps`` (``pruner=sparseswaps``): the OBS mask refined by exact
  1-swaps, then the OBS update on it;
- ``rose``: ``pruner.order=rose``: the ROSE column order (a no-op on layers that are not columnar);

and prints min / median over ``--repeats`` of the times and of the ratios ``option / obs``, each
ratio taken within one repeat. The layer loss ``tr(ΔW H ΔWᵀ)`` of each option relative to OBS's is
printed too (the same number whatever the machine).

    python bench/update.py --quick      # CPU: every shape at 1/4 (swaps: hours on flux_single_out)
    python bench/update.py --shapes tiny_qkv tiny_ff_out --repeats 7   # the embedded models' layers
    python bench/update.py --device cuda --repeats 5    # GPU: the real shapes
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone

import torch
from solve import SHAPES as REAL_SHAPES  # the real models' input groups (bench/solve.py)
from solve import solver_parser, solver_setup, timed

from obsdiff.evaluation.speed import device_name
from obsdiff.solvers import layer_solver
from obsdiff.solvers.obs import Pattern, reconstruction_error

SHAPES = REAL_SHAPES | {
    "tiny_qkv": ((96, 96, 96), 96),  # the embedded digits models: attention q/k/v (96 wide)
    "tiny_ff_out": ((96,), 384),  # their FFN down-projection (4 × 96 inputs)
}
OPTIONS = {  # name -> layer_solver arguments, as conf/pruner/*.yaml set them
    "obs": {"mask": "obs", "update": "obs"},
    "admm": {"mask": "obs", "update": "admm"},  # admm_update's defaults: ρ = 1, 20 iterations (obs_admm)
    "swaps": {"mask": "obs", "update": "obs", "refine": "swaps"},
    "rose": {"mask": "obs", "update": "obs", "order": "rose"},
}


def group_solve(solve, Ws: list[torch.Tensor], H: torch.Tensor, pattern: Pattern) -> list:
    """One input group as ``LayerwiseStrategy`` solves it: one factor, stacked where it can."""
    layers = [f"layer{i}" for i in range(len(Ws))]
    factor = solve.factorize(H, layer="group")
    if hasattr(solve, "stacked") and len(Ws) > 1:  # a lone layer is solved alone, as there
        return solve.stacked(Ws, H, pattern, layers=layers, factor=factor)
    return [solve(W, H, pattern, layer=name, factor=factor) for W, name in zip(Ws, layers, strict=True)]


def bench_shape(name: str, options: list[str], repeats: int, device, pattern: Pattern, scale: int) -> dict:
    rows, cols = SHAPES[name]
    rows, cols = tuple(max(r // scale, 1) for r in rows), max(cols // scale, 1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * cols, cols, generator=g)
    H = (2 * X.T @ X / X.shape[0]).to(device)
    Ws = [torch.randn(r, cols, generator=g).to(device) for r in rows]
    solvers = {k: layer_solver(**OPTIONS[k]) for k in options}
    times: dict[str, list[float]] = {k: [] for k in solvers}
    out: dict[str, list] = {}
    for rep in range(repeats):  # rotate the order, so drifts in machine load hit every option
        order = list(solvers)[rep % len(solvers) :] + list(solvers)[: rep % len(solvers)]
        for k in order:
            t, out[k] = timed(lambda k=k: group_solve(solvers[k], Ws, H, pattern), device)
            times[k].append(t)
    loss = {k: sum(float(reconstruction_error(W, r.weight, H)) for W, r in zip(Ws, res, strict=True))
            for k, res in out.items()}  # fmt: skip
    row = {"shape": name, "layers": len(rows), "rows": list(rows), "cols": cols, "scale": scale}
    for k, t in times.items():
        row |= {f"{k}_s_min": min(t), f"{k}_s_median": statistics.median(t)}
        ratios = [a / b for a, b in zip(t, times["obs"], strict=True)]
        row |= {f"{k}_over_obs_min": min(ratios), f"{k}_over_obs_median": statistics.median(ratios)}
        row |= {f"{k}_loss_over_obs": loss[k] / loss["obs"]}
    return row


def main() -> None:
    parser = solver_parser(__doc__, SHAPES, "update.jsonl")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), help=f"({', '.join(OPTIONS)})")
    args = parser.parse_args()
    unknown = sorted(set(args.options) - set(OPTIONS)) + sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown option or shape: {', '.join(unknown)}")
    options = ["obs"] + [k for k in args.options if k != "obs"]  # the ratios' baseline runs too
    device, pattern = solver_setup(args)
    others = options[1:]
    head = "  ".join(f"{k + '/obs':>16}" for k in others)
    print(f"{'shape':<16} {'rows':>22} {'cols':>6} {'obs s':>7}  {head}   (time min/median; loss)")
    for name in args.shapes:
        row = bench_shape(name, options, args.repeats, device, pattern, args.scale)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row |= {"bench": "update", "device": device_name(device), "pattern": args.pattern,
                "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "time": stamp}  # fmt: skip
        cells = "  ".join(
            f"{row[f'{k}_over_obs_min']:.2f}/{row[f'{k}_over_obs_median']:.2f}x;"
            f" {row[f'{k}_loss_over_obs']:.2f}"
            for k in others
        )
        head = f"{name:<16} {str(row['rows']):>22} {row['cols']:>6} {row['obs_s_median']:>7.3f}"
        print(f"{head}  {cells}", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
