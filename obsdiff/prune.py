"""The group-wise sequential loop: calibrate a package, prune it, go on to the next one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.prompts import load_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.models.base import ModelAdapter, slice_embeds
from obsdiff.packages import split_packages
from obsdiff.solvers import Pattern, SolveResult, reconstruction_error


@dataclass
class Calibration:
    """Pre-encoded calibration prompts and sampler settings.

    Args:
        embeds: the adapter's encoded prompts (CPU tensors, one row per prompt).
        seeds: one seed per prompt (per-prompt generators: batch size does not matter).
        num_steps: denoising steps ``T``.
        guidance_scale: CFG scale; > 1 doubles the denoiser batch.
        resolution: image side in pixels.
        batch_size: prompts per sampler call.
        timestep_weights: ``α_0 … α_{T-1}``.
    """

    embeds: dict
    seeds: list[int]
    num_steps: int
    guidance_scale: float
    resolution: int
    batch_size: int
    timestep_weights: list[float]


@dataclass
class LayerRecord:
    """One row of ``layers.csv``."""

    name: str
    rows: int
    cols: int
    package: int
    sparsity: float
    damp_frac: float
    damp: float
    loss: float
    seconds: float


def prepare_calibration(adapter: ModelAdapter, pipe, cfg) -> Calibration:
    """Load and encode the calibration prompts once, with per-prompt seeds and the α schedule."""
    c, sch = cfg.calibration, cfg.schedule
    prompts = load_prompts(c.source, c.num_prompts, c.path, c.column, c.dataset, c.split)
    return Calibration(
        embeds=adapter.encode(pipe, prompts, c.guidance_scale, c.batch_size, cfg.model.max_sequence_length),
        seeds=[c.seed + i for i in range(c.num_prompts)],
        num_steps=c.num_steps,
        guidance_scale=c.guidance_scale,
        resolution=c.resolution,
        batch_size=c.batch_size,
        timestep_weights=timestep_weights(sch.name, c.num_steps, sch.alpha_min, sch.alpha_max),
    )


def calibrate(adapter: ModelAdapter, pipe, calib: Calibration, tracker: StepTracker, progress: tqdm) -> None:
    """Run every calibration prompt through the full sampler (latents only, no VAE decode)."""
    num_prompts = len(calib.seeds)
    for start in range(0, num_prompts, calib.batch_size):
        stop = min(start + calib.batch_size, num_prompts)
        generators = [torch.Generator("cpu").manual_seed(s) for s in calib.seeds[start:stop]]
        tracker.reset()
        tracker.on_step = lambda n=stop - start: progress.update(n)
        adapter.denoise(
            pipe,
            slice_embeds(calib.embeds, start, stop),
            generators,
            calib.num_steps,
            calib.guidance_scale,
            calib.resolution,
            callback=tracker.callback,
            output_type="latent",
        )
        if tracker.step != calib.num_steps:
            raise RuntimeError(f"sampler ran {tracker.step} steps, expected {calib.num_steps}")


def prune_model(
    adapter: ModelAdapter,
    pipe,
    calib: Calibration,
    pattern: Pattern,
    solver: Callable[..., SolveResult],
    num_packages: int,
    targets: list[str],
    blocks: list[int] | None = None,
    solver_options: dict | None = None,
    on_package_done: Callable[[list[LayerRecord]], None] | None = None,
) -> list[LayerRecord]:
    """Prune the denoiser in place, package by package (METHOD.md §3).

    Package ``k`` is calibrated on the model in which packages ``< k`` are already pruned;
    inside a package every layer sees dense upstream activations. Hessians of one package
    are alive at a time.

    Args:
        adapter: the model family's adapter.
        pipe: the loaded pipeline (its denoiser is modified in place).
        calib: encoded prompts and sampler settings.
        pattern: the sparsity pattern.
        solver: ``(W, H, pattern, **solver_options) -> SolveResult``.
        num_packages: ``G``.
        targets: target layer names relative to a block.
        blocks: block indices to prune (``None`` = all).
        solver_options: extra keyword arguments for the solver (damping, block size).
        on_package_done: called with the package's records (e.g. to append to ``layers.csv``).

    Returns:
        One record per pruned layer.
    """
    denoiser: nn.Module = adapter.denoiser(pipe)
    packages = split_packages(adapter.units(denoiser, blocks, targets), num_packages)
    if not packages:
        raise ValueError(f"no target layers matched: pruner.targets={targets}, pruner.blocks={blocks}")
    tracker = StepTracker(calib.timestep_weights)
    total = len(packages) * len(calib.seeds) * calib.num_steps
    records: list[LayerRecord] = []
    with tqdm(total=total, desc="calibrate+prune", unit="prompt-step", dynamic_ncols=True) as progress:
        for k, package in enumerate(packages):
            groups = [group for unit in package for group in unit]
            progress.set_postfix_str(f"package {k + 1}/{len(packages)}")
            with capture_hessians(denoiser, groups, tracker) as hessians:
                calibrate(adapter, pipe, calib, tracker, progress)
            package_records = []
            for group in groups:
                H = hessians[group[0]].H
                for name in group:
                    package_records.append(
                        _prune_layer(denoiser, name, H, k, pattern, solver, solver_options)
                    )
            del hessians
            records += package_records
            if on_package_done is not None:
                on_package_done(package_records)
    return records


def _prune_layer(
    denoiser: nn.Module,
    name: str,
    H: torch.Tensor,
    package: int,
    pattern: Pattern,
    solver,
    options: dict | None,
) -> LayerRecord:
    layer = denoiser.get_submodule(name)
    W = layer.weight.data
    t0 = time.perf_counter()
    result = solver(W, H, pattern, layer=name, **(options or {}))
    loss = reconstruction_error(W, result.weight, H)
    W.copy_(result.weight)
    return LayerRecord(
        name=name,
        rows=W.shape[0],
        cols=W.shape[1],
        package=package,
        sparsity=float((W == 0).float().mean()),
        damp_frac=result.damp_frac,
        damp=result.damp,
        loss=loss,
        seconds=time.perf_counter() - t0,
    )
