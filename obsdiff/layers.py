"""Prunable layers as OBS sees them: a weight matrix ``(rows, cols)`` and the inputs its columns read.

A ``nn.Linear`` is its own matrix. A ``nn.Conv2d`` is pruned in its unfolded form, as GPTQ does:
its weight ``(out, in, kh, kw)`` flattens to ``(out, in · kh · kw)`` and every output position's
receptive field (``F.unfold`` of the input, same ordering) is one column of ``X``, so the Hessian
and the solve are those of the equivalent linear layer. Grouped convolutions and non-zero padding
modes have no such single matrix and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)


def is_prunable(module: nn.Module) -> bool:
    """A layer the layer-wise solvers can take (``Linear``, or a ``Conv2d`` with one matrix)."""
    if isinstance(module, nn.Conv2d):
        return _one_matrix(module)
    return isinstance(module, nn.Linear)


def columns(module: nn.Module) -> int:
    """Input columns of the layer's matrix (``in_features``; a conv: ``in · kh · kw``)."""
    if isinstance(module, nn.Conv2d):
        check_conv(module)
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(rows, cols)``: a view, so writing into it changes the layer."""
    return module.weight.data.reshape(module.weight.shape[0], -1)


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as ``(..., cols)`` rows of ``X``: a conv's receptive fields, a linear's as is."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # (B, in·kh·kw, positions)
        return patches.transpose(1, 2)
    return x


def _one_matrix(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def check_conv(module: nn.Conv2d) -> None:
    if not _one_matrix(module):
        raise ValueError(
            f"Conv2d with groups={module.groups}, padding={module.padding!r}, padding_mode="
            f"{module.padding_mode!r} cannot be pruned as one matrix; allowed: groups=1, numeric "
            "padding, padding_mode='zeros'"
        )
