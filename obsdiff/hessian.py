"""Timestep-weighted Hessian accumulator (METHOD.md §2).

``H = 2 Σ_i α_i X_i X_iᵀ`` kept as a running mean in fp32, exactly as the reference: each
call scales its inputs by ``√α`` and weights the mean by ``α × batch``.
"""

from __future__ import annotations

import math

import torch


class HessianAccumulator:
    """Running, weighted ``2 X Xᵀ`` for one layer input (shared by layers with identical inputs).

    Args:
        cols: input features of the layer(s).
        device: where ``H`` lives (the calibration device).
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.weight_sum = 0.0
        self.num_calls = 0

    def add(self, x: torch.Tensor, alpha: float) -> None:
        """Add one forward pass's input.

        Args:
            x: (batch, ..., cols) layer input; every token is a column of ``X``.
            alpha: the timestep weight ``α_i`` of the current denoising step.
        """
        batch = x.shape[0] if x.dim() > 1 else 1
        X = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (B*L, cols)
        w = alpha * batch
        self.H *= self.weight_sum / (self.weight_sum + w)
        self.weight_sum += w
        X = math.sqrt(2 * alpha / self.weight_sum) * X
        self.H.addmm_(X.T, X)
        self.num_calls += 1
