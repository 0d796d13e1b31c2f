"""Module packages (docs/METHOD.md §3): basic units cut into contiguous packages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_packages(units: list[T], num_packages: int) -> list[list[T]]:
    """Cut ``units`` into ``num_packages`` contiguous packages.

    ``size = n_units // G``; the first ``n_units % G`` packages get one unit more;
    ``G > n_units`` gives one unit per package.

    Args:
        units: basic units, block by block in forward order.
        num_packages: ``G`` ≥ 1.
    """
    if num_packages < 1:
        raise ValueError(f"pruner.num_packages must be >= 1, got {num_packages}")
    if not units:
        return []
    G = min(num_packages, len(units))
    size, extra = divmod(len(units), G)
    packages, start = [], 0
    for k in range(G):
        stop = start + size + (1 if k < extra else 0)
        packages.append(units[start:stop])
        start = stop
    return packages


def split_by_bytes(units: list[T], sizes: Sequence[int], budget: int) -> list[list[T]]:
    """Contiguous packages, each as many units as fit ``budget`` bytes of Hessians (greedy, in order).

    Raises:
        ValueError: One unit alone needs more than the budget (names it and its size).
    """
    packages: list[list[T]] = []
    current, used = [], 0
    for unit, size in zip(units, sizes, strict=True):
        if size > budget:
            raise ValueError(
                f"pruner.package_bytes={budget} ({budget / 1e9:.3f} GB) is smaller than one unit's Hessians "
                f"({size / 1e9:.3f} GB, unit {len(packages) + len(current) + 1}); raise it to at least {size}"
            )
        if current and used + size > budget:
            packages.append(current)
            current, used = [], 0
        current.append(unit)
        used += size
    return packages + ([current] if current else [])
