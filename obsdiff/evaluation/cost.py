"""Parameters and FLOPs of one denoiser forward, counted on a ``meta`` model (no weights, no memory).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: it counts only the ops in its
registry — matrix products (``mm``, ``bmm``, ``addmm``, ``baddbmm``), scaled-dot-product
attention and convolutions — with one multiply-add = 2 FLOPs. Norms, activations, softmax outside
SDPA, adds and the timestep embedding's elementwise work are not counted (a few % of a DiT
forward). Because the model lives on ``meta``, an 8B denoiser is counted on a laptop in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from obsdiff.models.base import ModelAdapter
from obsdiff.models.structure import HeadGroup


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def forward_flops(module: nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of ``module(**inputs)`` as counted by ``FlopCounterMode`` (any device, ``meta`` too)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(**inputs)
    return int(counter.get_total_flops())


def denoiser_cost(
    adapter: ModelAdapter,
    config: dict,
    architecture: dict[str, dict[str, int]],
    calls: Sequence[int],
    latent_size: int,
    text_tokens: int,
) -> dict[str, Any]:
    """Parameters and TFLOPs of ONE sampler step of a (possibly structurally pruned) shape.

    Args:
        adapter: the model family's adapter (``empty_denoiser``, ``reshape``, ``example_inputs``).
        config: the dense denoiser config (e.g. SD3-Medium's ``transformer/config.json``).
        architecture: per-block shapes that differ from ``config`` (``{}`` = dense), as returned by
            ``adapter.architecture``.
        calls: rows of each denoiser call in one step (``adapter.denoiser_calls``: ``[2]`` for a
            CFG-doubled batch, ``[1, 1]`` for true CFG in two calls).
        latent_size: latent side (``resolution // vae_scale_factor``).
        text_tokens: prompt tokens the denoiser attends to.

    Returns:
        ``{"params": int, "tflops": float}``; ``tflops`` counts matmuls, attention and convolutions
        (1 multiply-add = 2 FLOPs).
    """
    model = adapter.empty_denoiser(config)  # meta: shapes only
    adapter.reshape(model, architecture)
    flops = sum(
        forward_flops(model, adapter.example_inputs(model, rows, latent_size, text_tokens)) for rows in calls
    )
    return {"params": count_params(model), "tflops": flops / 1e12}


def structured_architecture(
    adapter: ModelAdapter, config: dict, ratio: float, blocks: Sequence[int]
) -> dict[str, dict[str, int]]:
    """The shape left by removing ``round(n · ratio)`` heads and FFN neurons of every group in ``blocks``.

    Uses the adapter's structure units on a ``meta`` model, so groups a real run skips (SD3's
    ``context_pre_only`` heads) are skipped here too. Which heads / neurons go does not matter
    for cost or latency; the first ones are removed.

    Args:
        adapter: the model family's adapter.
        config: the dense denoiser config.
        ratio: fraction of heads and of FFN neurons removed per group.
        blocks: block indices to shrink.

    Returns:
        The per-block architecture (``adapter.architecture`` of the shrunk model).
    """
    model = adapter.empty_denoiser(config)
    for unit in adapter.structure_units(model, blocks):
        removed = {}
        for group in unit:
            size = group.num_heads if isinstance(group, HeadGroup) else group.width
            removed[group.key] = list(range(round(size * ratio)))
        adapter.remove_structure(model, unit, removed)
    return adapter.architecture(model)
