"""The memory plan: what pruning will hold on the device, in bytes, before any weight loads.

Built from the model's config alone, on a ``meta`` denoiser (no memory): per package its layers,
their weights, the fp32 Hessians (an input read by several layers counted once), the largest
transient of a Hessian hook and of a layer solve; for the whole run the denoiser's weights and the
activations of one calibration forward (measured on ``meta`` by :class:`LiveBytes`, at the
calibration batch, CFG-doubled, and resolution). A package's peak is

    weights + its Hessians + max(activations + hook transient, solve transient)

The VAE and the text encoders are not counted: the sampler runs latents only during calibration and
the text encoders leave the device after encoding. ``LiveBytes`` is also how tests and
``bench/prune_sd3_shape.py`` measure a real run's peak on the CPU (on a GPU:
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from obsdiff.config.fields import ConfigError
from obsdiff.layers import columns, layer_input, matrix
from obsdiff.packages import split_by_bytes

# fp32 (cols, cols) matrices alive at once while a Hessian is damped and factorised: the copy,
# the identity, the damped sum, the Cholesky factor, its inverse, the inverse's factor and the
# finiteness check, and H⁻¹ kept for structured removals (measured with LiveBytes on
# obsdiff.solvers.layer_solver: 7.75).
FACTOR_MATRICES = 8
# fp32 (rows, cols) matrices alive at once in a solve beside its factor: the working copy, the
# block copies, the pruned result and mask, the loss's ΔW, ΔW·H and W·H (measured: 7.45).
SOLVE_MATRICES = 8
# Share of the device a plan may fill: the allocator's fragmentation and the CUDA context need
# the rest.
USABLE = 0.9


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, among those created while the mode is on.

    Works on ``meta`` tensors (shapes only) as on real ones; a storage counts from the op that
    created it until it is freed, however many views share it (a view or an in-place result of a
    tensor made before the mode, such as a weight, is not new memory).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._alive and key not in inputs:  # views and in-place results are not new
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def hessian_bytes(layer: nn.Module) -> int:
    """One accumulator: the fp32 (cols, cols) ``H`` and the fp64 column sums (DSnoT's moments)."""
    cols = columns(layer)
    return 4 * cols * cols + 8 * cols


def unit_bytes(denoiser: nn.Module, groups: Sequence[tuple[str, ...]]) -> int:
    """Hessian bytes of a unit's input groups (one accumulator per group)."""
    return sum(hessian_bytes(denoiser.get_submodule(group[0])) for group in groups)


@dataclass
class PackageBytes:
    """One package while it is calibrated and solved."""

    package: int
    units: int
    layers: int
    hessians: int  # distinct inputs: one fp32 Hessian each
    hessian_bytes: int
    weight_bytes: int  # the package's target layers' weights (part of the denoiser's)
    hook_bytes: int  # largest transient of a Hessian hook: the input as fp32, scaled
    solve_bytes: int  # largest transient of a solve: the factorisation, or a group's weights
    device: str  # where the Hessians live (the layers' weight device)
    shared: list[tuple[str, str, int]] = field(default_factory=list)  # model-wide groups


@dataclass
class MemoryPlan:
    """The device memory of a prune, before anything loads."""

    device: str
    capacity_bytes: int | None  # the device's memory (None: unknown)
    denoiser_bytes: int  # parameters and buffers at the run dtype
    activation_bytes: int  # one calibration forward, inputs included
    batch: int  # rows of a calibration denoiser call (CFG-doubled)
    resolution: int
    packages: list[PackageBytes]
    onloaded_bytes: int | None = None  # model.offload=group: the largest block + the modules outside blocks

    def package_peak(self, p: PackageBytes) -> int:
        calibrate = self.activation_bytes + p.hook_bytes
        if (
            self.onloaded_bytes is not None
        ):  # one block on the device while sampling; the package's layers to solve
            return p.hessian_bytes + max(self.onloaded_bytes + calibrate, p.weight_bytes + p.solve_bytes)
        return self.denoiser_bytes + p.hessian_bytes + max(calibrate, p.solve_bytes)

    @property
    def peak_bytes(self) -> int:
        return max(self.package_peak(p) for p in self.packages)

    @property
    def largest(self) -> PackageBytes:
        return max(self.packages, key=self.package_peak)

    def to_dict(self) -> dict:
        return asdict(self) | {
            "peak_bytes": self.peak_bytes,
            "package_peaks": [self.package_peak(p) for p in self.packages],
        }

    def metrics(self) -> dict:
        """Flat ``plan/*`` numbers for ``metrics.json`` and W&B."""
        largest = self.largest
        return {
            "plan/peak_bytes": self.peak_bytes,
            "plan/num_packages": len(self.packages),
            "plan/hessian_bytes_largest": largest.hessian_bytes,
            "plan/hessian_bytes_total": sum(p.hessian_bytes for p in self.packages),
            "plan/denoiser_bytes": self.denoiser_bytes,
            "plan/activation_bytes": self.activation_bytes,
            "plan/device": self.device,
            "plan/offloaded": self.onloaded_bytes is not None,
        }

    def table(self) -> str:
        """One line per package, then the peak against the device."""
        total = sum(p.hessian_bytes for p in self.packages)
        capacity = "unknown" if self.capacity_bytes is None else _gb(self.capacity_bytes)
        return "\n".join([
            packages_table(self.packages, [self.package_peak(p) for p in self.packages]),
            f"denoiser weights {_gb(self.denoiser_bytes)}; activations {_gb(self.activation_bytes)} "
            f"(batch {self.batch}, {self.resolution} px); Hessians of all packages {_gb(total)}",
            f"peak {_gb(self.peak_bytes)} (package {self.largest.package}) on {self.device} of {capacity}",
        ])  # fmt: skip


def packages_table(packages: list[PackageBytes], peaks: list[int] | None = None) -> str:
    """One line per package (its peak when known); then every model-wide shared input group."""
    lines = [f"{'package':>8} {'units':>6} {'layers':>7} {'hessians':>9} {'Hessians':>10} {'weights':>10} "
             f"{'solve':>10}" + (f" {'peak':>10}" if peaks else "") + "  device"]  # fmt: skip
    for i, p in enumerate(packages):
        peak = f" {_gb(peaks[i]):>10}" if peaks else ""
        lines.append(f"{p.package:>8} {p.units:>6} {p.layers:>7} {p.hessians:>9} {_gb(p.hessian_bytes):>10} "
                     f"{_gb(p.weight_bytes):>10} {_gb(p.solve_bytes):>10}{peak}  {p.device}")  # fmt: skip
    for p in packages:
        for first, last, count in p.shared:
            lines.append(
                f"package {p.package}: one Hessian for {count} layers reading one input ({first} ... {last})"
            )
    return "\n".join(lines)


class PlanError(ConfigError):
    """The plan does not fit the device; the message names the knob to change and its value."""


# Layers of one block that read one input: at most 4 (Flux single blocks: q, k, v, proj_mlp); a
# larger group is shared across blocks (the UNet / PixArt cross-attention K/V) and the plan says so.
MAX_BLOCK_GROUP = 4


def summarize_package(denoiser: nn.Module, groups: list[tuple[str, ...]], k: int, units: int) -> PackageBytes:
    """Bytes of one package from its input groups (works on ``meta``)."""
    firsts = [denoiser.get_submodule(group[0]) for group in groups]
    layers = [denoiser.get_submodule(name) for group in groups for name in group]
    solve = 0
    for group, first in zip(groups, firsts, strict=True):
        cols = columns(first)
        rows = sum(matrix(denoiser.get_submodule(n)).shape[0] for n in group)
        solve = max(
            solve, 4 * FACTOR_MATRICES * cols * cols, 4 * cols * cols + 4 * SOLVE_MATRICES * rows * cols
        )
    return PackageBytes(
        package=k, units=units, layers=len(layers), hessians=len(groups),
        hessian_bytes=sum(hessian_bytes(m) for m in firsts),
        weight_bytes=sum(m.weight.numel() * m.weight.element_size() for m in layers),
        hook_bytes=0, solve_bytes=solve,
        device=", ".join(sorted({str(m.weight.device) for m in firsts})),
        shared=[(g[0], g[-1], len(g)) for g in groups if len(g) > MAX_BLOCK_GROUP],
    )  # fmt: skip


class FusedAttention(TorchFunctionMode):
    """On ``meta``, ``scaled_dot_product_attention`` as the fused kernels the real run uses (CPU
    flash, CUDA flash / memory-efficient): the output only, no (tokens, tokens) score matrix."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
            query, value = named["query"], named["value"]
            if query.device.type == "meta":
                return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device="meta")
        return func(*args, **kwargs)


def measure_forward(
    denoiser: nn.Module, inputs: dict, groups: list[tuple[str, ...]]
) -> tuple[int, dict[str, int]]:
    """Peak bytes of one no-grad forward (inputs included) and, per group's first layer, the bytes
    of what a Hessian hook makes of its input (``HessianAccumulator.add``: fp32, scaled)."""
    seen: dict[str, int] = {}
    hooks = []
    for group in groups:

        def hook(module: nn.Module, args: tuple, name: str = group[0]) -> None:
            x = layer_input(module, args[0])
            copies = 1 if x.dtype == torch.float32 else 2  # the fp32 copy, then its scaled copy
            seen[name] = max(seen.get(name, 0), copies * 4 * x.numel())

        hooks.append(denoiser.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), FusedAttention(), LiveBytes() as live:
            denoiser(**inputs)
    finally:
        for handle in hooks:
            handle.remove()
    extra = sum(t.untyped_storage().nbytes() for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor))
    return live.peak + extra, seen


def build_plan(
    denoiser: nn.Module,
    packages: list[list[Any]],
    input_groups: Any,
    inputs: dict,
    *,
    device: str,
    batch: int,
    resolution: int,
    capacity: int | None,
    offloaded: bool = False,
) -> MemoryPlan:
    """The plan of ``packages`` of units of ``denoiser`` (a ``meta`` one at the run dtype: shapes only).

    Args:
        input_groups: unit → its input groups (the strategy's).
        inputs: one calibration forward's keyword inputs (``meta`` tensors).
        device: where the run puts the denoiser and its Hessians.
        offloaded: ``model.offload=group``: the weights wait on the CPU, one block at a time on ``device``.
    """
    all_groups = [group for package in packages for unit in package for group in input_groups(unit)]
    activations, hook = measure_forward(denoiser, inputs, all_groups)
    plans = []
    for k, package in enumerate(packages):
        groups = [group for unit in package for group in input_groups(unit)]
        p = summarize_package(denoiser, groups, k, len(package))
        p.hook_bytes = max((hook.get(g[0], 0) for g in groups), default=0)
        p.device = device
        plans.append(p)
    weights = _bytes(denoiser)
    onloaded = None
    if offloaded:
        blocks = [m for module in denoiser.children() if isinstance(module, nn.ModuleList) for m in module]
        onloaded = max(map(_bytes, blocks), default=0) + weights - sum(map(_bytes, blocks))
    return MemoryPlan(device, capacity, weights, activations, batch, resolution, plans, onloaded)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def device_capacity(device: torch.device) -> int | None:
    """Total memory of ``device`` (a GPU's, or the machine's RAM for the CPU); no weights needed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(plan: MemoryPlan, unit_sizes: Sequence[int], batch_size: int) -> None:
    """Raise :class:`PlanError` when the plan's peak exceeds ``USABLE`` of the device, saying what
    to set: ``pruner.package_bytes`` (the Hessian budget that fits), else a smaller calibration batch,
    else ``model.offload=group``."""
    if plan.capacity_bytes is None or plan.peak_bytes <= USABLE * plan.capacity_bytes:
        return
    usable = int(USABLE * plan.capacity_bytes)
    largest = plan.largest
    head = (
        f"the memory plan needs {_gb(plan.peak_bytes)} on {plan.device} (package {largest.package}: Hessians "
        f"{_gb(largest.hessian_bytes)}, denoiser {_gb(plan.denoiser_bytes)}, activations "
        f"{_gb(plan.activation_bytes)}); {int(100 * USABLE)}% of the device is {_gb(usable)}"
    )
    resident = (
        plan.denoiser_bytes if plan.onloaded_bytes is None else plan.onloaded_bytes + largest.weight_bytes
    )
    fixed = resident + max(plan.activation_bytes + largest.hook_bytes, largest.solve_bytes)
    budget = usable - fixed
    if budget >= max(unit_sizes):
        count = len(split_by_bytes(list(unit_sizes), unit_sizes, budget))
        raise PlanError(f"{head}: set pruner.package_bytes={budget} (about pruner.num_packages={count})")
    if plan.activation_bytes > largest.solve_bytes and batch_size > 1:
        scale = max(1, math.floor(batch_size * (usable - plan.denoiser_bytes - max(unit_sizes)) /
                                  max(plan.activation_bytes, 1)))  # fmt: skip
        if scale < batch_size and usable - plan.denoiser_bytes > max(unit_sizes):
            raise PlanError(f"{head}: set calibration.batch_size={scale} and pruner.package_bytes to fit")
    if plan.onloaded_bytes is None:
        raise PlanError(f"{head}: one unit does not fit beside the weights; set model.offload=group")
    raise PlanError(f"{head}: one unit does not fit even with model.offload=group; use a larger device")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"
