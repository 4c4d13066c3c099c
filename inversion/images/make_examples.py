"""Make the example images of inversion/images/ and the package's copies of the demo's four
(lora_w2w/data/examples/, `defaults.EXAMPLES`, which an install that is not editable ships); committed,
rerun to rebuild them exactly.

    python inversion/images/make_examples.py

- face.png (64 px) and face_256.png (the same, upscaled): a tiny-world face of identity seed
  3_000_123, outside the weights dataset (seeds 0 .. 99_999) and the base model's training identities;
  face_mask.png: its head (face and hair) white, for either size.
- drawing.png (256 px): an out-of-distribution face painted with flat colours and thick brush strokes;
  drawing_mask.png: its head white.
Masks are drawn at 4x and downsampled, so only their edges are grey (antialiasing).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_w2w.defaults import EXAMPLES
from lora_w2w.tiny import synthetic

HERE = Path(__file__).parent
FACE_SEED = 3_000_123
FACE_VIEW_SEED = 7
DRAWING_SEED = 11
SUPERSAMPLE = 4
PACKAGED = ("face.png", "face_mask.png", "drawing.png", "drawing_mask.png")  # the demo's, shipped in the package


def face_mask(identity: synthetic.Identity, view_seed: int, size: int) -> Image.Image:
    """White where render(identity, view_seed) draws the head (face, hair or bald cranium)."""
    side = size * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    pen = synthetic._Pen(ImageDraw.Draw(mask), side, synthetic.sample_view(view_seed))
    look = synthetic._look(identity)
    cy, rx, ry = synthetic._hair_outer(look)
    pen.ellipse(0, cy, rx, ry, 255)
    pen.polygon(synthetic._face_outline(look), 255)
    return mask.resize((size, size), Image.LANCZOS)


def stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box, colour, width: int) -> None:
    """One thick brush stroke: a short curved polyline starting inside the ellipse `box`, colour jittered."""
    (x0, y0, x1, y1), angle, radius = box, rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.8))
    start = np.array([(x0 + x1) / 2 + radius * np.cos(angle) * (x1 - x0) / 2,
                      (y0 + y1) / 2 + radius * np.sin(angle) * (y1 - y0) / 2])       # (2,)
    direction = rng.normal(0, 1, 2) * width / 4
    points = [start + direction * t + rng.normal(0, 0.5, 2) for t in range(4)]  # (4, 2)
    jitter = np.clip(np.array(colour) + rng.integers(-18, 19, 3), 0, 255)
    draw.line([tuple(p) for p in points], fill=tuple(int(c) for c in jitter), width=width, joint="curve")


def drawing(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A painted face (flat colours, thick strokes, black outlines) and its head mask."""
    rng = np.random.default_rng(DRAWING_SEED)
    s = size / 256
    image = Image.new("RGB", (size, size), (46, 84, 150))
    draw = ImageDraw.Draw(image)
    for _ in range(160):  # background: blue and ochre dabs
        colour = (52, 96, 170) if rng.random() < 0.7 else (214, 170, 62)
        stroke(draw, rng, (-40 * s, -40 * s, 296 * s, 296 * s), colour, round(14 * s))
    head = [70 * s, 44 * s, 186 * s, 196 * s]
    hair = [58 * s, 28 * s, 198 * s, 150 * s]
    draw.polygon([(40 * s, 256 * s), (80 * s, 200 * s), (176 * s, 200 * s), (216 * s, 256 * s)], fill=(60, 150, 80))
    draw.rectangle([108 * s, 180 * s, 148 * s, 214 * s], fill=(222, 150, 100))  # neck
    draw.ellipse(hair, fill=(92, 44, 20))
    draw.ellipse(head, fill=(236, 170, 120), outline=(20, 16, 16), width=round(6 * s))
    for _ in range(90):  # painted skin
        stroke(draw, rng, [84 * s, 70 * s, 172 * s, 188 * s], (236, 170, 120), round(9 * s))
    for _ in range(40):  # fringe
        stroke(draw, rng, [76 * s, 34 * s, 180 * s, 76 * s], (92, 44, 20), round(10 * s))
    for x in (100, 156):  # eyes, brows
        draw.ellipse([(x - 14) * s, 102 * s, (x + 14) * s, 120 * s], fill="white", outline=(20, 16, 16), width=round(3 * s))
        draw.ellipse([(x - 6) * s, 105 * s, (x + 6) * s, 117 * s], fill=(30, 90, 60))
        draw.line([(x - 18) * s, 92 * s, (x + 16) * s, 88 * s], fill=(40, 24, 14), width=round(7 * s))
    draw.line([128 * s, 112 * s, 120 * s, 146 * s, 134 * s, 148 * s], fill=(150, 80, 50), width=round(5 * s))
    draw.arc([102 * s, 150 * s, 154 * s, 178 * s], 20, 160, fill=(200, 40, 50), width=round(8 * s))

    side = size * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(mask)
    pen.ellipse([c * SUPERSAMPLE for c in hair], fill=255)
    pen.ellipse([c * SUPERSAMPLE for c in head], fill=255)
    return image, mask.resize((size, size), Image.LANCZOS)


def main() -> None:
    identity = synthetic.sample_identity(FACE_SEED)
    face = synthetic.render(identity, FACE_VIEW_SEED, 64)
    face.save(HERE / "face.png", optimize=True)
    face.resize((256, 256), Image.LANCZOS).save(HERE / "face_256.png", optimize=True)
    face_mask(identity, FACE_VIEW_SEED, 64).save(HERE / "face_mask.png", optimize=True)
    painted, mask = drawing()
    painted.save(HERE / "drawing.png", optimize=True)
    mask.save(HERE / "drawing_mask.png", optimize=True)
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for name in PACKAGED:
        shutil.copyfile(HERE / name, EXAMPLES / name)
    print(f"wrote {HERE}/face.png face_256.png face_mask.png drawing.png drawing_mask.png and copied {len(PACKAGED)} "
          f"to {EXAMPLES}")


if __name__ == "__main__":
    main()
