"""Structured OBS: FFN neurons and attention heads (docs/METHOD.md §4).

Plain tensor math, as in ``obs.py``. A removal step takes a set ``P`` of input columns of ``W``
(one chunk of FFN neurons, or one head's ``d_h`` columns), prunes them with sequential OBS and
compensates every remaining column ``K``. With ``Hinv = H⁻¹`` permuted to ``(P, K)`` and ``U`` its
upper Cholesky factor, the errors ``E`` of the pruned columns and the update of the kept ones are

    E[:, i] = w'_i / U_ii  (w' already updated by the errors of the earlier pruned columns)
    W[:, K] -= E · U[P, K]

Only the first ``|P|`` rows of ``U`` enter: ``U_PP = chol(Hinv_PP)`` (upper) and
``U_PK = U_PP⁻ᵀ Hinv_PK``, and the sequential loop is the triangular solve ``E U_PP = W_P``. So
``E U_PK = W_P Hinv_PP⁻¹ Hinv_PK``: the exact joint OBS update, equal to removing the columns
one by one with ``δ = -(w_q / Hinv_qq) · Hinv[q, :]`` and re-inverting in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from obsdiff.solvers.obs import CholeskyError, damped_inverse, reconstruction_error

log = logging.getLogger(__name__)

RRF_K = 60


@dataclass(frozen=True)
class StructuredPattern:
    """Structured sparsity: a fraction of the heads and of the FFN neurons of every pruned block.

    Args:
        ratio: the nominal fraction (reported as the target sparsity).
        head_ratio: fraction of attention heads removed (``round(heads · head_ratio)``).
        ffn_ratio: fraction of FFN neurons removed (``round(width · ffn_ratio)``), image and
            context FFN independently.
    """

    ratio: float
    head_ratio: float
    ffn_ratio: float

    kind = "structured"

    @property
    def target_sparsity(self) -> float:
        return self.ratio

    def num_heads(self, heads: int) -> int:
        return round(heads * self.head_ratio)

    def num_neurons(self, width: int) -> int:
        return round(width * self.ffn_ratio)


@dataclass
class StructuredResult:
    """Output of :func:`remove_ffn_columns`.

    Args:
        weight: (rows, cols) weight in the input dtype; removed columns are exactly zero.
        removed: sorted indices of the removed columns (LongTensor).
        damp_frac_used: the relative damping that succeeded (may exceed the requested one).
        loss: relative error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the undamped ``H``.
    """

    weight: torch.Tensor
    removed: torch.Tensor
    damp_frac_used: float
    loss: float


@dataclass
class HeadResult:
    """Output of :func:`remove_heads`; lists follow the order of the input projections.

    Args:
        weights: (rows_p, heads * head_dim) weights in their input dtypes; removed heads' columns zero.
        removed: removed head indices, in removal order.
        damp_frac_used: relative damping used per projection.
        losses: relative reconstruction error per projection (undamped ``H``).
    """

    weights: list[torch.Tensor]
    removed: list[int]
    damp_frac_used: list[float]
    losses: list[float]


def _prepare(
    W: torch.Tensor, H: torch.Tensor, damp_frac: float, layer: str, pre_removed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """fp32 copies, dead inputs fixed, damping added once (with obs.py's retry rule).

    ``pre_removed`` columns (removed by an earlier group of the same layer, e.g. Flux heads before
    MLP neurons of one ``proj_out``) are zeroed and decoupled in ``H`` after the damping, which
    is the state the earlier removal left them in.

    Returns:
        ``(W, H, damp_frac, H⁻¹)``: the inverse of the damped ``H`` comes from the factorisation
        that chose the damping (the same numbers as ``_inverse(H)``); ``None`` when
        ``pre_removed`` changed ``H`` after it.
    """
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0  # diag(H) == 0 → H_jj = 1, W[:, j] = 0
    H[dead, dead] = 1
    W[:, dead] = 0
    inverse, _, damp, used_frac = damped_inverse(H, damp_frac, layer)
    H.diagonal().add_(damp)  # H += λ · mean(diag H) · I
    if pre_removed is not None and pre_removed.numel():
        _mask_hessian(H, pre_removed)
        W[:, pre_removed] = 0
        inverse = None
    return W, H, used_frac, inverse


def column_range(cols: tuple[int, int] | None, width: int) -> tuple[int, int]:
    """``cols`` as ``(start, stop)``; ``None`` = every input column."""
    start, stop = (0, width) if cols is None else cols
    if not 0 <= start < stop <= width:
        raise ValueError(f"column range {cols} does not fit {width} input columns")
    return start, stop


def _inverse(H: torch.Tensor, layer: str) -> torch.Tensor:
    """``H⁻¹`` via Cholesky; raises :class:`CholeskyError` with advice when ``H`` is not PD."""
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(H))
    except torch.linalg.LinAlgError as exc:
        raise CholeskyError(
            f"{layer or 'layer'}: the masked, damped Hessian lost positive definiteness during "
            "structured removal. Raise pruner.damp_frac or calibrate on more prompts/steps."
        ) from exc


def _mask_hessian(H: torch.Tensor, idx: torch.Tensor) -> None:
    """Decouple removed inputs: ``H[idx,:] = H[:,idx] = 0; H[idx,idx] = 1`` (in place)."""
    H[idx, :] = 0
    H[:, idx] = 0
    H[idx, idx] = 1


def obs_remove_columns(W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor, layer: str = "") -> None:
    """Prune columns ``idx`` of ``W`` with sequential OBS and compensate all others (in place).

    Args:
        W: (rows, cols) fp32 weight, modified in place.
        Hinv: (cols, cols) ``H⁻¹`` of the current (damped, masked) Hessian.
        idx: (p,) column indices to remove, in the order OBS processes them.
        layer: name for error messages.
    """
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    keep[idx] = False
    try:
        U_PP = torch.linalg.cholesky(Hinv[idx][:, idx], upper=True)  # (p, p), Hinv_PP = U_PPᵀ U_PP
    except torch.linalg.LinAlgError as exc:
        raise CholeskyError(f"{layer or 'layer'}: H⁻¹ block not PD; raise pruner.damp_frac.") from exc
    # Sequential OBS errors err_i = w'_i / U_ii, i.e. E · U_PP = W_P.
    E = torch.linalg.solve_triangular(U_PP, W[:, idx], upper=True, left=False)  # (rows, p)
    # Rows P of the upper Cholesky factor of Hinv in (P, K) order: U_PK = U_PP⁻ᵀ Hinv_PK.
    U_PK = torch.linalg.solve_triangular(U_PP.T, Hinv[idx][:, keep], upper=False)  # (p, k)
    W[:, keep] -= E @ U_PK  # W[:, K] -= E · U[P, K]
    W[:, idx] = 0


def chunk_sizes(
    num_remove: int, first_chunk: int | None = None, chunk: int = 64, max_chunk: int = 1024
) -> list[int]:
    """Columns removed per iteration (reference schedule), summing to ``num_remove``.

    Args:
        num_remove: total columns to remove.
        first_chunk: size of the first chunk; ``None`` → ``(num_remove − 512) // 2`` clamped to
            ``[chunk, max_chunk]``.
        chunk: size of every later chunk.
        max_chunk: upper bound on any chunk.
    """
    chunk = max(1, min(chunk, max_chunk))
    first = (num_remove - 512) // 2 if first_chunk is None else first_chunk
    first = min(max(first, chunk if first_chunk is None else 1), max_chunk)
    sizes, left = [], num_remove
    while left > 0:
        n = min(first if not sizes else chunk, left)
        sizes.append(n)
        left -= n
    return sizes


def remove_ffn_columns(
    W: torch.Tensor,
    H: torch.Tensor,
    num_remove: int,
    damp_frac: float = 0.01,
    compensate: bool = True,
    first_chunk: int | None = None,
    chunk: int = 64,
    max_chunk: int = 1024,
    layer: str = "",
    cols: tuple[int, int] | None = None,
    pre_removed: torch.Tensor | None = None,
) -> StructuredResult:
    """Remove ``num_remove`` input columns (FFN neurons) of a down-projection (docs/METHOD.md §4).

    Args:
        W: (rows, cols) down-projection weight, cols = FFN hidden width; not modified.
        H: (cols, cols) Hessian of its input; not modified.
        num_remove: exact number of columns to remove.
        damp_frac: relative damping λ, added once before the loop.
        compensate: ``False`` only zeroes the chosen columns (same saliency, no OBS update).
        first_chunk, chunk, max_chunk: removal schedule, see :func:`chunk_sizes`.
        layer: name for log and error messages.
        cols: ``(start, stop)``: only these columns are neurons (Flux ``proj_out``: the MLP part);
            compensation still reaches every kept column. ``None`` = all.
        pre_removed: columns already removed by an earlier group of this layer (see ``_prepare``).

    Returns:
        ``removed`` holds only the columns removed here (absolute indices).
    """
    start, stop = column_range(cols, W.shape[1])
    if not 0 <= num_remove <= stop - start:
        raise ValueError(f"{layer}: num_remove={num_remove} must lie in [0, {stop - start}]")
    W0, H0, dtype = W, H, W.dtype
    W, H, used_frac, Hinv = _prepare(W, H, damp_frac, layer, pre_removed)
    removed = torch.zeros(stop - start, dtype=torch.bool, device=W.device)
    for step, n in enumerate(chunk_sizes(num_remove, first_chunk, chunk, max_chunk)):
        if step or Hinv is None:  # H was masked since the last inverse
            Hinv = _inverse(H, layer)  # (cols, cols)
        Wn = W[:, start:stop]  # (rows, neurons)
        saliency = torch.sum(Wn**2, dim=0) / torch.diag(Hinv)[start:stop]  # Σ_r W[r,q]² / [H⁻¹]_qq
        saliency[removed] = float("inf")
        local = torch.argsort(saliency, stable=True)[:n]
        removed[local] = True
        idx = local + start
        if compensate:
            obs_remove_columns(W, Hinv, idx, layer)
        else:
            W[:, idx] = 0
        _mask_hessian(H, idx)
    W = W.to(dtype)
    return StructuredResult(
        weight=W,
        removed=removed.nonzero().flatten() + start,
        damp_frac_used=used_frac,
        loss=reconstruction_error(W0, W, H0),
    )


def remove_columns(
    W: torch.Tensor,
    H: torch.Tensor,
    idx: torch.Tensor,
    damp_frac: float = 0.01,
    compensate: bool = True,
    layer: str = "",
    pre_removed: torch.Tensor | None = None,
) -> StructuredResult:
    """Remove a given set of input columns at once (e.g. chosen by L1 norm), with or without OBS.

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian of its input; not modified.
        idx: columns to remove.
        damp_frac: relative damping λ.
        compensate: apply the joint OBS update to the remaining columns.
        layer: name for log and error messages.
        pre_removed: columns already removed by an earlier group of this layer (see ``_prepare``).
    """
    W0, dtype = W, W.dtype
    idx = torch.as_tensor(idx, dtype=torch.long, device=W.device)
    W, Hd, used_frac, Hinv = _prepare(W, H, damp_frac, layer, pre_removed)
    if compensate and idx.numel():
        obs_remove_columns(W, Hinv if Hinv is not None else _inverse(Hd, layer), idx, layer)
    W[:, idx] = 0
    W = W.to(dtype)
    return StructuredResult(
        weight=W, removed=torch.sort(idx)[0], damp_frac_used=used_frac, loss=reconstruction_error(W0, W, H)
    )


def head_saliency(
    W: torch.Tensor, Hinv: torch.Tensor, head_dim: int, removed: set[int], cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """Per-head OBS score of an attention output projection; removed heads get ``+inf``.

    Args:
        W: (rows, in_features) output-projection weight.
        Hinv: (in_features, in_features) ``H⁻¹`` of its (damped, masked) Hessian.
        head_dim: ``d_h``.
        removed: heads already removed.
        cols: ``(start, stop)`` of the head columns (``heads · d_h`` of them; Flux ``proj_out``:
            the attention part); ``None`` = every column.

    Returns:
        (heads,) score ``Σ_{k ∈ head j} Σ_r W[r,k]² / d_k`` with ``d = diag(chol(block_j))²``.
    """
    start, stop = column_range(cols, W.shape[1])
    heads = (stop - start) // head_dim
    Hinv = Hinv[start:stop, start:stop]
    blocks = Hinv.reshape(heads, head_dim, heads, head_dim).diagonal(dim1=0, dim2=2)  # (d_h, d_h, heads)
    blocks = blocks.permute(2, 0, 1)  # (heads, d_h, d_h) diagonal blocks of H⁻¹
    d = torch.linalg.cholesky(blocks, upper=True).diagonal(dim1=-2, dim2=-1) ** 2  # (heads, d_h)
    col_sq = torch.sum(W[:, start:stop].float() ** 2, dim=0).reshape(heads, head_dim)  # (heads, d_h)
    score = torch.sum(col_sq / d, dim=1)
    score[sorted(removed)] = float("inf")
    return score


def head_ranks(score: torch.Tensor, removed: set[int]) -> torch.Tensor:
    """0-based rank of every head in one projection (0 = least important; removed heads last)."""
    score = score.detach().double().cpu().clone()
    score[sorted(removed)] = float("inf")
    order = torch.argsort(score, stable=True)  # ascending; rank 0 = least important
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def rrf_fuse(scores: list[torch.Tensor], removed: set[int], k: int = RRF_K) -> torch.Tensor:
    """Reciprocal Rank Fusion of per-projection head scores: ``Σ_p 1 / (k + rank_p + 1)``.

    Args:
        scores: (heads,) score per projection; lower = less important.
        removed: heads already removed; they sort last in every ranking.
        k: RRF constant (60 in the reference).

    Returns:
        (heads,) fused score; higher = less important (rank 0 is the least important head).
    """
    fused = torch.zeros(scores[0].shape[0], dtype=torch.float64)
    for score in scores:
        fused += 1.0 / (k + head_ranks(score, removed) + 1).double()
    return fused


def pick_head(fused: torch.Tensor, removed: set[int], first_rank: torch.Tensor | None = None) -> int:
    """The next head to remove: the highest fused score over heads not yet removed.

    Args:
        fused: (heads,) fused score (:func:`rrf_fuse`).
        removed: heads already removed.
        first_rank: (heads,) ranks of the first output projection (``to_out.0``). Exact ties of
            the fused score (ranks (0, 1) and (1, 0) fuse to the same value) go to the head that
            this projection ranks less important, as in the reference; ``None``: the lowest index.
    """
    if len(removed) >= fused.numel():
        raise ValueError(f"every one of the {fused.numel()} heads is already removed")
    fused = fused.clone()
    fused[sorted(removed)] = float("-inf")
    if first_rank is None:
        return int(torch.argmax(fused))
    tied = (fused == fused.max()).nonzero().flatten()
    return int(tied[torch.argmin(first_rank[tied])])


def remove_heads(
    Ws: list[torch.Tensor],
    Hs: list[torch.Tensor],
    head_dim: int,
    num_remove: int,
    damp_frac: float = 0.01,
    compensate: bool = True,
    rrf_k: int = RRF_K,
    layer: str = "",
    cols: tuple[int, int] | None = None,
) -> HeadResult:
    """Remove ``num_remove`` heads jointly from attention output projections (docs/METHOD.md §4).

    Args:
        Ws: (rows_p, in_features) output projections (``to_out.0``, ``to_add_out``; one is fine).
        Hs: (in_features, in_features) Hessian of each projection's input.
        head_dim: ``d_h`` (64 for SD3/SD3.5, 128 for Flux).
        num_remove: heads to remove, one per iteration.
        damp_frac: relative damping λ, added once per Hessian before the loop.
        compensate: ``False`` only zeroes the chosen heads' columns.
        rrf_k: Reciprocal Rank Fusion constant.
        layer: name for log and error messages.
        cols: ``(start, stop)`` of the head columns in every projection (``None`` = all columns);
            compensation reaches every kept column, inside the range or not.
    """
    if len(Ws) != len(Hs) or not Ws:
        raise ValueError(f"{layer}: need one Hessian per projection, got {len(Ws)} weights, {len(Hs)} H")
    width = Ws[0].shape[1]
    start, stop = column_range(cols, width)
    if (stop - start) % head_dim or any(W.shape[1] != width for W in Ws):
        raise ValueError(f"{layer}: every projection needs heads * head_dim={head_dim} input columns")
    heads = (stop - start) // head_dim
    if not 0 <= num_remove <= heads:
        raise ValueError(f"{layer}: num_remove={num_remove} must lie in [0, {heads}]")
    prepared = [_prepare(Ws[p], Hs[p], damp_frac, f"{layer}[{p}]") for p in range(len(Ws))]
    Wf, Hf, fracs, Hinvs = (list(x) for x in zip(*prepared, strict=True))  # fp32 W, damped H, λ, H⁻¹
    removed: list[int] = []
    for step in range(num_remove):
        if step:  # the previous head was masked out of every H
            Hinvs = [_inverse(H, layer) for H in Hf]
        scores = [head_saliency(Wf[p], Hinvs[p], head_dim, set(removed), cols) for p in range(len(Wf))]
        fused = rrf_fuse(scores, set(removed), rrf_k)
        j = pick_head(fused, set(removed), head_ranks(scores[0], set(removed)))
        for W, H, Hinv in zip(Wf, Hf, Hinvs, strict=True):
            idx = torch.arange(start + j * head_dim, start + (j + 1) * head_dim, device=W.device)  # head j
            if compensate:
                obs_remove_columns(W, Hinv, idx, layer)
            else:
                W[:, idx] = 0
            _mask_hessian(H, idx)
        removed.append(j)
    weights = [W.to(W0.dtype) for W, W0 in zip(Wf, Ws, strict=True)]
    losses = [reconstruction_error(W0, W, H0) for W0, W, H0 in zip(Ws, weights, Hs, strict=True)]
    return HeadResult(weights=weights, removed=removed, damp_frac_used=fracs, losses=losses)
