"""OWL's non-uniform layer-wise sparsity (Yin et al., ICML 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity"), as plain math.

Every "layer" ``l`` (a transformer block, or one linear layer) gets its Layerwise Outlier
Distribution (OWL §3.2) from the Wanda scores ``A = |W| · ‖X‖₂`` of its weights:

    LOD_l = #{ A_ij > M · mean(A) } / #A           (one mean over all of the layer's weights)

Layers with more outliers are pruned less: ``D_l = 2λ (LOD_l − min LOD) / (max LOD − min LOD)``
(the reference's min-max scaling into a range of width 2λ) and

    S_l = clip(S − D_l + c,  S − λ,  S + λ)  ∩ [0, 1]

with the one shift ``c`` that makes the parameter-weighted mean ``Σ n_l S_l / Σ n_l`` equal the
target ``S``. Without clipping and with equal layer sizes this is the reference code's rule
(``S_l = S − (D_l − mean D)``); the clip enforces the paper's ``S_l ∈ [S − λ, S + λ]``, which the
reference's rule only approximates, and the weighted mean makes blocks of different sizes (SD3's
last block, Flux's single blocks) add up to the target. Integer counts come last
(:func:`apportion`): ``Σ_l k_l = round(S · Σ n_l)`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The reference's defaults (luuyin/OWL README and scripts, LLaMA-7B at 70 %): M = 5, λ = 0.08.
THRESHOLD_M = 5.0
LAM = 0.08


def outlier_ratio(scores: Sequence[torch.Tensor], threshold_m: float = THRESHOLD_M) -> float:
    """``LOD``: the fraction of ``scores`` above ``threshold_m`` times their common mean (OWL §3.2).

    Args:
        scores: Wanda scores ``|W| · ‖X‖₂`` of every weight of one OWL layer (any shapes; one
            block's target layers together share one mean, as the reference concatenates them).
        threshold_m: the outlier threshold ``M``.
    """
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        raise ValueError("outlier_ratio needs at least one score")
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / numel
    above = sum(int((s > threshold_m * mean).sum()) for s in scores)
    return above / numel


def owl_sparsities(
    lod: Sequence[float], sizes: Sequence[int], target: float, lam: float = LAM
) -> list[float]:
    """OWL's sparsity per layer: more outliers, less sparsity; weighted mean ``target``, within ±λ.

    Args:
        lod: the layers' outlier ratios (:func:`outlier_ratio`).
        sizes: the layers' weight counts ``n_l`` (the weights of the mean).
        target: the global sparsity ``S``.
        lam: the range ``λ``: every ``S_l ∈ [S − λ, S + λ] ∩ [0, 1]``.

    Returns:
        ``S_l`` per layer; all ``target`` when every LOD is equal or ``λ = 0``.
    """
    if len(lod) != len(sizes) or not lod:
        raise ValueError(f"need one size per outlier ratio, got {len(lod)} ratios and {len(sizes)} sizes")
    if not 0.0 <= target <= 1.0 or not lam >= 0.0:
        raise ValueError(f"need 0 <= target <= 1 and lam >= 0, got target={target}, lam={lam}")
    low, high = min(lod), max(lod)
    if high == low or lam == 0:
        return [float(target)] * len(lod)
    a = [target - 2 * lam * (x - low) / (high - low) for x in lod]  # S − D_l
    lo, hi = max(0.0, target - lam), min(1.0, target + lam)
    c = _shift(a, [float(n) for n in sizes], target, lo, hi)
    return [min(hi, max(lo, x + c)) for x in a]


def _shift(a: list[float], n: list[float], target: float, lo: float, hi: float) -> float:
    """The ``c`` with ``Σ n_l clip(a_l + c, lo, hi) = target Σ n_l``.

    The left side is continuous, piecewise linear and non-decreasing in ``c``, with kinks where an
    ``a_l + c`` meets ``lo`` or ``hi``; ``lo <= target <= hi`` puts the root between the first and
    the last kink, and on the piece holding it the root is one linear interpolation.
    """
    total = target * sum(n)

    def f(c: float) -> float:
        return sum(w * min(hi, max(lo, x + c)) for x, w in zip(a, n, strict=True)) - total

    kinks = sorted({lo - x for x in a} | {hi - x for x in a})
    values = [f(c) for c in kinks]
    for c0, c1, f0, f1 in zip(kinks, kinks[1:], values, values[1:], strict=False):
        if f0 <= 0 <= f1:
            return c0 if f1 == f0 else c0 + (c1 - c0) * (-f0) / (f1 - f0)
    return kinks[0] if values[0] >= 0 else kinks[-1]  # rounding at an end of the range


def apportion(shares: Sequence[float], sizes: Sequence[int], total: int) -> list[int]:
    """Integer counts ``k_l`` with ``Σ k_l = total``, ``0 <= k_l <= n_l`` and ``|k_l − shares_l| < 1``.

    Largest remainders (Hamilton): every layer gets ``floor(shares_l)``, the ones left go to the
    largest fractional parts (ties to the earlier layer).

    Args:
        shares: real counts ``S_l · n_l`` that add up to ``total`` (up to float rounding).
        sizes: the layers' weight counts ``n_l``.
        total: the integer total, e.g. ``round(S · Σ n_l)``.

    Raises:
        ValueError: ``total`` cannot be reached within one of every share.
    """
    base = [min(n, max(0, math.floor(x))) for x, n in zip(shares, sizes, strict=True)]
    left = total - sum(base)
    order = sorted(range(len(base)), key=lambda i: (-(shares[i] - base[i]), i))
    order = [i for i in order if base[i] < sizes[i]]
    if not 0 <= left <= len(order):
        raise ValueError(f"cannot apportion {total} removals over shares summing to {sum(shares):.3f}")
    for i in order[:left]:
        base[i] += 1
    return base


def global_count(target: float, sizes: Sequence[int]) -> int:
    """``round(target · Σ n_l)`` (halves up): the removals a global sparsity ``target`` asks for."""
    return math.floor(target * sum(sizes) + 0.5)
