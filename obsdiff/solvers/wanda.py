"""Wanda baseline (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for LLMs").

Score ``S_ij = |W_ij| · ‖X_j‖₂`` (Wanda Eq. 1), compared within each output row (unstructured)
or within each aligned group of ``m`` columns of a row (N:M); no weight update.
"""

from __future__ import annotations

import torch

from obsdiff.solvers.magnitude import apply_mask, lowest_score_mask
from obsdiff.solvers.obs import Pattern, SolveResult


def wanda_scores(W: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| · ‖X_j‖₂`` (Wanda Eq. 1), fp32, shape (rows, cols)."""
    if col_norms.shape != (W.shape[1],):
        raise ValueError(f"col_norms must have shape ({W.shape[1]},), got {tuple(col_norms.shape)}")
    return W.detach().float().abs() * col_norms.detach().float().to(W.device).reshape(1, -1)


def col_norms_from_hessian(H: torch.Tensor) -> torch.Tensor:
    """Column norms ``sqrt(diag H)`` (cols,).

    Our ``H = 2 Σ α_i X_iᵀX_i / Σ α_i b_i``, so ``sqrt(diag H)`` is the timestep-weighted input norm
    ``‖X_j‖₂`` times one constant for the whole layer; Wanda ranks within a row or group, where a
    common factor cancels, so the mask is exactly Wanda's on the weighted inputs.
    """
    return torch.diag(H.detach()).float().clamp_min(0.0).sqrt()


def wanda_mask(W: torch.Tensor, col_norms: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda mask: per row, the ``floor(cols · ratio)`` lowest scores; or the ``n`` lowest per N:M group.

    Args:
        W: (rows, cols) weight.
        col_norms: (cols,) input column norms ``‖X_j‖₂`` (any common scale).
        pattern: unstructured ratio or N:M.

    Returns:
        (rows, cols) bool mask, ``True`` = removed; ties go to the lower column index.
    """
    return lowest_score_mask(wanda_scores(W, col_norms), pattern, per_row=True)


def wanda_solve_from_norms(
    W: torch.Tensor, col_norms: torch.Tensor, pattern: Pattern, *, layer: str = ""
) -> SolveResult:
    """Wanda from column norms alone: the O(cols)-memory path for callers that never build ``H``.

    Args:
        W: (rows, cols) weight; not modified.
        col_norms: (cols,) input column norms ``‖X_j‖₂``.
        pattern: unstructured ratio (per-row ranking) or N:M.
        layer: name for messages; unused.
    """
    del layer
    return apply_mask(W, wanda_mask(W, col_norms, pattern))


def wanda_solve(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, layer: str = "") -> SolveResult:
    """Prune one layer with Wanda, reading ``‖X_j‖₂`` off ``sqrt(diag H)`` (no weight update).

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) timestep-weighted Hessian; only its diagonal is used.
        pattern: unstructured ratio (per-row ranking) or N:M.
        layer: name for messages; unused.

    Returns:
        The masked weight and its mask.
    """
    return wanda_solve_from_norms(W, col_norms_from_hessian(H), pattern, layer=layer)
