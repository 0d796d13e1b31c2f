"""The group-wise sequential loop: calibrate a package, prune it, go on to the next one."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.prompts import load_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.hessian import HessianAccumulator
from obsdiff.models.base import ModelAdapter, StructuredUnit, slice_embeds
from obsdiff.packages import split_packages
from obsdiff.solvers import STRUCTURED_METHODS, Pattern, SolveResult, reconstruction_error
from obsdiff.solvers.l1 import l1_ffn_columns, l1_heads
from obsdiff.solvers.structured import (
    StructuredPattern,
    StructuredResult,
    remove_columns,
    remove_ffn_columns,
    remove_heads,
)


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
    sparsity: float  # fraction of zero weights; structured: fraction of columns removed
    damp_frac: float
    damp: float
    loss: float
    seconds: float  # solver time (calibration is shared by the package)


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
    """Prune the denoiser in place, layer by layer, package by package (METHOD.md §3).

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

    def prune_package(
        k: int, package: list, hessians: dict, status: Callable[[str], None]
    ) -> list[LayerRecord]:
        groups = [group for unit in package for group in unit]
        records = []
        for g, group in enumerate(groups):
            status(f"solving {g + 1}/{len(groups)}")
            acc = hessians[group[0]]
            records += [
                _prune_layer(denoiser, name, acc, k, pattern, solver, solver_options) for name in group
            ]
        return records

    def input_groups(package: list) -> list[tuple[str, ...]]:
        return [group for unit in package for group in unit]

    return _package_loop(adapter, pipe, calib, packages, input_groups, prune_package, on_package_done)


def prune_structured(
    adapter: ModelAdapter,
    pipe,
    calib: Calibration,
    pattern: StructuredPattern,
    num_packages: int,
    blocks: list[int],
    damp_frac: float = 0.01,
    compensate: bool = True,
    physical: bool = True,
    method: str = "obs",
    on_package_done: Callable[[list[LayerRecord]], None] | None = None,
) -> tuple[list[LayerRecord], dict[str, list[int]]]:
    """Remove attention heads and FFN neurons, package by package (METHOD.md §3–4).

    Each output projection / down-projection gets its own timestep-weighted Hessian. After a
    package is pruned its heads and neurons are deleted from the model (``physical=True``), so
    later packages calibrate on the smaller model; ``physical=False`` leaves them as zero
    columns (numerically the same model).

    Args:
        adapter: the model family's adapter.
        pipe: the loaded pipeline (its denoiser is modified in place).
        calib: encoded prompts and sampler settings.
        pattern: head and FFN ratios.
        num_packages: ``G``.
        blocks: block indices to prune.
        damp_frac: relative damping λ.
        compensate: apply the OBS update to the remaining columns (``False``: only remove).
        physical: slice the removed heads and neurons out of the model.
        method: how heads / neurons are chosen: ``"obs"`` (OBS saliency, iteratively) or ``"l1"``
            (smallest L1 norm, at once).
        on_package_done: called with the package's records.

    Returns:
        One record per OBS layer, and layer name → removed heads (output projections) or
        neurons (down-projections), in the dense model's indexing.
    """
    if method not in STRUCTURED_METHODS:
        raise KeyError(f"unknown structured method {method!r}; known: {list(STRUCTURED_METHODS)}")
    denoiser: nn.Module = adapter.denoiser(pipe)
    packages = split_packages(adapter.structured_units(denoiser, blocks), num_packages)
    if not packages:
        raise ValueError(f"no structured units in pruner.blocks={blocks}")
    removed: dict[str, list[int]] = {}

    def prune_package(
        k: int, package: list, hessians: dict, status: Callable[[str], None]
    ) -> list[LayerRecord]:
        records = []
        for u, unit in enumerate(package):
            status(f"solving {u + 1}/{len(package)}")
            records += _prune_unit(
                denoiser, unit, hessians, k, pattern, method, damp_frac, compensate, removed
            )
        if physical:
            for unit in package:
                adapter.remove_structure(denoiser, unit, {n: removed[n] for n in unit.layers})
        return records

    def input_groups(package: list) -> list[tuple[str, ...]]:
        return [(name,) for unit in package for name in unit.layers]

    records = _package_loop(adapter, pipe, calib, packages, input_groups, prune_package, on_package_done)
    return records, removed


def _package_loop(adapter, pipe, calib, packages, input_groups, prune_package, on_package_done):
    """The group-wise sequential loop: capture a package's Hessians, prune it, go on."""
    denoiser: nn.Module = adapter.denoiser(pipe)
    tracker = StepTracker(calib.timestep_weights)
    total = len(packages) * len(calib.seeds) * calib.num_steps
    records: list[LayerRecord] = []
    with tqdm(total=total, desc="calibrate+prune", unit="prompt-step", dynamic_ncols=True) as progress:
        for k, package in enumerate(packages):
            label = f"package {k + 1}/{len(packages)}"
            progress.set_postfix_str(label)
            with capture_hessians(denoiser, input_groups(package), tracker) as hessians:
                calibrate(adapter, pipe, calib, tracker, progress)
            package_records = prune_package(
                k, package, hessians, lambda msg, label=label: progress.set_postfix_str(f"{label}: {msg}")
            )
            del hessians  # a package's Hessians must not outlive it
            records += package_records
            if on_package_done is not None:
                on_package_done(package_records)
    return records


def _prune_layer(
    denoiser: nn.Module,
    name: str,
    acc: HessianAccumulator,
    package: int,
    pattern: Pattern,
    solver,
    options: dict | None,
) -> LayerRecord:
    layer = denoiser.get_submodule(name)
    W, H, options = layer.weight.data, acc.H, dict(options or {})
    if "moments" in inspect.signature(solver).parameters:  # DSnoT: per-column input mean / variance
        options["moments"] = acc.moments()
    t0 = time.perf_counter()
    result = solver(W, H, pattern, layer=name, **options)
    seconds = time.perf_counter() - t0
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
        seconds=seconds,
    )


def _prune_unit(
    denoiser: nn.Module,
    unit: StructuredUnit,
    hessians: dict,
    package: int,
    pattern: StructuredPattern,
    method: str,
    damp_frac: float,
    compensate: bool,
    removed: dict[str, list[int]],
) -> list[LayerRecord]:
    """Remove heads (jointly over the unit's projections) or FFN neurons (per layer) of one unit."""
    Ws = [denoiser.get_submodule(name).weight.data for name in unit.layers]
    Hs = [hessians[name].H for name in unit.layers]
    t0 = time.perf_counter()
    if unit.kind == "heads":
        d_h = unit.head_dim
        heads, layer = Ws[0].shape[1] // d_h, unit.layers[0]
        if method == "obs":
            res = remove_heads(Ws, Hs, d_h, pattern.num_heads(heads), damp_frac, compensate, layer=layer)
            chosen = sorted(res.removed)
            results = [
                StructuredResult(w, torch.tensor(chosen), f, loss)
                for w, f, loss in zip(res.weights, res.damp_frac_used, res.losses, strict=True)
            ]
        else:  # l1: the smallest-norm heads, removed at once
            chosen = sorted(l1_heads(Ws, d_h, pattern.num_heads(heads)))
            idx = torch.tensor([h * d_h + i for h in chosen for i in range(d_h)], dtype=torch.long)
            results = [
                remove_columns(W, H, idx, damp_frac, compensate, name)
                for W, H, name in zip(Ws, Hs, unit.layers, strict=True)
            ]
        cuts = [chosen] * len(Ws)
        fractions = [len(c) / heads for c in cuts]
    else:
        results = []
        for W, H, name in zip(Ws, Hs, unit.layers, strict=True):
            num = pattern.num_neurons(W.shape[1])
            if method == "obs":
                results.append(remove_ffn_columns(W, H, num, damp_frac, compensate, layer=name))
            else:
                results.append(remove_columns(W, H, l1_ffn_columns(W, num), damp_frac, compensate, name))
        cuts = [r.removed.tolist() for r in results]
        fractions = [len(c) / W.shape[1] for c, W in zip(cuts, Ws, strict=True)]
    seconds = (time.perf_counter() - t0) / len(Ws)  # a joint solve's time is split over its layers
    records = []
    for name, W, H, r, cut, fraction in zip(unit.layers, Ws, Hs, results, cuts, fractions, strict=True):
        W.copy_(r.weight)
        removed[name] = cut
        records.append(
            LayerRecord(
                name=name,
                rows=W.shape[0],
                cols=W.shape[1],
                package=package,
                sparsity=fraction,
                damp_frac=r.damp_frac_used,
                damp=r.damp_frac_used * float(torch.mean(torch.diag(H))),
                loss=r.loss,
                seconds=seconds,
            )
        )
    return records
