"""``pickscore``: mean PickScore (Kirstain et al., 2023) of the images for their prompts, a human
preference model (``obsdiff.evaluation.pickscore``); weights from ``eval.pickscore_model`` and
its processor from ``eval.pickscore_processor`` (local folders or hub ids; nothing downloads
offline). About 20–23 for good images with the real PickScore_v1."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from obsdiff.evaluation.metrics.base import EvalContext, Score


class PickScore:
    """Mean PickScore; per-image scores are the bootstrap's rows."""

    name: ClassVar[str] = "pickscore"
    label: ClassVar[str] = "PickScore"
    higher_is_better: ClassVar[bool] = True
    versus_dense: ClassVar[bool] = False

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.pickscore_model else "eval.pickscore_model is null"

    def weights(self) -> list[str | Path]:
        return [self.model_path, self.processor_path]

    def build(self, ecfg: Any, context: EvalContext) -> None:
        from obsdiff.evaluation.pickscore import load_pickscore

        self.model_path, self.processor_path = ecfg.pickscore_model, ecfg.pickscore_processor
        self.model, self.processor = load_pickscore(self.model_path, self.processor_path)

    def about(self) -> dict[str, str]:
        return {"eval/pickscore_network": str(self.model_path)}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        from obsdiff.evaluation.pickscore import pickscore

        per_image = pickscore(images, prompts, self.model, self.processor).double()
        return Score({self.name: per_image.mean().item()}, per_image, lambda rows: rows.mean().item())
