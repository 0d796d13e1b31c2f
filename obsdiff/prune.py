"""The group-wise sequential loop: calibrate a package, prune it, go on to the next one (docs/METHOD.md §3).

The loop knows no model family and no method: the adapter lists the units, the strategy
(``pruners/layerwise.py`` or ``pruners/structured.py``) says which layers of a unit share a
Hessian, prunes a calibrated unit and reshapes the model after a package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff import distributed, faults
from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.compiled import compiled
from obsdiff.calibration.hessian_cache import HessianCache
from obsdiff.calibration.prompts import load_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.checkpoint import PackageCheckpoints
from obsdiff.hessian import HessianAccumulator
from obsdiff.models.base import ModelAdapter, slice_embeds
from obsdiff.packages import split_by_bytes, split_packages
from obsdiff.plan import PackageBytes, packages_table, summarize_package, unit_bytes
from obsdiff.pruners.records import LayerRecord

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Pre-encoded calibration prompts and sampler settings.

    Args:
        embeds: the adapter's encoded prompts (CPU tensors, one row per prompt).
        seeds: one seed per prompt (per-prompt generators: batch size does not matter).
        num_steps: denoising steps ``T``.
        guidance_scale: the sampler's guidance scale (its meaning is the adapter's CFG rule).
        resolution: image side in pixels.
        batch_size: prompts per sampler call.
        timestep_weights: ``α_0 … α_{T-1}``.
        compile: run the denoiser through ``torch.compile`` while Hessians accumulate.
    """

    embeds: dict
    seeds: list[int]
    num_steps: int
    guidance_scale: float
    resolution: int
    batch_size: int
    timestep_weights: list[float]
    compile: bool = False


class Strategy(Protocol):
    """What the loop needs from a pruning strategy."""

    def units(self, adapter: ModelAdapter, denoiser: nn.Module) -> list[Any]: ...

    def input_groups(self, unit: Any) -> list[tuple[str, ...]]: ...

    def prune_unit(
        self, denoiser: nn.Module, unit: Any, hessians: dict[str, HessianAccumulator], package: int
    ) -> list[LayerRecord]: ...

    def after_package(self, adapter: ModelAdapter, denoiser: nn.Module, package: list[Any]) -> None: ...

    def modules(self, unit: Any) -> list[str]: ...

    def package_state(self, package: list[Any]) -> dict: ...

    def restore(
        self, adapter: ModelAdapter, denoiser: nn.Module, package: list[Any], state: dict
    ) -> None: ...


class NonFiniteError(RuntimeError):
    """A Hessian or a pruned weight holds NaN or Inf: the run stops before writing anything."""


def prepare_calibration(adapter: ModelAdapter, pipe: Any, calibration: Any, schedule: Any) -> Calibration:
    """Load and encode the calibration prompts once, with per-prompt seeds and the α schedule."""
    c, sch = calibration, schedule
    prompts = load_prompts(c.source, c.num_prompts, c.path, c.column, c.dataset, c.split)
    return Calibration(
        embeds=adapter.encode(pipe, prompts, c.guidance_scale, c.batch_size),
        seeds=[c.seed + i for i in range(c.num_prompts)],
        num_steps=c.num_steps,
        guidance_scale=c.guidance_scale,
        resolution=c.resolution,
        batch_size=c.batch_size,
        timestep_weights=timestep_weights(sch.name, c.num_steps, sch.alpha_min, sch.alpha_max),
        compile=c.get("compile", False),
    )


def calibrate(
    adapter: ModelAdapter,
    pipe: Any,
    calib: Calibration,
    tracker: StepTracker,
    progress: tqdm,
    stage: str = "",
) -> None:
    """Run every calibration prompt through the full sampler (latents only, no VAE decode).

    ``stage`` names the calibration for :func:`obsdiff.faults.reached` (tests kill a run there).
    """
    num_prompts = len(calib.seeds)
    for start in range(0, num_prompts, calib.batch_size):
        stop = min(start + calib.batch_size, num_prompts)
        generators = [torch.Generator("cpu").manual_seed(s) for s in calib.seeds[start:stop]]
        tracker.reset()

        def on_step(n: int = stop - start) -> None:
            progress.update(n)
            faults.reached(stage)

        tracker.on_step = on_step
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


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls without TF32 (or bf16 passes) while Hessians accumulate and solves run, as the
    reference code does, whatever precision the user or a library set; restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def prune_groupwise(
    adapter: ModelAdapter,
    pipe: Any,
    calib: Calibration,
    strategy: Strategy,
    num_packages: int,
    on_package_done: Callable[[list[LayerRecord]], None] | None = None,
    checkpoints: PackageCheckpoints | None = None,
    hessian_cache: HessianCache | None = None,
    package_bytes: int | None = None,
) -> list[LayerRecord]:
    """Prune the denoiser in place, package by package.

    1. Units (adapter + strategy) are cut into ``num_packages`` contiguous packages, or into as
       many as hold at most ``package_bytes`` of Hessians each (:func:`make_packages`).
    2. Packages finished by an earlier, killed run (``checkpoints``) are restored, not redone.
    3. For each remaining package: hook its input groups → run the whole calibration set through
       the sampler → remove the hooks → check the Hessians → prune every unit → let the strategy
       reshape the model → free the package's Hessians → checkpoint it → report its records.

    Package ``k`` is calibrated on the model in which packages ``< k`` are already pruned; inside
    a package every layer sees dense upstream activations. With ``hessian_cache`` the first
    package's Hessians (dense model) are read from it when a run with the same model and
    calibration stored them, else calibrated and stored.

    fp32 matmuls run at full precision throughout (:func:`exact_fp32`: no TF32).

    Raises:
        NonFiniteError: A Hessian or a pruned weight is not finite (names the layer).

    Returns:
        One record per pruned layer.
    """
    with exact_fp32():
        return _prune_groupwise(adapter, pipe, calib, strategy, num_packages, on_package_done, checkpoints,
                                hessian_cache, package_bytes)  # fmt: skip


def _prune_groupwise(
    adapter: ModelAdapter,
    pipe: Any,
    calib: Calibration,
    strategy: Strategy,
    num_packages: int,
    on_package_done: Callable[[list[LayerRecord]], None] | None,
    checkpoints: PackageCheckpoints | None,
    hessian_cache: HessianCache | None,
    package_bytes: int | None,
) -> list[LayerRecord]:
    denoiser: nn.Module = adapter.denoiser(pipe)
    offload = adapter.offload  # model.offload=group: Hessians and solves on its run device
    packages = make_packages(adapter, denoiser, strategy, num_packages, package_bytes)
    if not packages:
        raise ValueError("no target layers or structure groups matched pruner.targets / pruner.blocks")
    log.info(
        "packages (before calibration):\n%s", packages_table(package_summaries(denoiser, strategy, packages))
    )
    calib = distributed.shard(calib)  # data-parallel: this rank's prompts (obsdiff.distributed)
    records: list[LayerRecord] = []
    finished = 0 if checkpoints is None else checkpoints.finished(len(packages))
    for k in range(finished):  # the dense model gets the finished packages' shapes, then weights
        package_records, state = checkpoints.record(k)
        strategy.restore(adapter, denoiser, packages[k], state)
        checkpoints.load(k, denoiser)
        records += package_records
        if on_package_done is not None:
            on_package_done(package_records)
    if finished:
        log.info("resumed: packages 1-%d of %d restored from %s", finished, len(packages), checkpoints.folder)
    tracker = StepTracker(calib.timestep_weights)
    total = (len(packages) - finished) * len(calib.seeds) * calib.num_steps
    with tqdm(total=total, desc="calibrate+prune", unit="prompt-step", dynamic_ncols=True) as progress:
        for k in range(finished, len(packages)):
            package, label, start = packages[k], f"package {k + 1}/{len(packages)}", time.perf_counter()
            progress.set_postfix_str(label)
            groups = [group for unit in package for group in strategy.input_groups(unit)]

            def capture(k: int = k, groups: list = groups) -> dict[str, HessianAccumulator]:
                with (
                    capture_hessians(denoiser, groups, tracker, offload.onload_device) as hessians,
                    offload.sampling(denoiser),
                    compiled(denoiser, calib.compile),
                ):
                    calibrate(adapter, pipe, calib, tracker, progress, stage=f"calibrate:{k}")
                distributed.all_reduce_hessians(hessians)  # data-parallel: every rank's prompts
                return hessians

            if k == 0 and hessian_cache is not None:
                devices = [denoiser.get_submodule(group[0]).weight.device for group in groups]
                devices = [offload.onload_device or device for device in devices]  # offloaded: the run device
                hessians, cached = hessian_cache.get(groups, calib, devices, capture)
                if cached:
                    progress.update(len(calib.seeds) * calib.num_steps)
            else:
                hessians = capture()
            _check_finite("Hessian", {name: acc.H for name, acc in hessians.items()})
            modules = [name for unit in package for name in strategy.modules(unit)]
            offload.onload(denoiser, modules)  # the package's layers on the run device for the solve
            package_records = []
            if distributed.world_size() > 1:  # data-parallel: the ranks share the solves (no loop below)
                package_records = distributed.prune_package(strategy, denoiser, package, hessians, k)
            for u, unit in enumerate(package if distributed.world_size() == 1 else []):
                progress.set_postfix_str(f"{label}: solving {u + 1}/{len(package)}")
                package_records += strategy.prune_unit(denoiser, unit, hessians, k)
                faults.reached(f"solve:{k}")
            _check_finite("pruned weight", {n: denoiser.get_submodule(n).weight for n in modules})
            strategy.after_package(adapter, denoiser, package)
            offload.offload(denoiser, modules)  # where the next sampler run copies them from
            del hessians  # a package's Hessians must not outlive it
            if checkpoints is not None and distributed.is_main():  # data-parallel: rank 0 writes
                checkpoints.save(k, denoiser, modules, package_records, strategy.package_state(package))
            records += package_records
            if on_package_done is not None:
                on_package_done(package_records)
            log.info("%s done: %d layers in %.1f s", label, len(package_records), time.perf_counter() - start)
    return records


def _check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteError` naming the first layer whose tensor holds NaN or Inf."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{what} of layer {name} holds NaN or Inf; nothing was written. Check the model's dtype "
                "(fp16 overflows: try model.torch_dtype=bfloat16 or float32) and the calibration settings."
            )


def make_packages(
    adapter: ModelAdapter,
    denoiser: nn.Module,
    strategy: Strategy,
    num_packages: int,
    package_bytes: int | None,
) -> list[list[Any]]:
    """The units cut into packages: ``num_packages`` even ones, or as many as fit ``package_bytes``
    of fp32 Hessians each (shared inputs once); works on ``meta``."""
    units = strategy.units(adapter, denoiser)
    if package_bytes is None:
        return split_packages(units, num_packages)
    return split_by_bytes(
        units, [unit_bytes(denoiser, strategy.input_groups(u)) for u in units], package_bytes
    )


def package_summaries(
    denoiser: nn.Module, strategy: Strategy, packages: list[list[Any]]
) -> list[PackageBytes]:
    """Layers and bytes per package (shared inputs counted once); works on ``meta``."""
    return [
        summarize_package(
            denoiser, [g for unit in package for g in strategy.input_groups(unit)], k, len(package)
        )
        for k, package in enumerate(packages)
    ]
