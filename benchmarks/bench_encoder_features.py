"""The SD1.5 encoder's feature extraction per image on one CPU core: dlib's face descriptor (`w2w train-encoder
--features dlib`: detection, landmarks, the aligned chip's descriptor) against the tiny world's pixel features
of the same images, in the same run.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_encoder_features.py [--repeats 5]

The images: two photographs that ship in packages (the astronaut of scikit-image, Grace Hopper of
matplotlib) resized to 512 x 512, the size of the published identity images (Stable Diffusion 1.5's).
The last line is one JSON object {"benchmark": "encoder_features", "ratio": <dlib seconds / pixels seconds>,
"seconds_per_image": {"dlib": ..., "pixels": ...}, "load_average": ...}, medians over --repeats passes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from matplotlib import cbook
from PIL import Image
from skimage import data

from lora_w2w.encoder import FEATURES, EncoderConfig

SIZE = 512  # px of a published identity image


def photographs() -> list[Image.Image]:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        pictures = [Image.fromarray(data.astronaut()), hopper.convert("RGB")]
    return [picture.resize((SIZE, SIZE), Image.Resampling.BICUBIC) for picture in pictures]


def seconds_per_image(features: str, images: list[Image.Image], repeats: int) -> float:
    """The median over `repeats` passes of one pass's seconds per image, the extractor warmed up once."""
    config = EncoderConfig(features=features)
    extract = FEATURES[features].extract
    extract(images[:1], config)  # loads dlib's models
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = extract(images, config)  # (B, F)
        passes.append((time.perf_counter() - start) / len(images))
    if rows.isnan().any():
        raise SystemExit(f"{features}: a photograph without a face found")
    return statistics.median(passes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="passes over the images (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = photographs()
    per_image = {name: seconds_per_image(name, images, args.repeats) for name in ("dlib", "pixels")}
    result = {"benchmark": "encoder_features", "ratio": per_image["dlib"] / per_image["pixels"],
              "seconds_per_image": per_image, "images": len(images), "size": SIZE, "repeats": args.repeats,
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()[0]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
