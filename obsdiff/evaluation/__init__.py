"""Evaluation: FID (injectable feature networks), CLIP score, prompt judges and image grids.

This package imports nothing heavy: import the modules themselves (``obsdiff.evaluation.fid``, …).
It holds the registries whose names config validation checks; their entries are lazy
``"module:attr"`` references, imported (with torch) on first use.
"""

from obsdiff.registry import Registry

# FID feature networks by name (``eval.feature_net``): ``builder(weights_path) -> nn.Module``.
FEATURE_NETS: Registry = Registry(
    "FID feature net (eval.feature_net)",
    {
        "efficientnet_lite0": "obsdiff.evaluation.features:load_efficientnet_lite0",
        "inception_v3": "obsdiff.evaluation.fid:inception_feature_net",
    },
)
# Real reference sets by name (``eval.real_images``): ``load(count, resolution) -> (N, 3, R, R)``;
# ``eval.reference_dir`` reads a folder instead.
REAL_IMAGES: Registry = Registry(
    "real image set (eval.real_images)",
    {"digits_heldout": "obsdiff.evaluation.evaluate:heldout_digits"},
)
# Prompt judges by name (``eval.prompt_judge``): ``obsdiff.evaluation.metrics.prompt_accuracy.PromptJudge``.
PROMPT_JUDGES: Registry = Registry(
    "prompt judge (eval.prompt_judge)",
    {"digits_classifier": "obsdiff.evaluation.metrics.prompt_accuracy:DIGITS_CLASSIFIER_JUDGE"},
)

__all__ = ["FEATURE_NETS", "PROMPT_JUDGES", "REAL_IMAGES"]
