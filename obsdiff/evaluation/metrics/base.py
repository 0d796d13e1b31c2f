"""The metric protocol, what metrics share while scoring, and the registry of metrics by name.

A metric is one file in this package plus one line in the registry below; ``eval.metrics`` in an
eval YAML picks them by name. This module imports no torch, so config checks list the names free.

A metric's :meth:`Metric.score` returns a :class:`Score`: its values (the point estimates, keyed
``<name>`` and ``<name>_<part>``), one row per image (``samples``) and the function that turns rows
back into the main value (``reduce``). A bootstrap resamples rows and reduces them again: per-image
metrics (CLIP score, SSIM) average per-image values, set metrics (FID) recompute from resampled
features (and correct the interval for the bias repeated images bring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from obsdiff.registry import Registry

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor, nn

    from obsdiff.evaluation.fid import FidReference


@dataclass
class EvalContext:
    """What metrics share in one run: built networks and references, filled in as they appear.

    Args:
        ecfg: The ``eval`` config.
        tokenizer: The pipeline's CLIP tokenizer (the tiny local CLIP uses it).
    """

    ecfg: Any
    tokenizer: Any = None
    feature_net: nn.Module | None = None  # the FID features, built once for both references
    fid_real: FidReference | None = None
    fid_dense: FidReference | None = None
    dense: Tensor | None = None  # the dense model's images, same prompts and seeds as the scored ones
    _features: tuple[int, Tensor] | None = None  # (id of the images, their features): one pass per call

    def features(self, images: Tensor) -> Tensor:
        """FID features (N, D) of ``images``, computed once however many FID metrics read them."""
        from obsdiff.evaluation.fid import image_features

        if self._features is None or self._features[0] != id(images):
            self._features = (id(images), image_features(images, self.feature_net))
        return self._features[1]


@dataclass
class Score:
    """One metric's result on one image set.

    Args:
        values: Point estimates by key (``<name>`` first, then ``<name>_<part>``).
        samples: One row per image (per-image values, or features for a set metric), (N, ...).
        reduce: Rows (a resample of ``samples``) → the main value ``values[<name>]``.
        debias: Resampling biases ``reduce`` (a set metric): its interval is bias-corrected.
    """

    values: dict[str, float]
    samples: Tensor
    reduce: Callable[[Tensor], float]
    debias: bool = False


class Metric(Protocol):
    """A quality metric, found by ``name`` in :data:`METRICS`; built once, scores many image sets."""

    name: ClassVar[str]  # its key in metrics.json: eval/<name>, dense/<name>
    label: ClassVar[str]  # what the report's table calls it
    higher_is_better: ClassVar[bool]
    versus_dense: ClassVar[bool]  # compares with the dense images: not scored on the dense model itself

    def enabled(self, ecfg: Any) -> str | None:
        """``None`` if the eval config gives the metric what it needs, else why not (a null field)."""
        ...

    def weights(self) -> list[str | Path]:
        """The files it loads (their fingerprint keys the dense cache); hub ids are named only."""
        ...

    def build(self, ecfg: Any, context: EvalContext) -> None:
        """Load its networks (once per run); may set shared ones on ``context``."""
        ...

    def about(self) -> dict[str, str]:
        """``eval/<what>`` → what its numbers are measured with (network names), for metrics.json."""
        ...

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        """Score float images (N, 3, H, W) in [0, 1], one per prompt."""
        ...


# Metrics by name (``eval.metrics``): a lazy ``"module:Class"`` per entry; registration order is
# the report's order.
METRICS: Registry = Registry(
    "metric (eval.metrics)",
    {
        "fid_real": "obsdiff.evaluation.metrics.fid:FidReal",
        "fid_dense": "obsdiff.evaluation.metrics.fid:FidDense",
        "prompt_accuracy": "obsdiff.evaluation.metrics.prompt_accuracy:PromptAccuracy",
        "clip_score": "obsdiff.evaluation.metrics.clip_score:ClipScore",
        "ssim_dense": "obsdiff.evaluation.metrics.ssim_dense:SsimDense",
        "psnr_dense": "obsdiff.evaluation.metrics.psnr_dense:PsnrDense",
        "pickscore": "obsdiff.evaluation.metrics.pickscore:PickScore",
        "hpsv2": "obsdiff.evaluation.metrics.hpsv2:HpsV2",
        "hpsv21": "obsdiff.evaluation.metrics.hpsv2:HpsV21",
        "imagereward": "obsdiff.evaluation.metrics.imagereward:ImageReward",
    },
)
