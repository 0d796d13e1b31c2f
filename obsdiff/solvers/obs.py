"""Optimal Brain Surgeon layer solver in the SparseGPT form (docs/METHOD.md §1).

Plain tensor math: ``W`` (rows, cols), ``H`` (cols, cols) and a sparsity pattern go in; the
pruned weight, its mask, the damping that was used and the OBS loss come out. Notation follows
the paper and the SparseGPT reference: ``Hinv`` is the upper Cholesky factor of ``H⁻¹``;
``W1, Q1, Err1, Losses1`` are the per-block working copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate

import torch

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4
DAMP_GROWTH = 10.0


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    Args:
        kind: ``"unstructured"`` or ``"nm"``.
        ratio: fraction of weights to remove (unstructured).
        n: weights removed in every aligned group of ``m`` input columns (N:M).
        m: group size (N:M).
        exact_count: unstructured only: prune exactly ``floor(numel * ratio)`` weights per block
            instead of the reference's ``<=`` threshold (which can remove one more).
        count: unstructured only: remove exactly this many weights of the layer (a non-uniform
            allocation's integer share, ``obsdiff.allocation``); ``None``: ``ratio`` decides.
            Spread over OBS column blocks and Wanda rows by :func:`split_count`; ``ratio`` is
            then only reported.
    """

    kind: str
    ratio: float = 0.0
    n: int = 0
    m: int = 0
    exact_count: bool = False
    count: int | None = None

    @property
    def target_sparsity(self) -> float:
        return self.n / self.m if self.kind == "nm" else self.ratio


def split_count(count: int, parts: int, start: int, stop: int) -> int:
    """The share of ``count`` removals that falls on items ``start:stop`` of ``parts`` equal items.

    ``floor(count·stop/parts) − floor(count·start/parts)``: proportional to ``stop − start``
    within one removal, and the shares of any partition of ``0:parts`` sum to ``count`` exactly
    (integer arithmetic, no float ratio to round).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return count * stop // parts - count * start // parts


@dataclass
class SolveResult:
    """Output of a layer solver.

    Args:
        weight: the pruned weight, in the input weight's dtype.
        mask: ``True`` where a weight was removed.
        damp: the absolute damping added to ``diag(H)``.
        damp_frac: the relative damping that succeeded (may exceed the requested one).
        obs_loss: SparseGPT's accumulated OBS loss ``Σ (w - q)² / U_qq²``.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    damp: float
    damp_frac: float
    obs_loss: float


class CholeskyError(RuntimeError):
    """Raised when ``H`` stays non positive definite after every damping retry."""


def damped_inverse(
    H: torch.Tensor, damp_frac: float, layer: str = ""
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Damp ``H`` and return its inverse and the upper Cholesky factor of that inverse.

    Retries with ``damp_frac`` grown tenfold (up to ``MAX_DAMP_RETRIES`` times) when the
    factorisation fails, and logs every retry; never falls back to another method.

    Args:
        H: (cols, cols) fp32 Hessian with dead columns already fixed.
        damp_frac: relative damping λ: ``H += λ · mean(diag(H)) · I``.
        layer: name used in log and error messages.

    Returns:
        ``(H⁻¹, Hinv, damp, damp_frac)``: the inverse of the damped ``H``, its upper Cholesky
        factor, the absolute and the relative damping used.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    frac = damp_frac
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = frac * mean_diag
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            inverse = torch.cholesky_inverse(L)
            Hinv = torch.linalg.cholesky(inverse, upper=True)
            if torch.isfinite(Hinv).all():
                if attempt:
                    log.warning(
                        "%s: Cholesky succeeded with damp_frac=%g after %d retries", layer, frac, attempt
                    )
                return inverse, Hinv, damp, frac
        except torch.linalg.LinAlgError:
            pass
        log.warning(
            "%s: Cholesky failed with damp_frac=%g; retrying with %g", layer, frac, frac * DAMP_GROWTH
        )
        frac *= DAMP_GROWTH
    raise CholeskyError(
        f"{layer or 'layer'}: the Hessian is not positive definite even with damp_frac="
        f"{frac / DAMP_GROWTH:g}. Calibrate on more prompts/steps (calibration.num_prompts), or raise "
        f"pruner.damp_frac (now {damp_frac:g})."
    )


def inverse_cholesky(H: torch.Tensor, damp_frac: float, layer: str = "") -> tuple[torch.Tensor, float, float]:
    """``(Hinv, damp, damp_frac)`` of :func:`damped_inverse`: the upper Cholesky factor of the
    damped ``H⁻¹``, the absolute and the relative damping used."""
    _, Hinv, damp, frac = damped_inverse(H, damp_frac, layer)
    return Hinv, damp, frac


@dataclass(frozen=True)
class Factor:
    """What a solve needs from ``H`` alone: computed once per input group, shared by its layers.

    Args:
        Hinv: upper Cholesky factor of the damped ``H⁻¹`` (dead columns fixed first).
        dead: ``diag(H) == 0``: inputs that never fire (their weights are zeroed).
        damp: absolute damping added to ``diag(H)``.
        damp_frac: relative damping that succeeded.
    """

    Hinv: torch.Tensor
    dead: torch.Tensor
    damp: float
    damp_frac: float


def factorize(
    H: torch.Tensor, damp_frac: float = 0.01, layer: str = "", device: torch.device | None = None
) -> Factor:
    """Fix dead columns, damp and factorise ``H`` (not modified): the part of :func:`obs_solve`
    that depends on ``H`` only, so layers reading one input share it bit for bit."""
    H = H.detach().clone().float().to(device if device is not None else H.device)
    dead = torch.diag(H) == 0  # dead inputs: H_jj = 1 (and W[:, j] = 0 in the solve)
    H[dead, dead] = 1
    Hinv, damp, used_frac = inverse_cholesky(H, damp_frac, layer)
    return Factor(Hinv, dead, damp, used_frac)


def _block_mask(W1: torch.Tensor, d: torch.Tensor, pattern: Pattern, k: int | None = None) -> torch.Tensor:
    """Unstructured mask of one column block, chosen over all rows at once (reference rule);
    ``k``: remove exactly that many (``pattern.count``'s share of the block)."""
    tmp = W1**2 / d.reshape(1, -1) ** 2  # (rows, count) saliency w² / U_qq²
    flat = tmp.flatten()
    exact = pattern.exact_count or k is not None
    k = int(flat.numel() * pattern.ratio) if k is None else k
    if exact:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.argsort(flat, stable=True)[:k]] = True
        return mask.reshape(tmp.shape)
    thresh = torch.sort(flat)[0][min(k, flat.numel() - 1)]
    return tmp <= thresh


def obs_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    damp_frac: float = 0.01,
    block_size: int = 128,
    layer: str = "",
    *,
    mask: torch.Tensor | None = None,
    factor: Factor | None = None,
) -> SolveResult:
    """Prune one linear layer with OBS (docs/METHOD.md §1): :func:`obs_solve_stacked` of one layer.

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian ``2 Σ α X Xᵀ``; not modified.
        pattern: unstructured ratio or N:M.
        damp_frac: relative damping λ.
        block_size: columns per lazy-update block ``B``.
        layer: name for log and error messages.
        mask: optional fixed (rows, cols) mask, ``True`` = remove (e.g. from magnitude or Wanda):
            selection is skipped and only the OBS compensation runs; ``pattern`` is then only
            reported.
        factor: ``factorize(H, damp_frac)`` computed once for every layer of an input group
            (the same numbers as computing it here).

    Returns:
        The pruned weight (input dtype), mask, damping used and OBS loss.
    """
    masks = None if mask is None else [mask]
    return obs_solve_stacked([W], H, pattern, damp_frac, block_size, [layer], masks=masks, factor=factor)[0]


def obs_solve_stacked(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    pattern: Pattern,
    damp_frac: float = 0.01,
    block_size: int = 128,
    layers: list[str] | None = None,
    *,
    masks: list[torch.Tensor] | None = None,
    factor: Factor | None = None,
) -> list[SolveResult]:
    """Prune layers that read one input (one ``H``) in one column sweep of their row-stacked weights.

    Bit for bit what :func:`obs_solve` gives each layer with the shared ``factor``: the per-column
    OBS updates act row by row; the unstructured threshold is taken per layer (its rows of each
    block) and the lazy block update is one GEMM per layer, the same calls a separate solve makes.

    Args:
        Ws: (rows_i, cols) weights; not modified.
        H: (cols, cols) their shared Hessian; not modified.
        pattern: unstructured ratio or N:M.
        damp_frac: relative damping λ.
        block_size: columns per lazy-update block ``B``.
        layers: one name per weight for log and error messages.
        masks: optional fixed (rows_i, cols) masks, one per weight (see :func:`obs_solve`).
        factor: ``factorize(H, damp_frac)``, else computed here once.

    Returns:
        One result per weight, in order.
    """
    layers = list(layers) if layers is not None else [""] * len(Ws)
    cols = Ws[0].shape[1]
    for W, name in zip(Ws, layers, strict=True):
        if W.shape[1] != cols:
            raise ValueError(f"{name}: {W.shape[1]} input columns, the group has {cols}")
    if pattern.kind == "nm" and (cols % pattern.m or block_size % pattern.m):
        raise ValueError(
            f"{layers[0]}: N:M needs cols ({cols}) and block_size ({block_size}) divisible by M={pattern.m}"
        )
    if pattern.count is not None and len(Ws) > 1:
        raise ValueError(f"{layers[0]}: pattern.count is one layer's removals; solve the layers one by one")
    if pattern.count is not None and not 0 <= pattern.count <= Ws[0].numel():
        raise ValueError(f"{layers[0]}: pattern.count must be in [0, {Ws[0].numel()}], got {pattern.count}")
    for W, M, name in zip(Ws, masks if masks is not None else [None] * len(Ws), layers, strict=True):
        if M is not None and M.shape != W.shape:
            raise ValueError(f"{name}: mask shape {tuple(M.shape)} != weight shape {tuple(W.shape)}")
    bounds = [0, *accumulate(W.shape[0] for W in Ws)]
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))  # row range of each layer in the stack
    W = torch.cat([W.detach() for W in Ws]).float()  # (Σ rows_i, cols), a copy
    fixed_mask = None if masks is None else torch.cat([M.to(W.device, torch.bool) for M in masks])
    if factor is None:
        factor = factorize(H, damp_frac, layers[0], device=W.device)
    W[:, factor.dead.to(W.device)] = 0  # dead inputs
    mask, Losses = _sweep(W, factor.Hinv.to(W.device), pattern, block_size, segments, fixed_mask)
    return [
        SolveResult(
            weight=W[r0:r1].to(W0.dtype),
            mask=mask[r0:r1],
            damp=factor.damp,
            damp_frac=factor.damp_frac,
            obs_loss=float(Losses[r0:r1].sum()),
        )
        for W0, (r0, r1) in zip(Ws, segments, strict=True)
    ]


def _sweep(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    pattern: Pattern,
    block_size: int,
    segments: list[tuple[int, int]],
    fixed_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS column sweep over ``W`` (rows, cols) fp32, in place; returns ``(mask, Losses)``.

    Args:
        W: (rows, cols) weight with dead inputs zeroed, overwritten with the pruned weight.
        Hinv: (cols, cols) upper Cholesky factor of the damped ``H⁻¹``.
        pattern: unstructured ratio or N:M (ignored where ``fixed_mask`` is given).
        block_size: columns per lazy-update block ``B``.
        segments: ``(r0, r1)`` row ranges of the stacked layers; unstructured thresholds and the
            lazy-update GEMMs are per segment.
        fixed_mask: (rows, cols) mask to compensate instead of choosing one.

    Returns:
        The (rows, cols) mask, ``True`` = removed, and the (rows,) OBS losses.
    """
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    Losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if fixed_mask is not None:
            mask1 = fixed_mask[:, i1:i2].clone()
        elif pattern.kind == "unstructured":
            k = None if pattern.count is None else split_count(pattern.count, cols, i1, i2)
            mask1 = torch.cat([_block_mask(W1[r0:r1], d1, pattern, k) for r0, r1 in segments])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern.kind == "nm" and fixed_mask is None and i % pattern.m == 0:
                # N:M on the current, already-compensated weights.
                tmp = W1[:, i : i + pattern.m] ** 2 / d1[i : i + pattern.m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, pattern.n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            # OBS update of the remaining columns of the block: δ = -err · U[i, i:].
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        for r0, r1 in segments:  # lazy update of later columns, one GEMM per layer
            W[r0:r1, i2:] -= Err1[r0:r1].matmul(Hinv[i1:i2, i2:])
    return mask, Losses


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative, Hessian-weighted error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` used in ``layers.csv``.

    Args:
        W: (rows, cols) dense weight.
        W_hat: (rows, cols) pruned weight.
        H: (cols, cols) the layer's own timestep-weighted Hessian (undamped).
    """
    W = W.float()
    H = H.float().to(W.device)
    delta = W - W_hat.float().to(W.device)
    num = torch.sum((delta @ H) * delta)
    den = torch.sum((W @ H) * W)
    return float(num / den) if den > 0 else float("nan")
