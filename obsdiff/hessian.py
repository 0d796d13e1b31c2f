"""Timestep-weighted Hessian accumulator (docs/METHOD.md §2).

``H = 2 Σ_i α_i X_i X_iᵀ`` kept as a running mean in fp32, exactly as the reference: each
call scales its inputs by ``√α`` and weights the mean by ``α × batch``. The same weighting gives
the per-column input moments that DSnoT needs (O(cols) memory, no effect on ``H``).
"""

from __future__ import annotations

import math

import torch


def tokens(x: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """A layer input (batch, ..., cols) as fp32 token rows ``X`` (B·L, cols) on ``device``, and B."""
    batch = x.shape[0] if x.dim() > 1 else 1
    return x.detach().reshape(-1, x.shape[-1]).to(device, torch.float32), batch


class HessianAccumulator:
    """Running, weighted ``2 X Xᵀ`` for one layer input (shared by layers with identical inputs).

    Args:
        cols: input features of the layer(s).
        device: where ``H`` lives (the calibration device).
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.col_sum = torch.zeros(cols, dtype=torch.float64, device=device)  # Σ over a sample's tokens
        self.weight_sum = 0.0
        self.tokens = 0  # tokens per sample (for per-token moments)
        self.num_calls = 0

    def add(self, x: torch.Tensor, alpha: float) -> None:
        """Add one forward pass's input.

        Args:
            x: (batch, ..., cols) layer input; every token is a column of ``X``.
            alpha: the timestep weight ``α_i`` of the current denoising step.
        """
        X, batch = tokens(x, self.H.device)
        w = alpha * batch
        self.H *= self.weight_sum / (self.weight_sum + w)
        self.col_sum *= self.weight_sum / (self.weight_sum + w)
        self.weight_sum += w
        self.col_sum += (alpha / self.weight_sum) * X.sum(dim=0, dtype=torch.float64)
        self.tokens = X.shape[0] // batch
        X = math.sqrt(2 * alpha / self.weight_sum) * X
        self.H.addmm_(X.T, X)
        self.num_calls += 1

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep-weighted per-column input statistics for DSnoT.

        Returns:
            ``mean``: (cols,) weighted mean over samples of the per-sample token sum ``Σ_t x_t``
            (the reference's scale, the same normalisation as ``H``), and ``var``: (cols,)
            weighted per-token variance ``E[x²] − E[x]²``.
        """
        per_token_sq = torch.diag(self.H).double() / (2 * self.tokens)  # diag(H)/2 = E[Σ_t x_t²]
        per_token_mean = self.col_sum / self.tokens
        var = (per_token_sq - per_token_mean**2).clamp_min(0)
        return self.col_sum.float(), var.float()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
        """Tensors and scalars that rebuild this accumulator exactly (:meth:`from_state`)."""
        scalars = {"weight_sum": self.weight_sum, "tokens": self.tokens, "num_calls": self.num_calls}
        return {"H": self.H, "col_sum": self.col_sum}, scalars

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], scalars: dict, device: torch.device | str = "cpu"
    ) -> HessianAccumulator:
        """The accumulator :meth:`state` described, bit for bit, on ``device``."""
        acc = cls.__new__(cls)
        acc.H, acc.col_sum = tensors["H"].to(device), tensors["col_sum"].to(device)
        acc.weight_sum, acc.tokens = float(scalars["weight_sum"]), int(scalars["tokens"])
        acc.num_calls = int(scalars["num_calls"])
        return acc


class DiagonalAccumulator:
    """Only ``diag(H)`` of :class:`HessianAccumulator`: the weighted ``2 Σ α x_j²`` per input column.

    The same running, ``α × batch``-weighted mean (so ``sqrt(diag)`` is the timestep-weighted
    ``‖X_j‖₂`` of Wanda and OWL, up to one constant per layer), in O(cols) memory and O(tokens ×
    cols) time per call instead of O(tokens × cols²): a dense pre-pass over every target layer at
    once (``obsdiff.allocation``) costs little beyond the sampler runs.

    Args:
        cols: input features of the layer(s).
        device: where the diagonal lives.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.diag = torch.zeros(cols, dtype=torch.float64, device=device)
        self.weight_sum = 0.0
        self.num_calls = 0

    def add(self, x: torch.Tensor, alpha: float) -> None:
        """Add one forward pass's input (as :meth:`HessianAccumulator.add`).

        Args:
            x: (batch, ..., cols) layer input; every token is a column of ``X``.
            alpha: the timestep weight ``α_i`` of the current denoising step.
        """
        X, batch = tokens(x, self.diag.device)
        w = alpha * batch
        self.diag *= self.weight_sum / (self.weight_sum + w)
        self.weight_sum += w
        self.diag += (2 * alpha / self.weight_sum) * X.square().sum(dim=0, dtype=torch.float64)
        self.num_calls += 1
