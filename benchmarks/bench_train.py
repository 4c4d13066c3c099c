"""Identities per hour: `w2w train-identities` (K identities per pass) versus one `train_dreambooth.py`
run per identity, same steps and hyper-parameters, on the tiny world, measured in the same run.

    python benchmarks/bench_train.py [--identities 8] [--steps 100]      # or: make bench-train

Both include what a run costs: loading the base, caching latents and embeddings, training, writing
the adapters. Class images are generated once before timing (both reuse them). The last line is one
JSON object {"benchmark": "train", "ratio": <multi identities/hour / solo identities/hour>, ...}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lora_w2w import train_identities
from lora_w2w.dreambooth import add_dreambooth_arguments, train_one
from lora_w2w.tiny.faces import write_dataset

TINY_BASE = Path("files/tiny/base")


def base_model(workdir: Path) -> str:
    """The committed tiny base, or a randomly initialised one of the same architecture (same cost)."""
    if (TINY_BASE / "model_index.json").is_file():
        return str(TINY_BASE)
    from lora_w2w.tiny.pipeline import TinyPipelineConfig, build_pipeline, save_pipeline

    save_pipeline(build_pipeline(TinyPipelineConfig(), seed=0), workdir / "base")
    return str(workdir / "base")


def dreambooth_args(base: str, class_dir: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", base, "--class_data_dir", str(class_dir), "--max_train_steps",
            str(steps), "--num_class_images", "50", "--class_inference_steps", "10"]


def solo_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instance_data_dir")
    parser.add_argument("--output_dir")
    add_dreambooth_arguments(parser)
    return parser.parse_args(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=8, help="identities trained by each method (K)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per identity (the paper: 800)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(work)
        write_dataset(work / "faces", args.identities, first_seed=500_000, progress=False)
        faces = work / "faces" / "celeba_generated"
        common = dreambooth_args(base, work / "class", args.steps)
        train_one(solo_args(["--instance_data_dir", str(faces / "500000"), "--output_dir", str(work / "warm"),
                             *dreambooth_args(base, work / "class", 1)]))  # class images, warm-up

        start = time.perf_counter()
        for folder in sorted(faces.iterdir()):
            train_one(solo_args(["--instance_data_dir", str(folder), "--output_dir", str(work / "solo" / folder.name),
                                 *common]))
        solo_seconds = time.perf_counter() - start

        start = time.perf_counter()
        multi = train_identities.parse_args(["--instance_root", str(faces), "--output_root", str(work / "multi"),
                                             "--identities_per_batch", str(args.identities), *common])
        trained, refused = train_identities.train_identities(multi)
        multi_seconds = time.perf_counter() - start
        assert len(trained) == args.identities and not refused, (trained, refused)

    solo_rate = 3600 * args.identities / solo_seconds
    multi_rate = 3600 * args.identities / multi_seconds
    print(f"solo train_dreambooth.py: {solo_seconds:.1f} s for {args.identities} identities ({solo_rate:.0f}/hour)")
    print(f"train-identities K={args.identities}: {multi_seconds:.1f} s ({multi_rate:.0f}/hour)")
    print(json.dumps({"benchmark": "train", "ratio": round(multi_rate / solo_rate, 2),
                      "identities_per_hour": round(multi_rate), "baseline_identities_per_hour": round(solo_rate),
                      "identities": args.identities, "steps": args.steps, "threads": args.threads, "base": base}))


if __name__ == "__main__":
    main()
