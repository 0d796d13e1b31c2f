"""``hpsv2`` / ``hpsv21``: mean Human Preference Score v2 / v2.1 (Wu et al., 2023) of the images for
their prompts, ``cos(E_image, E_text)`` of a fine-tuned CLIP-H (``obsdiff.evaluation.hpsv2``; no
open_clip, no torchvision). Weights from ``eval.hpsv2_model`` / ``eval.hpsv21_model`` (a local
``.pt`` / ``.safetensors`` file or ``<owner>/<repo>/<file>`` on the hub; nothing downloads
offline), the tokenizer from ``eval.hps_tokenizer``. About 0.25–0.30 for good images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from obsdiff.evaluation.metrics.base import EvalContext, Score


class _HumanPreferenceScore:
    """Mean HPS of one version; per-image scores are the bootstrap's rows."""

    name: ClassVar[str]
    label: ClassVar[str]
    model_field: ClassVar[str]  # the eval config field naming its checkpoint
    higher_is_better: ClassVar[bool] = True
    versus_dense: ClassVar[bool] = False

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.get(self.model_field) else f"eval.{self.model_field} is null"

    def weights(self) -> list[str | Path]:
        return [self.model_path, self.tokenizer_path]

    def build(self, ecfg: Any, context: EvalContext) -> None:
        from obsdiff.evaluation.hpsv2 import load_hpsv2

        self.model_path, self.tokenizer_path = ecfg[self.model_field], ecfg.hps_tokenizer
        self.model, self.tokenizer = load_hpsv2(self.model_path, self.tokenizer_path)

    def about(self) -> dict[str, str]:
        return {f"eval/{self.name}_network": str(self.model_path)}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        from obsdiff.evaluation.hpsv2 import hps_score

        per_image = hps_score(images, prompts, self.model, self.tokenizer).double()
        return Score({self.name: per_image.mean().item()}, per_image, lambda rows: rows.mean().item())


class HpsV2(_HumanPreferenceScore):
    """HPS v2.0 (``HPS_v2_compressed.pt``)."""

    name: ClassVar[str] = "hpsv2"
    label: ClassVar[str] = "HPS v2"
    model_field: ClassVar[str] = "hpsv2_model"


class HpsV21(_HumanPreferenceScore):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``, trained on more, higher-quality comparisons)."""

    name: ClassVar[str] = "hpsv21"
    label: ClassVar[str] = "HPS v2.1"
    model_field: ClassVar[str] = "hpsv21_model"
