"""A small CNN that reads digit, foreground and background colour from 32×32 digit images.

It scores how well a text-to-image model follows the digits captions of
:mod:`obsdiff.models.digits_data`: :func:`prompt_accuracy` parses what each prompt asks for and
compares it with what the classifier sees. The shipped weights (``digits_classifier.safetensors``)
and their record (``digits_classifier.json``: sizes, held-out accuracy per head, floors the tests
check) are made by ``experiments/tiny_digits/train.py``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from obsdiff.models.digits_data import COLOUR_NAMES, IMAGE_SIZE, NUM_DIGITS, parse_caption

WEIGHTS_FILE = "digits_classifier.safetensors"
RECORD_FILE = "digits_classifier.json"
HEADS = ("digit", "fg", "bg")


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsClassifier(nn.Module):
    """Three-headed CNN: digit (10 classes), foreground and background colour (one per palette colour)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), hidden: int = 128):
        """Builds the network with random weights.

        Args:
            widths: Channels of the three stages (32×32, 16×16, 8×8; each ends in a 2× max-pool).
            hidden: Width of the shared fully connected layer.
        """
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            _conv(3, c1), _conv(c1, c1), nn.MaxPool2d(2),  # (N, c1, 16, 16)
            _conv(c1, c2), _conv(c2, c2), nn.MaxPool2d(2),  # (N, c2, 8, 8)
            _conv(c2, c3), nn.MaxPool2d(2),  # (N, c3, 4, 4)
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(c3 * 16, hidden),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.digit = nn.Linear(hidden, NUM_DIGITS)
        self.fg = nn.Linear(hidden, len(COLOUR_NAMES))
        self.bg = nn.Linear(hidden, len(COLOUR_NAMES))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of each head.

        Args:
            images: Float images (N, 3, H, W) in [0, 1]; resized to 32×32 if needed.

        Returns:
            ``{"digit": (N, 10), "fg": (N, C), "bg": (N, C)}`` logits.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        h = self.features(x * 2 - 1)
        return {"digit": self.digit(h), "fg": self.fg(h), "bg": self.bg(h)}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
        """Most likely class of each head (int64 (N,) tensors), in eval mode, batched."""
        was_training = self.training
        self.eval()
        logits = [self(batch) for batch in images.split(batch_size)]
        self.train(was_training)
        return {head: torch.cat([out[head] for out in logits]).argmax(1) for head in HEADS}


def _package_file(name: str) -> Path:
    """Path of a file shipped next to this module."""
    return Path(str(resources.files(__package__).joinpath(name)))


def classifier_record(path: str | Path | None = None) -> dict:
    """The shipped record: architecture, training command, held-out accuracies and test floors.

    Args:
        path: A record JSON; the packaged ``digits_classifier.json`` by default.
    """
    return json.loads(Path(path or _package_file(RECORD_FILE)).read_text(encoding="utf-8"))


def shipped_weights() -> Path:
    """The shipped weights file (its size and time key the dense-image cache)."""
    return _package_file(WEIGHTS_FILE)


def load_digits_classifier(weights_path: str | Path | None = None) -> DigitsClassifier:
    """Builds the classifier and loads trained weights (strictly, on CPU, no download).

    Args:
        weights_path: A safetensors state dict; the shipped weights by default (their record,
            ``digits_classifier.json``, gives the sizes).

    Returns:
        The classifier in eval mode with gradients disabled.
    """
    record = classifier_record()
    net = DigitsClassifier(tuple(record["widths"]), record["hidden"])
    net.load_state_dict(load_file(str(weights_path or shipped_weights())), strict=True)
    return net.eval().requires_grad_(False)


def prompt_hits(
    images: Tensor, prompts: list[str], classifier: DigitsClassifier | None = None
) -> dict[str, Tensor]:
    """Per image, whether it shows what its digits prompt asks for.

    Args:
        images: Float images (N, 3, H, W) in [0, 1], one per prompt.
        prompts: Captions written by :mod:`obsdiff.models.digits_data` templates.
        classifier: The judge; the shipped classifier by default.

    Returns:
        Bool (N,) tensors: ``digit``, ``fg``, ``bg`` agreement and ``all`` (all three right).

    Raises:
        ValueError: If counts differ or a prompt is not a digits caption.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    wanted = [parse_caption(p) for p in prompts]
    predicted = (classifier or load_digits_classifier()).predict(images)
    hits = {
        "digit": predicted["digit"] == torch.tensor([c.digit for c in wanted]),
        "fg": predicted["fg"] == torch.tensor([c.fg for c in wanted]),
        "bg": predicted["bg"] == torch.tensor([c.bg for c in wanted]),
    }
    hits["all"] = hits["digit"] & hits["fg"] & hits["bg"]
    return hits


def prompt_accuracy(
    images: Tensor, prompts: list[str], classifier: DigitsClassifier | None = None
) -> dict[str, float]:
    """How often the images show what their digits prompts ask for.

    Args:
        images: Float images (N, 3, H, W) in [0, 1], one per prompt.
        prompts: Captions written by :mod:`obsdiff.models.digits_data` templates.
        classifier: The judge; the shipped classifier by default.

    Returns:
        Fractions in [0, 1]: ``digit``, ``fg``, ``bg`` agreement and ``all`` (all three right).

    Raises:
        ValueError: If counts differ or a prompt is not a digits caption.
    """
    hits = prompt_hits(images, prompts, classifier)
    return {name: hit.float().mean().item() for name, hit in hits.items()}
