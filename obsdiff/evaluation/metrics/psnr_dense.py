"""``psnr_dense``: peak signal-to-noise ratio (dB) of each pruned image against the dense image of
the same prompt and seed, as the mean and the worst decile (``psnr_dense_p10``).

An image equal to its dense one has infinite PSNR; it is capped at :data:`PSNR_CAP_DB` (an MSE of
1e-10 on [0, 1] pixels), so means stay finite and metrics.json accepts them.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor
from torchmetrics.functional import peak_signal_noise_ratio

from obsdiff.evaluation.metrics.base import EvalContext, Score
from obsdiff.evaluation.metrics.ssim_dense import FidelityMetric, fidelity_score

PSNR_CAP_DB = 100.0


class PsnrDense(FidelityMetric):
    """PSNR to the dense model's images (same prompts and seeds), capped at 100 dB."""

    name: ClassVar[str] = "psnr_dense"
    label: ClassVar[str] = "PSNR to the dense model (dB)"
    higher_is_better: ClassVar[bool] = True

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        per_image = peak_signal_noise_ratio(
            images, context.dense, data_range=1.0, reduction="none", dim=(1, 2, 3)
        )  # (N,)
        return fidelity_score(self.name, per_image.clamp(max=PSNR_CAP_DB))
