"""``prompt_accuracy``: the fraction of images a prompt judge finds showing all their prompt asks.

The judge is ``eval.prompt_judge`` (:data:`obsdiff.evaluation.PROMPT_JUDGES`); its parts (for the
digits classifier: digit, foreground, background) are reported as ``prompt_accuracy_<part>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from obsdiff.evaluation import PROMPT_JUDGES
from obsdiff.evaluation.metrics.base import EvalContext, Score


class PromptJudge(NamedTuple):
    """A prompt judge: ``build()`` gives a scorer ``(images, prompts) -> {part: (N,) bool}`` whose
    ``all`` part says which images show everything their prompt asks for; ``weights()`` is its
    weight file, which keys the dense cache."""

    description: str
    build: Callable[[], Callable[[Tensor, list[str]], dict[str, Tensor]]]
    weights: Callable[[], Path]


def _digits_classifier() -> Callable[[Tensor, list[str]], dict[str, Tensor]]:
    from obsdiff.evaluation.digits_classifier import load_digits_classifier, prompt_hits

    classifier = load_digits_classifier()
    return lambda images, prompts: prompt_hits(images, prompts, classifier)


def _digits_classifier_weights() -> Path:
    from obsdiff.evaluation.digits_classifier import shipped_weights

    return shipped_weights()


# The ``digits_classifier`` entry of ``PROMPT_JUDGES`` (``eval.prompt_judge``).
DIGITS_CLASSIFIER_JUDGE = PromptJudge(
    "digits classifier: digit, foreground and background all as prompted "
    "(the tiny model's stand-in for CLIP score)",
    _digits_classifier,
    _digits_classifier_weights,
)


class PromptAccuracy:
    """Prompt accuracy and its parts; per-image hits are the bootstrap's rows."""

    name: ClassVar[str] = "prompt_accuracy"
    label: ClassVar[str] = "prompt accuracy"
    higher_is_better: ClassVar[bool] = True
    versus_dense: ClassVar[bool] = False

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.get("prompt_judge") else "eval.prompt_judge is null"

    def weights(self) -> list[str | Path]:
        return [self.judge.weights()]

    def build(self, ecfg: Any, context: EvalContext) -> None:
        self.judge = PROMPT_JUDGES[ecfg.prompt_judge]
        self.hits = self.judge.build()

    def about(self) -> dict[str, str]:
        return {"eval/prompt_judge": self.judge.description}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        hits = {part: hit.float() for part, hit in self.hits(images, prompts).items()}
        every = hits.pop("all")  # (N,) 1.0 where the image shows all its prompt asks
        values = {self.name: every.mean().item()}
        values |= {f"{self.name}_{part}": hit.mean().item() for part, hit in hits.items()}
        return Score(values, every, lambda rows: rows.mean().item())
