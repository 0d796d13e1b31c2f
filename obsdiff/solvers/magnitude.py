"""Magnitude pruning baseline: remove the weights with the smallest ``|W|``, no update.

Plain tensor math. ``lowest_score_mask`` is the one selection rule shared by the score-based
baselines (magnitude, Wanda, DSnoT's start mask): exact counts, ties broken by index (stable sort).
"""

from __future__ import annotations

import torch

from obsdiff.solvers.obs import Pattern, SolveResult, split_count


def lowest_score_mask(scores: torch.Tensor, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """Mask (``True`` = removed) of the lowest scores under ``pattern``.

    Args:
        scores: (rows, cols) importance; lower is removed first.
        pattern: unstructured: the ``ratio`` fraction, exactly ``floor(count * ratio)`` weights
            (``exact_count`` is irrelevant here: the count is always exact), or exactly
            ``pattern.count`` of the layer (per row: split over the rows by ``split_count``);
            N:M: the ``n`` lowest in every aligned group of ``m`` columns of every row.
        per_row: unstructured only: rank within each row (Wanda) instead of over the whole layer
            (magnitude).

    Returns:
        (rows, cols) bool mask; ties go to the lower flat index (stable sort), so the result is
        deterministic.
    """
    rows, cols = scores.shape
    scores = scores.float()
    if pattern.kind == "nm":
        if pattern.m <= 0 or cols % pattern.m or not 0 <= pattern.n <= pattern.m:
            raise ValueError(f"N:M needs 0 <= N <= M and cols ({cols}) divisible by M={pattern.m}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)  # (rows, groups, m)
        idx = torch.argsort(groups, dim=-1, stable=True)[..., : pattern.n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(rows, cols)
    if pattern.kind != "unstructured":
        raise ValueError(f"unknown pattern kind {pattern.kind!r}; known: 'unstructured', 'nm'")
    if not 0.0 <= pattern.ratio <= 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1], got {pattern.ratio}")
    flat = scores if per_row else scores.reshape(1, -1)  # (rows, cols) or (1, rows*cols)
    if pattern.count is not None:
        return _counted_mask(flat, pattern.count).reshape(rows, cols)
    k = int(flat.shape[1] * pattern.ratio)
    idx = torch.argsort(flat, dim=1, stable=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).reshape(rows, cols)


def _counted_mask(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Exactly ``count`` lowest scores of ``flat`` (parts, size), split over its parts (rows)."""
    parts, size = flat.shape
    if not 0 <= count <= flat.numel():
        raise ValueError(f"pattern.count must be in [0, {flat.numel()}], got {count}")
    k = torch.tensor([split_count(count, parts, p, p + 1) for p in range(parts)], device=flat.device)
    idx = torch.argsort(flat, dim=1, stable=True)
    chosen = torch.arange(size, device=flat.device).unsqueeze(0) < k.unsqueeze(1)  # (parts, size)
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, chosen)


def magnitude_mask(W: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Magnitude mask: the smallest ``|W|`` over the whole layer (unstructured) or per N:M group.

    Args:
        W: (rows, cols) weight.
        pattern: unstructured ratio or N:M.

    Returns:
        (rows, cols) bool mask, ``True`` = removed.
    """
    return lowest_score_mask(W.detach().abs(), pattern, per_row=False)


def apply_mask(W: torch.Tensor, mask: torch.Tensor) -> SolveResult:
    """Zero the masked weights with no compensation; the common result of the mask-only baselines.

    Args:
        W: (rows, cols) weight; not modified.
        mask: (rows, cols) bool, ``True`` = removed.

    Returns:
        ``SolveResult`` in W's dtype with ``damp = damp_frac = 0`` and ``obs_loss = nan``
        (there is no OBS solve).
    """
    weight = W.detach().float().masked_fill(mask, 0.0).to(W.dtype)
    return SolveResult(weight=weight, mask=mask, damp=0.0, damp_frac=0.0, obs_loss=float("nan"))


def magnitude_solve(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, layer: str = "") -> SolveResult:
    """Prune one layer by magnitude (no weight update).

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian; unused, part of the common solver signature.
        pattern: unstructured ratio (layer-wide ranking) or N:M.
        layer: name for messages; unused.

    Returns:
        The masked weight and its mask.
    """
    del H, layer  # common signature; magnitude needs neither
    return apply_mask(W, magnitude_mask(W, pattern))
