"""Fréchet distance between two image sets, with an injectable feature network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import NoTrainInceptionV3, _compute_fid
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from obsdiff.evaluation import FEATURE_NETS  # the registry: names torch-free, entries lazy

INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299
# What every image goes through on its way into the Inception net (reported as ``eval/fid_resize``).
INCEPTION_RESIZE = (
    f"bicubic, antialias=True, to {INCEPTION_SIZE}x{INCEPTION_SIZE} (torch.nn.functional.interpolate "
    "of float [0, 1] images, clamped), then uint8 (x * 255 truncated) as torchmetrics does"
)
# Images per feature-network call: on CPU, EfficientNet-Lite0 at 224² ran 2.3x faster per image in
# batches of 8 than of 64 (activations stay in cache).
FEATURE_BATCH = 8


def fid_resize(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Float images (N, 3, H, W) in [0, 1] resized to (N, 3, size, size): bicubic, antialiased.

    Antialiasing matters when downsampling (1024² generations, 640×480 photos): without it the
    resize aliases, which moves FID. Images already of that size are returned unchanged.
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)


def load_centre_crop(path: str | Path, size: int = INCEPTION_SIZE) -> Tensor:
    """A photo's central square (side = its shorter side), :func:`fid_resize`-d: (1, 3, size, size)."""
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    array = np.array(image.crop((left, top, left + side, top + side)))
    return fid_resize(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, size)


class UnitRangeInception(nn.Module):
    """torchmetrics' FID Inception-v3 (torch-fidelity weights) taking float [0, 1] images.

    Images are first resized to 299² by :func:`fid_resize` (so torch-fidelity's own bilinear,
    non-antialiased resize has nothing left to do). torchmetrics feeds a custom feature module the
    images unchanged, while its Inception expects uint8; this wrapper does the same
    ``(x * 255).byte()`` conversion torchmetrics applies itself.
    """

    num_features: int = INCEPTION_FEATURES
    resize: str = INCEPTION_RESIZE

    def __init__(self, weights_path: str | None = None) -> None:
        """Builds the network (torch-fidelity must be installed).

        Args:
            weights_path: Local Inception-v3 FID weights; ``None`` lets torch-fidelity fetch its own.
        """
        super().__init__()
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=weights_path,
        )

    def forward(self, images: Tensor) -> Tensor:
        """Returns pool3 features (N, 2048).

        Args:
            images: Float images (N, 3, H, W) in [0, 1].
        """
        return self.inception((fid_resize(images) * 255).byte())


def inception_feature_net(weights_path: str | None = None) -> nn.Module:
    """The standard FID Inception-v3 (2048-d pool features) for real runs.

    Args:
        weights_path: Local ``pt_inception-2015-12-05`` weights; ``None`` downloads them on first use.

    Raises:
        ImportError: When torch-fidelity (the ``coco`` extra) is not installed.
    """
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError(
            'Inception-v3 FID needs torch-fidelity: run `pip install "obsdiff[coco]"`, '
            "or use the feature net `efficientnet_lite0`, which needs no extra package."
        )
    return UnitRangeInception(weights_path)


def get_feature_net(name: str, weights_path: str | None = None) -> nn.Module:
    """Builds a registered FID feature network by name.

    Args:
        name: A key of :data:`FEATURE_NETS`.
        weights_path: Optional local weights file passed to the builder.

    Raises:
        KeyError: For an unknown name; the message lists the known ones.
    """
    if name not in FEATURE_NETS:
        raise KeyError(f"Unknown FID feature net {name!r}; known: {sorted(FEATURE_NETS)}")
    return FEATURE_NETS[name](weights_path)


def _check_images(images: Tensor, side: str) -> None:
    """Raises a ValueError unless ``images`` is a float (N >= 2, 3, H, W) batch.

    Args:
        images: The image batch to check.
        side: "real" or "fake", used in the message.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"FID {side} images must be float (N, 3, H, W) in [0, 1], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 {side} images (a covariance), got {images.shape[0]}")


@torch.no_grad()
def image_features(images: Tensor, feature_net: nn.Module, batch_size: int = FEATURE_BATCH) -> Tensor:
    """Feature vectors (N, D), float64 on the CPU, of float images (N, 3, H, W) in [0, 1]."""
    device = next(feature_net.parameters(), torch.empty(0)).device
    return torch.cat([feature_net(batch.to(device)).double().cpu() for batch in images.split(batch_size)])


class FidReference:
    """The feature statistics (mean, covariance) of a reference set, for FID to any image set.

    Build it from images (:meth:`from_images`) or saved statistics (``FidReference(mean, cov)``);
    :meth:`fid` takes the other set's features, so one feature pass serves several references.
    The statistics and the distance are torchmetrics' ``FrechetInceptionDistance`` (float64).

    Args:
        mean: Feature mean (D,).
        cov: Feature covariance (D, D), unbiased.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        self.mean, self.cov = mean.double(), cov.double()

    @classmethod
    def from_features(cls, features: Tensor) -> FidReference:
        """Statistics of features (N >= 2, D)."""
        features = features.double()
        mean = features.mean(0)
        centred = features - mean
        return cls(mean, centred.T @ centred / (features.shape[0] - 1))

    @classmethod
    def from_images(
        cls, images: Tensor, feature_net: nn.Module, batch_size: int = FEATURE_BATCH
    ) -> FidReference:
        """Statistics of float images (N >= 2, 3, H, W) in [0, 1]."""
        _check_images(images, "real")
        return cls.from_features(image_features(images, feature_net, batch_size))

    @classmethod
    def from_files(
        cls, paths: list[Path], feature_net: nn.Module, batch_size: int = FEATURE_BATCH
    ) -> FidReference:
        """Statistics of photos of any size, each centre-cropped and resized (:func:`load_centre_crop`),
        read ``batch_size`` at a time (5,000 COCO photos never sit in memory at once)."""
        if len(paths) < 2:
            raise ValueError(f"FID needs at least 2 real images (a covariance), got {len(paths)}")
        features = [
            image_features(
                torch.cat([load_centre_crop(p) for p in paths[start : start + batch_size]]), feature_net
            )
            for start in range(0, len(paths), batch_size)
        ]
        return cls.from_features(torch.cat(features))

    def fid(self, features: Tensor) -> float:
        """FID between this reference and a set of features (N >= 2, D) (lower is closer)."""
        other = FidReference.from_features(features)
        return float(_compute_fid(self.mean, self.cov, other.mean, other.cov))


def fid(real: Tensor, fake: Tensor, feature_net: nn.Module, batch_size: int = FEATURE_BATCH) -> float:
    """Fréchet distance between the feature statistics of two image sets.

    Args:
        real: Reference images, float (N, 3, H, W) in [0, 1].
        fake: Generated images, float (M, 3, H, W) in [0, 1].
        feature_net: Module mapping such images to (B, D) features (see :data:`FEATURE_NETS`).
        batch_size: Images per feature-network call.

    Returns:
        The FID value (lower is closer).
    """
    _check_images(fake, "fake")
    reference = FidReference.from_images(real, feature_net, batch_size)
    return reference.fid(image_features(fake, feature_net, batch_size))
