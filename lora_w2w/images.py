"""The one reader of image files (photographs, masks, instance images), bounded, and images of any bit
depth brought to 8 bits per channel.

`read_image` refuses, in one line naming the file, what is not a regular file (a FIFO would block the
read), an image whose header claims more than MAX_IMAGE_PIXELS (a "decompression bomb": a few KB of PNG
that would decode into gigabytes) before it is decoded, and one whose sides differ by more than
MAX_ASPECT_RATIO (a 1 x 400,000 strip, resized to the model's 512 px on its shorter side, would be
512 x 204,800,000); it turns the picture by its EXIF orientation (a phone's portrait photograph is stored
sideways with a tag saying so), then brings it to 8 bits.

PIL keeps a 16-bit greyscale PNG or TIFF as mode I;16 (0 .. 65535), a 32-bit integer one as I and a
float TIFF as F (by convention 0 .. 1); `convert("RGB")` clips those to 0 .. 255, so a 16-bit image
turns white and a float one black. Every image and mask the project reads goes through `eight_bit`.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import W2WError
from .paths import check_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # the files read as images
# Pixels an image file may claim: above the largest cameras' photographs (100 megapixels), 400 MB as 8-bit
# RGB. The reader sets PIL's Image.MAX_IMAGE_PIXELS to it, so that PIL refuses a larger header before
# decoding it (PIL warns above MAX_IMAGE_PIXELS and refuses above twice it; the reader refuses above once).
MAX_IMAGE_PIXELS = 2**27
MAX_ASPECT_RATIO = 20  # longer side / shorter side: panoramas (up to about 10) pass
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


def check_picture(image: Image.Image, what: str = "image") -> Image.Image:
    """`image`, refused (W2WError naming `what`) when it has more than MAX_IMAGE_PIXELS pixels or an aspect
    ratio beyond MAX_ASPECT_RATIO."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise W2WError(f"{what}: an image of {width} x {height} = {width * height:,} pixels; expected at most "
                       f"{MAX_IMAGE_PIXELS:,} ({MAX_IMAGE_PIXELS / 1e6:.0f} megapixels): scale it down")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise W2WError(f"{what}: an image of {width} x {height} pixels; expected sides within {MAX_ASPECT_RATIO}:1 "
                       f"of each other (crop it)")
    return image


def read_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The image file `path`, decoded, turned upright by its EXIF orientation and brought to 8 bits
    (`eight_bit`); W2WError naming the file when it is no regular file, does not decode, or is refused by
    `check_picture` (a header claiming more than MAX_IMAGE_PIXELS is refused before it is decoded)."""
    check_input(path, f"{'an' if what[:1] in 'aeiou' else 'a'} {what} file")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # the same value in every call: safe across threads
    try:
        with warnings.catch_warnings(record=True):  # PIL's DecompressionBombWarning: check_picture refuses below
            with Image.open(path) as image:
                check_picture(image, str(path))
                image.load()
                picture = ImageOps.exif_transpose(image)
    except W2WError:
        raise
    except FileNotFoundError:
        raise W2WError(f"{path}: no such {what} file") from None
    except Image.DecompressionBombError as error:  # PIL names the pixels, not the sides
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(claimed[1]):,} pixels" if claimed else "more pixels than that"
        raise W2WError(f"{path}: the image claims {pixels}; expected at most {MAX_IMAGE_PIXELS:,} "
                       f"({MAX_IMAGE_PIXELS / 1e6:.0f} megapixels): scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise W2WError(f"{path}: not a readable {what} ({error})") from None
    return eight_bit(picture, str(path))
