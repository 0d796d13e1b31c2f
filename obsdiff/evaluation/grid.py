"""Labelled image grids (e.g. dense vs. pruned samples for the same prompts)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_CELL = 96
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
ELLIPSIS = "..."


def _check_rows(rows: dict[str, Tensor]) -> tuple[int, int, int]:
    """Validates that every row is a float (N, 3, H, W) batch of one common shape.

    Args:
        rows: Row label -> images.

    Returns:
        ``(N, H, W)`` shared by all rows.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    shapes = {label: tuple(images.shape) for label, images in rows.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[1] != 3 or len(set(shapes.values())) != 1:
        raise ValueError(f"All rows must be (N, 3, H, W) batches of one shape, got {shapes}")
    return first[0], first[2], first[3]


def _to_pil(image: Tensor, scale: int) -> Image.Image:
    """Float (3, H, W) image in [0, 1] -> RGB PIL image upscaled ``scale`` times (nearest).

    Args:
        image: One image.
        scale: Integer upscaling factor.
    """
    x = image.detach().float().cpu().clamp(0, 1)[None]
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    array = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(array)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shortens ``text`` with a trailing ellipsis until it is at most ``width`` pixels wide.

    Args:
        draw: Drawing context used to measure text.
        text: The caption.
        font: Font to measure with.
        width: Available width in pixels.
    """
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + ELLIPSIS, font=font) > width:
        text = text[:-1]
    return text + ELLIPSIS


def image_grid(rows: dict[str, Tensor], columns: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Draws one labelled row per entry, with optional column captions on top.

    Args:
        rows: Row label -> float images (N, 3, H, W) in [0, 1]; all rows share one shape.
        columns: Optional N captions (e.g. prompts), truncated to the cell width.
        pad: Gap in pixels between cells and around text.

    Returns:
        The RGB grid. Cells are upscaled (nearest) to at least 96 px on their shorter side.
    """
    num_images, height, width = _check_rows(rows)
    if columns is not None and len(columns) != num_images:
        raise ValueError(f"Got {len(columns)} column captions for {num_images} images per row")
    scale = max(1, math.ceil(MIN_CELL / min(height, width)))
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(label, font=font)) for label in rows) + 2 * pad
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3]
    top = line_h + 2 * pad if columns is not None else 0
    grid = Image.new(
        "RGB",
        (label_w + pad + num_images * (cell_w + pad), top + pad + len(rows) * (cell_h + pad)),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(grid)
    for j, caption in enumerate(columns or []):
        draw.text(
            (label_w + pad + j * (cell_w + pad), pad),
            _fit_text(draw, caption, font, cell_w),
            fill=TEXT_COLOR,
            font=font,
        )
    for i, (label, images) in enumerate(rows.items()):
        y = top + pad + i * (cell_h + pad)
        draw.text((pad, y + (cell_h - line_h) // 2), label, fill=TEXT_COLOR, font=font)
        for j, image in enumerate(images):
            grid.paste(_to_pil(image, scale), (label_w + pad + j * (cell_w + pad), y))
    return grid


def save_image_grid(path: str | Path, rows: dict[str, Tensor], columns: list[str] | None = None) -> Path:
    """Writes :func:`image_grid` to ``path`` (format from the suffix), creating parent folders.

    Args:
        path: Output file, e.g. ``samples/grid.png``.
        rows: Row label -> float images (N, 3, H, W) in [0, 1].
        columns: Optional N column captions.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, columns).save(path)
    return path
