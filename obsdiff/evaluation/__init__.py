"""Evaluation: FID (injectable feature networks), CLIP score and image grids."""

from obsdiff.evaluation.clip import TensorCLIP, clip_score, load_clip, tiny_clip
from obsdiff.evaluation.features import EfficientNetLite0FeatureNet, load_efficientnet_lite0
from obsdiff.evaluation.fid import FEATURE_NETS, fid, get_feature_net, inception_feature_net
from obsdiff.evaluation.grid import image_grid, save_image_grid

__all__ = [
    "FEATURE_NETS",
    "EfficientNetLite0FeatureNet",
    "TensorCLIP",
    "clip_score",
    "fid",
    "get_feature_net",
    "image_grid",
    "inception_feature_net",
    "load_clip",
    "load_efficientnet_lite0",
    "save_image_grid",
    "tiny_clip",
]
