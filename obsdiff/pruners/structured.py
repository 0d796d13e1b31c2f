"""Structured strategy: remove attention heads and FFN neurons, then slice them out (docs/METHOD.md §4).

A structured unit holds structure groups (``obsdiff.models.structure``); each group's OBS layers
get their own timestep-weighted Hessian. Groups of one unit may share a layer (Flux's single-stream
``proj_out``: heads on its first columns, MLP neurons on the rest): the later group continues
from the weights and removed columns the earlier one left, so both are compensated jointly.

How heads / neurons are chosen is a :class:`StructuredMethod`, found by name in
``obsdiff.solvers.STRUCTURED_METHODS``: a new structured method is one entry there, not a branch
in the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from obsdiff.hessian import HessianAccumulator
from obsdiff.models.base import ModelAdapter
from obsdiff.models.structure import HeadGroup, NeuronGroup, StructureUnit
from obsdiff.pruners.records import LayerRecord
from obsdiff.solvers import STRUCTURED_METHODS
from obsdiff.solvers.l1 import l1_ffn_columns, l1_heads
from obsdiff.solvers.obs import reconstruction_error
from obsdiff.solvers.structured import StructuredPattern, remove_columns, remove_ffn_columns, remove_heads


@dataclass
class Removal:
    """What one group's removal returns: the chosen heads / neurons and the new weights."""

    chosen: list[int]  # head indices, or neuron indices within the group's columns
    weights: list[torch.Tensor]  # one per OBS layer of the group, in the layer dtype
    damp_fracs: list[float]


class StructuredMethod(Protocol):
    """Chooses and removes heads / neurons of one group (with or without OBS compensation).

    ``Ws`` / ``Hs``: the group's OBS layers (current weights, undamped Hessians); ``pre_removed``:
    columns an earlier group of the unit already removed from each layer.
    """

    def heads(self, group: HeadGroup, Ws: list, Hs: list, num: int, damp_frac: float, compensate: bool,
              pre_removed: list) -> Removal: ...  # fmt: skip

    def neurons(self, group: NeuronGroup, W: torch.Tensor, H: torch.Tensor, num: int, damp_frac: float,
                compensate: bool, pre_removed: torch.Tensor) -> Removal: ...  # fmt: skip


class ObsMethod:
    """OBS saliency; heads one per iteration (RRF over output projections), neurons in chunks."""

    def heads(self, group, Ws, Hs, num, damp_frac, compensate, pre_removed) -> Removal:
        if any(p.numel() for p in pre_removed):
            raise ValueError(f"{group.key}: head groups must come first in a unit")
        res = remove_heads(Ws, Hs, group.head_dim, num, damp_frac, compensate, layer=group.outputs[0],
                           cols=group.cols)  # fmt: skip
        return Removal(sorted(res.removed), res.weights, res.damp_frac_used)

    def neurons(self, group, W, H, num, damp_frac, compensate, pre_removed) -> Removal:
        res = remove_ffn_columns(W, H, num, damp_frac, compensate, layer=group.down, cols=group.cols,
                                 pre_removed=pre_removed)  # fmt: skip
        return Removal((res.removed - group.cols[0]).tolist(), [res.weight], [res.damp_frac_used])


class L1Method:
    """Smallest L1 norm (Li et al. 2017), removed at once; OBS update only if ``compensate``."""

    def heads(self, group, Ws, Hs, num, damp_frac, compensate, pre_removed) -> Removal:
        chosen = sorted(l1_heads(Ws, group.head_dim, num, cols=group.cols))
        idx = torch.tensor(group.columns(chosen), dtype=torch.long)
        results = [remove_columns(W, H, idx, damp_frac, compensate, name, pre_removed=p)
                   for W, H, name, p in zip(Ws, Hs, group.outputs, pre_removed, strict=True)]  # fmt: skip
        return Removal(chosen, [r.weight for r in results], [r.damp_frac_used for r in results])

    def neurons(self, group, W, H, num, damp_frac, compensate, pre_removed) -> Removal:
        idx = l1_ffn_columns(W, num, cols=group.cols)
        r = remove_columns(W, H, idx, damp_frac, compensate, group.down, pre_removed=pre_removed)
        return Removal((idx - group.cols[0]).tolist(), [r.weight], [r.damp_frac_used])


@dataclass
class _LayerState:
    """One OBS layer across the groups of a unit."""

    W0: torch.Tensor  # dense weight (layer dtype)
    W: torch.Tensor  # current weight
    removed: list[int] = field(default_factory=list)  # removed input columns so far
    damp_frac: float | None = None
    seconds: float = 0.0


@dataclass
class StructuredStrategy:
    """Structured pruning of ``blocks``: heads and neurons chosen by ``method``, sliced per package.

    Args:
        method: a ``STRUCTURED_METHODS`` name (``obs``, ``l1``).
        pattern: head and FFN ratios.
        blocks: block indices to prune.
        damp_frac: relative damping λ.
        compensate: apply the OBS update to the remaining columns (``False``: only remove).
        physical: slice the removed heads / neurons out of the model after each package (``False``:
            zero columns, numerically the same model).
    """

    method: str
    pattern: StructuredPattern
    blocks: list[int]
    damp_frac: float = 0.01
    compensate: bool = True
    physical: bool = True
    removed: dict[str, list[int]] = field(default_factory=dict)  # group key -> heads / neurons (dense)

    def __post_init__(self) -> None:
        self._method = STRUCTURED_METHODS.get(self.method)()  # loud on unknown names

    def units(self, adapter: ModelAdapter, denoiser: nn.Module) -> list[StructureUnit]:
        return adapter.structure_units(denoiser, self.blocks)

    def input_groups(self, unit: StructureUnit) -> list[tuple[str, ...]]:
        names = dict.fromkeys(name for group in unit for name in group.outputs)  # shared layers once
        return [(name,) for name in names]

    def prune_unit(
        self, denoiser: nn.Module, unit: StructureUnit, hessians: dict[str, HessianAccumulator], package: int
    ) -> list[LayerRecord]:
        states: dict[str, _LayerState] = {}
        for group in unit:
            for name in group.outputs:
                if name not in states:
                    W = denoiser.get_submodule(name).weight.data
                    states[name] = _LayerState(W0=W.clone(), W=W)
            self.removed[group.key] = self._remove(group, states, hessians)
        records = []
        for name, s in states.items():
            layer, H = denoiser.get_submodule(name), hessians[name].H
            layer.weight.data.copy_(s.W)
            records.append(LayerRecord(
                name=name, rows=s.W.shape[0], cols=s.W.shape[1], package=package,
                sparsity=len(s.removed) / s.W.shape[1], damp_frac=s.damp_frac,
                damp=s.damp_frac * float(torch.mean(torch.diag(H))),
                loss=reconstruction_error(s.W0, s.W, H), seconds=s.seconds,
            ))  # fmt: skip
        return records

    def _remove(self, group, states: dict[str, _LayerState], hessians: dict) -> list[int]:
        layers = [states[name] for name in group.outputs]
        Hs = [hessians[name].H for name in group.outputs]
        pre = [torch.tensor(s.removed, dtype=torch.long) for s in layers]
        t0 = time.perf_counter()
        if isinstance(group, HeadGroup):
            num = self.pattern.num_heads(group.num_heads)
            out = self._method.heads(
                group, [s.W for s in layers], Hs, num, self.damp_frac, self.compensate, pre
            )
        else:
            num = self.pattern.num_neurons(group.width)
            out = self._method.neurons(
                group, layers[0].W, Hs[0], num, self.damp_frac, self.compensate, pre[0]
            )
        seconds = (time.perf_counter() - t0) / len(layers)  # a joint solve's time is split over its layers
        for s, W, frac in zip(layers, out.weights, out.damp_fracs, strict=True):
            s.W = W
            s.removed += group.columns(out.chosen)
            s.damp_frac = frac if s.damp_frac is None else s.damp_frac
            s.seconds += seconds
        return out.chosen

    def after_package(self, adapter: ModelAdapter, denoiser: nn.Module, package: list[StructureUnit]) -> None:
        if self.physical:
            for unit in package:
                adapter.remove_structure(denoiser, unit, self.removed)

    def modules(self, unit: StructureUnit) -> list[str]:
        """Every layer a unit's removals change: the OBS layers and the sliced input projections."""
        names = []
        for group in unit:
            names += [*group.outputs, *(group.inputs if isinstance(group, HeadGroup) else group.up)]
        return list(dict.fromkeys(names))

    def package_state(self, package: list[StructureUnit]) -> dict:
        """The heads / neurons the package removed, by group key (what reshaping needs)."""
        return {group.key: self.removed[group.key] for unit in package for group in unit}

    def restore(
        self, adapter: ModelAdapter, denoiser: nn.Module, package: list[StructureUnit], state: dict
    ) -> None:
        """Redo a finished package's removals on the dense model (its weights are loaded after)."""
        self.removed.update(state)
        self.after_package(adapter, denoiser, package)
