"""Bootstrap confidence intervals over prompts: resample the images' rows, reduce them again."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LEVEL = 0.95


def resample_indices(count: int, resamples: int, seed: int) -> Tensor:
    """``resamples`` draws of ``count`` row indices with replacement (resamples, count), from a
    generator of its own: the same seed gives the same draws, whatever else ran before."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(count, (resamples, count), generator=generator)


def bootstrap_interval(
    samples: Tensor,
    reduce: Callable[[Tensor], float],
    resamples: int,
    seed: int,
    debias: bool = False,
    level: float = LEVEL,
) -> list[float]:
    """The percentile bootstrap interval ``[low, high]`` of ``reduce(samples)``.

    Every metric of a run draws the same index sets (the same ``seed``), so their intervals are
    paired over the same prompts.

    Args:
        samples: One row per image (N, ...), N >= 2.
        reduce: Rows → the metric's value.
        resamples: How many resamples (>= 1).
        seed: Seed of the resampling.
        debias: Shift the interval by the bootstrap's bias estimate, ``mean(resampled) -
            reduce(samples)``. For FID: resampled sets repeat images, whose smaller spread raises
            the FID (on the 50 tiny prompts by ~12, which put the plain interval wholly above it).
        level: Coverage of the interval.
    """
    values = torch.tensor(
        [reduce(samples[rows]) for rows in resample_indices(samples.shape[0], resamples, seed)],
        dtype=torch.float64,
    )
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    bias = values.mean().item() - reduce(samples) if debias else 0.0
    low, high = (torch.quantile(values, tails) - bias).tolist()
    return [low, high]
