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
    batch: int,
    latent_size: int,
    text_tokens: int,
) -> dict[str, Any]:
    """Parameters and TFLOPs of ONE denoiser forward of a (possibly structurally pruned) shape.

    Args:
        adapter: the model family's adapter (``empty_denoiser``, ``reshape``, ``example_inputs``).
        config: the dense denoiser config (e.g. SD3-Medium's ``transformer/config.json``).
        architecture: per-block shapes that differ from ``config`` (``{}`` = dense), as returned by
            ``adapter.architecture``.
        batch: denoiser batch (CFG doubles the prompts).
        latent_size: latent side (``resolution // vae_scale_factor``).
        text_tokens: prompt tokens the denoiser attends to.

    Returns:
        ``{"params": int, "tflops": float}``; ``tflops`` counts matmuls, attention and convolutions
        (1 multiply-add = 2 FLOPs).
    """
    model = adapter.empty_denoiser(config)  # meta: shapes only
    adapter.reshape(model, architecture)
    inputs = adapter.example_inputs(model, batch, latent_size, text_tokens)
    return {"params": count_params(model), "tflops": forward_flops(model, inputs) / 1e12}


def structured_architecture(
    adapter: ModelAdapter, config: dict, ratio: float, blocks: Sequence[int]
) -> dict[str, dict[str, int]]:
    """The shape left by removing ``round(n · ratio)`` heads and FFN neurons in ``blocks``.

    Uses the adapter's structured units on a ``meta`` model, so blocks without prunable heads
    (SD3's ``context_pre_only`` last block) keep their heads, as in a real structured run. Which
    heads / neurons go does not matter for cost or latency; the first ones are removed.

    Args:
        adapter: the model family's adapter.
        config: the dense denoiser config.
        ratio: fraction of heads and of FFN neurons removed per unit.
        blocks: block indices to shrink.

    Returns:
        The per-block architecture (``adapter.architecture`` of the shrunk model).
    """
    model = adapter.empty_denoiser(config)
    for unit in adapter.structured_units(model, blocks):
        widths = {layer: model.get_submodule(layer).in_features for layer in unit.layers}
        if unit.kind == "heads":
            heads = next(iter(widths.values())) // unit.head_dim
            removed = {layer: list(range(round(heads * ratio))) for layer in unit.layers}
        else:
            removed = {layer: list(range(round(width * ratio))) for layer, width in widths.items()}
        adapter.remove_structure(model, unit, removed)
    return adapter.architecture(model)
