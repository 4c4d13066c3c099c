"""Faces in photographs: detection, the square face crop the paper inverts, and an automatic mask.

Detection is scikit-image's frontal-face LBP cascade (OpenCV's lbpcascade_frontalface, shipped inside
the scikit-image wheel with its sample photograph `skimage.data.astronaut()`: nothing is downloaded).
It runs on a working copy of the image whose shorter side is brought into DETECT_SIDE, so that the small
faces of the tiny world (64 px images) and large photographs take the same path.

    image = open_image("me.jpg")
    box = largest_face(image, "me.jpg")       # FaceBox in the image's pixels; NoFaceError when none
    crop, box_in_crop = face_crop(image, box)  # square, the face FACE_FRACTION of its width
    mask = face_mask(crop.size, box_in_crop)   # "L" image: a soft ellipse over face and hair

A box is the cascade's detection window: a square from the eyebrows to below the mouth, its centre near
the nose.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import NoFaceError

# The cascade's settings: the scale step between window sizes and how many overlapping windows make a
# face. On the astronaut, 1.1 and 4 find her face alone; 2 neighbours also fire on the flag and the suit.
SCALE_FACTOR = 1.1
MIN_NEIGHBOURS = 4
WINDOW = 24  # px: the cascade's smallest window (its training size)
# Faces narrower than MIN_FACE of the shorter side are not looked for: too small to invert, and on the
# astronaut the smaller windows fire on the flag and the suit.
MIN_FACE = 0.1
# Shorter side of the working copy: a 64 px face upscaled to 256 px is found (at 64 px the faces are
# barely larger than the window and are missed); photographs above 512 px are scaled down for speed.
DETECT_SIDE = (256, 512)
# FFHQ-like framing: the detected box is FACE_FRACTION of the crop's width, centred across, its centre
# CROP_SHIFT box sizes below the crop's (room for the hair above).
FACE_FRACTION = 0.45
CROP_SHIFT = 0.1
# The automatic mask: an ellipse centred HAIR_SHIFT box sizes above the box centre (the hair), with
# semi-axes MASK_AXES box sizes (width, height); its edge ramps from 0 to 1 across a band of
# +-MASK_EDGE of its radius, narrow enough that the saved mask passes `inversion.check_mask`.
HAIR_SHIFT = 0.25
MASK_AXES = (0.8, 0.95)
MASK_EDGE = 0.025


@dataclass(frozen=True)
class FaceBox:
    """A square face box in pixels of its image: top row, left column, side."""

    top: int
    left: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        """(row, column) of the box's centre."""
        return self.top + self.size / 2, self.left + self.size / 2

    def contains(self, row: float, column: float) -> bool:
        return self.top <= row <= self.top + self.size and self.left <= column <= self.left + self.size


@lru_cache(maxsize=1)
def _cascade():
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    return Cascade(lbp_frontal_face_cascade_filename())


def detect_faces(image: Image.Image) -> list[FaceBox]:
    """The frontal faces the cascade finds in `image`, in its pixels, largest first."""
    low, high = DETECT_SIDE
    scale = min(max(min(image.size), low), high) / min(image.size)  # working copy / image
    work = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                       Image.Resampling.BICUBIC)
    side = min(work.size)
    smallest = max(WINDOW, round(MIN_FACE * side))
    found = _cascade().detect_multi_scale(img=np.asarray(work), scale_factor=SCALE_FACTOR, step_ratio=1,
                                          min_size=(smallest, smallest), max_size=(side, side),
                                          min_neighbor_number=MIN_NEIGHBOURS)
    boxes = [FaceBox(round(f["r"] / scale), round(f["c"] / scale), round(f["width"] / scale)) for f in found]
    return sorted(boxes, key=lambda box: -box.size)


def largest_face(image: Image.Image, name: str = "image") -> FaceBox:
    """The largest detected face; NoFaceError naming the image when there is none."""
    boxes = detect_faces(image)
    if not boxes:
        raise NoFaceError(f"{name}: no face found (the detector finds frontal faces); use --crop center to fit "
                          f"the image's centre crop as it is")
    return boxes[0]


def face_square(size: tuple[int, int], box: FaceBox) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square around `box` in an image of `size` (width, height): the box
    FACE_FRACTION of its width (or more where the image is too small: the square is then the largest
    inside it), shifted to stay inside the image."""
    width, height = size
    side = min(round(box.size / FACE_FRACTION), width, height)
    row, column = box.centre
    row -= CROP_SHIFT * box.size
    left = int(np.clip(round(column - side / 2), 0, width - side))
    top = int(np.clip(round(row - side / 2), 0, height - side))
    return left, top, left + side, top + side


def face_crop(image: Image.Image, box: FaceBox) -> tuple[Image.Image, FaceBox]:
    """The square crop of `image` around `box` (see `face_square`), and the box in the crop's pixels."""
    left, top, right, bottom = face_square(image.size, box)
    return image.crop((left, top, right, bottom)), FaceBox(box.top - top, box.left - left, box.size)


def centred_box(size: tuple[int, int]) -> FaceBox:
    """Where a face sits in an image already framed as `face_crop` frames it: FACE_FRACTION of the shorter
    side, centred across, CROP_SHIFT of its size below the centre."""
    width, height = size
    side = round(FACE_FRACTION * min(size))
    return FaceBox(round((height - side) / 2 + CROP_SHIFT * side), (width - side) // 2, side)


def face_mask(size: tuple[int, int], box: FaceBox) -> Image.Image:
    """An "L" image of `size` (width, height): 255 inside an ellipse over the face and hair of `box`, 0
    outside, with a soft edge (see MASK_AXES, HAIR_SHIFT, MASK_EDGE)."""
    width, height = size
    row, column = box.centre
    row -= HAIR_SHIFT * box.size
    rows, columns = np.mgrid[0:height, 0:width] + 0.5  # pixel centres, (H, W) each
    radius = np.hypot((columns - column) / (MASK_AXES[0] * box.size), (rows - row) / (MASK_AXES[1] * box.size))
    ramp = np.clip((1 + MASK_EDGE - radius) / (2 * MASK_EDGE), 0, 1)  # 1 inside, 0 outside, (H, W)
    smooth = ramp * ramp * (3 - 2 * ramp)  # smoothstep
    return Image.fromarray(np.round(255 * smooth).astype(np.uint8), mode="L")
