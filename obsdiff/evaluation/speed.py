"""Latency of a denoiser forward and of a whole sampler call (VAE decode included).

CUDA: one pair of CUDA events per timed iteration, after a synchronised warm-up, so the numbers are
GPU time of the queued work. CPU: ``time.perf_counter``. CPU timings show that a smaller model runs,
not what it gains on a GPU.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from obsdiff.models.base import ModelAdapter

CPU_WARNING = "cpu: timings are not GPU speedups"
MIN_SPEEDUP = 1.05  # below: "no speedup"


def device_name(device: torch.device | str) -> str:
    """GPU name, or the CPU model from ``/proc/cpuinfo`` with the core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    models = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
    return f"{models[0] if models else platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: the work to time (called without arguments).
        device: where ``fn`` runs; CUDA is timed with events, anything else with ``perf_counter``.
        warmup: untimed calls first (allocator, kernels selection, caches).
        iters: timed calls.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}: time at least one call")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def latency_stats(times_ms: list[float], device: torch.device) -> dict[str, Any]:
    """Median and 10th / 90th percentiles (``p10 ≤ median ≤ p90``) of per-call milliseconds."""
    p10, median, p90 = np.percentile(np.asarray(times_ms, dtype=np.float64), [10, 50, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "iters": len(times_ms),
        "device": str(device),
    }


def denoiser_latency(
    denoiser: nn.Module, inputs: dict[str, Any], warmup: int = 3, iters: int = 20
) -> dict[str, Any]:
    """Latency of ``denoiser(**inputs)`` under ``torch.no_grad``.

    Args:
        denoiser: the model, on its device and dtype.
        inputs: keyword inputs of one forward (e.g. ``adapter.example_inputs``), on that device.
        warmup: untimed forwards first.
        iters: timed forwards.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms", "iters", "device"}``.
    """
    device = next(denoiser.parameters()).device
    with torch.no_grad():
        times = time_calls(lambda: denoiser(**inputs), device, warmup, iters)
    return latency_stats(times, device)


def pipeline_latency(
    adapter: ModelAdapter,
    pipe: Any,
    embeds: dict,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    warmup: int = 1,
    iters: int = 3,
) -> dict[str, Any]:
    """End-to-end latency of one sampler call (all steps + the VAE decode, ``output_type="pt"``).

    Args:
        adapter: the model family's adapter.
        pipe: the loaded pipeline.
        embeds: pre-encoded prompts (``adapter.encode``); their batch is the number of images.
        num_steps: sampler steps.
        guidance_scale: CFG scale (> 1 doubles the denoiser batch).
        resolution: image side in pixels.
        warmup: untimed sampler calls first.
        iters: timed sampler calls.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms", "iters", "device"}`` plus ``"num_steps"``.
    """
    device = next(adapter.denoiser(pipe).parameters()).device
    num_images = len(next(iter(embeds.values())))

    def generate() -> Any:
        generators = [torch.Generator().manual_seed(i) for i in range(num_images)]
        return adapter.denoise(
            pipe, embeds, generators, num_steps, guidance_scale, resolution, output_type="pt"
        )

    return latency_stats(time_calls(generate, device, warmup, iters), device) | {"num_steps": num_steps}


def verdict(speedup: float, flop_speedup: float, device: torch.device) -> str:
    """One line on a dense → pruned comparison: ``"no speedup"`` below ``MIN_SPEEDUP``; CPU flagged first.

    Args:
        speedup: measured dense / pruned median latency.
        flop_speedup: dense / pruned FLOPs (the ideal speedup).
        device: where the timings were taken.
    """
    parts = [CPU_WARNING] if device.type == "cpu" else []
    if speedup < MIN_SPEEDUP:
        parts.append(f"no speedup ({speedup:.2f}x measured, {flop_speedup:.2f}x fewer FLOPs)")
    else:
        parts.append(f"{speedup:.2f}x faster ({flop_speedup:.2f}x fewer FLOPs)")
    return "; ".join(parts)
