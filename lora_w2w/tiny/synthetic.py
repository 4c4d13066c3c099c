"""Procedural faces for the tiny world: CelebA-like identities, many images each.

An identity is a set of binary CelebA attributes (drawn with realistic correlations) and
continuous traits (face shape, skin tone, eyes, nose, mouth, hair ...); every image of it varies
in pose, scale, position, background, lighting and expression (Smiling, drawn per image).
Everything is deterministic from integer seeds and drawn with numpy + PIL only: shapes are
polygons in *face units* (face centre at 0, y down, face half-width ~0.7) mapped to pixels by
one affine transform per image, drawn at 4x resolution and downsampled with LANCZOS.

    from lora_w2w.tiny.synthetic import sample_identity, render, caption, write_dataset
    person = sample_identity(7)
    render(person, view_seed=3).save("face.png")      # 64 x 64 RGB
    caption(person, smiling=True)  # "a photo of a smiling young woman with blond hair and glasses"
    write_dataset("data/faces", num_identities=1000)  # data/faces/celeba_generated/000000/0.png

    python -m lora_w2w.tiny.synthetic --out data/faces --num 16 --grid assets/tiny_faces.png
"""

from __future__ import annotations

import argparse
import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..storage import atomic_output

ATTRIBUTES: tuple[str, ...] = (
    "Male", "Young", "Eyeglasses", "No_Beard", "Mustache", "Bald", "Black_Hair", "Blond_Hair",
    "Brown_Hair", "Gray_Hair", "Pale_Skin", "Wearing_Hat", "Chubby",
)
IMAGE_ATTRIBUTES: tuple[str, ...] = ("Smiling",)
HAIR_COLOURS: tuple[str, ...] = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
TRAITS: tuple[str, ...] = (  # all in [0, 1]; skin_tone 0 = dark, 1 = pale
    "face_width", "face_height", "jaw_width", "skin_tone", "eye_spacing", "eye_size", "eye_hue",
    "brow_thickness", "nose_length", "nose_width", "mouth_width", "hair_shade", "hair_length",
    "clothes_hue",
)
CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "photo", "of", "person", "sks", "smiling", "young", "old", "chubby", "pale", "man",
    "woman", "with", "and", "black", "blond", "brown", "gray", "hair", "bald", "head", "glasses",
    "beard", "mustache", "hat",
)
SUPERSAMPLE = 4  # drawn at 4x the output size, then LANCZOS-downsampled (antialiasing)

# ----------------------------------------------------------------------------------------------
# Identities

# Attribute probabilities; CelebA-like, with the rare ones made common enough to learn from.
P_MALE, P_YOUNG, P_PALE, P_HAT = 0.42, 0.75, 0.30, 0.10
P_GLASSES = {True: 0.15, False: 0.35}        # by Young  -> ~20% overall
P_CHUBBY = {True: 0.10, False: 0.30}         # by Young  -> ~15% overall
P_BALD = {(True, True): 0.04, (True, False): 0.30, (False, True): 0.002, (False, False): 0.01}
P_BEARD = {True: 0.45, False: 0.01}          # by Male
P_MUSTACHE = {(True, True): 0.40, (True, False): 0.08, (False, True): 0.0, (False, False): 0.005}
# Hair colour weights (black, blond, brown, gray) by (Male, Young).
HAIR_WEIGHTS = {
    (True, True): (0.45, 0.14, 0.40, 0.01), (True, False): (0.30, 0.08, 0.27, 0.35),
    (False, True): (0.34, 0.32, 0.33, 0.01), (False, False): (0.25, 0.22, 0.23, 0.30),
}
# Trait ranges that attributes pin down (the others are uniform in [0, 1]).
PALE_SKIN_TONE, OTHER_SKIN_TONE = (0.76, 1.0), (0.0, 0.64)
CHUBBY_FACE_WIDTH, OTHER_FACE_WIDTH = (0.80, 1.0), (0.0, 0.65)


@dataclass(frozen=True)
class Identity:
    """One synthetic person: CelebA attributes and continuous traits (all in [0, 1])."""

    name: str                      # e.g. "000123"
    attributes: dict[str, bool]    # every name of ATTRIBUTES
    traits: np.ndarray             # (len(TRAITS),) float32 in [0, 1]

    def trait(self, name: str) -> float:
        return float(self.traits[TRAITS.index(name)])


def _sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """Binary attributes with CelebA-like correlations (beards on men, gray hair on the old...)."""
    male, young = bool(rng.random() < P_MALE), bool(rng.random() < P_YOUNG)
    bald = bool(rng.random() < P_BALD[male, young])
    beard = bool(rng.random() < P_BEARD[male])
    weights = np.array(HAIR_WEIGHTS[male, young])
    hair = None if bald else HAIR_COLOURS[rng.choice(len(HAIR_COLOURS), p=weights / weights.sum())]
    attributes = {
        "Male": male,
        "Young": young,
        "Eyeglasses": bool(rng.random() < P_GLASSES[young]),
        "No_Beard": not beard,
        "Mustache": bool(rng.random() < P_MUSTACHE[male, beard]),
        "Bald": bald,
        **{colour: colour == hair for colour in HAIR_COLOURS},
        "Pale_Skin": bool(rng.random() < P_PALE),
        # Never on the bald (a hat would hide it); / 0.95 since ~5% are bald.
        "Wearing_Hat": not bald and bool(rng.random() < P_HAT / 0.95),
        "Chubby": bool(rng.random() < P_CHUBBY[young]),
    }
    return {name: attributes[name] for name in ATTRIBUTES}


def sample_identity(seed: int, name: str | None = None) -> Identity:
    """The identity of `seed`: attributes first, then traits (some constrained by attributes)."""
    rng = np.random.default_rng(seed)
    attributes = _sample_attributes(rng)
    traits = rng.random(len(TRAITS))  # (T,)
    for trait, attribute, (lo_yes, hi_yes), (lo_no, hi_no) in (
        ("skin_tone", "Pale_Skin", PALE_SKIN_TONE, OTHER_SKIN_TONE),
        ("face_width", "Chubby", CHUBBY_FACE_WIDTH, OTHER_FACE_WIDTH),
    ):
        lo, hi = (lo_yes, hi_yes) if attributes[attribute] else (lo_no, hi_no)
        i = TRAITS.index(trait)
        traits[i] = lo + (hi - lo) * traits[i]
    return Identity(name=f"{seed:06d}" if name is None else name, attributes=attributes,
                    traits=traits.astype(np.float32))


def caption(identity: Identity, smiling: bool = False) -> str:
    """A descriptive caption from the small vocabulary CAPTION_WORDS (no punctuation), e.g.
    "a photo of a smiling old chubby man with gray hair and glasses and a beard and a hat"."""
    a = identity.attributes
    words = ["smiling"] * smiling + ["young" if a["Young"] else "old"]
    words += ["chubby"] * a["Chubby"] + ["pale"] * a["Pale_Skin"]
    words = ["a", "photo", "of", "an" if words[0] == "old" else "a", *words]
    words += ["man" if a["Male"] else "woman", "with"]
    if a["Bald"]:
        words += ["a", "bald", "head"]
    else:
        colour = next(c for c in HAIR_COLOURS if a[c])
        words += [colour.split("_")[0].lower(), "hair"]
    extras = [["glasses"]] * a["Eyeglasses"] + [["a", "beard"]] * (not a["No_Beard"])
    extras += [["a", "mustache"]] * a["Mustache"] + [["a", "hat"]] * a["Wearing_Hat"]
    for extra in extras:
        words += ["and", *extra]
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# Views (per-image nuisance: pose, scale, position, background, lighting, expression)

@dataclass(frozen=True)
class View:
    """The nuisance of one image, everything but the identity."""

    smiling: bool
    roll: float             # in-plane rotation, radians
    yaw: float              # left-right head turn in [-1, 1]: inner features shift sideways
    scale: float            # face size multiplier
    offset: tuple[float, float]   # face centre offset, fraction of the image side
    corners: np.ndarray     # (2, 2, 3) background colours at the image corners, 0..255
    light: tuple[float, float]    # directional shading: angle (radians), strength
    brightness: float
    contrast: float


def sample_view(view_seed: int) -> View:
    """The view of `view_seed`: small pose changes, a muted background gradient, mild lighting."""
    rng = np.random.default_rng(view_seed)
    smiling = bool(rng.random() < 0.5)  # first draw: view_smiling() relies on it
    base = 0.5 * rng.uniform(40, 220, 3) + 0.5 * rng.uniform(70, 190)  # muted: mixed with a grey
    return View(
        smiling=smiling,
        roll=float(np.deg2rad(rng.uniform(-9, 9))),
        yaw=float(rng.uniform(-1, 1)),
        scale=float(rng.uniform(0.9, 1.08)),
        offset=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.04, 0.04))),
        corners=np.clip(base + rng.uniform(-30, 30, (2, 2, 3)), 0, 255),
        light=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.0, 0.2))),
        brightness=float(rng.uniform(0.85, 1.12)),
        contrast=float(rng.uniform(0.85, 1.15)),
    )


def view_smiling(view_seed: int) -> bool:
    """Whether the image drawn with `view_seed` smiles (when render() is not told otherwise)."""
    return bool(np.random.default_rng(view_seed).random() < 0.5)


def dataset_view_seed(identity_seed: int, image_index: int) -> int:
    """The view seed write_dataset() uses for image `image_index` of identity `identity_seed`."""
    return int(np.random.SeedSequence([identity_seed, image_index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Colours and geometry of an identity (face units: face centre at 0, y down)

SKIN_STOPS = np.array([(92, 58, 38), (140, 92, 60), (190, 138, 96), (222, 174, 132),
                       (240, 212, 196), (248, 226, 216)], dtype=np.float64)
HAIR_RGB = {  # (shade 0, shade 1)
    "Black_Hair": ((18, 16, 16), (52, 40, 34)),
    "Blond_Hair": ((250, 218, 100), (214, 170, 58)),
    "Brown_Hair": ((96, 54, 24), (150, 92, 46)),
    "Gray_Hair": ((212, 212, 214), (168, 168, 172)),
}
EYE_STOPS = np.array([(70, 40, 20), (120, 80, 30), (70, 130, 60), (40, 100, 200), (110, 140, 170)],
                     dtype=np.float64)
HAT_RGB = ((205, 30, 40), (30, 60, 205), (25, 150, 60), (130, 40, 170), (0, 140, 150),
           (225, 60, 150))  # strong colours, none like a hair colour


def _ramp(stops: np.ndarray, t: float) -> np.ndarray:
    """Piecewise-linear colour ramp: (S, 3) stops, t in [0, 1] -> (3,)."""
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return stops[i] + (x - i) * (stops[i + 1] - stops[i])


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(np.round(colour), 0, 255).astype(int)
    return int(r), int(g), int(b)


@dataclass(frozen=True)
class _Look:
    """Everything render() needs from an identity, in face units and RGB tuples."""

    attributes: dict[str, bool]
    width: float            # face half-width
    height: float           # face half-height
    squareness: float       # superellipse exponent of the jaw, 2 = round
    taper: float            # how much the chin narrows
    eye_x: float
    eye_rx: float
    brow_thick: float
    nose_y: float           # bottom of the nose
    nose_w: float
    mouth_y: float
    mouth_w: float          # half-width
    hair_length: float
    skin: tuple[int, int, int]
    shadow: tuple[int, int, int]    # darker skin: nose, ears, neck
    line: tuple[int, int, int]      # wrinkle lines
    lips: tuple[int, int, int]
    hair: tuple[int, int, int]
    beard: tuple[int, int, int]
    iris: tuple[int, int, int]
    clothes: tuple[int, int, int]
    hat: tuple[int, int, int]


EYE_Y = -0.12


def _look(identity: Identity) -> _Look:
    a, t = identity.attributes, identity.trait
    male, young = a["Male"], a["Young"]
    skin = _ramp(SKIN_STOPS, t("skin_tone"))
    if not young:  # older skin: greyer
        skin = 0.78 * skin + 0.22 * skin.mean()
    # The bald have no hair colour; their beard takes this one.
    hair_name = next((c for c in HAIR_COLOURS if a[c]), "Gray_Hair" if not young else "Brown_Hair")
    dark, light = (np.array(c, dtype=np.float64) for c in HAIR_RGB[hair_name])
    hair = dark + t("hair_shade") * (light - dark)
    lips = np.array((196, 52, 74)) if not male else 0.65 * skin + 0.35 * np.array((170, 60, 60))
    clothes = np.array(colorsys.hsv_to_rgb(t("clothes_hue"), 0.55, 0.62)) * 255
    nose_y = EYE_Y + 0.24 + 0.14 * t("nose_length")
    return _Look(
        attributes=a,
        width=0.58 + 0.22 * t("face_width"),
        height=0.84 + 0.1 * t("face_height"),
        squareness=2.0 + 1.6 * (0.4 * t("jaw_width") + 0.6 * male) * (not a["Chubby"]),
        taper=0.05 if a["Chubby"] else 0.28 - 0.12 * male,
        eye_x=0.24 + 0.12 * t("eye_spacing"),
        eye_rx=0.10 + 0.05 * t("eye_size"),
        brow_thick=0.035 + 0.04 * t("brow_thickness") + 0.02 * male,
        nose_y=nose_y,
        nose_w=0.07 + 0.06 * t("nose_width"),
        mouth_y=nose_y + 0.18,
        mouth_w=0.15 + 0.09 * t("mouth_width"),
        hair_length=t("hair_length"),
        skin=_rgb(skin),
        shadow=_rgb(0.8 * skin),
        line=_rgb(0.55 * skin),
        lips=_rgb(lips),
        hair=_rgb(hair),
        beard=_rgb(0.6 * hair if hair_name != "Gray_Hair" else hair),
        iris=_rgb(_ramp(EYE_STOPS, t("eye_hue"))),
        clothes=_rgb(clothes),
        hat=HAT_RGB[min(int(t("clothes_hue") * len(HAT_RGB)), len(HAT_RGB) - 1)],
    )


# ----------------------------------------------------------------------------------------------
# Drawing

class _Pen:
    """Draws shapes given in face units through the view's affine map (roll, scale, offset)."""

    def __init__(self, draw: ImageDraw.ImageDraw, side: int, view: View):
        self.draw = draw
        self.unit = 0.32 * side * view.scale  # pixels per face unit
        c, s = np.cos(view.roll), np.sin(view.roll)
        self.matrix = self.unit * np.array([[c, -s], [s, c]])  # (2, 2)
        self.centre = side * np.array([0.5 + view.offset[0], 0.46 + view.offset[1]])  # (2,)

    def _xy(self, points: np.ndarray) -> list[float]:
        return (points @ self.matrix.T + self.centre).ravel().tolist()  # (P, 2) -> [x0, y0, ...]

    def polygon(self, points: np.ndarray, fill) -> None:
        self.draw.polygon(self._xy(points), fill=fill)

    def line(self, points: np.ndarray, fill, width: float) -> None:
        self.draw.line(self._xy(points), fill=fill, width=max(1, round(width * self.unit)),
                       joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill) -> None:
        self.polygon(_arc(cx, cy, rx, ry), fill)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, stop: float = 360.0,
         n: int = 40) -> np.ndarray:
    """Points on an ellipse from angle `start` to `stop` (degrees, clockwise on screen): (n, 2)."""
    t = np.deg2rad(np.linspace(start, stop, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _face_outline(look: _Look, grow: float = 0.0) -> np.ndarray:
    """Head outline: an ellipse on top, a tapered superellipse jaw below: (P, 2)."""
    w, h = look.width + grow, look.height + grow
    top = _arc(0, 0, w, h, 180, 360, 24)
    t = np.linspace(0, np.pi, 32)
    c, s = np.cos(t), np.sin(t)
    e = 2 / look.squareness
    y = h * s ** e
    x = w * np.sign(c) * np.abs(c) ** e * (1 - look.taper * (y / h) ** 2)
    return np.concatenate([top, np.stack([x, y], axis=1)])


def _hair_outer(look: _Look) -> tuple[float, float, float]:
    """Centre y, half-width and half-height of the hair volume (or of the bald cranium)."""
    male, length = look.attributes["Male"], look.hair_length
    volume = 0.04 + 0.08 * length if male else 0.12 + 0.06 * length
    return -0.12, look.width + volume, look.height + volume - 0.05


def _draw_shirt(pen: _Pen, look: _Look) -> None:
    y = look.height + 0.42
    pen.polygon(_arc(0, y + 0.9, 1.45, 0.95, 180, 360), look.clothes)


def _draw_long_hair(pen: _Pen, look: _Look) -> None:
    """Hair that falls behind the face and neck (women): ends between chin and shoulders."""
    cy, rx, ry = _hair_outer(look)
    bottom = look.height * (0.55 + 0.75 * look.hair_length)
    top = _arc(0, cy, rx, ry, 180, 360)
    sides = np.array([[rx + 0.04, bottom], [-rx - 0.04, bottom]])
    pen.polygon(np.concatenate([top, sides]), look.hair)


def _draw_ears(pen: _Pen, look: _Look, view: View) -> None:
    for side in (-1, 1):
        shrink = 1 - 0.25 * max(0.0, side * view.yaw)  # the ear turned away shows less
        pen.ellipse(side * look.width * 0.97, EYE_Y + 0.12, 0.12 * shrink, 0.19, look.shadow)


def _draw_neck(pen: _Pen, look: _Look) -> None:
    neck_w = 0.3 + 0.12 * look.attributes["Male"] + 0.1 * look.attributes["Chubby"]
    pen.polygon(np.array([[-neck_w, 0.3], [neck_w, 0.3], [neck_w, look.height + 0.5],
                          [-neck_w, look.height + 0.5]]), look.shadow)


def _draw_head(pen: _Pen, look: _Look) -> None:
    if look.attributes["Bald"]:  # a skin-coloured cranium where hair would be, with a shine
        cy, rx, ry = _hair_outer(look)
        pen.polygon(_arc(0, cy, rx - 0.06, ry - 0.06, 180, 360), look.skin)
    pen.polygon(_face_outline(look), look.skin)
    if look.attributes["Chubby"]:  # double chin
        pen.line(_arc(0, look.height - 0.1, 0.3, 0.12, 20, 160, 16), look.shadow, 0.035)
    if look.attributes["Bald"]:
        cy, rx, ry = _hair_outer(look)
        pen.ellipse(-0.22, cy - ry + 0.3, 0.22, 0.1, _rgb(0.55 * np.array(look.skin) + 115))


def _draw_beard(pen: _Pen, look: _Look, dx: float) -> None:
    """A dark region around the jaw, from the cheeks down, leaving the upper lip bare."""
    outline = _face_outline(look, grow=0.02)
    top = look.mouth_y - 0.1
    jaw = outline[outline[:, 1] > top]  # chin outline, right to left
    under_mouth = _arc(dx, look.mouth_y, look.mouth_w + 0.06, 0.1, 180, 0, 16)  # left to right
    pen.polygon(np.concatenate([jaw, under_mouth]), look.beard)


def _draw_eyes(pen: _Pen, look: _Look, dx: float) -> None:
    rx = look.eye_rx
    for side in (-1, 1):
        x = side * look.eye_x + dx
        pen.ellipse(x, EYE_Y, rx, 0.62 * rx, (245, 245, 242))
        pen.ellipse(x + 0.3 * dx, EYE_Y, 0.55 * rx, 0.55 * rx, look.iris)
        pen.ellipse(x + 0.3 * dx, EYE_Y, 0.24 * rx, 0.24 * rx, (10, 10, 10))
        brow = _arc(x, EYE_Y + 0.1, rx + 0.05, 0.28, 235, 305, 10)
        pen.line(brow, look.hair if not look.attributes["Bald"] else look.line, look.brow_thick)


def _draw_nose(pen: _Pen, look: _Look, dx: float) -> None:
    tip = 1.6 * dx
    w = look.nose_w
    pen.polygon(np.array([[dx, EYE_Y + 0.08], [tip + w, look.nose_y], [tip - w, look.nose_y]]),
                look.shadow)
    pen.line(np.array([[tip - w, look.nose_y + 0.01], [tip + w, look.nose_y + 0.01]]),
             look.line, 0.03)


def _draw_mouth(pen: _Pen, look: _Look, dx: float, smiling: bool) -> None:
    """Smiling: an open, upturned mouth showing teeth; neutral: closed lips."""
    w, y = look.mouth_w, look.mouth_y
    if smiling:
        w, top = 1.15 * w, y - 0.05
        mouth = _arc(dx, top, w, 0.17, 0, 180, 24)  # lower half-ellipse
        pen.polygon(mouth, (110, 20, 30))
        pen.polygon(_arc(dx, top, 0.85 * w, 0.07, 0, 180, 16), (250, 250, 245))  # teeth
        corners = np.array([[dx + w + 0.04, top - 0.05], [dx - w - 0.04, top - 0.05]])  # upturned
        pen.line(np.concatenate([corners[:1], mouth, corners[1:]]), look.lips, 0.03)
    else:
        pen.polygon(_arc(dx, y, w, 0.045, 0, 360, 24), look.lips)
        pen.line(np.array([[dx - w, y], [dx + w, y]]), _rgb(0.6 * np.array(look.lips)), 0.02)


def _draw_mustache(pen: _Pen, look: _Look, dx: float) -> None:
    """A thick bar between the nose and the mouth, wider than the mouth, darker than a beard."""
    y = (look.nose_y + look.mouth_y) / 2 + 0.01
    w = look.mouth_w + 0.05
    pen.polygon(np.array([[dx - w, y + 0.06], [dx - w * 0.8, y - 0.05], [dx + w * 0.8, y - 0.05],
                          [dx + w, y + 0.06]]), _rgb(0.75 * np.array(look.beard)))


def _draw_wrinkles(pen: _Pen, look: _Look, dx: float) -> None:
    """Old age: forehead lines, nasolabial folds and bags under the eyes."""
    for y in (-0.5, -0.41):
        pen.line(_arc(dx, y + 0.25, 0.32, 0.25, 240, 300, 8), look.line, 0.04)
    for side in (-1, 1):
        fold = np.array([[dx + side * (look.nose_w + 0.06), look.nose_y - 0.05],
                         [dx + side * (look.mouth_w + 0.08), look.mouth_y + 0.04]])
        pen.line(fold, look.line, 0.04)
        pen.line(_arc(dx + side * look.eye_x, EYE_Y + 0.04, look.eye_rx, 0.1, 30, 150, 8),
                 look.line, 0.035)


def _draw_hair(pen: _Pen, look: _Look) -> None:
    """The hair cap: the top of the head down to the temples, with a hairline on the forehead."""
    cy, rx, ry = _hair_outer(look)
    w = look.width
    receding = look.attributes["Male"] and not look.attributes["Young"]
    hairline = -0.52 + 0.08 * receding
    side_y = EYE_Y + (0.05 if look.attributes["Male"] else 0.25)
    cap = np.concatenate([
        _arc(0, cy, rx, ry, 180, 360, 32),
        [[rx, side_y], [w * 0.93, side_y], [w * 0.82, hairline + 0.12]],
        _arc(0, hairline + 0.12, w * 0.82, 0.16, 360, 180, 16)[1:-1],
        [[-w * 0.82, hairline + 0.12], [-w * 0.93, side_y], [-rx, side_y]],
    ])
    pen.polygon(cap, look.hair)


def _draw_hat(pen: _Pen, look: _Look) -> None:
    """A coloured dome over the hair and a darker brim across the forehead."""
    cy, rx, ry = _hair_outer(look)
    brim_y = -0.5
    dome = brim_y - (cy - ry) + 0.06  # from the brim to just above the hair
    pen.polygon(np.concatenate([_arc(0, brim_y, rx + 0.02, dome, 180, 360),
                                [[rx + 0.02, brim_y]]]), look.hat)
    pen.polygon(np.array([[-rx - 0.12, brim_y - 0.1], [rx + 0.12, brim_y - 0.1],
                          [rx + 0.14, brim_y + 0.04], [-rx - 0.14, brim_y + 0.04]]),
                _rgb(0.7 * np.array(look.hat)))


def _draw_glasses(pen: _Pen, look: _Look, dx: float) -> None:
    """Thick dark frames around both eyes, a bridge and the temples."""
    frame, rx = (15, 15, 18), look.eye_rx + 0.07
    for side in (-1, 1):
        x = side * look.eye_x + dx
        rim = _arc(x, EYE_Y, rx, 0.7 * rx + 0.03, 0, 360, 28)
        pen.line(np.concatenate([rim, rim[:2]]), frame, 0.055)
        pen.line(np.array([[x + side * rx, EYE_Y - 0.02], [side * look.width, EYE_Y - 0.04]]),
                 frame, 0.045)
    pen.line(np.array([[dx - look.eye_x + rx, EYE_Y - 0.02], [dx + look.eye_x - rx, EYE_Y - 0.02]]),
             frame, 0.05)


def _background(corners: np.ndarray, side: int) -> Image.Image:
    """A smooth four-corner gradient: (2, 2, 3) colours -> side x side RGB image."""
    return Image.fromarray(corners.astype(np.uint8)).resize((side, side), Image.BILINEAR)


def _relight(image: Image.Image, view: View) -> Image.Image:
    """Directional shading, then contrast and brightness, at the output resolution."""
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    side = pixels.shape[0]
    ramp = np.linspace(-1, 1, side, dtype=np.float32)
    angle, strength = view.light
    shade = 1 + strength * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])  # (H, W)
    pixels = pixels * shade[:, :, None]
    pixels = (pixels - 128) * view.contrast + 128 * view.brightness
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render(identity: Identity, view_seed: int, size: int = 64, smiling: bool | None = None
           ) -> Image.Image:
    """One RGB `size` x `size` image of `identity`; the view (pose, background, light, expression)
    comes from `view_seed`; `smiling` overrides the view's expression."""
    view = sample_view(view_seed)
    smiling = view.smiling if smiling is None else smiling
    look = _look(identity)
    side = size * SUPERSAMPLE
    image = _background(view.corners, side)
    pen = _Pen(ImageDraw.Draw(image), side, view)
    dx = 0.08 * view.yaw  # inner features follow the head turn
    a = identity.attributes

    _draw_shirt(pen, look)
    _draw_ears(pen, look, view)
    if not a["Male"] and not a["Bald"]:
        _draw_long_hair(pen, look)  # behind the face, in front of the ears
    _draw_neck(pen, look)
    _draw_head(pen, look)
    if not a["No_Beard"]:
        _draw_beard(pen, look, dx)
    if not a["Young"]:
        _draw_wrinkles(pen, look, dx)
    _draw_eyes(pen, look, dx)
    _draw_nose(pen, look, dx)
    _draw_mouth(pen, look, dx, smiling)
    if a["Mustache"]:
        _draw_mustache(pen, look, dx)
    if not a["Bald"]:
        _draw_hair(pen, look)
    if a["Wearing_Hat"]:
        _draw_hat(pen, look)
    if a["Eyeglasses"]:
        _draw_glasses(pen, look, dx)
    return _relight(image.resize((size, size), Image.LANCZOS), view)


# ----------------------------------------------------------------------------------------------
# Dataset on disk

def attribute_row(identity: Identity) -> dict[str, float]:
    """One row of attributes.csv: CelebA columns as +1/-1, then the traits."""
    return {**{k: 1 if identity.attributes[k] else -1 for k in ATTRIBUTES},
            **{k: float(v) for k, v in zip(TRAITS, identity.traits)}}


def _complete(folder: Path, images: int) -> bool:
    return all((folder / f"{k}.png").is_file() for k in range(images))


def _write_identity(folder: Path, seed: int, identity: Identity, images: int, size: int) -> None:
    """Render all `images` pngs of one identity, each to a temporary name then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images):
        with atomic_output(folder / f"{k}.png") as tmp:
            render(identity, dataset_view_seed(seed, k), size).save(tmp, format="PNG")


def _image_rows(seed: int, identity: Identity, images: int) -> list[dict]:
    """Rows of images.csv for one identity: name, image index, view seed, Smiling +1/-1."""
    seeds = [dataset_view_seed(seed, k) for k in range(images)]
    return [{"name": identity.name, "image": k, "view_seed": s,
             "Smiling": 1 if view_smiling(s) else -1} for k, s in enumerate(seeds)]


def _merge_csv(path: Path, table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Merge `table` into the csv at `path` (new rows win), sort by `keys`, write atomically."""
    if path.is_file():
        old = pd.read_csv(path, dtype={"name": str})
        table = pd.concat([old, table]).drop_duplicates(subset=keys, keep="last")
    table = table.sort_values(keys).reset_index(drop=True)
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


def write_dataset(root, num_identities: int, first_seed: int = 0, images_per_identity: int = 10,
                  size: int = 64, progress: bool = True, seeds: list[int] | None = None) -> pd.DataFrame:
    """Write root/celeba_generated/<name>/<k>.png for identities first_seed .. first_seed+num-1 (or
    the identities `seeds`), root/attributes.csv (one row per identity, index "name": CelebA columns
    +1/-1 and the traits) and root/images.csv (name, image, view_seed, Smiling +1/-1). Complete
    identity folders are skipped (resumable); csv rows of earlier calls are kept. Returns the
    attribute table."""
    seeds = range(first_seed, first_seed + num_identities) if seeds is None else seeds
    if len(seeds) < 1 or images_per_identity < 1 or size < 8:
        raise ValueError(f"write_dataset: need at least 1 identity, images_per_identity >= 1, "
                         f"size >= 8; got {len(seeds)}, {images_per_identity}, {size}")
    root = Path(root)
    images_dir = root / "celeba_generated"
    attribute_rows, image_rows = [], []
    for seed in tqdm(seeds, desc="faces", disable=not progress):
        identity = sample_identity(seed)
        folder = images_dir / identity.name
        if not _complete(folder, images_per_identity):
            _write_identity(folder, seed, identity, images_per_identity, size)
        image_rows += _image_rows(seed, identity, images_per_identity)
        attribute_rows.append({"name": identity.name, **attribute_row(identity)})
    _merge_csv(root / "images.csv", pd.DataFrame(image_rows), ["name", "image"])
    table = _merge_csv(root / "attributes.csv", pd.DataFrame(attribute_rows), ["name"])
    return table.set_index("name")


def render_grid(seeds: list[int], views: int = 4, size: int = 64, per_row: int = 4) -> Image.Image:
    """A picture of identities `seeds` (`per_row` to a row), each as `views` images side by side:
    the same images write_dataset() writes for them."""
    gap = size // 8
    rows = -(-len(seeds) // per_row)
    block = views * size + gap  # one identity's strip plus the gap after it
    grid = Image.new("RGB", (per_row * block - gap, rows * (size + gap) - gap), (255, 255, 255))
    for i, seed in enumerate(seeds):
        identity = sample_identity(seed)
        for k in range(views):
            x, y = (i % per_row) * block + k * size, (i // per_row) * (size + gap)
            grid.paste(render(identity, dataset_view_seed(seed, k), size), (x, y))
    return grid


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a dataset of procedural faces.")
    parser.add_argument("--out", required=True, help="Dataset root: writes celeba_generated/, "
                        "attributes.csv and images.csv there.")
    parser.add_argument("--num", type=int, default=16, help="Number of identities.")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seed (and name) of the first identity.")
    parser.add_argument("--images-per-identity", type=int, default=10, help="Images per identity.")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--grid", default=None,
                        help="Also write a picture of the identities to this png.")
    parser.add_argument("--grid-views", type=int, default=4,
                        help="Images per identity in the grid.")
    args = parser.parse_args(argv)
    if args.num < 1 or args.images_per_identity < 1 or args.grid_views < 1:
        parser.error(f"--num, --images-per-identity and --grid-views must be >= 1; got "
                     f"{args.num}, {args.images_per_identity}, {args.grid_views}")
    if args.size < 8:
        parser.error(f"--size must be >= 8; got {args.size}")
    return args


def main(args: argparse.Namespace) -> None:
    table = write_dataset(args.out, args.num, args.first_seed, args.images_per_identity, args.size)
    print(f"{len(table)} identities in {args.out}")
    if args.grid:
        seeds = list(range(args.first_seed, args.first_seed + args.num))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        render_grid(seeds, args.grid_views, args.size).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main(parse_args())
