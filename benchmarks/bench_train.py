"""Identities per hour: one `w2w train-identities` run (K identities per pass) versus one
`train_dreambooth.py` run per identity (what train.sh does), same steps and hyper-parameters (the
tiny world's recipe, `LORA_RECIPE`), on the tiny world, measured in the same run.

    python benchmarks/bench_train.py [--identities 32] [--steps 200] [--threads 2]    # or: make bench-train

Each run is a process, as a user runs it: interpreter start and imports, loading the base, caching
latents and embeddings, training, writing the adapters (plain `python`, not `accelerate launch`,
whose extra launcher process would only make the baseline slower). Class images are generated once
before timing and both reuse them.

Then, in this process, the time of one training step alone, solo (K = 1) and per identity at K, and
what arithmetic allows: the UNet's flops per sample over this core's float32 matmul rate bounds how
much faster than a solo step any step can be (`step_ratio_ceiling`). The last line is one JSON object
{"benchmark": "train", "ratio": <multi identities/hour / solo identities/hour>, "step_ratio": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_w2w.tiny.build import LORA_RECIPE, recipe_flags
from lora_w2w.tiny.faces import write_dataset

TINY_BASE = Path("files/tiny/base")


def base_model(workdir: Path) -> str:
    """The committed tiny base, or a randomly initialised one of the same architecture (same cost)."""
    if (TINY_BASE / "model_index.json").is_file():
        return str(TINY_BASE)
    from lora_w2w.tiny.pipeline import TinyPipelineConfig, build_pipeline, save_pipeline

    save_pipeline(build_pipeline(TinyPipelineConfig(), seed=0), workdir / "base")
    return str(workdir / "base")


def run(command: list[str], threads: int) -> float:
    """Wall seconds of one process run with `threads` torch threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def step_seconds(base: str, faces: Path, class_dir: Path, k: int, steps: int) -> tuple[float, float, float]:
    """(seconds of a solo step, seconds per identity of a K-identity step, UNet fwd+bwd flops per sample),
    each the best of a few timings of `steps` steps after a warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_w2w import train_identities as ti
    from lora_w2w.dreambooth import (identities_loss, initial_lora_weights, load_base, load_image_folder,
                                     lora_layout, prepare_identity, prepare_shared)

    args = ti.parse_args(["--instance_root", str(faces), "--output_root", "unused", "--class_data_dir",
                          str(class_dir), "--pretrained_model_name_or_path", base, *recipe_flags(LORA_RECIPE)])
    model = load_base(base, torch.device("cpu"))
    layout = lora_layout(model, args)
    shared = prepare_shared(model, args, model.resolution, class_dir)
    identities = [prepare_identity(f.name, load_image_folder(f, model.resolution), model, shared, args)
                  for f in ti.identity_folders(faces)[:k]]

    def per_identity(group) -> float:
        banks = ti.install_banks(model.unet, layout, initial_lora_weights(layout, 0).expand(len(group), -1))
        optimizer = torch.optim.AdamW([p for b in banks.values() for p in (b.lora_A, b.lora_B)])
        timings = []
        for _ in range(4):  # the first is a warm-up
            start = time.perf_counter()
            for _ in range(steps):
                identities_loss(model.unet, group, shared, args).backward()
                optimizer.step()
                optimizer.zero_grad()
            timings.append((time.perf_counter() - start) / steps / len(group))
        ti.remove_banks(model.unet, banks)
        return min(timings[1:])

    solo, multi = per_identity(identities[:1]), per_identity(identities)
    banks = ti.install_banks(model.unet, layout, initial_lora_weights(layout, 0)[None])
    with FlopCounterMode(display=False) as counter:
        identities_loss(model.unet, identities[:1], shared, args).backward()
    ti.remove_banks(model.unet, banks)
    return solo, multi, counter.get_total_flops() / (2 * args.train_batch_size)


def matmul_flops_per_second(n: int = 1024, repeats: int = 20) -> float:
    """This process's float32 matmul rate on n x n matrices (best of a few)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=32, help="identities trained by each method, K (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=LORA_RECIPE["max_train_steps"],
                        help="training steps per identity (default: the tiny recipe's %(default)s; the paper: 800)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_flags(dict(LORA_RECIPE, max_train_steps=args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(work)
        write_dataset(work / "faces", args.identities, first_seed=500_000, progress=False)
        faces = work / "faces" / "celeba_generated"
        folders = sorted(faces.iterdir())
        common = ["--pretrained_model_name_or_path", base, "--class_data_dir", str(work / "class"), *recipe]
        solo = [sys.executable, "train_dreambooth.py", *common]
        run([*solo, "--instance_data_dir", str(folders[0]), "--output_dir", str(work / "warm"),
             "--max_train_steps", "1"], args.threads)  # the shared class images, generated once

        solo_seconds = sum(run([*solo, "--instance_data_dir", str(f), "--output_dir", str(work / "solo" / f.name)],
                               args.threads) for f in folders)
        multi_seconds = run([sys.executable, "-m", "lora_w2w.train_identities", "--instance_root", str(faces),
                             "--output_root", str(work / "multi"), "--identities_per_batch", str(args.identities),
                             *common], args.threads)
        trained = [f.name for f in folders if (work / "multi" / f.name / "unet" / "adapter_model.safetensors").is_file()]
        assert len(trained) == args.identities, trained
        solo_step, multi_step, flops = step_seconds(base, faces, work / "class", args.identities, steps=10)
    peak = matmul_flops_per_second()

    solo_rate, multi_rate = 3600 * args.identities / solo_seconds, 3600 * args.identities / multi_seconds
    solo_rate_flops = 2 * flops / solo_step  # a solo step is 2 samples (instance + class)
    print(f"solo train_dreambooth.py runs: {solo_seconds:.1f} s for {args.identities} identities ({solo_rate:.0f}/hour)")
    print(f"one train-identities run, K={args.identities}: {multi_seconds:.1f} s ({multi_rate:.0f}/hour)")
    print(f"one step: solo {1000 * solo_step:.1f} ms, K={args.identities} {1000 * multi_step:.1f} ms per identity "
          f"({solo_rate_flops / 1e9:.0f} and {2 * flops / multi_step / 1e9:.0f} GFLOP/s; float32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s)")
    print(json.dumps({"benchmark": "train", "ratio": round(multi_rate / solo_rate, 2),
                      "identities_per_hour": round(multi_rate), "baseline_identities_per_hour": round(solo_rate),
                      "step_ratio": round(solo_step / multi_step, 2),
                      "step_ratio_ceiling": round(peak / solo_rate_flops, 2),
                      "identities": args.identities, "steps": args.steps, "threads": args.threads, "base": base}))


if __name__ == "__main__":
    main()
