"""Seconds of `storage.check_outputs` for `w2w generate`'s outputs (a folder, seed_XXXX.png per seed and
grid.png, with its inputs) at S seeds, against its time at 100 seeds in the same run, and against the
check it replaced, which compared every output's resolved path with every earlier one's.

    python benchmarks/bench_outputs.py [--seeds 2000] [--baseline-seeds 100] [--pairwise-seeds 500]
    make bench-outputs

`ratio` is the time per output at --seeds over the time per output at --baseline-seeds: 1 when the
check is linear in the number of outputs (the issue measured the pairwise check at 5 s for 500 seeds
and 85 s for 2,000, quadratic). `pairwise_ratio` is the pairwise duplicate test alone (what grew with the
square: 2 resolve() per pair) over the whole check, both at --pairwise-seeds. The outputs go into a new
folder with a space as input, as `w2w generate --space SPACE --out NEW` has them. Medians of --repeats.
The last line is one JSON object {"benchmark": "outputs", "ratio": ..., "pairwise_ratio": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_w2w.layout import LoraLayer, LoraLayout
from lora_w2w.space import Space
from lora_w2w.storage import FILES_FOLDER, IMAGE_FILE, check_outputs, save_space


def generate_outputs(out: Path, seeds: int) -> list:
    """The outputs `w2w generate --seeds 0 .. S-1 --out OUT` checks."""
    return [(out, FILES_FOLDER)] + [(out / f"seed_{seed:04d}.png", IMAGE_FILE) for seed in range(seeds)] + \
           [(out / "grid.png", IMAGE_FILE)]


def seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def pairwise_duplicates(outputs: list) -> None:
    """The duplicate test of the earlier check: each output's resolved path against every earlier one's."""
    paths = [path for path, _ in outputs]
    for i, path in enumerate(paths):
        for other in paths[:i]:
            assert path.resolve() != other.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2000, help="seeds of the large check (default: %(default)s)")
    parser.add_argument("--baseline-seeds", type=int, default=100,
                        help="seeds of the check it is compared with (default: %(default)s)")
    parser.add_argument("--pairwise-seeds", type=int, default=500,
                        help="seeds at which the pairwise test is timed (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each, their median (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        layout = LoraLayout((LoraLayer("attn1.to_q", 8, 8),), rank=1, alpha=1.0, target_modules=("to_q",))
        save_space(Space(torch.zeros(16), torch.ones(16), torch.eye(16)[:2], layout), work / "space")
        inputs = [work / "space", work / "model.safetensors"]
        per_output = {}
        for seeds in (args.baseline_seeds, args.seeds):
            outputs = generate_outputs(work / "out", seeds)
            per_output[seeds] = seconds(lambda: check_outputs(outputs, inputs), args.repeats) / len(outputs)
            print(f"{seeds:,} seeds: {1e6 * per_output[seeds]:.1f} µs per output, "
                  f"{per_output[seeds] * len(outputs):.3f} s in all")
        outputs = generate_outputs(work / "out", args.pairwise_seeds)
        whole = seconds(lambda: check_outputs(outputs, inputs), args.repeats)
        pairwise = seconds(lambda: pairwise_duplicates(outputs), 1)
        print(f"{args.pairwise_seeds:,} seeds: the check {whole:.3f} s, the earlier pairwise duplicate test alone "
              f"{pairwise:.2f} s")
    ratio = per_output[args.seeds] / per_output[args.baseline_seeds]
    print(json.dumps({"benchmark": "outputs", "seeds": args.seeds, "baseline_seeds": args.baseline_seeds,
                      "ratio": round(ratio, 3), "seconds": round(per_output[args.seeds] * (args.seeds + 2), 4),
                      "pairwise_seeds": args.pairwise_seeds, "pairwise_ratio": round(pairwise / whole, 1)}))


if __name__ == "__main__":
    main()
