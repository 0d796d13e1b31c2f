"""DSnoT baseline (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"), training-free mask refinement.

Start from a Wanda (or magnitude) mask; then, in every output row ``q`` and in parallel over the
rows, swap one removed weight back in ("grow") for one kept weight taken out ("prune") per cycle,
driven by the expected reconstruction error of the row

    ε_q = Σ_j (W_qj − Ŵ_qj) μ_j = Σ_{j removed} W_qj μ_j          (DSnoT's expected reconstruction error)

with ``μ`` the per-column input mean and ``v`` the per-column input variance:

- grow  i = argmax over removed r of  sign(ε_q) · W_qr μ_r / v_r^pow_of_var_regrowing   (growing criterion)
  among those whose regrowth shrinks |ε_q| (sign(ε_q) · W_qr μ_r > 0);
- prune j = argmin over kept r with sign(W_qr μ_r) = −sign(ε_q) of
            |W_qr| · ‖X_r‖₂ / v_r^pow_of_var_pruning                                  (pruning criterion)
- accept iff |ε_q| > update_threshold and ε_q keeps its sign after the swap; the first rejected
  swap stops the row for good (reference code), as does running out of candidates.
- N:M: the pruned weight must lie in the grown weight's group of ``m`` columns. (The reference's
  N:M branch prunes the group's lowest start score with no sign restriction; the rule above is
  the unstructured one, restricted to the group, so the guarantee below holds for both.)

Every weight moves at most once (grown weights are never re-pruned, pruned ones never regrown),
as in the reference's sorted candidate lists. Because the grown weight has the sign of ε_q, the
pruned one the opposite sign and the sign of ε_q is kept, every accepted swap strictly lowers
``|ε_q|``: DSnoT's own objective ``Σ_q |ε_q|`` never grows. The quadratic error
``tr(ΔW H ΔWᵀ)`` is NOT guaranteed to fall (ε only sees the means, not the covariance); the
opt-in ``exact_guard`` also rejects swaps that raise the row's exact error.
"""

from __future__ import annotations

import torch

from obsdiff.solvers import DSNOT_INITS as INITS  # the start masks; names readable without torch
from obsdiff.solvers.magnitude import apply_mask, magnitude_mask
from obsdiff.solvers.obs import Pattern, SolveResult
from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_mask, wanda_scores


def _inv_var_pow(var: torch.Tensor, power: float) -> torch.Tensor:
    """``v^-power`` with ``v`` floored at 1e-12 · mean(v) so constant inputs do not divide by zero."""
    floor = max(float(var.mean()) * 1e-12, torch.finfo(torch.float32).tiny)
    return var.clamp_min(floor).pow(-power).reshape(1, -1)


def dsnot_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    *,
    mean: torch.Tensor,
    var: torch.Tensor,
    init: str = "wanda",
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    pow_of_var_pruning: float = 0.0,
    keep_error_sign: bool = True,
    exact_guard: bool = False,
    layer: str = "",
) -> SolveResult:
    """Prune one layer with DSnoT (no weight update; only the mask changes).

    Defaults follow the reference code (zyxxmu/DSnoT ``main.py``): ``max_cycles=50``,
    ``update_threshold=0.1``, ``pow_of_var_regrowing=1``. ``pow_of_var_pruning`` is parsed by the
    reference (default 1) but never used there, so its effective value is 0, our default.

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) timestep-weighted Hessian: ``‖X_j‖₂ ∝ sqrt(H_jj)`` for the Wanda start
            mask and pruning score (a common scale cancels), and the exact error of ``exact_guard``.
        pattern: unstructured ratio (every row keeps its start count) or N:M (swaps stay inside
            one aligned group of ``m`` columns, so every group keeps ``n`` removed).
        mean: (cols,) timestep-weighted per-column input mean ``μ``.
        var: (cols,) per-column input variance ``v`` (only ranks candidates: a common scale
            cancels).
        init: start mask, ``"wanda"`` (per-row) or ``"magnitude"`` (layer-wide).
        max_cycles: most swaps per row.
        update_threshold: a row stops once ``|ε_q|`` is at or below this absolute value, in the
            units of ``Σ W μ`` (so it depends on the scale of ``mean``).
        pow_of_var_regrowing: exponent of ``v`` dividing the grow score.
        pow_of_var_pruning: exponent of ``v`` dividing the pruning (Wanda) score.
        keep_error_sign: reject swaps that flip the sign of ``ε_q`` (always on in the reference's
            N:M branch; its unstructured default ``without_same_sign=True`` drops it, and then
            ``|ε_q|`` may grow).
        exact_guard: also reject a swap that raises the row's ``ΔW_q H ΔW_qᵀ`` (not in the paper).
        layer: name for messages.

    Returns:
        The masked weight, the refined mask, ``damp = damp_frac = 0`` and ``obs_loss = nan``.
    """
    rows, cols = W.shape
    if init not in INITS:
        raise ValueError(f"{layer}: unknown DSnoT init {init!r}; known: {list(INITS)}")
    if mean.shape != (cols,) or var.shape != (cols,):
        raise ValueError(f"{layer}: mean and var must have shape ({cols},)")
    Wf = W.detach().float()
    H = H.detach().float().to(Wf.device)
    col_norms = col_norms_from_hessian(H)
    mask = wanda_mask(Wf, col_norms, pattern) if init == "wanda" else magnitude_mask(Wf, pattern)

    contrib = Wf * mean.detach().float().to(Wf.device).reshape(1, -1)  # W_qr μ_r, (rows, cols)
    var = var.detach().float().to(Wf.device)
    grow_score = contrib * _inv_var_pow(var, pow_of_var_regrowing)  # growing criterion without sign(ε)
    prune_score = wanda_scores(Wf, col_norms) * _inv_var_pow(var, pow_of_var_pruning)  # pruning criterion
    eps = (contrib * mask).sum(dim=1)  # ε_q, (rows,)
    sign0 = torch.sign(eps)
    grow_pool, prune_pool = mask.clone(), ~mask  # each weight moves at most once
    group = torch.arange(cols, device=Wf.device) // (pattern.m if pattern.kind == "nm" else cols)
    if exact_guard:
        HD = (Wf * mask) @ H  # ΔW H, (rows, cols); the row's exact error is ΔW_q · (ΔW H)_q
    active = torch.ones(rows, dtype=torch.bool, device=Wf.device)
    row = torch.arange(rows, device=Wf.device)

    for _ in range(max_cycles):
        s = torch.sign(eps).unsqueeze(1)  # (rows, 1)
        can_grow = grow_pool & (s * contrib > 0)  # regrowing must shrink |ε|
        i = torch.where(can_grow, s * grow_score, -torch.inf).argmax(dim=1)
        can_prune = prune_pool & (s * contrib < 0) & (group.unsqueeze(0) == group[i].unsqueeze(1))
        j = torch.where(can_prune, prune_score, torch.inf).argmin(dim=1)
        eps_after = eps - contrib[row, i] + contrib[row, j]
        accept = active & can_grow.any(1) & can_prune.any(1) & (eps.abs() > update_threshold)
        if keep_error_sign:
            accept &= torch.sign(eps_after) == sign0
        if exact_guard:
            wi, wj = Wf[row, i], Wf[row, j]
            change = (  # d' = d − w_i e_i + w_j e_j:  d'Hd' − dHd
                -2 * wi * HD[row, i] + 2 * wj * HD[row, j]
                + wi**2 * H[i, i] + wj**2 * H[j, j] - 2 * wi * wj * H[i, j]
            )  # fmt: skip
            accept &= change <= 0
        active = accept
        if not active.any():
            break
        r, i, j = row[active], i[active], j[active]
        mask[r, i], mask[r, j] = False, True
        grow_pool[r, i], prune_pool[r, j] = False, False
        eps = torch.where(active, eps_after, eps)
        if exact_guard:
            HD[r] += Wf[r, j].unsqueeze(1) * H[j] - Wf[r, i].unsqueeze(1) * H[i]
    return apply_mask(W, mask)
