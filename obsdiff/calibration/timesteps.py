"""Timestep weighting schedules (docs/METHOD.md §2) and the step tracker that indexes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from obsdiff.registry import Registry

# torch is imported inside the schedules that need it: the names are read by config validation,
# which must not import torch.


def _uniform(T: int, a_min: float, a_max: float) -> list[float]:
    return [1.0] * T


def _linear_increase(T: int, a_min: float, a_max: float) -> list[float]:
    import torch

    return torch.linspace(a_min, a_max, T, dtype=torch.float64).tolist()


def _linear_decrease(T: int, a_min: float, a_max: float) -> list[float]:
    import torch

    return torch.linspace(a_max, a_min, T, dtype=torch.float64).tolist()


def _log_increase(T: int, a_min: float, a_max: float) -> list[float]:
    if T == 1:
        return [a_min]
    return [a_min + (a_max - a_min) * math.log(1 + i) / math.log(T) for i in range(T)]


def _log_decrease(T: int, a_min: float, a_max: float) -> list[float]:
    if T == 1:
        return [a_max]
    return [a_min + (a_max - a_min) * math.log(T - i) / math.log(T) for i in range(T)]


def _cosine_decrease(T: int, a_min: float, a_max: float) -> list[float]:
    """Extra schedule (not in the paper): half-cosine from α_max down to α_min."""
    if T == 1:
        return [a_max]
    return [a_min + (a_max - a_min) * 0.5 * (1 + math.cos(math.pi * i / (T - 1))) for i in range(T)]


SCHEDULES: Registry[Callable[[int, float, float], list[float]]] = Registry(
    "schedule (schedule.name)",
    {
        "uniform": _uniform,
        "linear_increase": _linear_increase,
        "linear_decrease": _linear_decrease,
        "log_increase": _log_increase,
        "log_decrease": _log_decrease,
        "cosine_decrease": _cosine_decrease,
    },
)


def timestep_weights(
    name: str, num_steps: int, alpha_min: float = 0.8, alpha_max: float = 1.2
) -> list[float]:
    """Return ``α_0 … α_{T-1}`` of schedule ``name`` (step 0 is the noisiest).

    Args:
        name: a key of ``SCHEDULES``.
        num_steps: ``T``, denoising steps of the calibration sampler.
        alpha_min: smallest weight.
        alpha_max: largest weight.
    """
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return SCHEDULES[name](num_steps, alpha_min, alpha_max)


class StepTracker:
    """Knows the current denoising step of the sampler loop and its weight.

    Reset before each sampler call; ``callback`` is passed as the pipeline's
    ``callback_on_step_end`` and advances the step, so a sampler that calls the denoiser
    more than once per step still sees one index per step.

    Args:
        weights: ``α_i`` for every step.
    """

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights
        self.step = 0
        self.on_step: Callable[[], None] | None = None

    def reset(self) -> None:
        self.step = 0

    @property
    def alpha(self) -> float:
        if self.step >= len(self.weights):
            raise RuntimeError(
                f"sampler ran step {self.step} but the schedule has {len(self.weights)} steps; "
                "was the tracker reset before the sampler call?"
            )
        return self.weights[self.step]

    def callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` hook: step ``step`` is done, the next one is ``step + 1``."""
        self.step = step + 1
        if self.on_step is not None:
            self.on_step()
        return callback_kwargs
