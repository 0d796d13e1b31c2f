"""``clip_score``: CLIP score of the images against their prompts (torchmetrics' ``CLIPScore``).

``eval.clip_model`` names the CLIP: a name of :data:`CLIP_MODELS` (networks of this project), or
else a hub id or local folder loaded with ``from_pretrained``. A new local CLIP is one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from obsdiff.evaluation.clip import clip_scores, load_clip, mean_clip_score, tiny_clip
from obsdiff.evaluation.metrics.base import EvalContext, Score

BATCH_SIZE = 32  # image/prompt pairs per CLIP call


class ClipModel(NamedTuple):
    """A CLIP of this project: what to call it in metrics.json, ``load(ecfg, context) ->
    (model, processor)``, and the files it reads (they key the dense cache)."""

    description: str
    load: Callable[[Any, EvalContext], tuple[Any, Any]]
    files: Callable[[], list[Path]] = list


def _digits_clip(ecfg: Any, context: EvalContext) -> tuple[Any, Any]:
    from obsdiff.evaluation.digits_clip import load_digits_clip

    return load_digits_clip()


def _digits_clip_files() -> list[Path]:
    from obsdiff.evaluation.digits_clip import shipped_weights

    return [shipped_weights()]


# ``eval.clip_model`` names with a builder of their own; any other value is a hub id or a folder.
CLIP_MODELS: dict[str, ClipModel] = {
    "tiny": ClipModel(
        "tiny random CLIP (plumbing check, not a quality number)",
        lambda ecfg, context: tiny_clip(context.tokenizer, image_size=ecfg.resolution),
    ),
    "digits": ClipModel(
        "digits CLIP (trained on the tiny model's digits and captions)", _digits_clip, _digits_clip_files
    ),
}


class ClipScore:
    """Mean CLIP score; per-image scores are the bootstrap's rows."""

    name: ClassVar[str] = "clip_score"
    label: ClassVar[str] = "CLIP score"
    higher_is_better: ClassVar[bool] = True
    versus_dense: ClassVar[bool] = False

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.clip_model else "eval.clip_model is null"

    def weights(self) -> list[str | Path]:
        known = CLIP_MODELS.get(self.clip_model)
        return known.files() if known else [self.clip_model]

    def build(self, ecfg: Any, context: EvalContext) -> None:
        self.clip_model = ecfg.clip_model
        known = CLIP_MODELS.get(ecfg.clip_model)
        model, processor = known.load(ecfg, context) if known else load_clip(ecfg.clip_model)
        self.model_and_processor = lambda: (model, processor)
        self.description = known.description if known else ecfg.clip_model

    def about(self) -> dict[str, str]:
        return {"eval/clip_network": self.description}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        scores = clip_scores(images, prompts, self.model_and_processor, BATCH_SIZE)  # (N,)
        return Score({self.name: mean_clip_score(scores, BATCH_SIZE)}, scores, mean_clip_score)
