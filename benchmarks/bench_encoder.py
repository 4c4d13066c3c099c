"""Instant inversion on the tiny world: the time to a given identity similarity inverting from the encoder's
prediction over inverting from zero, in the same run, and the encoder's forward time.

    python benchmarks/bench_encoder.py [--identities 4] [--level L] [--repeats 50]     # one thread

Held-out identities (seeds 6,000,000+, as `w2w evaluate --only encoder`) are inverted from their first view
with the space's real preset, from zero and from the encoder's prediction (`tables.evaluate_encoder`: one
seeded run per start, scored by the evaluator against views 5-9 after 0, 10, 25, 40, 50, 100, 200 and 400
steps). Each curve is the mean over the identities; its time to `level` is the seconds of its first point at
or above it (the encoder's forward pass counted), in CPU time of this one-thread process, which other
processes on a shared machine do not inflate. `level` defaults to what zero-init reaches at its last step.
`ratio` = the encoder's time / zero-init's (below 1: the encoder is faster; null when its curve never reaches
the level). The forward time is the median of --repeats `encoder.predict` calls on one image, in wall time.
The last line is one JSON object {"benchmark": "encoder", "ratio": ..., "forward_ms": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lora_w2w.encoder_files import default_encoder
from lora_w2w.tiny import tables
from lora_w2w.tiny.evaluator import Evaluator
from lora_w2w.tiny.synthetic import dataset_view_seed, render, sample_identity
from lora_w2w.workbench import Workbench

TINY = Path("files/tiny")


def forward_ms(encoder, repeats: int) -> float:
    """The median wall time of one `encoder.predict` on one held-out render, in milliseconds."""
    seed = tables.HELD_OUT_SEEDS
    image = render(sample_identity(seed), dataset_view_seed(seed, 0))
    encoder.predict(image)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.predict(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=4, help="held-out identities inverted (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="inversion steps (default: the real preset's)")
    parser.add_argument("--level", type=float, default=None,
                        help="identity similarity to reach (default: zero-init's at its last step)")
    parser.add_argument("--seeds", type=int, default=4, help="images generated per scored model (default: %(default)s)")
    parser.add_argument("--denoising-steps", type=int, default=25,
                        help="denoising steps per scored image (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=50, help="encoder forward passes timed (default: %(default)s)")
    parser.add_argument("--work", default="outputs/bench_encoder", help="scratch folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    bench = Workbench(TINY / "base", TINY / "space", "cpu", progress=False)
    path = default_encoder(TINY / "space")
    encoder = bench.encoder(path)
    ctx = tables.Context(bench, Evaluator.load(TINY / "evaluator.safetensors"), Path(args.work), encoder=path)
    ctx.work.mkdir(parents=True, exist_ok=True)
    settings = tables.Settings(inversions=args.identities, inversion_steps=args.steps, seeds=args.seeds,
                               steps=args.denoising_steps)
    section = tables.evaluate_encoder(ctx, settings)
    curves = section["curves"]
    level = curves["zero"][-1]["identity_similarity"] if args.level is None else args.level
    zero, started = (tables._first_reaching(curves[name], level) for name in ("zero", "encoder"))
    result = {"benchmark": "encoder", "level": level, "identities": args.identities,
              "zero_s": None if zero is None else zero["seconds"],
              "zero_steps": None if zero is None else zero["steps"],
              "encoder_s": None if started is None else started["seconds"],
              "encoder_steps": None if started is None else started["steps"],
              "ratio": None if zero is None or started is None else started["seconds"] / zero["seconds"],
              "forward_ms": forward_ms(encoder, args.repeats), "encoder_forward_cpu_s": section["encoder_forward_s"],
              "curves": curves, "threads": torch.get_num_threads()}
    for name, curve in curves.items():
        print(f"{name:8s} " + "  ".join(f"{p['steps']}: {p['identity_similarity']:.3f} ({p['seconds']:.1f} s)"
                                        for p in curve))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
