"""Image grids: layout arithmetic, upscaling, labels, captions and saving."""

import numpy as np
import pytest
import torch
from PIL import Image

from obsdiff.evaluation.grid import MIN_CELL, image_grid, save_image_grid


def _solid(n: int, rgb: tuple[float, float, float], size: int = 32) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def _dark_pixels(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 128).sum())


def _rows() -> dict[str, torch.Tensor]:
    return {"dense": _solid(3, (1.0, 0.0, 0.0)), "pruned": _solid(3, (0.0, 0.0, 1.0))}


def test_tiny_images_are_upscaled_and_placed_in_labelled_rows():
    pad = 2
    grid = np.asarray(image_grid(_rows(), pad=pad))
    cell = MIN_CELL  # 32 px images, nearest-upscaled 3x
    width = grid.shape[1]
    label_w = width - pad - 3 * (cell + pad)
    assert label_w > 0
    assert grid.shape[0] == pad + 2 * (cell + pad)
    x = label_w + pad + 2 * (cell + pad)  # third column
    assert (grid[pad : pad + cell, x : x + cell] == (255, 0, 0)).all()
    y = pad + cell + pad  # second row
    assert (grid[y : y + cell, x : x + cell] == (0, 0, 255)).all()
    assert _dark_pixels(grid[pad : pad + cell, :label_w]) > 10  # "dense"
    assert _dark_pixels(grid[y : y + cell, :label_w]) > 10  # "pruned"


def test_column_captions_add_a_header_and_are_truncated_to_the_cell():
    plain = image_grid(_rows())
    long_prompt = "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation"
    captioned = np.asarray(image_grid(_rows(), columns=[long_prompt, "", ""]))
    header = captioned.shape[0] - plain.size[1]
    assert captioned.shape[1] == plain.size[0] and header > 0
    first_x = plain.size[0] - 3 * (MIN_CELL + 2)  # left edge of the first cell
    assert _dark_pixels(captioned[:header, first_x : first_x + MIN_CELL]) > 10
    assert _dark_pixels(captioned[:header, first_x + MIN_CELL :]) == 0  # truncated, no spill-over
    assert _dark_pixels(captioned[:header, :first_x]) == 0


def test_large_images_keep_their_size():
    grid = image_grid({"only": torch.rand(2, 3, 128, 160)}, pad=0)
    assert grid.size[1] == 128


def test_rejects_mismatched_rows_and_captions():
    with pytest.raises(ValueError, match="one shape"):
        image_grid({"a": _solid(2, (1, 1, 1)), "b": _solid(3, (1, 1, 1))})
    with pytest.raises(ValueError, match="captions"):
        image_grid(_rows(), columns=["only one"])
    with pytest.raises(ValueError, match="at least one row"):
        image_grid({})


def test_save_image_grid_writes_a_png(tmp_path):
    path = save_image_grid(tmp_path / "sub" / "grid.png", _rows(), columns=["a", "b", "c"])
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == image_grid(_rows(), columns=["a", "b", "c"]).size
