"""``imagereward``: mean ImageReward v1.0 (Xu et al., 2023) of the images for their prompts, the
BLIP reward model of human preference the paper reports (``obsdiff.evaluation.imagereward``);
``ImageReward.pt`` from ``eval.imagereward_model`` (the file, a folder holding it, or the hub repo)
and the BERT tokenizer from ``eval.imagereward_tokenizer`` (nothing downloads offline). Normalised
by the authors' constants: about 0 for an average generated image, higher is better. Runs on the
GPU when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from obsdiff.evaluation.metrics.base import EvalContext, Score


class ImageReward:
    """Mean ImageReward; per-image scores are the bootstrap's rows."""

    name: ClassVar[str] = "imagereward"
    label: ClassVar[str] = "ImageReward v1.0"
    higher_is_better: ClassVar[bool] = True
    versus_dense: ClassVar[bool] = False

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.imagereward_model else "eval.imagereward_model is null"

    def weights(self) -> list[str | Path]:
        return [self.model_path, self.tokenizer_path]

    def build(self, ecfg: Any, context: EvalContext) -> None:
        import torch

        from obsdiff.evaluation.imagereward import load_imagereward

        self.model_path, self.tokenizer_path = ecfg.imagereward_model, ecfg.imagereward_tokenizer
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_imagereward(self.model_path, self.tokenizer_path, device)

    def about(self) -> dict[str, str]:
        return {"eval/imagereward_network": str(self.model_path)}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        from obsdiff.evaluation.imagereward import imagereward

        per_image = imagereward(images, prompts, self.model, self.tokenizer).double()
        return Score({self.name: per_image.mean().item()}, per_image, lambda rows: rows.mean().item())
