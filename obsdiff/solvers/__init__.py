"""Layer solvers, found by name: ``W, H, pattern -> SolveResult`` (plain tensor math)."""

from collections.abc import Callable

from obsdiff.solvers.obs import CholeskyError, Pattern, SolveResult, obs_solve, reconstruction_error

SOLVERS: dict[str, Callable[..., SolveResult]] = {"obs": obs_solve}


def get_solver(name: str) -> Callable[..., SolveResult]:
    """Return the solver registered as ``name``; raise with the known names otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise KeyError(f"unknown solver {name!r}; known solvers: {sorted(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "CholeskyError",
    "Pattern",
    "SolveResult",
    "get_solver",
    "obs_solve",
    "reconstruction_error",
]
