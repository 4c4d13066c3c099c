"""Pictures written to disk: PNG files that appear complete or not at all."""
from __future__ import annotations

import os

from PIL import Image

from .storage import atomic_output


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write `image` to `path` as a PNG, through a temporary file renamed once written."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
