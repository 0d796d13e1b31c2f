"""Pruning methods, found by name: a mask choice and a weight update, both plain tensor math.

Layer-wise (unstructured, N:M) a method is ``mask`` (which weights go: ``obs``, ``magnitude``,
``wanda``, ``dsnot``) plus ``update`` (``obs``: the OBS compensation on that mask; ``none``: plain
masking). ``mask=obs, update=obs`` is the OBS solver itself; any other pair is the "mask choice
vs reconstruction" ablation. Structured methods choose heads / neurons (``obs``, ``l1``).
"""

from collections.abc import Callable
from typing import Any

import torch

from obsdiff.solvers.dsnot import dsnot_solve
from obsdiff.solvers.magnitude import apply_mask, magnitude_mask
from obsdiff.solvers.obs import CholeskyError, Pattern, SolveResult, obs_solve, reconstruction_error
from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_mask

Moments = tuple[torch.Tensor, torch.Tensor]  # per-column input mean and variance (DSnoT)


def _obs_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    return obs_solve(W, H, pattern, options["damp_frac"], options["block_size"], layer).mask


def _magnitude_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    return magnitude_mask(W, pattern)


def _wanda_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    return wanda_mask(W, col_norms_from_hessian(H), pattern)  # ‖X_j‖ from the same weighted capture


def _dsnot_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    mean, var = moments
    return dsnot_solve(W, H, pattern, mean=mean, var=var, layer=layer, **options["dsnot"]).mask


MASK_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "obs": _obs_mask,
    "magnitude": _magnitude_mask,
    "wanda": _wanda_mask,
    "dsnot": _dsnot_mask,
}
STRUCTURED_METHODS = ("obs", "l1")
UPDATES = ("obs", "none")


def layer_solver(
    mask: str,
    update: str,
    damp_frac: float = 0.01,
    block_size: int = 128,
    dsnot: dict[str, Any] | None = None,
) -> Callable[..., SolveResult]:
    """``(W, H, pattern, *, layer, moments) -> SolveResult`` for a mask method and an update.

    Args:
        mask: one of ``MASK_METHODS``.
        update: ``"obs"`` (OBS compensation on the chosen mask) or ``"none"``.
        damp_frac: relative damping of every OBS solve.
        block_size: OBS lazy-update block.
        dsnot: DSnoT's options (``init``, ``max_cycles``, ``update_threshold``, …).
    """
    if mask not in MASK_METHODS:
        raise KeyError(f"unknown mask method {mask!r}; known: {sorted(MASK_METHODS)}")
    if update not in UPDATES:
        raise KeyError(f"unknown update {update!r}; known: {list(UPDATES)}")
    options = {"damp_frac": damp_frac, "block_size": block_size, "dsnot": dict(dsnot or {})}

    def solve(W, H, pattern, *, layer: str = "", moments: Moments | None = None) -> SolveResult:
        if mask == "obs" and update == "obs":
            return obs_solve(W, H, pattern, damp_frac, block_size, layer)
        chosen = MASK_METHODS[mask](W, H, pattern, layer, moments, options)
        if update == "obs":
            return obs_solve(W, H, pattern, damp_frac, block_size, layer, mask=chosen)
        return apply_mask(W, chosen)

    return solve


__all__ = [
    "MASK_METHODS",
    "STRUCTURED_METHODS",
    "UPDATES",
    "CholeskyError",
    "Pattern",
    "SolveResult",
    "layer_solver",
    "obs_solve",
    "reconstruction_error",
]
