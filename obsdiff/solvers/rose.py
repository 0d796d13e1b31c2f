"""ROSE column order for the OBS sweep (Su & Wang, "ROSE: Reordered SparseGPT for More Accurate
One-Shot Large Language Models Pruning", CPAL 2026, arXiv 2603.05878).

SparseGPT sweeps the columns left to right, so a column pruned late has few columns left to take
up its error. ROSE estimates each column's would-be-pruned loss before the sweep and moves the
costly columns to the front, at two levels: within each block of ``B`` columns by column loss, and
the blocks themselves by block loss (both descending). Only "columnar" layers are reordered.

- Score ``S = |W| · ‖X_j‖₂ = |W| · sqrt(diag H)`` (the Wanda score; the authors' code).
- Pre-pruning mask ``M``: per block of ``B`` columns, the lowest scores at the sweep's ratio with
  the sweep's rule (``<=`` the value at ``floor(numel · p)``, or the exact count), per layer of
  a group; N:M: the ``n`` lowest of each row's aligned group of ``m``. Loss matrix
  ``L = S ⊙ M``; column loss ``Σ_r L[r, j]``; block loss the sum over the block's columns.
- Columnar layer: the relative range of the block losses ``(max − min) / max`` (over the full
  blocks) exceeds ``threshold`` (0.5 in the authors' code); otherwise the natural order is kept.
- N:M: the unit that moves is a whole aligned group of ``m`` columns (its internal order kept),
  so every aligned group of the permuted sweep is an aligned group of the original columns and the
  pattern holds in the original order. Units in a block: by unit loss; blocks: by block loss.

The sweep itself is unchanged: it runs on ``W[:, P]`` and ``H[P][:, P]`` (factorised afresh: the
factor of ``P H Pᵀ`` is not a permutation of ``H``'s), and its weight and mask are put back in the
original column order. Layers of one input group share one permutation, computed from their
stacked weights, so they still share one factor and one row-stacked sweep.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from itertools import accumulate

import torch

from obsdiff.solvers.obs import Pattern, SolveResult
from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_scores

log = logging.getLogger(__name__)

ROSE_THRESHOLD = 0.5  # the authors' columnar-layer cut on the relative range of block loss


def prepruned_loss(
    S: torch.Tensor, pattern: Pattern, block_size: int, segments: list[tuple[int, int]]
) -> torch.Tensor:
    """Column loss ``Σ_r (S ⊙ M)[r, j]`` of the pre-pruning mask ``M`` (cols,).

    Args:
        S: (rows, cols) scores, rows of every layer of the group stacked.
        pattern: unstructured ratio or N:M.
        block_size: columns per block ``B`` (the sweep's).
        segments: ``(r0, r1)`` row range of each layer: the unstructured pick is per layer and
            block, as in the sweep.
    """
    rows, cols = S.shape
    if pattern.kind == "nm":
        groups = S.reshape(rows, cols // pattern.m, pattern.m)  # (rows, groups, m)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(2, torch.topk(groups, pattern.n, dim=2, largest=False).indices, True)
        return (groups * mask).sum(0).reshape(cols)  # the n lowest of every row's group
    loss = torch.zeros(cols, device=S.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        for r0, r1 in segments:
            tmp = S[r0:r1, i1:i2]
            loss[i1:i2] += (tmp * _lowest(tmp, pattern.ratio, pattern.exact_count)).sum(0)
    return loss


def _lowest(tmp: torch.Tensor, ratio: float, exact_count: bool) -> torch.Tensor:
    """The sweep's unstructured pick on one block (``obs._block_mask``'s rule, on scores)."""
    flat = tmp.flatten()
    k = int(flat.numel() * ratio)
    if exact_count:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.argsort(flat, stable=True)[:k]] = True
        return mask.reshape(tmp.shape)
    return tmp <= torch.kthvalue(flat, min(k, flat.numel() - 1) + 1).values  # = sort(flat)[k]


def relative_range(block_loss: torch.Tensor) -> float:
    """``(max − min) / max`` of the block losses; 0 for fewer than two blocks or no loss."""
    if block_loss.numel() < 2 or float(block_loss.max()) <= 0:
        return 0.0
    return float((block_loss.max() - block_loss.min()) / block_loss.max())


def rose_order(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    pattern: Pattern,
    block_size: int,
    threshold: float = ROSE_THRESHOLD,
    layer: str = "",
) -> torch.Tensor | None:
    """ROSE's column permutation for layers reading one input, or ``None`` (natural order).

    Args:
        Ws: (rows_i, cols) weights of the group (one permutation for all of them).
        H: (cols, cols) their Hessian.
        pattern: unstructured ratio or N:M.
        block_size: the sweep's block ``B``.
        threshold: the columnar-layer cut on the relative range of block loss.
        layer: name for log messages.

    Returns:
        ``P`` (cols,) long: position ``t`` of the sweep takes original column ``P[t]``; ``None``
        when the layer is not columnar (or N:M does not fit: the sweep then raises).
    """
    cols = Ws[0].shape[1]
    unit = pattern.m if pattern.kind == "nm" else 1  # what moves: a column, or an aligned N:M group
    if pattern.kind == "nm" and (cols % pattern.m or block_size % pattern.m):
        return None
    S = torch.cat([wanda_scores(W, col_norms_from_hessian(H)) for W in Ws])  # (Σ rows_i, cols)
    bounds = [0, *accumulate(W.shape[0] for W in Ws)]
    column_loss = prepruned_loss(S, pattern, block_size, list(zip(bounds[:-1], bounds[1:], strict=True)))
    full = cols // block_size  # a partial last block is not compared, and stays last
    block_loss = column_loss[: full * block_size].reshape(full, block_size).sum(1)
    ratio = relative_range(block_loss)
    if ratio <= threshold:
        log.debug("%s: not columnar (relative range of block loss %.3f <= %g)", layer, ratio, threshold)
        return None
    log.info("%s: columnar (relative range of block loss %.3f > %g): ROSE order", layer, ratio, threshold)
    unit_loss = column_loss.reshape(cols // unit, unit).sum(1)  # (cols / unit,)
    starts = [b * block_size for b in torch.argsort(block_loss, descending=True, stable=True).tolist()]
    if full * block_size < cols:
        starts.append(full * block_size)  # the partial block stays last
    pieces = []
    for i1 in starts:
        u1, u2 = i1 // unit, min(i1 + block_size, cols) // unit
        units = u1 + torch.argsort(unit_loss[u1:u2], descending=True, stable=True)  # by unit loss
        pieces.append((units.unsqueeze(1) * unit + torch.arange(unit, device=units.device)).flatten())
    return torch.cat(pieces)


def permute_back(result: SolveResult, perm: torch.Tensor) -> SolveResult:
    """A result of the sweep on ``W[:, P]`` in the original column order (the loss is a sum: kept)."""
    inverse = torch.argsort(perm).to(result.weight.device)
    return dataclasses.replace(result, weight=result.weight[:, inverse], mask=result.mask[:, inverse])


def _permuted(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``P H Pᵀ``: ``H[P][:, P]``."""
    perm = perm.to(H.device)
    return H.index_select(0, perm).index_select(1, perm)


def rose_solver(solve: Callable[..., SolveResult], block_size: int, threshold: float = ROSE_THRESHOLD):
    """``solve`` (``layer_solver``'s, natural order) run in ROSE order on columnar layers.

    Each solve computes the permutation from ``W`` and ``H``, runs ``solve`` on the permuted
    problem (its moments and factor too) and puts the result back. ``factorize`` gives ``None``:
    the factor belongs to the permuted ``H``, so it is computed inside (once per stacked group).
    A layer that is not columnar is solved as is, with the ``factor`` it was given.
    """

    def solve_rose(W, H, pattern, *, layer: str = "", moments=None, factor=None) -> SolveResult:
        perm = rose_order([W], H, pattern, block_size, threshold, layer)
        if perm is None:
            return solve(W, H, pattern, layer=layer, moments=moments, factor=factor)
        result = solve(W[:, perm.to(W.device)], _permuted(H, perm), pattern, layer=layer,
                       moments=_moments(moments, perm))  # fmt: skip
        return permute_back(result, perm)

    def factorize(H, *, layer: str = ""):
        """``None``: the factor depends on the order, i.e. on the weights; each solve makes its own."""
        return None

    def stacked(Ws, H, pattern, *, layers: list[str], moments=None, factor=None) -> list[SolveResult]:
        """One permutation for the group (from its stacked weights), one factor, one sweep."""
        perm = rose_order(Ws, H, pattern, block_size, threshold, "+".join(layers))
        if perm is None:
            return solve.stacked(Ws, H, pattern, layers=layers, moments=moments, factor=factor)
        results = solve.stacked([W[:, perm.to(W.device)] for W in Ws], _permuted(H, perm), pattern,
                                layers=layers, moments=_moments(moments, perm))  # fmt: skip
        return [permute_back(r, perm) for r in results]

    solve_rose.factorize = factorize
    if hasattr(solve, "stacked"):
        solve_rose.stacked = stacked
    return solve_rose


def _moments(moments, perm: torch.Tensor):
    """DSnoT's per-column ``(mean, var)`` in the permuted order."""
    return None if moments is None else tuple(m[perm.to(m.device)] for m in moments)
