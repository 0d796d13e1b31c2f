"""The one place that hooks the denoiser: Hessian capture for a module package.

``capture_hessians`` registers one forward pre-hook per *input group* (layers that see the
same input tensor, e.g. ``to_q/to_k/to_v``), so those layers share a single Hessian, and it
removes every hook in ``finally``. A group may span blocks (the UNet's cross-attention K/V read
the text embedding in every block): the hook sits on its first layer, which sees that tensor
once per denoiser call. Conv2d inputs are unfolded (``obsdiff.layers``). The hooks are
``torch.compiler.disable``-d: under ``calibration.compile`` each runs eagerly at a graph break.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from obsdiff.calibration.timesteps import StepTracker
from obsdiff.hessian import HessianAccumulator
from obsdiff.layers import columns, layer_input


@contextmanager
def capture_hessians(
    denoiser: nn.Module,
    input_groups: Sequence[tuple[str, ...]],
    tracker: StepTracker,
    device: torch.device | str | None = None,
    accumulator: Callable[[int, Any], Any] = HessianAccumulator,
) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate ``2 Σ α_i X_i X_iᵀ`` for every layer of ``input_groups`` while the block runs.

    Args:
        denoiser: the model whose linear layers are named in ``input_groups``.
        input_groups: tuples of layer names that receive the same input.
        tracker: supplies ``α`` of the current denoising step.
        device: where the Hessians live (default: each layer's weight device).
        accumulator: ``(cols, device) -> obj`` with ``obj.add(x, alpha)``; e.g.
            :class:`obsdiff.hessian.DiagonalAccumulator` keeps only ``diag(H)``.

    Yields:
        Layer name → accumulator; layers of one group map to the same object.
    """
    hessians: dict[str, HessianAccumulator] = {}
    handles = []

    def make_hook(acc: HessianAccumulator):
        def hook(module: nn.Module, args: tuple) -> None:
            acc.add(layer_input(module, args[0]), tracker.alpha)

        return hook

    try:
        for group in input_groups:
            first = denoiser.get_submodule(group[0])
            acc = accumulator(columns(first), device or first.weight.device)
            for name in group:
                hessians[name] = acc
            handles.append(first.register_forward_pre_hook(torch.compiler.disable(make_hook(acc))))
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
