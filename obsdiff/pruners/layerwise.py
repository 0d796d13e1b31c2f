"""Layer-wise strategy: every target layer gets its own solve on its input group's Hessian.

The group's Hessian is damped and factorised once (``solver.factorize``) and the factor is shared
by its layers' solves: q/k/v, Flux's four single-block layers, the UNets' model-wide cross K/V.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    """

    solver: LayerSolver
    pattern: Pattern
    targets: Sequence[str]
    blocks: Sequence[int] | None = None

    def units(self, adapter: ModelAdapter, denoiser: nn.Module) -> list[Unit]:
        return adapter.units(denoiser, self.blocks, self.targets)

    def input_groups(self, unit: Unit) -> list[tuple[str, ...]]:
        return list(unit)

    def prune_unit(
        self, denoiser: nn.Module, unit: Unit, hessians: dict[str, HessianAccumulator], package: int
    ) -> list[LayerRecord]:
        records = []
        for group in unit:  # one factorisation of the group's Hessian, one solve per layer
            acc, factorize = hessians[group[0]], getattr(self.solver, "factorize", None)
            t0 = time.perf_counter()
            factor = factorize(acc.H, layer=group[0]) if factorize is not None else None
            shared = (time.perf_counter() - t0) / len(group)  # its time is split over the layers
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
        layer = denoiser.get_submodule(name)
        W, H = matrix(layer), acc.H  # a conv as its unfolded (out, in·kh·kw) matrix, a view
        t0 = time.perf_counter()
        kwargs = {"factor": factor} if factor is not None else {}
        result = self.solver(W, H, self.pattern, layer=name, moments=acc.moments(), **kwargs)
        seconds = time.perf_counter() - t0 + shared
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
