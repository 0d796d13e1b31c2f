"""obsdiff-bench: latency and FLOPs of a dense vs. a structurally pruned denoiser.

    obsdiff-bench --artifact outputs/RUN/pruned --resolution 512 1024     # a pruned run vs. its base
    obsdiff-bench --random sd3_medium --structured-ratio 0.3 --blocks 1:23  # random weights, shape only
    obsdiff-bench --random flux_dev --structured-ratio 0.3                  # any adapter's random_shapes

Appends one JSON line per resolution to ``--out`` and prints a table. CPU timings only show that the
smaller model runs; they are not GPU speedups.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from obsdiff.artifacts import base_model_config, library_versions, load_pruned, read_manifest
from obsdiff.config import parse_blocks
from obsdiff.evaluation.cost import denoiser_cost, structured_architecture
from obsdiff.evaluation.speed import CPU_WARNING, denoiser_latency, device_name, pipeline_latency, verdict
from obsdiff.models import ADAPTERS, adapter_class, get_adapter
from obsdiff.models.base import DTYPES, resolve_device, torch_dtype


def random_shapes() -> dict[str, tuple[str, str, int, int]]:
    """``--random`` names of every adapter: name -> (family, ``model.path``, VAE downscale, text tokens)."""
    shapes = {}
    for family in sorted(ADAPTERS):
        for name, (path, scale, tokens) in getattr(adapter_class(family), "random_shapes", {}).items():
            shapes[name] = (family, path, scale, tokens)
    return shapes


def parse_block_list(spec: str, num_blocks: int) -> list[int]:
    """``"1:23"`` (a slice of the block indices; ``"1:-1"``: all but the first and last) or ``"1,4,7"``."""
    if ":" in spec:
        return parse_blocks(spec, num_blocks)
    return [int(x) for x in spec.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI options (see bench/README.md)."""
    p = argparse.ArgumentParser(prog="obsdiff-bench", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--artifact", type=Path, help="a run's pruned/ folder")
    mode.add_argument("--random", choices=sorted(random_shapes()), help="random weights of this shape")
    p.add_argument("--structured-ratio", type=float, default=0.3, help="--random: heads/neurons removed")
    p.add_argument("--blocks", default="1:-1", help="--random: blocks to shrink, slice or list")
    p.add_argument("--batch", type=int, default=2, help="rows of one denoiser call (SD3 CFG: 2 per prompt)")
    p.add_argument("--resolution", type=int, nargs="+", help="pixels (default: the model's native)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--text-tokens", type=int, help="default: the shape's (SD3-Medium 333, FLUX.1-dev 512)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--steps", type=int, default=28, help="--artifact: sampler steps per image")
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--pipeline-iters", type=int, default=3, help="--artifact: timed sampler calls")
    base_help = "--artifact: the base model's folder here (an artifact names another machine's as .../name)"
    p.add_argument("--base-path", help=base_help)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/speed.jsonl"))
    return p.parse_args(argv)


def time_denoiser(adapter: Any, denoiser: torch.nn.Module, args: argparse.Namespace, sizes: dict) -> dict:
    """Denoiser latency at every resolution; inputs seeded so dense and pruned see the same ones."""
    out = {}
    for res, (latent, tokens) in sizes.items():
        gen = torch.Generator().manual_seed(args.seed)
        inputs = adapter.example_inputs(denoiser, args.batch, latent, tokens, gen)
        out[res] = {"denoiser": denoiser_latency(denoiser, inputs, args.warmup, args.iters)}
    return out


def time_pipeline(adapter: Any, pipe: Any, model_cfg: Any, args: argparse.Namespace, sizes: dict) -> dict:
    """Denoiser and end-to-end latency of one loaded pipeline at every resolution."""
    out = time_denoiser(adapter, adapter.denoiser(pipe), args, sizes)
    rows = sum(adapter.denoiser_calls(args.guidance_scale, dict(adapter.denoiser(pipe).config)))
    num_images = max(1, args.batch // rows)
    embeds = adapter.encode(pipe, [args.prompt] * num_images, args.guidance_scale, num_images)
    timing = (min(args.warmup, 1), args.pipeline_iters)
    for res in sizes:
        out[res]["pipeline"] = pipeline_latency(
            adapter, pipe, embeds, args.steps, args.guidance_scale, res, *timing
        )
    return out


def bench_artifact(args: argparse.Namespace, device: torch.device, dtype: str) -> tuple[Any, dict, dict]:
    """Pruned pipeline, then its dense base (one at a time in memory): denoiser + end-to-end."""
    manifest = read_manifest(args.artifact)
    overrides = {"device": str(device), "torch_dtype": dtype}
    if args.base_path:
        overrides["path"] = args.base_path
    model_cfg = base_model_config(args.artifact, manifest, **overrides)
    adapter = get_adapter(model_cfg.family, model_cfg.get("options"))
    pipe = load_pruned(args.artifact, **overrides)
    denoiser = adapter.denoiser(pipe)
    tokens = args.text_tokens or adapter.text_tokens(pipe)
    scale = pipe.vae_scale_factor
    resolutions = args.resolution or [denoiser.config.sample_size * scale]
    sizes = {res: (res // scale, tokens) for res in resolutions}
    shape = {"config": dict(denoiser.config), "architecture": adapter.architecture(denoiser), "sizes": sizes}
    pruned = time_pipeline(adapter, pipe, model_cfg, args, sizes)
    del pipe, denoiser  # one pipeline in memory at a time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dense = time_pipeline(adapter, adapter.load(model_cfg), model_cfg, args, sizes)
    return adapter, shape, {"dense": dense, "pruned": pruned}


def bench_random(args: argparse.Namespace, device: torch.device, dtype: str) -> tuple[Any, dict, dict]:
    """A random denoiser, timed dense, then reshaped in place (one copy in memory) and timed again."""
    family, path, scale, default_tokens = random_shapes()[args.random]
    adapter = get_adapter(family)
    config = adapter.denoiser_config(OmegaConf.create({"path": path}))
    blocks = parse_block_list(args.blocks, adapter.num_blocks(config))
    architecture = structured_architecture(adapter, config, args.structured_ratio, blocks)
    resolutions = args.resolution or [config.get("sample_size", 128) * scale]
    sizes = {res: (res // scale, args.text_tokens or default_tokens) for res in resolutions}
    torch.manual_seed(args.seed)
    model = adapter.empty_denoiser(config, device=device).eval()  # from_config: random init
    if torch_dtype(dtype) != next(model.parameters()).dtype:
        model = model.to(torch_dtype(dtype))
    dense = time_denoiser(adapter, model, args, sizes)
    adapter.reshape(model, architecture)  # keeps the first heads / neurons: latency is the same
    pruned = time_denoiser(adapter, model, args, sizes)
    shape = {"config": config, "architecture": architecture, "sizes": sizes}
    return adapter, shape, {"dense": dense, "pruned": pruned}


def records(adapter: Any, shape: dict, timings: dict, args: argparse.Namespace, device: torch.device,
            dtype: str) -> list[dict]:  # fmt: skip
    """One JSON-able record per resolution: latency, FLOPs, params, verdict, versions, settings."""
    base = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "artifact" if args.artifact else "random",
        "model": str(args.artifact) if args.artifact else args.random,
        "device": str(device), "device_name": device_name(device), "dtype": dtype,
        "torch_threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
        "versions": library_versions(), "architecture": shape["architecture"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }  # fmt: skip
    rows = []
    for res, (latent, tokens) in shape["sizes"].items():
        dense, pruned = (denoiser_cost(adapter, shape["config"], a, [args.batch], latent, tokens)
                         for a in ({}, shape["architecture"]))  # fmt: skip
        t_dense, t_pruned = timings["dense"][res], timings["pruned"][res]
        speedup = t_dense["denoiser"]["median_ms"] / t_pruned["denoiser"]["median_ms"]
        row = {**base, "resolution": res, "batch": args.batch, "latent_size": latent, "text_tokens": tokens,
               "dense_ms": t_dense["denoiser"]["median_ms"], "pruned_ms": t_pruned["denoiser"]["median_ms"],
               "speedup": speedup, "dense_tflops": dense["tflops"], "pruned_tflops": pruned["tflops"],
               "flop_reduction": 1 - pruned["tflops"] / dense["tflops"],
               "dense_params": dense["params"], "pruned_params": pruned["params"],
               "verdict": verdict(speedup, dense["tflops"] / pruned["tflops"], device),
               "dense_latency": t_dense, "pruned_latency": t_pruned}  # fmt: skip
        if "pipeline" in t_dense:
            row["pipeline_dense_ms"] = t_dense["pipeline"]["median_ms"]
            row["pipeline_pruned_ms"] = t_pruned["pipeline"]["median_ms"]
            row["pipeline_speedup"] = row["pipeline_dense_ms"] / row["pipeline_pruned_ms"]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per resolution (ms, speedup, GFLOPs, params, pipeline) and its verdict."""
    r0 = rows[0]
    print(f"\n{r0['model']} on {r0['device_name']} ({r0['dtype']}, batch {r0['batch']}, "
          f"{r0['text_tokens']} text tokens, load {r0['loadavg_1min']:.2f})")  # fmt: skip
    head = f"{'res':>5} {'dense ms':>10} {'pruned ms':>10} {'speedup':>8} {'GFLOPs':>19} {'FLOPs -':>8}"
    head += f" {'params M':>17}"
    print(head + ("  pipeline ms (speedup)" if "pipeline_speedup" in r0 else ""))
    for r in rows:
        line = (f"{r['resolution']:>5} {r['dense_ms']:>10.2f} {r['pruned_ms']:>10.2f} {r['speedup']:>7.2f}x "
                f"{r['dense_tflops'] * 1e3:>9.4g}>{r['pruned_tflops'] * 1e3:<9.4g} "
                f"{r['flop_reduction']:>7.1%} "
                f"{r['dense_params'] / 1e6:>8.4g}>{r['pruned_params'] / 1e6:<8.4g}")  # fmt: skip
        if "pipeline_speedup" in r:
            line += (
                f"  {r['pipeline_dense_ms']:.0f}>{r['pipeline_pruned_ms']:.0f} ({r['pipeline_speedup']:.2f}x)"
            )
        print(line + f"\n      verdict: {r['verdict']}")
    if r0["device"] == "cpu":
        print(f"\n*** {CPU_WARNING.upper()} ***")


def run_bench(argv: list[str] | None = None) -> list[dict]:
    """Measure, print a table and append one JSON line per resolution to ``--out``; return the records."""
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # CPU: random / pruned weights must not hit denormal slow paths
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    bench = bench_artifact if args.artifact else bench_random
    adapter, shape, timings = bench(args, device, dtype)
    rows = records(adapter, shape, timings, args, device, dtype)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``obsdiff-bench``); returns nothing so the exit status is 0."""
    run_bench(argv)


if __name__ == "__main__":
    main()
