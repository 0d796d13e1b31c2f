"""``ssim_dense``: structural similarity of each pruned image to the dense image of the same prompt
and seed (torchmetrics' SSIM, Gaussian 11×11 window), as the mean and the worst decile
(``ssim_dense_p10``, the 10th percentile). 1 means identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics.functional import structural_similarity_index_measure

from obsdiff.evaluation.metrics.base import EvalContext, Score


def fidelity_score(name: str, per_image: Tensor) -> Score:
    """Mean and 10th percentile (``<name>_p10``, the worst decile) of per-image values (N,)."""
    per_image = per_image.double()
    values = {name: per_image.mean().item(), f"{name}_p10": torch.quantile(per_image, 0.1).item()}
    return Score(values, per_image, lambda rows: rows.mean().item())


class FidelityMetric:
    """A per-image comparison with the dense model's images: no network, nothing to load."""

    versus_dense: ClassVar[bool] = True

    def enabled(self, ecfg: Any) -> str | None:
        return None

    def weights(self) -> list[str | Path]:
        return []

    def build(self, ecfg: Any, context: EvalContext) -> None:
        return None

    def about(self) -> dict[str, str]:
        return {}


class SsimDense(FidelityMetric):
    """SSIM to the dense model's images (same prompts and seeds)."""

    name: ClassVar[str] = "ssim_dense"
    label: ClassVar[str] = "SSIM to the dense model"
    higher_is_better: ClassVar[bool] = True

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        per_image = structural_similarity_index_measure(
            images, context.dense, data_range=1.0, reduction="none"
        )
        return fidelity_score(self.name, per_image)
