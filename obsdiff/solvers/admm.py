"""ADMM weight update for a fixed mask (Boža 2024, "Fast and Effective Weight Update for Pruned
Large Language Models", arXiv 2401.02938, TMLR; reference code fmfi-compbio/admm-pruning).

Plain tensor math. For every row ``w`` of ``W`` (rows are independent), with ``S`` the kept set:

    min_ŵ (w − ŵ) H_d (w − ŵ)ᵀ   s.t.  ŵ_j = 0 for j ∉ S          (the layer's reconstruction error)

where ``H_d`` is ``H`` with obs.py's conventions: dead inputs (``H_jj = 0``) get ``H_jj = 1`` and
zero weights, then ``H_d = H + damp_frac · mean(diag H) · I``. ADMM splits ``W = Z`` with ``Z``
constrained to the mask (the paper's updates, with the scaled dual ``U``):

    W ← (W₀ H + ρ (Z − U)) (H + ρ I)⁻¹       (one inverse per ρ value; the iterations are matmuls)
    Z ← (W + U) ⊙ M                          (projection on the mask, M = 1 on kept weights)
    U ← U + W − Z

in the paper's preconditioned coordinates: ``H`` scaled to a unit diagonal, ``W`` by the input
norms ``√diag(H_d)`` (the reference code's normalisation; it makes ``ρ`` scale free, so the
paper's ``ρ = 1`` fits any layer, and ranks weights by the Wanda-like ``|W|·‖X‖``). The change of
variables leaves the optimum unchanged. The result is the last ``Z = (W + U) ⊙ M`` (the paper's
final step): exactly zero on the mask, nothing else forced to zero. The problem is convex, so with
enough iterations the result is the exact least-squares optimum on the kept set.

Gradual mask growth (the paper's gradual pruning, ``growth`` iterations, cubic schedule
``s_t = s (1 − (1 − (t+1)/growth)³)``): the paper grows its own mask by ``|W + U|``; here the final
mask is given, so iteration ``t < growth`` removes, in every row, the fraction
``1 − (1 − (t+1)/growth)³`` of that row's masked weights with the smallest preconditioned
``|W + U|`` (a subset of the given mask; iteration ``growth − 1`` reaches it exactly and the rest
run on it). Deviation: per row instead of layer-wide, so stacked layers stay independent.

Deviations from the reference code: obs.py's damping (``damp_frac``, default 0.01, uniform)
replaces the reference's ``0.1`` on the normalised diagonal, so ADMM and OBS minimise the same
objective; a geometric ρ schedule is available (``rho_factor``, ``rho_every``; the scaled dual is
rescaled by ``ρ_old / ρ_new`` on every change, Boyd et al. 2011 §3.4.1), off by default (the
reference code keeps ``ρ = 1``); the inverse comes from a Cholesky factor, not ``torch.inverse``.
Memory: the factor holds ``Hn`` and one (cols, cols) inverse per distinct ρ value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from obsdiff.solvers.obs import CholeskyError, SolveResult


@dataclass(frozen=True)
class AdmmFactor:
    """What ADMM needs from ``H`` alone: computed once per input group, shared by its layers.

    Args:
        Hn: (cols, cols) damped Hessian scaled to a unit diagonal, ``H_d / (d dᵀ)``.
        d: (cols,) input norms ``√diag(H_d)`` (the preconditioner).
        inverses: ``(ρ, (Hn + ρ I)⁻¹)`` for every ρ value of the schedule, in order.
        dead: ``diag(H) == 0``: inputs that never fire (their weights are zeroed).
        damp: absolute damping added to ``diag(H)``.
        damp_frac: relative damping.
    """

    Hn: torch.Tensor
    d: torch.Tensor
    inverses: tuple[tuple[float, torch.Tensor], ...]
    dead: torch.Tensor
    damp: float
    damp_frac: float


def rho_schedule(rho: float, iterations: int, rho_factor: float = 1.0, rho_every: int = 0) -> list[float]:
    """ρ of every iteration: ``rho · rho_factor^⌊k / rho_every⌋`` (``rho_every = 0``: constant)."""
    if not rho > 0 or not rho_factor > 0 or rho_every < 0 or iterations < 0:
        raise ValueError(
            f"ADMM needs rho > 0, rho_factor > 0, rho_every >= 0, iterations >= 0; got "
            f"{rho}, {rho_factor}, {rho_every}, {iterations}"
        )
    fp32 = torch.finfo(torch.float32)
    try:
        rhos = [rho * rho_factor ** (k // rho_every if rho_every else 0) for k in range(iterations)]
    except OverflowError:
        rhos = [math.inf]
    if rhos and not all(fp32.tiny < value < fp32.max for value in (rhos[0], rhos[-1])):
        schedule = f"{rho} x {rho_factor} every {rho_every} iterations"
        raise ValueError(f"the ADMM rho schedule leaves fp32: {schedule}")
    return rhos


def admm_factorize(
    H: torch.Tensor,
    rhos: list[float],
    damp_frac: float = 0.01,
    layer: str = "",
    device: torch.device | None = None,
) -> AdmmFactor:
    """Fix dead columns, damp and precondition ``H`` (not modified); invert ``Hn + ρ I`` per ρ value."""
    H = H.detach().clone().float().to(device if device is not None else H.device)
    dead = torch.diag(H) == 0  # dead inputs: H_jj = 1 (and W[:, j] = 0 in the update), as obs.py
    H[dead, dead] = 1
    damp = damp_frac * torch.mean(torch.diag(H)).item()
    H.diagonal().add_(damp)  # H_d
    d = torch.diag(H).sqrt()
    Hn = H.div_(d.unsqueeze(1)).div_(d.unsqueeze(0))  # (cols, cols), unit diagonal
    inverses = []
    for rho in dict.fromkeys(rhos):  # distinct values, in order
        A = Hn.clone()
        A.diagonal().add_(rho)
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() or not torch.isfinite(L).all():
            raise CholeskyError(
                f"{layer or 'layer'}: Hn + rho*I is not positive definite for rho={rho:g}; raise "
                f"pruner.admm.rho or pruner.damp_frac (now {damp_frac:g})."
            )
        inverses.append((rho, torch.cholesky_inverse(L)))
        del A, L
    return AdmmFactor(Hn, d, tuple(inverses), dead, damp, damp_frac)


def admm_factorize_for(
    H: torch.Tensor,
    damp_frac: float = 0.01,
    layer: str = "",
    *,
    rho: float = 1.0,
    iterations: int = 20,
    rho_factor: float = 1.0,
    rho_every: int = 0,
    growth: int = 0,
) -> AdmmFactor:
    """:func:`admm_factorize` for the ρ schedule of :func:`admm_update`'s options (``growth`` unused)."""
    del growth  # part of the options, not of the factor
    return admm_factorize(H, rho_schedule(rho, iterations, rho_factor, rho_every) or [rho], damp_frac, layer)


def _growth_mask(score: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, frac: float) -> torch.Tensor:
    """Per row, the ``round(frac · count)`` masked entries with the smallest ``score`` (within ``mask``)."""
    ranked = torch.argsort(score.masked_fill(~mask, torch.inf), dim=1, stable=True)  # masked first
    k = torch.round(counts * frac).unsqueeze(1)  # (rows, 1)
    take = torch.arange(score.shape[1], device=score.device).unsqueeze(0) < k  # (rows, cols) by rank
    return torch.zeros_like(mask).scatter_(1, ranked, take)


def admm_update(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    *,
    rho: float = 1.0,
    iterations: int = 20,
    growth: int = 0,
    rho_factor: float = 1.0,
    rho_every: int = 0,
    damp_frac: float = 0.01,
    layer: str = "",
    factor: AdmmFactor | None = None,
) -> SolveResult:
    """Re-fit the kept weights of ``W`` to ``H`` for a fixed mask by ADMM (Boža 2024).

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian ``2 Σ α X Xᵀ``; not modified (unused when ``factor`` is given).
        mask: (rows, cols) bool, ``True`` = removed; the result's zeros are exactly these.
        rho: the penalty ρ (of the first iteration), in the preconditioned coordinates; paper: 1.
        iterations: ADMM iterations; paper: 20 (0: plain masking with dead inputs zeroed).
        growth: gradual mask growth over the first ``growth`` iterations (the paper uses 15 where
            it chooses its own mask; 0 = off: the given mask from the start).
        rho_factor: ρ is multiplied by this every ``rho_every`` iterations (1: constant ρ).
        rho_every: iterations per ρ value (0: one ρ for all iterations).
        damp_frac: relative damping λ of ``H`` (obs.py's convention).
        layer: name for error messages.
        factor: :func:`admm_factorize` of ``H`` for this ρ schedule, shared by an input group.

    Returns:
        The updated weight (input dtype), the given mask, the damping used, and as ``obs_loss``
        the exact damped error ``½ tr(ΔW H_d ΔWᵀ)`` (the quantity OBS's loss accumulates).
    """
    options = dict(rho=rho, iterations=iterations, growth=growth, rho_factor=rho_factor, rho_every=rho_every)
    return admm_update_stacked([W], H, [mask], damp_frac=damp_frac, layers=[layer], factor=factor, **options)[
        0
    ]


def admm_update_stacked(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    masks: list[torch.Tensor],
    *,
    rho: float = 1.0,
    iterations: int = 20,
    growth: int = 0,
    rho_factor: float = 1.0,
    rho_every: int = 0,
    damp_frac: float = 0.01,
    layers: list[str] | None = None,
    factor: AdmmFactor | None = None,
) -> list[SolveResult]:
    """:func:`admm_update` of layers that read one input, in one run on their row-stacked weights.

    Rows are independent (the mask growth too), so each layer gets what its own call gives, up to
    the rounding of the larger matmuls. Arguments as :func:`admm_update`, one weight, mask and
    name per layer; returns one result per layer, in order.
    """
    layers = list(layers) if layers is not None else [""] * len(Ws)
    cols = Ws[0].shape[1]
    for W, M, name in zip(Ws, masks, layers, strict=True):
        if W.shape[1] != cols or M.shape != W.shape or H.shape != (cols, cols):
            raise ValueError(
                f"{name}: W {tuple(W.shape)}, mask {tuple(M.shape)} and H {tuple(H.shape)} do not match"
            )
    if not 0 <= growth <= iterations:
        raise ValueError(f"{layers[0]}: ADMM growth ({growth}) must be in [0, iterations={iterations}]")
    rhos = rho_schedule(rho, iterations, rho_factor, rho_every)
    device = Ws[0].device
    if factor is None:
        factor = admm_factorize(H, rhos or [rho], damp_frac, layers[0], device=device)
    d = factor.d.to(device)
    mask = torch.cat([M.to(device, torch.bool) for M in masks])  # (Σ rows_i, cols)
    W0 = torch.cat([W.detach().float() for W in Ws]) * d.unsqueeze(0)  # preconditioned copy
    W0[:, factor.dead.to(device)] = 0  # dead inputs
    Z = _iterate(W0, mask, factor, rhos, growth)
    Z[:, factor.dead.to(device)] = 0  # dead inputs stay zero
    delta = W0 - Z
    losses = 0.5 * torch.sum((delta @ factor.Hn.to(device)) * delta, dim=1)  # ½ ΔW H_d ΔWᵀ per row
    weight = Z / d.unsqueeze(0)
    results, r0 = [], 0
    for W in Ws:
        r1 = r0 + W.shape[0]
        loss = float(losses[r0:r1].sum())
        results.append(
            SolveResult(weight[r0:r1].to(W.dtype), mask[r0:r1], factor.damp, factor.damp_frac, loss)
        )
        r0 = r1
    return results


def _iterate(
    W0: torch.Tensor, mask: torch.Tensor, factor: AdmmFactor, rhos: list[float], growth: int
) -> torch.Tensor:
    """The ADMM loop on preconditioned ``W0`` (rows, cols); returns the final ``Z = (W + U) ⊙ M``."""
    inverses = dict(factor.inverses)
    XY = W0 @ factor.Hn.to(W0.device)  # the paper's XᵀX W
    W, U = W0.clone(), torch.zeros_like(W0)
    counts = mask.sum(dim=1).float()  # removed weights per row
    removed = mask  # the mask of the current iteration (a subset of ``mask`` while it grows)
    for k, rho in enumerate(rhos):
        if k and rho != rhos[k - 1]:
            U *= rhos[k - 1] / rho  # the scaled dual u = y / ρ follows ρ
        if k < growth:  # cubic schedule of the removed fraction, a subset of the given mask
            removed = _growth_mask((W + U).abs(), mask, counts, 1 - (1 - (k + 1) / growth) ** 3)
        Z = (W + U).masked_fill(removed, 0.0)  # projection on the mask
        U += W - Z
        W = (XY + rho * (Z - U)) @ inverses[rho].to(W0.device)  # (W₀H + ρ(Z − U)) (H + ρI)⁻¹
    return (W + U).masked_fill(mask, 0.0)  # the final step: Z, exact zeros on the mask
