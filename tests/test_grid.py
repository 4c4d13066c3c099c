"""The labelled image grid that every picture of the project is drawn with (< 1 s)."""
import numpy as np
import pytest
from PIL import Image

from lora_w2w.errors import W2WError
from lora_w2w.pipeline import image_grid


def _tiles(count: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (10 * i, 200, 90)) for i in range(count)]


def test_unlabelled_grid_is_the_tiles_side_by_side():
    grid = image_grid(_tiles(6), columns=3)
    assert grid.size == (96, 64)
    assert grid.getpixel((32 * 2 + 5, 32 + 5)) == (50, 200, 90)  # tile 5: row 1, column 2


def test_labels_add_margins_with_text_and_keep_the_tiles_whole():
    plain = np.asarray(image_grid(_tiles(4), columns=2))
    grid = image_grid(_tiles(4), columns=2, row_labels=["original", "Eyeglasses +3 std"],
                      column_labels=["seed 0", "seed 1"])
    left, top = grid.width - 64, grid.height - 64
    assert left > 60 and top > 10  # room for the longer row label and a line of column labels
    pixels = np.asarray(grid)
    assert (pixels[top:, left:] == plain).all()
    margin = pixels[top:, :left]
    assert (margin < 128).any() and (margin > 250).mean() > 0.7  # dark text on white
    assert (pixels[:top, left:] < 128).any()


def test_label_counts_must_match_the_grid():
    with pytest.raises(W2WError, match="3 row labels for a grid of 2 rows"):
        image_grid(_tiles(4), columns=2, row_labels=["a", "b", "c"])
    with pytest.raises(W2WError, match="1 column labels for a grid of 2 columns"):
        image_grid(_tiles(4), columns=2, column_labels=["a"])
