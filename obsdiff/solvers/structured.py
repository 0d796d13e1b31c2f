"""Structured OBS: FFN neurons and attention heads (METHOD.md §4).

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

from obsdiff.solvers.obs import CholeskyError, inverse_cholesky, reconstruction_error

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
    W: torch.Tensor, H: torch.Tensor, damp_frac: float, layer: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fp32 copies, dead inputs fixed, damping added once (with obs.py's retry rule)."""
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0  # diag(H) == 0 → H_jj = 1, W[:, j] = 0
    H[dead, dead] = 1
    W[:, dead] = 0
    _, damp, used_frac = inverse_cholesky(H, damp_frac, layer)
    H.diagonal().add_(damp)  # H += λ · mean(diag H) · I
    return W, H, used_frac


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
) -> StructuredResult:
    """Remove ``num_remove`` input columns (FFN neurons) of a down-projection (METHOD.md §4).

    Args:
        W: (rows, cols) down-projection weight, cols = FFN hidden width; not modified.
        H: (cols, cols) Hessian of its input; not modified.
        num_remove: exact number of columns to remove.
        damp_frac: relative damping λ, added once before the loop.
        compensate: ``False`` only zeroes the chosen columns (same saliency, no OBS update).
        first_chunk, chunk, max_chunk: removal schedule, see :func:`chunk_sizes`.
        layer: name for log and error messages.
    """
    cols = W.shape[1]
    if not 0 <= num_remove <= cols:
        raise ValueError(f"{layer}: num_remove={num_remove} must lie in [0, {cols}]")
    W0, H0, dtype = W, H, W.dtype
    W, H, used_frac = _prepare(W, H, damp_frac, layer)
    removed = torch.zeros(cols, dtype=torch.bool, device=W.device)
    for n in chunk_sizes(num_remove, first_chunk, chunk, max_chunk):
        Hinv = _inverse(H, layer)  # (cols, cols)
        saliency = torch.sum(W**2, dim=0) / torch.diag(Hinv)  # Σ_r W[r,q]² / [H⁻¹]_qq
        saliency[removed] = float("inf")
        idx = torch.argsort(saliency, stable=True)[:n]
        if compensate:
            obs_remove_columns(W, Hinv, idx, layer)
        else:
            W[:, idx] = 0
        _mask_hessian(H, idx)
        removed[idx] = True
    W = W.to(dtype)
    return StructuredResult(
        weight=W,
        removed=removed.nonzero().flatten(),
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
) -> StructuredResult:
    """Remove a given set of input columns at once (e.g. chosen by L1 norm), with or without OBS.

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian of its input; not modified.
        idx: columns to remove.
        damp_frac: relative damping λ.
        compensate: apply the joint OBS update to the remaining columns.
        layer: name for log and error messages.
    """
    W0, dtype = W, W.dtype
    idx = torch.as_tensor(idx, dtype=torch.long, device=W.device)
    W, Hd, used_frac = _prepare(W, H, damp_frac, layer)
    if compensate and idx.numel():
        obs_remove_columns(W, _inverse(Hd, layer), idx, layer)
    W[:, idx] = 0
    W = W.to(dtype)
    return StructuredResult(
        weight=W, removed=torch.sort(idx)[0], damp_frac_used=used_frac, loss=reconstruction_error(W0, W, H)
    )


def head_saliency(W: torch.Tensor, Hinv: torch.Tensor, head_dim: int, removed: set[int]) -> torch.Tensor:
    """Per-head OBS score of an attention output projection; removed heads get ``+inf``.

    Args:
        W: (rows, heads * head_dim) output-projection weight.
        Hinv: (heads * head_dim, heads * head_dim) ``H⁻¹`` of its (damped, masked) Hessian.
        head_dim: ``d_h``.
        removed: heads already removed.

    Returns:
        (heads,) score ``Σ_{k ∈ head j} Σ_r W[r,k]² / d_k`` with ``d = diag(chol(block_j))²``.
    """
    heads = W.shape[1] // head_dim
    blocks = Hinv.reshape(heads, head_dim, heads, head_dim).diagonal(dim1=0, dim2=2)  # (d_h, d_h, heads)
    blocks = blocks.permute(2, 0, 1)  # (heads, d_h, d_h) diagonal blocks of H⁻¹
    d = torch.linalg.cholesky(blocks, upper=True).diagonal(dim1=-2, dim2=-1) ** 2  # (heads, d_h)
    col_sq = torch.sum(W.float() ** 2, dim=0).reshape(heads, head_dim)  # (heads, d_h) Σ_r W[r,k]²
    score = torch.sum(col_sq / d, dim=1)
    score[sorted(removed)] = float("inf")
    return score


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
        score = score.detach().double().cpu().clone()
        score[sorted(removed)] = float("inf")
        order = torch.argsort(score, stable=True)  # ascending; rank 0 = least important
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        fused += 1.0 / (k + rank + 1).double()
    return fused


def pick_head(fused: torch.Tensor, removed: set[int]) -> int:
    """Index of the next head to remove: argmax of the fused score over heads not yet removed."""
    if len(removed) >= fused.numel():
        raise ValueError(f"every one of the {fused.numel()} heads is already removed")
    fused = fused.clone()
    fused[sorted(removed)] = float("-inf")
    return int(torch.argmax(fused))


def remove_heads(
    Ws: list[torch.Tensor],
    Hs: list[torch.Tensor],
    head_dim: int,
    num_remove: int,
    damp_frac: float = 0.01,
    compensate: bool = True,
    rrf_k: int = RRF_K,
    layer: str = "",
) -> HeadResult:
    """Remove ``num_remove`` heads jointly from attention output projections (METHOD.md §4).

    Args:
        Ws: (rows_p, heads * head_dim) output projections (``to_out.0``, ``to_add_out``; one is fine).
        Hs: (heads * head_dim, heads * head_dim) Hessian of each projection's input.
        head_dim: ``d_h`` (64 for SD3/SD3.5, 128 for Flux).
        num_remove: heads to remove, one per iteration.
        damp_frac: relative damping λ, added once per Hessian before the loop.
        compensate: ``False`` only zeroes the chosen heads' columns.
        rrf_k: Reciprocal Rank Fusion constant.
        layer: name for log and error messages.
    """
    if len(Ws) != len(Hs) or not Ws:
        raise ValueError(f"{layer}: need one Hessian per projection, got {len(Ws)} weights, {len(Hs)} H")
    cols = Ws[0].shape[1]
    if cols % head_dim or any(W.shape[1] != cols for W in Ws):
        raise ValueError(f"{layer}: every projection needs heads * head_dim={head_dim} input columns")
    heads = cols // head_dim
    if not 0 <= num_remove <= heads:
        raise ValueError(f"{layer}: num_remove={num_remove} must lie in [0, {heads}]")
    prepared = [_prepare(Ws[p], Hs[p], damp_frac, f"{layer}[{p}]") for p in range(len(Ws))]
    Wf, Hf, fracs = (list(x) for x in zip(*prepared, strict=True))  # fp32 W, damped H, λ per projection
    removed: list[int] = []
    for _ in range(num_remove):
        Hinvs = [_inverse(H, layer) for H in Hf]
        scores = [head_saliency(Wf[p], Hinvs[p], head_dim, set(removed)) for p in range(len(Wf))]
        j = pick_head(rrf_fuse(scores, set(removed), rrf_k), set(removed))
        for W, H, Hinv in zip(Wf, Hf, Hinvs, strict=True):
            idx = torch.arange(j * head_dim, (j + 1) * head_dim, device=W.device)  # head j's columns
            if compensate:
                obs_remove_columns(W, Hinv, idx, layer)
            else:
                W[:, idx] = 0
            _mask_hessian(H, idx)
        removed.append(j)
    weights = [W.to(W0.dtype) for W, W0 in zip(Wf, Ws, strict=True)]
    losses = [reconstruction_error(W0, W, H0) for W0, W, H0 in zip(Ws, weights, Hs, strict=True)]
    return HeadResult(weights=weights, removed=removed, damp_frac_used=fracs, losses=losses)
