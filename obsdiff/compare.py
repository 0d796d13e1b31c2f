"""The method comparison grid: every method at every sparsity it defines, as Hydra options.

Each cell ``<method>-<level>`` is a config option of the ``compare`` group (registered in code, so
the grid reads as one table): it selects ``pruner=<method>`` and the level's sparsity.
``conf/experiment/compare_methods.yaml`` sweeps ``+compare=glob(*)`` as one multirun; undefined
pairs (Wanda or DSnoT with structured sparsity, L1-norm with unstructured) are not in the grid.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

LEVELS: dict[str, dict] = {
    "u30": {"kind": "unstructured", "ratio": 0.3},
    "u50": {"kind": "unstructured", "ratio": 0.5},
    "u60": {"kind": "unstructured", "ratio": 0.6},
    "u70": {"kind": "unstructured", "ratio": 0.7},
    "2of4": {"kind": "nm", "n": 2, "m": 4},
    "s20": {"kind": "structured", "ratio": 0.2},
    "s30": {"kind": "structured", "ratio": 0.3},
}
METHODS: dict[str, tuple[str, ...]] = {
    "magnitude": ("u30", "u50", "u60", "u70", "2of4"),
    "wanda": ("u30", "u50", "u60", "u70", "2of4"),
    "sparsegpt": ("u30", "u50", "u60", "u70", "2of4"),
    "dsnot": ("u30", "u50", "u60", "u70", "2of4"),
    "obs_diff": ("u30", "u50", "u60", "u70", "2of4", "s20", "s30"),
    "obs_admm": ("u30", "u50", "u60", "u70", "2of4"),  # OBS mask, ADMM re-fit (experiments/tiny_quality)
    "obs_swaps_admm": ("u30", "u50", "u60", "u70", "2of4"),  # OBS mask, 1-swaps, ADMM re-fit (idem)
    "l1_norm": ("s20", "s30"),
}


def cells() -> dict[str, dict]:
    """Cell name → config node (``# @package _global_``)."""
    out = {}
    for method, levels in METHODS.items():
        for level in levels:
            sparsity = LEVELS[level]
            defaults = [
                {"override /pruner@_global_.pruner": method},
                {"override /sparsity@_global_.sparsity": sparsity["kind"]},  # group option = kind
                "_self_",
            ]
            out[f"{method}-{level}"] = {"defaults": defaults, "sparsity": dict(sparsity)}
    return out


def register_cells() -> None:
    for name, node in cells().items():
        ConfigStore.instance().store(group="compare", name=name, node=node, package="_global_")
