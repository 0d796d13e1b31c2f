"""One row of ``layers.csv`` per pruned layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerRecord:
    """One row of ``layers.csv``."""

    name: str
    rows: int
    cols: int
    package: int
    sparsity: float  # fraction of zero weights; structured: fraction of input columns removed
    damp_frac: float
    damp: float
    loss: float
    seconds: float  # solver time (calibration is shared by the package)
