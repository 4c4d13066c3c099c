"""Images of any bit depth brought to 8 bits per channel, so that PIL's convert("RGB") does not clip them.

PIL keeps a 16-bit greyscale PNG or TIFF as mode I;16 (0 .. 65535), a 32-bit integer one as I and a
float TIFF as F (by convention 0 .. 1); `convert("RGB")` clips those to 0 .. 255, so a 16-bit image
turns white and a float one black. Every image and mask the project reads goes through `eight_bit`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import W2WError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # the files read as images
SIXTEEN_BIT_MAX = 65535  # white of a 16-bit image (I;16, and I holding 16-bit values)
FLOAT_MAX = 1.0  # white of a float image
EIGHT_BIT_MAX = 255


def eight_bit(image: Image.Image, what: str = "image") -> Image.Image:
    """`image` with 8 bits per channel: I;16 and I scaled from 0 .. 65535, F from 0 .. 1, to an L image;
    other modes as they are. W2WError naming `what` when the values lie outside that range."""
    if image.mode.startswith("I;16") or image.mode == "I":
        white = SIXTEEN_BIT_MAX
    elif image.mode == "F":
        white = FLOAT_MAX
    else:
        return image
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(values).all() and 0 <= low and high <= white):
        raise W2WError(f"{what}: a {image.mode} image with values {low:g} .. {high:g}; expected 0 .. {white:g} "
                       f"(black .. white)")
    return Image.fromarray(np.round(values * (EIGHT_BIT_MAX / white)).astype(np.uint8), "L")
