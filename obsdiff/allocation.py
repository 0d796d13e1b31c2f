"""Non-uniform sparsity allocation (``sparsity.allocation``): one global target, split per block or layer.

``uniform`` (the default): every target layer gets ``sparsity.ratio``; nothing here runs.
``owl``: OWL's outlier-weighted split (``obsdiff.solvers.owl``): blocks whose Wanda scores
``|W| · ‖X‖₂`` hold more outliers are pruned less, within ``ratio ± λ``, and the removals over all
target layers add up to ``round(ratio · Σ n_l)`` exactly (integer counts per layer, each solved
with :attr:`obsdiff.solvers.obs.Pattern.count`).

OWL needs every layer's outlier ratio before the first package is pruned, while the group-wise
loop calibrates package ``k`` only after packages ``< k`` are pruned. So a dense pre-pass runs
first: the whole calibration set (the same prompts, seeds and α weights) through the sampler once,
with one hook per input group of every target layer that keeps only ``diag(H)``
(:class:`obsdiff.hessian.DiagonalAccumulator`, O(cols) per group, no Hessian). Its cost is one
sampler pass over the calibration set plus a squared-sum per hooked input; the package
calibrations that follow are unchanged. As in the reference (luuyin/OWL), the outlier ratios
come from the dense model; a resumed run repeats the pre-pass on the reloaded dense model and gets
the same split.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.timesteps import StepTracker
from obsdiff.hessian import DiagonalAccumulator
from obsdiff.layers import matrix
from obsdiff.models.base import ModelAdapter
from obsdiff.solvers.obs import Pattern
from obsdiff.solvers.owl import apportion, global_count, outlier_ratio, owl_sparsities

log = logging.getLogger(__name__)


@dataclass
class Allocation:
    """The split of one global target over OWL's "layers" (blocks, or single target layers).

    Args:
        method: ``sparsity.allocation``.
        granularity: ``block`` or ``layer``.
        target: the global sparsity.
        groups: one label per OWL layer (``block 3``, or the layer's name).
        members: the target layers of each group.
        outlier_ratios: each group's LOD (fraction of scores above ``M × mean``).
        sparsities: each group's sparsity before integer rounding.
        sizes: weights per target layer.
        counts: removals per target layer (they sum to ``round(target · Σ sizes)``).
        options: the rule's parameters (``threshold_m``, ``lam``).
        seconds: the dense pre-pass and the rule.
    """

    method: str
    granularity: str
    target: float
    groups: list[str]
    members: list[list[str]]
    outlier_ratios: list[float]
    sparsities: list[float]
    sizes: dict[str, int]
    counts: dict[str, int]
    options: dict[str, Any]
    seconds: float = 0.0

    def patterns(self, base: Pattern) -> dict[str, Pattern]:
        """One unstructured pattern per target layer: its exact count (and its ratio, for reports)."""
        return {
            name: dataclasses.replace(base, ratio=count / self.sizes[name], count=count)
            for name, count in self.counts.items()
        }

    @property
    def achieved(self) -> float:
        """The global sparsity the counts give."""
        return sum(self.counts.values()) / sum(self.sizes.values())

    def to_dict(self) -> dict[str, Any]:
        """``allocation.json``: the rule, every group's LOD and sparsity, every layer's count."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "target": self.target,
            "achieved": self.achieved,
            "removed": sum(self.counts.values()),
            "weights": sum(self.sizes.values()),
            "options": self.options,
            "seconds": self.seconds,
            "groups": [
                {"name": g, "outlier_ratio": lod, "sparsity": s, "layers": layers}
                for g, lod, s, layers in zip(
                    self.groups, self.outlier_ratios, self.sparsities, self.members, strict=True
                )
            ],
            "layers": {
                n: {"weights": self.sizes[n], "removed": k, "sparsity": k / self.sizes[n]}
                for n, k in self.counts.items()
            },
        }

    def table(self) -> str:
        """One line per group: its LOD and its sparsity (the log)."""
        width = max(len(g) for g in self.groups)
        lines = [f"{'group':<{width}}  outliers  sparsity"]
        lines += [
            f"{g:<{width}}  {100 * lod:7.3f}%  {100 * s:7.3f}%"
            for g, lod, s in zip(self.groups, self.outlier_ratios, self.sparsities, strict=True)
        ]
        return "\n".join(lines)


def allocation_groups(adapter: ModelAdapter, denoiser: nn.Module, spec: Any) -> list[tuple[str, list[str]]]:
    """OWL's "layers": ``(label, target layer names)`` per block, or one per target layer.

    Raises:
        ValueError: the blocks' target layers are not exactly the run's target layers.
    """
    names = _layer_names(adapter.units(denoiser, spec.blocks, spec.targets))
    if spec.allocation_granularity == "layer":
        return [(name, [name]) for name in names]
    blocks = spec.blocks if spec.blocks is not None else range(adapter.num_blocks(spec.denoiser_config))
    groups = [(f"block {b}", _layer_names(adapter.units(denoiser, [b], spec.targets))) for b in blocks]
    groups = [(label, members) for label, members in groups if members]
    flat = [name for _, members in groups for name in members]
    if sorted(flat) != sorted(names):
        raise ValueError(
            "the blocks' target layers differ from the run's target layers; "
            "use sparsity.allocation_granularity=layer for this model"
        )
    return groups


def _layer_names(units: list) -> list[str]:
    return list(dict.fromkeys(name for unit in units for group in unit for name in group))


def column_norms(
    adapter: ModelAdapter, pipe: Any, calib: Any, groups: list[tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """The dense pre-pass: ``sqrt(diag H)`` (timestep-weighted ``‖X_j‖₂``) of every layer in ``groups``.

    One run of the whole calibration set through the sampler, the hooks keeping only ``diag(H)``.
    """
    from obsdiff.prune import calibrate, exact_fp32  # the loop's sampler run, not a copy of it

    denoiser, offload = adapter.denoiser(pipe), adapter.offload
    tracker = StepTracker(calib.timestep_weights)
    total = len(calib.seeds) * calib.num_steps
    with (
        exact_fp32(),
        tqdm(total=total, desc="allocation pre-pass", unit="prompt-step", dynamic_ncols=True) as progress,
        capture_hessians(denoiser, groups, tracker, offload.onload_device, DiagonalAccumulator) as diags,
        offload.sampling(denoiser),
    ):
        calibrate(adapter, pipe, calib, tracker, progress, stage="allocation")
    return {name: acc.diag.clamp_min(0).sqrt().float() for name, acc in diags.items()}


def owl_allocation(adapter: ModelAdapter, pipe: Any, calib: Any, spec: Any) -> Allocation:
    """OWL's split of ``spec.ratio``: the dense pre-pass, each group's LOD, the rule, integer counts.

    Args:
        adapter: the family adapter.
        pipe: the loaded, dense pipeline.
        calib: the run's calibration (:class:`obsdiff.prune.Calibration`).
        spec: the run spec (``ratio``, ``blocks``, ``targets``, ``allocation_granularity``, ``owl``).
    """
    start = time.perf_counter()
    denoiser = adapter.denoiser(pipe)
    groups = allocation_groups(adapter, denoiser, spec)
    units = adapter.units(denoiser, spec.blocks, spec.targets)
    norms = column_norms(adapter, pipe, calib, [g for unit in units for g in unit])
    sizes, lods = {}, []
    for _, members in groups:
        scores = []
        for name in members:
            W = matrix(denoiser.get_submodule(name)).detach()  # (rows, cols); conv: unfolded
            scores.append(W.float().abs() * norms[name].to(W.device).reshape(1, -1))  # Wanda |W|·‖X‖
            sizes[name] = W.numel()
        lods.append(outlier_ratio(scores, spec.owl["threshold_m"]))
        del scores
    group_sizes = [sum(sizes[n] for n in members) for _, members in groups]
    sparsities = owl_sparsities(lods, group_sizes, spec.ratio, spec.owl["lam"])
    names = [n for _, members in groups for n in members]
    shares = [s * sizes[n] for (_, members), s in zip(groups, sparsities, strict=True) for n in members]
    counts = apportion(shares, [sizes[n] for n in names], global_count(spec.ratio, list(sizes.values())))
    allocation = Allocation(
        method="owl", granularity=spec.allocation_granularity, target=spec.ratio,
        groups=[g for g, _ in groups], members=[m for _, m in groups], outlier_ratios=lods,
        sparsities=sparsities, sizes=sizes, counts=dict(zip(names, counts, strict=True)),
        options=dict(spec.owl), seconds=time.perf_counter() - start,
    )  # fmt: skip
    log.info(
        "sparsity allocation owl (M=%g, lambda=%g, %s-wise; pre-pass and rule %.1f s), global %.6f:\n%s",
        spec.owl["threshold_m"], spec.owl["lam"], allocation.granularity, allocation.seconds,
        allocation.achieved, allocation.table(),
    )  # fmt: skip
    return allocation


def allocate(adapter: ModelAdapter, pipe: Any, calib: Any, spec: Any) -> Allocation | None:
    """``sparsity.allocation``: ``None`` for ``uniform`` (every layer gets ``sparsity.ratio``)."""
    if spec.allocation == "uniform":
        return None
    if spec.allocation == "owl":
        return owl_allocation(adapter, pipe, calib, spec)
    raise ValueError(f"unknown sparsity.allocation {spec.allocation!r}; known: uniform, owl")
