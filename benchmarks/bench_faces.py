"""Faces on dlib against the scikit-image LBP cascade they replaced: how often each finds the tiny world's drawn
faces, and the seconds per image of every step `w2w invert --crop face --mask auto` and `w2w score` take on
photographs, in the same process.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_faces.py [--renders 200] [--cnn-renders 200]

Renders: 50 held-out identities x 4 views (seeds 6,000,000+, 64 px), as files/tiny/README.md measured the
cascade. Each detector reads the working copy `faces.working_copy` makes (the shorter side brought to 256 px,
as the cascade's code did); dlib's `detect_faces` includes the 68 landmarks. The cascade runs with the
settings it had in `lora_w2w/faces.py` (scale step 1.1, 4 neighbours, faces from 10% of the shorter side).
Photographs: scikit-image's astronaut (512 x 512) and matplotlib's Grace Hopper (512 x 600), each step timed
alone, the median of --repeats. The last line is one JSON object {"benchmark": "faces", "ratio": <dlib HOG's
seconds per render / the cascade's>, "detection_rate": {...}, "seconds_per_image": {...}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from matplotlib import cbook
from PIL import Image
from skimage import data

from lora_w2w import faces
from lora_w2w.identity import DlibIdentity
from lora_w2w.tiny.synthetic import dataset_view_seed, render, sample_identity

HELD_OUT_SEEDS = 6_000_000
VIEWS = 4
CASCADE = dict(scale_factor=1.1, step_ratio=1, min_neighbor_number=4)  # the replaced detector's settings
CASCADE_MIN_FACE, CASCADE_WINDOW = 0.1, 24


def tiny_renders(count: int) -> list[Image.Image]:
    """`count` renders: identity i // VIEWS, its view i % VIEWS."""
    return [render(sample_identity(HELD_OUT_SEEDS + i // VIEWS), dataset_view_seed(HELD_OUT_SEEDS + i // VIEWS,
                                                                                   i % VIEWS))
            for i in range(count)]


def cascade_finds(cascade, image: Image.Image) -> bool:
    pixels, _ = faces.working_copy(image)
    side = min(pixels.shape[:2])
    smallest = max(CASCADE_WINDOW, round(CASCADE_MIN_FACE * side))
    return len(cascade.detect_multi_scale(img=pixels, min_size=(smallest, smallest), max_size=(side, side),
                                          **CASCADE)) > 0


def detection(find, images: list[Image.Image]) -> tuple[float, float]:
    """(the share of images in which `find` finds a face, seconds per image)."""
    start = time.perf_counter()
    found = [bool(find(image)) for image in images]
    return float(np.mean(found)), (time.perf_counter() - start) / len(images)


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def photograph_steps(image: Image.Image, repeats: int) -> dict[str, float]:
    """Seconds of each step on one photograph: detection with landmarks (HOG, CNN), FFHQ's alignment to
    512 px, the landmark mask, dlib's descriptor (detection included, as `w2w score` embeds an image)."""
    face = faces.detect_faces(image)[0]
    aligned = faces.align_face(image, face.landmarks, 512)
    embedder = DlibIdentity()
    return {"hog_detect_and_landmarks": median_seconds(lambda: faces.detect_faces(image, "hog"), repeats),
            "cnn_detect_and_landmarks": median_seconds(lambda: faces.detect_faces(image, "cnn"), repeats),
            "align_512": median_seconds(lambda: faces.align_face(image, face.landmarks, 512), repeats),
            "landmark_mask_512": median_seconds(lambda: faces.landmark_mask((512, 512), aligned.landmarks), repeats),
            "embed": median_seconds(lambda: embedder.embed([image]), repeats)}


def main(args: argparse.Namespace) -> dict:
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    photographs = {"astronaut": Image.fromarray(data.astronaut()),
                   "grace_hopper": Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")}
    faces.detect_faces(photographs["astronaut"], "cnn")  # load the models before any clock starts
    DlibIdentity().embed([photographs["astronaut"]])
    cascade = Cascade(lbp_frontal_face_cascade_filename())
    renders = tiny_renders(args.renders)
    rates, per_render = {}, {}
    rates["lbp_cascade"], per_render["lbp_cascade"] = detection(lambda im: cascade_finds(cascade, im), renders)
    rates["dlib_hog"], per_render["dlib_hog"] = detection(lambda im: faces.detect_faces(im, "hog"), renders)
    rates["dlib_cnn"], per_render["dlib_cnn"] = detection(lambda im: faces.detect_faces(im, "cnn"),
                                                          renders[:args.cnn_renders])
    for name in rates:
        print(f"tiny world renders: {name:12s} finds {rates[name]:.1%} in {per_render[name] * 1000:.1f} ms each")
    steps = {name: photograph_steps(image, args.repeats) for name, image in photographs.items()}
    for name, seconds in steps.items():
        print(f"{name}: " + ", ".join(f"{step} {value:.3f} s" for step, value in seconds.items()))
    result = {"benchmark": "faces", "ratio": per_render["dlib_hog"] / per_render["lbp_cascade"],
              "detection_rate": rates, "renders": {"lbp_cascade": len(renders), "dlib_hog": len(renders),
                                                   "dlib_cnn": min(args.cnn_renders, len(renders))},
              "seconds_per_render": per_render, "seconds_per_image": steps}
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renders", type=int, default=200, help="tiny world renders (default: %(default)s)")
    parser.add_argument("--cnn-renders", type=int, default=40,
                        help="of those, the renders the CNN detector reads (1.5-6 s each; default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per photograph step (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.renders, args.cnn_renders, args.repeats) < 1:
        parser.error("--renders, --cnn-renders and --repeats must be >= 1")
    return args


if __name__ == "__main__":
    main(parse_args())
