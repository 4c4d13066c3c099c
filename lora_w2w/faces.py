"""Faces in photographs on dlib: detection, 68 landmarks, FFHQ's alignment and a mask from the landmarks.

dlib (the `dlib-bin` wheels) runs a face detector (HOG by default, its CNN, MMOD, on request), the 68-point
landmark predictor and (`identity.py`) the face descriptor; their weights ship inside the
`face-recognition-models` package: nothing is downloaded.

    image = open_image("me.jpg")
    face = find_face(image, "me.jpg")                    # box and 68 landmarks in the image's pixels; NoFaceError
    aligned = align_face(image, face.landmarks, 512)     # FFHQ's square crop at 512 px, the landmarks in it
    mask = landmark_mask(aligned.image.size, aligned.landmarks)  # "L": the jaw's hull raised over forehead and hair

Detection runs on a working copy of the image whose shorter side is at least DETECT_MIN px (the tiny world's
64 px faces are found there, dlib's detectors look for faces of 80 px and up) and whose longer side is at most
DETECT_MAX px (an 8,000 px photograph takes the time of a 1,024 px one); where it finds nothing it tries again
on dlib's upsampled pyramid (UPSAMPLING), which finds faces down to 40 px of the working copy.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import NoFaceError, W2WError
from .images import eight_bit

DETECTORS = ("hog", "cnn")  # dlib's HOG + linear SVM frontal detector; its CNN (MMOD): slower, finds turned faces
DETECTOR_HELP = ("dlib's face detector: hog (fast, frontal faces) or cnn (MMOD: finds turned faces, 40-70x slower on "
                 "the CPU) (default: %(default)s)")  # the help of every front end's --detector
DETECT_MIN, DETECT_MAX = 256, 1024  # px: the working copy's shorter side at least, longer side at most
UPSAMPLING = (0, 1)  # dlib's upsampling steps tried in turn until a face is found (1: twice the size)
# FFHQ's alignment reduces a large photograph by an integer factor while the face's square stays at least
# SUPERSAMPLE x the output size, renders the square at SUPERSAMPLE x, then resizes it down with antialiasing
# (FFHQ renders at 4x: no sharper here at 512 px, 3.5x the time). The landmark mask is drawn at SUPERSAMPLE x.
SUPERSAMPLE = 2
# The landmark mask: the jaw line (landmarks 0-16, ear to ear under the chin) mirrored above the eyebrows'
# line, HAIR_RAISE times as high and HAIR_WIDEN times as wide, over forehead and hair; its edge feathered by a
# blur of FEATHER x the face's width, narrow enough that the saved mask passes `inversion.check_mask` (set on
# the astronaut and Grace Hopper).
HAIR_RAISE = 1.2
HAIR_WIDEN = 1.3
FEATHER = 0.008
# Where no face is found, the automatic mask is an ellipse over where FFHQ's alignment puts a face and its hair:
# centre and semi-axes as fractions of the side (the bounds of the landmark masks of the aligned astronaut and
# Grace Hopper: columns 0.16-0.86, rows 0-0.88).
TEMPLATE_CENTRE = (0.5, 0.44)
TEMPLATE_AXES = (0.34, 0.44)


@dataclass(frozen=True)
class Face:
    """A face dlib found: its detection box (left, top, right, bottom) and its 68 landmarks (x, y), in pixels
    of the image it was found in (iBUG 300-W's order: 0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67
    mouth)."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray  # (68, 2) float


@dataclass(frozen=True)
class Alignment:
    """A face aligned as FFHQ's: the square picture, the landmarks in its pixels, and `to_source`, the
    affine map (2, 3) of its coordinates into the image's (continuous: pixel i spans [i, i + 1))."""

    image: Image.Image
    landmarks: np.ndarray  # (68, 2)
    to_source: np.ndarray  # (2, 3)

    def warp(self, picture: Image.Image, resample=Image.Resampling.NEAREST) -> Image.Image:
        """Another picture of the image's size (a mask) cut as the image was, black outside it."""
        return _affine(picture, self.to_source, self.image.width, self.image.width, resample)


# ----------------------------------------------------------------------------- dlib's models

def model_file(name: str) -> Path:
    """A model file shipped in face-recognition-models (found without importing it: its __init__ needs
    pkg_resources, which new setuptools no longer have)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise W2WError("face-recognition-models is not installed; expected it with the project "
                       "(pip install -r requirements.txt)")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise W2WError(f"{path}: missing from face-recognition-models; reinstall it (pip install "
                       f"--force-reinstall face-recognition-models)")
    return path


@lru_cache(maxsize=None)
def _detector(name: str):
    import dlib

    if name == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(model_file("mmod_human_face_detector.dat")))


@lru_cache(maxsize=1)
def _landmark_predictor():
    import dlib

    return dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))


def check_detector(detector: str) -> str:
    if detector not in DETECTORS:
        raise W2WError(f"unknown face detector {detector!r}; expected one of {', '.join(DETECTORS)}")
    return detector


# ----------------------------------------------------------------------------- detection and landmarks

def working_copy(image: Image.Image) -> tuple[np.ndarray, float]:
    """The RGB array (H, W, 3) uint8 that dlib reads (see DETECT_MIN, DETECT_MAX) and its scale over `image`."""
    rgb = eight_bit(image).convert("RGB")
    scale = max(DETECT_MIN / min(rgb.size), 1.0)
    scale = min(scale, DETECT_MAX / max(rgb.size))
    if scale != 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BOX)
    return np.ascontiguousarray(np.asarray(rgb)), scale


def _boxes(pixels: np.ndarray, detector: str) -> list:
    """dlib rectangles of the faces in `pixels`, at the first of UPSAMPLING that finds any."""
    for upsample in UPSAMPLING:
        found = _detector(detector)(pixels, upsample)
        if len(found):
            return [d.rect if detector == "cnn" else d for d in found]
    return []


def dlib_shapes(pixels: np.ndarray, detector: str = "hog") -> list:
    """dlib's full_object_detection (box and 68 landmarks) of each face in a `working_copy`, largest first."""
    predictor = _landmark_predictor()
    shapes = [predictor(pixels, rect) for rect in _boxes(pixels, check_detector(detector))]
    return sorted(shapes, key=lambda shape: -shape.rect.area())


def detect_faces(image: Image.Image, detector: str = "hog") -> list[Face]:
    """The faces dlib's `detector` finds in `image` with their landmarks, in the image's pixels, largest first."""
    pixels, scale = working_copy(image)
    faces = []
    for shape in dlib_shapes(pixels, detector):
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)  # (68, 2) in the working copy
        rect = shape.rect
        box = tuple(round(v / scale) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
        faces.append(Face(box, (points + 0.5) / scale - 0.5))  # pixel centres map to pixel centres
    return faces


def find_face(image: Image.Image, name: str = "image", detector: str = "hog") -> Face:
    """The largest face of `image`; NoFaceError naming the image when dlib finds none."""
    faces = detect_faces(image, detector)
    if not faces:
        raise NoFaceError(f"{name}: no face found (dlib's {detector.upper()} detector finds faces of 40 px and up"
                          f"{', frontal' if detector == 'hog' else ''}); use --crop center to fit the image's "
                          f"centre crop as it is")
    return faces[0]


# ----------------------------------------------------------------------------- FFHQ's alignment

# FFHQ's crop (NVlabs/ffhq-dataset, download_ffhq.py, recreate_aligned_images), step by step:
#   eye_left = mean(lm[36:42]); eye_right = mean(lm[42:48]); eye_avg = (eye_left + eye_right) * 0.5
#   eye_to_eye = eye_right - eye_left; mouth_avg = (lm[48] + lm[54]) * 0.5; eye_to_mouth = mouth_avg - eye_avg
#   "Choose oriented crop rectangle": x = eye_to_eye - flipud(eye_to_mouth) * [-1, 1]; x /= hypot(x);
#   x *= max(hypot(eye_to_eye) * 2.0, hypot(eye_to_mouth) * 1.8); y = flipud(x) * [-1, 1];
#   c = eye_avg + eye_to_mouth * 0.1; quad = [c - x - y, c - x + y, c + x + y, c + x - y]
#   "Shrink" the image by an integer factor when the quad is over twice the output; "Crop" around the quad with
#   a border; "Pad": reflect the image where the quad leaves it, blur the padding and fade it to the median
#   colour; "Transform" the quad to a square of 4 x the output size and resize it down with antialiasing.
# Here: the same square; the padding is blurred and faded by a ramp of its own; one affine map instead of QUAD.

def ffhq_square(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FFHQ's oriented crop square of a face's 68 landmarks (68, 2): its centre c and half-side vectors x
    (rightwards, along the eyes) and y (downwards), (2,) each; the corners are c -+ x -+ y."""
    eye_left, eye_right = landmarks[36:42].mean(0), landmarks[42:48].mean(0)  # (2,) each
    eye_middle = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (landmarks[48] + landmarks[54]) / 2 - eye_middle
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])  # the eye line, levelled by the mouth
    x *= max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth)) / np.hypot(*x)
    y = np.array([-x[1], x[0]])  # x turned a right angle (downwards in image coordinates)
    return eye_middle + 0.1 * eye_to_mouth, x, y


def _affine(picture: Image.Image, to_source: np.ndarray, side: int, output: int, resample) -> Image.Image:
    """`picture` resampled onto a square of `side` px, black outside it: `to_source` (2, 3) maps the continuous
    coordinates (u, v, 1) of a square of `output` px into the picture's; `side` px cover that same square."""
    matrix = to_source * np.array([output / side, output / side, 1.0])  # (2, 3)
    return picture.transform((side, side), Image.Transform.AFFINE, tuple(matrix.ravel()), resample)


def _padded(picture: Image.Image, corners: np.ndarray, border: float) -> tuple[Image.Image, np.ndarray]:
    """The part of `picture` that the square `corners` (4, 2) and a `border` around it cover, extended by
    reflection past the picture's edges where they reach outside it, the reflection blurred and faded to the
    median colour with the distance from the edge (FFHQ's crop and padding, by a ramp of its own); and the
    offset (2,) to add to the picture's coordinates to get the part's."""
    low = np.floor(corners.min(0) - border).astype(int)   # (2,) x, y
    high = np.ceil(corners.max(0) + border).astype(int)
    inside_low, inside_high = np.clip(low, 0, picture.size), np.clip(high, 0, picture.size)
    if (inside_high <= inside_low).any():  # the square lies wholly outside the picture: keep an edge to reflect
        inside_low, inside_high = np.minimum(inside_low, np.array(picture.size) - 1), np.maximum(inside_high, 1)
    part = picture.crop((*inside_low, *inside_high))
    before, after = inside_low - low, high - inside_high                                # (2,) each, >= 0
    if not (before.any() or after.any()):
        return part, -inside_low.astype(np.float64)
    pixels = np.asarray(part, np.float32)                                               # (H, W, 3)
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((before[1], after[1]), (before[0], after[0]), (0, 0)), mode="symmetric")
    rows, columns = np.ogrid[:padded.shape[0], :padded.shape[1]]
    outside = np.maximum(np.maximum(before[1] - rows, rows - (before[1] + height - 1)) / max(border, 1.0),
                         np.maximum(before[0] - columns, columns - (before[0] + width - 1)) / max(border, 1.0))
    ramp = np.clip(outside, 0, 1)[..., None]  # (H', W', 1): 0 inside and on the edge, 1 a border away
    blur = ImageFilter.GaussianBlur(float(border) / 4)
    blurred = np.asarray(Image.fromarray(padded.astype(np.uint8)).filter(blur), np.float32)  # (H', W', 3)
    padded += (blurred - padded) * np.clip(4 * ramp, 0, 1)
    padded += (np.median(pixels[::4, ::4].reshape(-1, 3), axis=0) - padded) * ramp  # (every 16th pixel's)
    offset = (before - inside_low).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(padded), 0, 255).astype(np.uint8)), offset


def align_face(image: Image.Image, landmarks: np.ndarray, size: int) -> Alignment:
    """The face of `landmarks` (68, 2) cut from `image` as FFHQ cuts its faces (`ffhq_square`), a square of
    `size` px, with its landmarks in the square's pixels."""
    centre, x, y = ffhq_square(landmarks)
    corner = centre - x - y                                                   # (2,) top left, pixel indices
    # output -> image, in continuous coordinates (PIL's: pixel i spans [i, i + 1)), (2, 3)
    to_source = np.column_stack([2 * x / size, 2 * y / size, corner + 0.5])
    render = SUPERSAMPLE * size
    shrink = max(1, int(2 * np.hypot(*x) // render))  # the square at least `render` px of the reduced picture
    picture = eight_bit(image).convert("RGB")
    if shrink > 1:
        picture = picture.reduce(shrink)
    corners = np.stack([corner, corner + 2 * x, corner + 2 * x + 2 * y, corner + 2 * y]) + 0.5  # (4, 2)
    picture, offset = _padded(picture, corners / shrink, 0.1 * 2 * np.hypot(*x) / shrink)
    scaled = to_source / shrink + np.column_stack([np.zeros((2, 2)), offset])  # (2, 3) into the padded picture
    aligned = _affine(picture, scaled, render, size, Image.Resampling.BICUBIC)
    aligned = aligned.resize((size, size), Image.Resampling.LANCZOS)
    inverse = np.linalg.inv(to_source[:, :2])                                 # (2, 2): image -> output
    return Alignment(aligned, (landmarks - corner) @ inverse.T - 0.5, to_source)


# ----------------------------------------------------------------------------- masks

def landmark_mask(size: tuple[int, int], landmarks: np.ndarray) -> Image.Image:
    """An "L" image of `size` (width, height): 255 inside the jaw line and its mirror image above the eyebrows,
    raised by HAIR_RAISE and widened by HAIR_WIDEN over forehead and hair, 0 outside; the edge feathered
    (FEATHER)."""
    jaw, brows = landmarks[0:17], landmarks[17:27]                    # (17, 2), (10, 2)
    _, x, y = ffhq_square(landmarks)
    right, down = x / np.hypot(*x), y / np.hypot(*y)                  # (2,) each
    middle = brows.mean(0)                                            # (2,) on the brows' line
    across, depth = (jaw - middle) @ right, (jaw - middle) @ down     # (17,) each: px right of and below it
    chin = max(depth.max(), 1.0)                                      # px from the brows' line to the chin
    height = HAIR_RAISE * chin * np.sqrt(np.clip(depth / chin, 0, 1))  # (17,) rounder than the chin
    raised = middle + np.outer(HAIR_WIDEN * across, right) - np.outer(height, down)  # (17, 2)
    outline = np.concatenate([jaw, raised[::-1]])                     # (34, 2) around the head
    canvas = Image.new("L", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in (outline + 0.5) * SUPERSAMPLE], fill=255)
    mask = canvas.resize(size, Image.Resampling.BOX)
    face_width = np.hypot(*(jaw[16] - jaw[0]))
    return mask.filter(ImageFilter.GaussianBlur(float(FEATHER * face_width)))


def template_mask(size: tuple[int, int]) -> Image.Image:
    """An "L" image of `size`: a soft ellipse over where FFHQ's alignment puts a face and its hair (see
    TEMPLATE_CENTRE, TEMPLATE_AXES): the fallback for an image framed so whose face dlib does not find."""
    width, height = size
    side = min(size)
    rows, columns = np.mgrid[0:height, 0:width] + 0.5  # pixel centres, (H, W) each
    centre_x = width / 2 + (TEMPLATE_CENTRE[0] - 0.5) * side
    centre_y = height / 2 + (TEMPLATE_CENTRE[1] - 0.5) * side
    radius = np.hypot((columns - centre_x) / (TEMPLATE_AXES[0] * side), (rows - centre_y) / (TEMPLATE_AXES[1] * side))
    edge = FEATHER * 2  # in units of the radius
    ramp = np.clip((1 + edge - radius) / (2 * edge), 0, 1)  # 1 inside, 0 outside, (H, W)
    return Image.fromarray(np.round(255 * ramp * ramp * (3 - 2 * ramp)).astype(np.uint8), mode="L")
