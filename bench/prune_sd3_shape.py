"""Benchmark: prune an SD3-Medium-shaped transformer (random weights) through obsdiff's real loop.

Times ``prune_groupwise`` with ``SD3Adapter`` and a ``LayerwiseStrategy`` of the OBS solver
(``layer_solver("obs", "obs")``), split into calibration (sampler passes with Hessian capture), OBS
solves and the loop's per-layer bookkeeping, plus peak memory against the memory plan's prediction
(``obsdiff.plan``, from the config on a ``meta`` model; CPU: measured with ``LiveBytes``, GPU:
``torch.cuda.max_memory_allocated``). Random
weights and prompt embeddings stand in for the checkpoint and text encoders: nothing downloads.

    python bench/prune_sd3_shape.py --preset cpu-small
    python bench/prune_sd3_shape.py --preset paper          # SD3-Medium, docs/METHOD.md §5, on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from obsdiff.calibration.timesteps import timestep_weights
from obsdiff.evaluation.speed import device_name
from obsdiff.models.base import DTYPES, KNOWN_CONFIGS, resolve_device, torch_dtype
from obsdiff.models.sd3 import SD3Adapter
from obsdiff.plan import LiveBytes, build_plan, device_capacity
from obsdiff.prune import Calibration, make_packages, prune_groupwise
from obsdiff.pruners.layerwise import LayerSolver, LayerwiseStrategy
from obsdiff.solvers import Pattern, SolveResult, layer_solver

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
MAX_SEQUENCE_LENGTH = 256  # T5 tokens (zero rows: the random pipeline has no T5, as at inference)
TEXT_TOKENS = 77 + MAX_SEQUENCE_LENGTH  # CLIP tokens + T5 tokens
# docs/METHOD.md §5 calibration settings; cpu-small fits a 2-core CPU in a few minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_layers=24, num_prompts=100, num_steps=25, resolution=512, num_packages=4, batch_size=4,
                  device="auto", dtype="float16"),
    "cpu-small": dict(num_layers=2, num_prompts=4, num_steps=4, resolution=256, num_packages=2, batch_size=2,
                      device="cpu", dtype="float32"),
}  # fmt: skip


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedSolver:
    """Wraps a solver and sums the wall time of its calls (synchronising CUDA around each).

    Args:
        solver: a layer solver, ``(W, H, pattern, *, layer, moments) -> SolveResult``.
        device: the device the solves run on.
    """

    def __init__(self, solver: LayerSolver, device: torch.device) -> None:
        self.solver, self.device, self.seconds = solver, device, 0.0

    def __call__(self, W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, layer: str = "",
                 moments: Any = None, **kwargs: Any) -> SolveResult:  # fmt: skip
        sync(self.device)
        t0 = time.perf_counter()
        result = self.solver(W, H, pattern, layer=layer, moments=moments, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return result

    def stacked(
        self, Ws: list[torch.Tensor], H: torch.Tensor, pattern: Pattern, **kwargs: Any
    ) -> list[SolveResult]:
        """The wrapped solver's row-stacked sweep of one input group (timed with the solves)."""
        sync(self.device)
        t0 = time.perf_counter()
        results = self.solver.stacked(Ws, H, pattern, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return results

    def factorize(self, H: torch.Tensor, *, layer: str = "") -> Any:
        """The wrapped solver's per-group factor (timed with the solves), if it has one."""
        factorize = getattr(self.solver, "factorize", None)
        if factorize is None:
            return None
        sync(self.device)
        t0 = time.perf_counter()
        factor = factorize(H, layer=layer)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return factor


class SeparateTimedSolver(TimedSolver):
    """``--no-stack``: every layer of an input group solved on its own (the shared factor stays)."""

    stacked = None


class TimedSD3Adapter(SD3Adapter):
    """The SD3 adapter with its sampler calls timed (the calibration passes)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__({"text_encoder_3": None, "max_sequence_length": MAX_SEQUENCE_LENGTH})
        self.device, self.seconds = device, 0.0

    def denoise(self, *args: Any, **kwargs: Any) -> Any:
        sync(self.device)
        t0 = time.perf_counter()
        out = super().denoise(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def sd3_medium_config() -> dict[str, Any]:
    """SD3-Medium's ``transformer/config.json`` (the copy obsdiff ships; nothing downloads)."""
    config = json.loads((KNOWN_CONFIGS / SD3Adapter.known_configs[SD3_MEDIUM]).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_pipeline(
    num_layers: int, device: torch.device, dtype: torch.dtype, seed: int
) -> StableDiffusion3Pipeline:
    """SD3-Medium-shaped transformer with seeded random weights in a pipeline without VAE/encoders.

    ``StableDiffusion3Pipeline.__init__`` accepts ``None`` for the VAE and every text
    encoder/tokenizer (``vae_scale_factor`` falls back to 8, as for SD3's VAE), and ``__call__``
    with pre-computed embeddings and ``output_type="latent"`` touches neither; no workaround needed.
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**sd3_medium_config(), "num_layers": num_layers})
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(device=device, dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(num_prompts: int, cfg: bool, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random stand-ins for the CLIP+T5 prompt embeddings (CPU, model dtype)."""
    g = torch.Generator("cpu").manual_seed(seed)
    shapes = {"prompt_embeds": (TEXT_TOKENS, 4096), "pooled_prompt_embeds": (2048,)}
    if cfg:
        shapes |= {"negative_prompt_embeds": (TEXT_TOKENS, 4096), "negative_pooled_prompt_embeds": (2048,)}
    return {k: torch.randn(num_prompts, *s, generator=g).to(dtype) for k, s in shapes.items()}


def predicted_plan(args: argparse.Namespace, adapter: SD3Adapter, strategy: LayerwiseStrategy) -> Any:
    """The memory plan of this prune, from the config alone (a ``meta`` transformer)."""
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    with torch.device("meta"):
        meta = SD3Transformer2DModel(**{**sd3_medium_config(), "num_layers": args.num_layers})
    meta = torch.nn.Module.to(meta, dtype)
    packages = make_packages(adapter, meta, strategy, args.num_packages, None)
    batch = args.batch_size * (2 if args.guidance_scale > 1 else 1)
    inputs = adapter.example_inputs(meta, batch, args.resolution // 8, TEXT_TOKENS)
    return build_plan(meta, packages, strategy.input_groups, inputs, device=str(device), batch=batch,
                      resolution=args.resolution, capacity=device_capacity(device))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones take the ``--preset`` value."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    for key, kind in [("num_layers", int), ("num_prompts", int), ("num_steps", int), ("resolution", int),
                      ("num_packages", int), ("batch_size", int), ("device", str)]:  # fmt: skip
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--pattern", default="unstructured", help='"unstructured" or "N:M", e.g. "2:4"')
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured ratio")
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--schedule", default="log_decrease")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stack", action="store_true", help="solve the layers of an input group one by one")
    p.add_argument("--compile", action="store_true", help="calibration.compile: torch.compile the denoiser")
    p.add_argument(
        "--live-bytes",
        action="store_true",
        help="CPU: measure the peak of live tensors (obsdiff.plan.LiveBytes; slows the run)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("bench/results.jsonl"))
    args = vars(p.parse_args(argv))
    preset = PRESETS[args["preset"]]
    return argparse.Namespace(**{k: preset.get(k) if v is None else v for k, v in args.items()})


def parse_pattern(spec: str, ratio: float) -> Pattern:
    """``"unstructured"`` (with ``ratio``) or ``"N:M"``."""
    if spec == "unstructured":
        return Pattern(kind="unstructured", ratio=ratio)
    n, m = (int(x) for x in spec.split(":"))
    return Pattern(kind="nm", n=n, m=m)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, calibrate and prune; print a table and append one JSON line to ``--out``."""
    args = parse_args(argv)
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.set_flush_denormal(True)  # as obsdiff runs do (flush_denormal=true)
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    pipe = build_pipeline(args.num_layers, device, dtype, args.seed)
    build_s = time.perf_counter() - t0
    calib = Calibration(
        embeds=random_embeds(args.num_prompts, args.guidance_scale > 1, dtype, args.seed + 1),
        seeds=[args.seed + 1000 + i for i in range(args.num_prompts)],
        num_steps=args.num_steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
        batch_size=args.batch_size, timestep_weights=timestep_weights(args.schedule, args.num_steps),
        compile=args.compile,
    )  # fmt: skip
    timed = SeparateTimedSolver if args.no_stack else TimedSolver
    adapter, solver = TimedSD3Adapter(device), timed(layer_solver("obs", "obs"), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pattern, targets = parse_pattern(args.pattern, args.sparsity), list(adapter.default_targets)
    strategy = LayerwiseStrategy(solver, pattern, targets)
    plan = predicted_plan(args, adapter, strategy)
    t0 = time.perf_counter()
    live = LiveBytes() if device.type == "cpu" and args.live_bytes else contextlib.nullcontext()
    with live:
        records = prune_groupwise(adapter, pipe, calib, strategy, args.num_packages)
    sync(device)
    total_s = time.perf_counter() - t0
    weights = sum(
        t.numel() * t.element_size() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()]
    )
    measured = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else live.peak + weights if args.live_bytes else float("nan"))  # fmt: skip
    numel = sum(r.rows * r.cols for r in records)
    figures = {
        "total_s": total_s,
        "calibration_s": adapter.seconds,
        "solve_s": solver.seconds,
        "layer_overhead_s": total_s - adapter.seconds - solver.seconds,
        "build_s": build_s,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "plan_peak_gib": plan.peak_bytes / 2**30,
        "measured_peak_gib": measured / 2**30,  # CPU: tensors alive at once (LiveBytes), + weights
        "plan_over_measured": plan.peak_bytes / measured,
        "layers_pruned": len(records),
        "achieved_sparsity": sum(r.sparsity * r.rows * r.cols for r in records) / numel,
        "denoiser_params_m": sum(p.numel() for p in pipe.transformer.parameters()) / 1e6,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # other processes skew CPU timings
    }  # fmt: skip
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device_name": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "device": str(device), **figures}  # fmt: skip
    print(f"\n{args.preset} on {row['device_name']}: {args.dtype}, {args.num_layers} blocks, "
          f"{args.num_prompts} prompts x {args.num_steps} steps, {args.resolution}px, "
          f"G={args.num_packages}, {args.pattern}")  # fmt: skip
    for key, value in figures.items():
        print(f"  {key:<18} {value:10.3f}" if isinstance(value, float) else f"  {key:<18} {value!s:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
