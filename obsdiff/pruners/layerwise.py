"""Layer-wise strategy: every target layer is solved on its input group's Hessian.

The group's Hessian is damped and factorised once (``solver.factorize``) and the factor is shared
by its layers: q/k/v, Flux's four single-block layers, the UNets' model-wide cross K/V. Where the
method has an OBS update (``solver.stacked``) a group of several layers is solved in one
row-stacked column sweep, bit for bit the separate solves; otherwise one solve per layer. With a
non-uniform allocation (``patterns``: an exact count per layer) every layer is solved on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from obsdiff.hessian import HessianAccumulator
from obsdiff.layers import matrix
from obsdiff.models.base import ModelAdapter, Unit
from obsdiff.pruners.records import LayerRecord
from obsdiff.solvers.obs import Pattern, SolveResult, reconstruction_error

# (W, H, pattern, *, layer, moments) -> SolveResult; moments = DSnoT's per-column input statistics
LayerSolver = Callable[..., SolveResult]


@dataclass
class LayerwiseStrategy:
    """Unstructured / N:M pruning of the target layers of ``blocks`` with one solver.

    Args:
        solver: the method's solve function (``obsdiff.solvers.layer_solver``).
        pattern: the sparsity pattern.
        targets: target layer names relative to a block.
        blocks: block indices (``None`` = all).
        patterns: one pattern per layer name (``sparsity.allocation``, ``obsdiff.allocation``);
            ``None``: ``pattern`` for every layer.
    """

    solver: LayerSolver
    pattern: Pattern
    targets: Sequence[str]
    blocks: Sequence[int] | None = None
    patterns: Mapping[str, Pattern] | None = None

    def pattern_of(self, name: str) -> Pattern:
        """The pattern layer ``name`` is pruned to."""
        return self.pattern if self.patterns is None else self.patterns[name]

    def units(self, adapter: ModelAdapter, denoiser: nn.Module) -> list[Unit]:
        return adapter.units(denoiser, self.blocks, self.targets)

    def input_groups(self, unit: Unit) -> list[tuple[str, ...]]:
        return list(unit)

    def prune_unit(
        self, denoiser: nn.Module, unit: Unit, hessians: dict[str, HessianAccumulator], package: int
    ) -> list[LayerRecord]:
        records = []
        for group in unit:  # one factorisation of the group's Hessian, one sweep or one solve per layer
            factor = None  # the last group's factor is freed before this one's is computed
            acc, factorize = hessians[group[0]], getattr(self.solver, "factorize", None)
            stacked = getattr(self.solver, "stacked", None)
            t0 = time.perf_counter()
            factor = factorize(acc.H, layer=group[0]) if factorize is not None else None
            shared = (time.perf_counter() - t0) / len(group)  # its time is split over the layers
            if stacked is not None and len(group) > 1 and self.patterns is None:
                records += self._prune_stacked(denoiser, group, acc, package, factor, shared)
                continue
            for name in group:
                records.append(self._prune_layer(denoiser, name, acc, package, factor, shared))
        return records

    def after_package(self, adapter: ModelAdapter, denoiser: nn.Module, package: list[Unit]) -> None:
        """Nothing to reshape: pruned weights are zeros in place."""

    def modules(self, unit: Unit) -> list[str]:
        """The layers whose weights pruning ``unit`` changes."""
        return [name for group in unit for name in group]

    def package_state(self, package: list[Unit]) -> dict:
        """Nothing beyond the weights is needed to resume after a package."""
        return {}

    def restore(self, adapter: ModelAdapter, denoiser: nn.Module, package: list[Unit], state: dict) -> None:
        """Nothing to reshape before a finished package's weights are loaded."""

    def _prune_layer(
        self,
        denoiser: nn.Module,
        name: str,
        acc: HessianAccumulator,
        package: int,
        factor: Any,
        shared: float,
    ) -> LayerRecord:
        W = matrix(denoiser.get_submodule(name))  # a conv as its unfolded (out, in·kh·kw) matrix, a view
        t0 = time.perf_counter()
        kwargs = {"factor": factor} if factor is not None else {}
        result = self.solver(W, acc.H, self.pattern_of(name), layer=name, moments=acc.moments(), **kwargs)
        return self._record(name, W, result, acc, package, time.perf_counter() - t0 + shared)

    def _prune_stacked(
        self,
        denoiser: nn.Module,
        group: tuple[str, ...],
        acc: HessianAccumulator,
        package: int,
        factor: Any,
        shared: float,
    ) -> list[LayerRecord]:
        """The group's layers in one row-stacked sweep; its time is split over them by rows."""
        Ws = [matrix(denoiser.get_submodule(name)) for name in group]
        t0 = time.perf_counter()
        results = self.solver.stacked(
            Ws, acc.H, self.pattern, layers=list(group), moments=acc.moments(), factor=factor
        )
        per_row = (time.perf_counter() - t0) / sum(W.shape[0] for W in Ws)
        return [
            self._record(name, W, result, acc, package, per_row * W.shape[0] + shared)
            for name, W, result in zip(group, Ws, results, strict=True)
        ]

    def _record(
        self,
        name: str,
        W: torch.Tensor,
        result: SolveResult,
        acc: HessianAccumulator,
        package: int,
        seconds: float,
    ) -> LayerRecord:
        """Write the pruned weight into the layer's matrix ``W`` and describe it."""
        loss = reconstruction_error(W, result.weight, acc.H)
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
