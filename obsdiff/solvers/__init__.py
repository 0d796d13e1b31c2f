"""Pruning methods, found by name: a mask choice and a weight update, both plain tensor math.

Layer-wise (unstructured, N:M) a method is ``mask`` (which weights go: ``obs``, ``magnitude``,
``wanda``, ``dsnot``), optionally ``refine`` (``swaps``: SparseSwaps' optimal 1-swaps on the
mask-only error; ``none``), plus ``update`` (``obs``: the OBS compensation on that mask; ``admm``:
the least-squares re-fit of the kept weights by ADMM, Boža 2024; ``none``: plain masking).
``mask=obs, update=obs`` is the OBS solver itself; any other pair is the "mask choice vs
reconstruction" ablation. Structured methods choose heads / neurons (``obs``, ``l1``).
``order`` is the column order of the OBS sweep: ``natural`` (left to right) or ``rose`` (ROSE:
costly columns first on columnar layers, ``obsdiff.solvers.rose``).

Importing this package does not import torch: config validation reads the registries' names.
The solver modules load on first use; ``Pattern``, ``SolveResult``, ``obs_solve``,
``obs_solve_stacked``, ``reconstruction_error`` and ``CholeskyError`` are served from
``obsdiff.solvers.obs`` on access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from obsdiff.registry import Registry

if TYPE_CHECKING:
    import torch

    from obsdiff.solvers.obs import (
        CholeskyError,
        Pattern,
        SolveResult,
        obs_solve,
        obs_solve_stacked,
        reconstruction_error,
    )

Moments = tuple["torch.Tensor", "torch.Tensor"]  # per-column input mean and variance (DSnoT)
_FROM_OBS = (
    "CholeskyError",
    "Factors",
    "Pattern",
    "SolveResult",
    "obs_solve",
    "obs_solve_stacked",
    "reconstruction_error",
)


def __getattr__(name: str) -> Any:
    """``from obsdiff.solvers import Pattern`` (etc.): import ``obsdiff.solvers.obs`` on first access."""
    if name in _FROM_OBS:
        return getattr(importlib.import_module("obsdiff.solvers.obs"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _obs_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    from obsdiff.solvers.obs import obs_solve

    return obs_solve(W, H, pattern, options["damp_frac"], options["block_size"], layer,
                     factor=options.get("factor")).mask  # fmt: skip


def _magnitude_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    from obsdiff.solvers.magnitude import magnitude_mask

    return magnitude_mask(W, pattern)


def _wanda_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_mask

    return wanda_mask(W, col_norms_from_hessian(H), pattern)  # ‖X_j‖ from the same weighted capture


def _dsnot_mask(W, H, pattern, layer, moments, options) -> torch.Tensor:
    from obsdiff.solvers.dsnot import dsnot_solve

    mean, var = moments
    return dsnot_solve(W, H, pattern, mean=mean, var=var, layer=layer, **options["dsnot"]).mask


def _no_refine(W, H, pattern, mask, layer, options) -> torch.Tensor:
    return mask


def _swaps_refine(W, H, pattern, mask, layer, options) -> torch.Tensor:
    from obsdiff.solvers.swaps import refine_swaps

    return refine_swaps(W, H, mask, pattern, layer=layer, **options["swaps"])


def _obs_update(W, H, pattern, mask, layer, options) -> SolveResult:
    from obsdiff.solvers.obs import obs_solve

    return obs_solve(W, H, pattern, options["damp_frac"], options["block_size"], layer, mask=mask,
                     factor=options.get("factor"))  # fmt: skip


def _admm_update(W, H, pattern, mask, layer, options) -> SolveResult:
    from obsdiff.solvers.admm import admm_update

    factor = options.get("admm_factor")
    return admm_update(
        W, H, mask, damp_frac=options["damp_frac"], layer=layer, factor=factor, **options["admm"]
    )


def _no_update(W, H, pattern, mask, layer, options) -> SolveResult:
    from obsdiff.solvers.magnitude import apply_mask

    return apply_mask(W, mask)


# ``pruner.mask`` (layer-wise): ``(W, H, pattern, layer, moments, options) -> mask``.
MASK_METHODS: Registry[Callable[..., torch.Tensor]] = Registry(
    "mask method (pruner.mask)",
    {"obs": _obs_mask, "magnitude": _magnitude_mask, "wanda": _wanda_mask, "dsnot": _dsnot_mask},
)
# ``pruner.refine``: ``(W, H, pattern, mask, layer, options) -> mask``, between mask and update.
REFINES: Registry[Callable[..., torch.Tensor]] = Registry(
    "mask refinement (pruner.refine)", {"none": _no_refine, "swaps": _swaps_refine}
)
# ``pruner.update``: ``(W, H, pattern, mask, layer, options) -> SolveResult``.
UPDATES: Registry[Callable[..., SolveResult]] = Registry(
    "update (pruner.update)", {"obs": _obs_update, "admm": _admm_update, "none": _no_update}
)
# ``pruner.mask`` for ``sparsity=structured``: how heads / neurons are chosen (a ``StructuredMethod``
# class of ``obsdiff.pruners.structured``; a new structured method is one entry here).
STRUCTURED_METHODS: Registry[type] = Registry(
    "structured method (pruner.mask, sparsity=structured)",
    {"obs": "obsdiff.pruners.structured:ObsMethod", "l1": "obsdiff.pruners.structured:L1Method"},
)
# ``pruner.order``: ``(solve, block_size, threshold) -> solve``, the natural-order method run in
# that column order (``rose``: permute W, H and moments, sweep, put the result back).
ORDERS: Registry[Callable[..., Callable[..., SolveResult]]] = Registry(
    "column order (pruner.order)",
    {"natural": lambda solve, block_size, threshold: solve, "rose": "obsdiff.solvers.rose:rose_solver"},
)
# ``pruner.dsnot.init``: the start mask DSnoT refines (``obsdiff.solvers.dsnot`` dispatches).
DSNOT_INITS: Registry[Callable[..., torch.Tensor]] = Registry(
    "DSnoT init (pruner.dsnot.init)",
    {"wanda": "obsdiff.solvers.wanda:wanda_mask", "magnitude": "obsdiff.solvers.magnitude:magnitude_mask"},
)


class Factors(NamedTuple):
    """What ``layer_solver(..., update="admm").factorize`` shares: the OBS factor (an OBS mask),
    ``None`` otherwise, and the ADMM factor."""

    obs: Any
    admm: Any


def layer_solver(
    mask: str,
    update: str,
    damp_frac: float = 0.01,
    block_size: int = 128,
    dsnot: dict[str, Any] | None = None,
    admm: dict[str, Any] | None = None,
    refine: str = "none",
    swaps: dict[str, Any] | None = None,
    order: str = "natural",
    rose_threshold: float = 0.5,
) -> Callable[..., SolveResult]:
    """``(W, H, pattern, *, layer, moments, factor) -> SolveResult`` for a mask method and an update.

    ``solve.factorize(H, layer=...)`` gives what the method's steps need from ``H`` alone (the
    damped inverse-Cholesky factor of its OBS steps; with the ADMM update, :class:`Factors` with
    the ADMM inverses too), once for all layers of an input group (bit for bit what each solve
    would compute). With the OBS or ADMM update, ``solve.stacked(Ws, H, pattern, *, layers,
    moments, factor) -> list[SolveResult]`` solves such a group in one row-stacked run
    (``obs_solve_stacked``: bit for bit; ``admm_update_stacked``: up to matmul rounding).

    Args:
        mask: one of ``MASK_METHODS``.
        update: one of ``UPDATES``: ``"obs"`` (OBS compensation on the chosen mask), ``"admm"``
            or ``"none"``.
        damp_frac: relative damping of every OBS solve and of the ADMM objective.
        block_size: OBS lazy-update block.
        dsnot: DSnoT's options (``init``, ``max_cycles``, ``update_threshold``, …).
        admm: the ADMM update's options (``rho``, ``iterations``, ``growth``, ``rho_factor``,
            ``rho_every``; see ``obsdiff.solvers.admm.admm_update``).
        refine: one of ``REFINES``: ``"swaps"`` refines the chosen mask (``refine_swaps``) before
            the update; ``"none"`` keeps it.
        swaps: ``refine_swaps``' options (``max_iterations``, ``chunk_elements``).
        order: one of ``ORDERS``: the OBS sweep's column order.
        rose_threshold: ``order=rose``: the columnar-layer cut on the relative range of block loss.
    """
    choose, compensate = MASK_METHODS.get(mask), UPDATES.get(update)  # loud on unknown names
    refined, in_order = REFINES.get(refine), ORDERS.get(order)
    options = {"damp_frac": damp_frac, "block_size": block_size}
    options |= {"dsnot": dict(dsnot or {}), "admm": dict(admm or {}), "swaps": dict(swaps or {})}

    def split(factor) -> dict[str, Any]:
        """The options' factors: ``factor`` is the OBS one, or :class:`Factors` with the ADMM update."""
        if update != "admm":
            return {"factor": factor}
        factor = factor or Factors(None, None)
        return {"factor": factor.obs, "admm_factor": factor.admm}

    def pick(W, H, pattern, layer, moments, opts) -> torch.Tensor:
        """The mask of ``pruner.mask``, refined by ``pruner.refine``."""
        chosen = choose(W, H, pattern, layer, moments, opts)
        return refined(W, H, pattern, chosen, layer, opts)

    def solve(W, H, pattern, *, layer: str = "", moments: Moments | None = None, factor=None) -> SolveResult:
        if mask == "obs" and update == "obs" and refine == "none":
            from obsdiff.solvers.obs import obs_solve

            return obs_solve(W, H, pattern, damp_frac, block_size, layer, factor=factor)
        opts = options | split(factor)
        chosen = pick(W, H, pattern, layer, moments, opts)
        return compensate(W, H, pattern, chosen, layer, opts)

    def factorize(H, *, layer: str = ""):
        """What every step of this method reuses from ``H`` (``None``: nothing to share)."""
        obs = None
        if "obs" in (mask, update):
            from obsdiff.solvers.obs import factorize as factor_of

            obs = factor_of(H, damp_frac, layer)
        if update != "admm":
            return obs
        from obsdiff.solvers.admm import admm_factorize_for

        return Factors(obs, admm_factorize_for(H, damp_frac, layer, **options["admm"]))

    def chosen_masks(Ws, H, pattern, layers, moments, opts):
        return [pick(W, H, pattern, name, moments, opts) for W, name in zip(Ws, layers, strict=True)]

    def stacked(Ws, H, pattern, *, layers: list[str], moments: Moments | None = None, factor=None):
        """Layers of one input group in one row-stacked OBS sweep: bit for bit their separate solves."""
        from obsdiff.solvers.obs import obs_solve_stacked

        chosen = None
        if mask != "obs" or refine != "none":  # masks per layer, the OBS compensation stacked
            chosen = chosen_masks(Ws, H, pattern, layers, moments, options | {"factor": factor})
        return obs_solve_stacked(Ws, H, pattern, damp_frac, block_size, layers, masks=chosen, factor=factor)

    def stacked_admm(Ws, H, pattern, *, layers: list[str], moments: Moments | None = None, factor=None):
        """Masks chosen per layer, the ADMM update of the group in one row-stacked run."""
        from obsdiff.solvers.admm import admm_update_stacked

        opts = options | split(factor)
        chosen = chosen_masks(Ws, H, pattern, layers, moments, opts)
        factor = opts["admm_factor"]
        return admm_update_stacked(
            Ws, H, chosen, damp_frac=damp_frac, layers=layers, factor=factor, **options["admm"]
        )

    solve.factorize = factorize  # layers of one input group share the factor (LayerwiseStrategy)
    if update in ("obs", "admm"):  # ``update=none`` has no sweep to share: its layers are solved one by one
        solve.stacked = stacked if update == "obs" else stacked_admm
    return in_order(solve, block_size, rose_threshold)


__all__ = [
    "DSNOT_INITS",
    "MASK_METHODS",
    "ORDERS",
    "REFINES",
    "STRUCTURED_METHODS",
    "UPDATES",
    "CholeskyError",
    "Factors",
    "Pattern",
    "SolveResult",
    "layer_solver",
    "obs_solve",
    "obs_solve_stacked",
    "reconstruction_error",
]
