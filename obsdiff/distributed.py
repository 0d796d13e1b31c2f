"""Data-parallel calibration under ``torchrun`` (one process per GPU, or several on the CPU).

Every rank loads the same model and encodes the same prompts; then, per package:

1. each rank runs its contiguous share of the calibration prompts (:func:`shard`; per-prompt
   seeds make a prompt's trajectory independent of which rank runs it);
2. the accumulators are all-reduced (:func:`all_reduce_hessians`): the *unnormalised* weighted
   sums ``Σ α X Xᵀ`` and ``Σ α x`` are added up, then divided by the summed weight, so every rank
   holds the single-process Hessians up to fp32 summation order;
3. layer-wise solves are bin-packed over the ranks by cost (:func:`assign`), each rank solves its
   units and their owners broadcast the pruned weights and ``layers.csv`` rows
   (:func:`prune_package`). Structured removals are solved on every rank (the chosen heads /
   neurons drive the strategy's slicing on each rank); rank 0's weights are broadcast and its
   choices checked against every rank's.

Only rank 0 writes into the run directory (``obsdiff.run``); the others write nothing and skip
evaluation. A single process without ``torchrun`` never creates a process group and runs exactly
as before. The group's timeout (``OBSDIFF_DIST_TIMEOUT_MIN``, default 60 minutes) bounds how long
the other ranks wait for one that failed or is busy (rank 0 computes the dense baseline alone).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from obsdiff.hessian import HessianAccumulator
from obsdiff.layers import columns
from obsdiff.models.base import resolve_device, slice_embeds
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.pruners.records import LayerRecord

log = logging.getLogger(__name__)
TIMEOUT_ENV = "OBSDIFF_DIST_TIMEOUT_MIN"


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the run's outputs (rank 0, or the only process)."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the ``torchrun`` job (``WORLD_SIZE > 1``) for the block, and leave it afterwards.

    The backend follows the model's device: ``nccl`` with each rank on ``cuda:LOCAL_RANK``, else
    ``gloo``. Without ``torchrun`` (or with one process) nothing happens.

    Args:
        device: the model's configured device (``cpu``, ``cuda``, ``auto``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "60")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    log.info("rank %d of %d (%s)", rank(), world_size(), dist.get_backend())
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; ``value`` itself without a group)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(calib: Any) -> Any:
    """This rank's contiguous share of the calibration prompts (``calib`` itself on one rank).

    Args:
        calib: a :class:`obsdiff.prune.Calibration`.
    """
    if world_size() == 1:
        return calib
    n, r, w = len(calib.seeds), rank(), world_size()
    start, stop = n * r // w, n * (r + 1) // w
    embeds = slice_embeds(calib.embeds, start, stop)
    return dataclasses.replace(calib, embeds=embeds, seeds=calib.seeds[start:stop])


def all_reduce_hessians(hessians: dict[str, HessianAccumulator]) -> None:
    """Sum every rank's accumulators in place: afterwards each rank holds the Hessians of all prompts.

    The running means are turned back into weighted sums (``H · weight_sum``), added up and
    divided by the total weight; calls add up, tokens per sample are the same wherever a rank saw
    any (a rank without prompts has 0). Nothing happens on one rank.
    """
    if world_size() == 1:
        return
    for acc in dict.fromkeys(hessians.values()):  # shared accumulators once, in the same order everywhere
        counts = torch.tensor([acc.weight_sum, acc.num_calls], dtype=torch.float64, device=acc.H.device)
        tokens = torch.tensor([acc.tokens], dtype=torch.int64, device=acc.H.device)
        acc.H *= acc.weight_sum
        acc.col_sum *= acc.weight_sum
        for tensor in (acc.H, acc.col_sum, counts):
            dist.all_reduce(tensor)
        dist.all_reduce(tokens, op=dist.ReduceOp.MAX)
        acc.weight_sum, acc.num_calls, acc.tokens = float(counts[0]), int(counts[1]), int(tokens[0])
        if acc.weight_sum > 0:
            acc.H /= acc.weight_sum
            acc.col_sum /= acc.weight_sum


def assign(costs: Sequence[float], num_ranks: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least-loaded rank (lowest on ties).

    Args:
        costs: one cost per item (e.g. ``rows · cols²`` of a solve).
        num_ranks: ranks to share the items.

    Returns:
        One rank per item, in the items' order.
    """
    loads = [(0.0, r) for r in range(num_ranks)]  # a heap of (load, rank)
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


def solve_cost(denoiser: nn.Module, names: Sequence[str]) -> float:
    """``Σ rows · cols²`` over the layers: the OBS sweep's cost."""
    total = 0.0
    for name in names:
        layer = denoiser.get_submodule(name)
        total += layer.weight.shape[0] * columns(layer) ** 2
    return total


def prune_package(
    strategy: Any, denoiser: nn.Module, package: list[Any], hessians: dict[str, HessianAccumulator], k: int
) -> list[LayerRecord]:
    """Prune a calibrated package over the ranks; every rank ends with the same weights and rows.

    Layer-wise: units are bin-packed by solve cost, each rank solves its own, then each unit's
    owner broadcasts its pruned weights and records. Structured: every rank solves every unit
    (the removals drive the slicing after the package), rank 0 broadcasts the weights and every
    rank checks its removals equal rank 0's.

    Returns:
        The package's records in unit order (as on one process).
    """
    if not isinstance(strategy, LayerwiseStrategy):
        records = [r for unit in package for r in strategy.prune_unit(denoiser, unit, hessians, k)]
        owners = [0] * len(package)
        state = strategy.package_state(package)
        if broadcast_object(state) != state:
            raise RuntimeError(f"rank {rank()} removed other heads / neurons than rank 0 in package {k}")
    else:
        owners = assign([solve_cost(denoiser, strategy.modules(unit)) for unit in package], world_size())
        mine = {u: strategy.prune_unit(denoiser, unit, hessians, k)
                for u, unit in enumerate(package) if owners[u] == rank()}  # fmt: skip
        records = []
        for u, owner in enumerate(owners):
            box = [mine.get(u)]
            dist.broadcast_object_list(box, src=owner)
            records += box[0]
    for unit, owner in zip(package, owners, strict=True):
        for name in strategy.modules(unit):
            dist.broadcast(denoiser.get_submodule(name).weight.data, src=owner)
    return records
