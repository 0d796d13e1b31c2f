"""``fid_real`` and ``fid_dense``: FID to real images and to the dense model (other seeds).

Both read the same features of the scored images (one feature pass, :meth:`EvalContext.features`);
their reference statistics are set on the context by ``dense_baseline``. They are set metrics: a
bootstrap resamples the images' feature rows and recomputes the distance (:func:`fid_of_features`),
and corrects the interval for the upward bias of resampled sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from obsdiff.evaluation.fid import FidReference, get_feature_net
from obsdiff.evaluation.metrics.base import EvalContext, Score


def fid_of_features(reference: FidReference, features: Tensor) -> float:
    """FID between ``reference`` and features (N, D) through the smaller eigenproblem.

    The nonzero eigenvalues of ``Σ_ref Σ_x`` are those of ``A Σ_ref Aᵀ / (N - 1)`` (``A`` the
    centred features), an (N, N) symmetric matrix: for N < D (50 tiny prompts, 1280 features) a
    bootstrap resample costs an N-sized problem instead of a D-sized one. Equal to
    :meth:`FidReference.fid` up to rounding.
    """
    count, dim = features.shape
    if count >= dim:
        return reference.fid(features)
    features = features.double()
    mean = features.mean(0)
    centred = features - mean  # (N, D)
    inner = centred @ reference.cov @ centred.T / (count - 1)  # (N, N)
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()  # tr √(Σ_ref Σ_x)
    trace_x = centred.square().sum() / (count - 1)  # tr Σ_x
    distance = (mean - reference.mean).square().sum() + reference.cov.trace() + trace_x - 2 * trace_sqrt
    return float(distance)


class _Fid:
    """FID to the reference statistics the context holds under ``reference`` (lower is closer)."""

    name: ClassVar[str]
    label: ClassVar[str]
    reference: ClassVar[str]  # the EvalContext field holding its reference statistics
    higher_is_better: ClassVar[bool] = False
    versus_dense: ClassVar[bool] = False

    def weights(self) -> list[str | Path]:
        return [self.ecfg.feature_weights] if self.ecfg.feature_weights else []

    def build(self, ecfg: Any, context: EvalContext) -> None:
        self.ecfg = ecfg
        if context.feature_net is None:
            context.feature_net = get_feature_net(ecfg.feature_net, ecfg.feature_weights)

    def about(self) -> dict[str, str]:
        return {"eval/fid_feature_net": self.ecfg.feature_net}

    def score(self, images: Tensor, prompts: list[str], context: EvalContext) -> Score:
        reference = getattr(context, self.reference)
        if reference is None:
            raise RuntimeError(f"{self.name}: no reference statistics (dense_baseline sets them first)")
        features = context.features(images)
        distance = reference.fid(features)
        return Score(
            {self.name: distance}, features, lambda rows: fid_of_features(reference, rows), debias=True
        )


class FidReal(_Fid):
    """FID to the eval's real images (``eval.reference_dir`` or ``eval.real_images``)."""

    name = "fid_real"
    label = "FID to real images"
    reference = "fid_real"

    def enabled(self, ecfg: Any) -> str | None:
        if ecfg.reference_dir or ecfg.get("real_images"):
            return None
        return "the eval has no real images (eval.reference_dir, eval.real_images are null)"


class FidDense(_Fid):
    """FID to the dense model's images from other seeds (``eval.reference_seed`` on)."""

    name = "fid_dense"
    label = "FID to the dense model"
    reference = "fid_dense"

    def enabled(self, ecfg: Any) -> str | None:
        return None if ecfg.reference_seed is not None else "eval.reference_seed is null"
