"""Identities per hour: one `w2w train-identities` run (K identities per pass) versus one
`train_dreambooth.py` run per identity (what train.sh does), same steps and hyper-parameters (the
tiny world's recipe, `LORA_RECIPE`), on the tiny world, measured in the same run.

    python benchmarks/bench_train.py [--identities 32] [--solo-identities 8] [--steps S] [--threads N]
    python benchmarks/bench_train.py --sd15 --identities 8 --steps 5       # SD1.5 on a GPU
    python benchmarks/bench_train.py --sdxl --identities 4 --steps 2       # SDXL's architecture, small, on a CPU

Each run is a process, as a user runs it: interpreter start and imports, loading the base, caching
latents and embeddings, training, writing the adapters (plain `python`, not `accelerate launch`,
whose extra launcher process would only make the baseline slower). Class images are generated once
before timing and both reuse them. Every solo run costs the same, so the baseline's rate is measured on
the first `--solo-identities` of the K identities (8 keeps the benchmark near 15 minutes at 800 steps).

Then, in this process, the time of one training step alone, solo (K = 1) and per identity at K, and
what arithmetic allows: the UNet's flops per sample over this core's float32 matmul rate bounds how
much faster than a solo step any step can be (`step_ratio_ceiling`). The last line is one JSON object
{"benchmark": "train", "ratio": <multi identities/hour / solo identities/hour>, "step_ratio": ..., ...}.

`--sd15` times only the step, on a randomly initialised SD1.5 at 512 px (no download), on CUDA when
present with bf16 autocast (`--mixed_precision bf16`): identity-steps/s solo and at K, their TFLOP/s
and the fraction of the chip's dense bf16 peak. `--sdxl` does the same on Stable Diffusion XL's
architecture at a size a CPU trains (lora_w2w/data/sdxl_unet_config.json's blocks and depths: 70
transformer blocks, 280 LoRA layers, the text-time embedding and two text encoders, every width divided by
--width-divisor, 4; 256 px): its `step_ratio` (solo seconds per identity-step over K's) is the batched
trainer's gain on SDXL's layer structure, measured against solo in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lora_w2w.dreambooth import DreamboothConfig
from lora_w2w.flags import config_argv
from lora_w2w.tiny.build import LORA_RECIPE
from lora_w2w.tiny.synthetic import write_dataset

TINY_BASE = Path("files/tiny/base")
TRAIN_DREAMBOOTH = Path(__file__).resolve().parents[1] / "train_dreambooth.py"


def base_model(workdir: Path) -> str:
    """The committed tiny base, or a randomly initialised one of the same architecture (same cost)."""
    if (TINY_BASE / "model_index.json").is_file():
        return str(TINY_BASE)
    from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline, save_pipeline

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


def step_seconds(base: str, faces: Path, class_dir: Path, k: int, steps: int, recipe: list[str]
                 ) -> tuple[float, float, float]:
    """(seconds of a solo step, seconds per identity of a K-identity step, UNet fwd+bwd flops per sample),
    each the best of a few timings of `steps` steps after a warm-up, with the training flags `recipe`."""
    from lora_w2w import train_identities as ti
    from lora_w2w.dreambooth import load_base, load_image_folder, lora_layout, prepare_identity, prepare_shared

    args = ti.parse_args(["--instance_root", str(faces), "--output_root", "unused", *recipe])
    model = load_base(base, torch.device("cpu"))
    layout = lora_layout(model, args)
    shared = prepare_shared(model, args, model.resolution, class_dir)
    identities = [prepare_identity(f.name, load_image_folder(f, model.resolution), model, shared, args)
                  for f in ti.identity_folders(faces)[:k]]

    solo, multi = (seconds_per_identity_step(model.network, layout, group, shared, args, steps)
                   for group in (identities[:1], identities))
    return solo, multi, flops_per_sample(model.network, layout, identities[:1], shared, args)


def seconds_per_identity_step(unet, layout, group, shared, args, steps: int, autocast=nullcontext) -> float:
    """Seconds per identity of `train_group`'s step (LoraBanks, AdamW) for the identities `group`: the
    best of 3 timings of `steps` steps after a warm-up."""
    from lora_w2w import train_identities as ti
    from lora_w2w.dreambooth import identities_loss, initial_lora_weights

    timings = []
    with ti.identity_banks(unet, layout, initial_lora_weights(layout, 0).expand(len(group), -1)) as banks:
        optimizer = torch.optim.AdamW([p for b in banks.values() for p in (b.lora_A, b.lora_B)])
        for _ in range(4):  # the first is a warm-up
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                identities_loss(unet, group, shared, args, autocast).backward()
                optimizer.step()
                optimizer.zero_grad()
            synchronize()
            timings.append((time.perf_counter() - start) / steps / len(group))
    return min(timings[1:])


def flops_per_sample(unet, layout, group, shared, args) -> float:
    """Flops of the UNet's forward and backward per sample of a training step (one identity)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_w2w import train_identities as ti
    from lora_w2w.dreambooth import identities_loss, initial_lora_weights

    with ti.identity_banks(unet, layout, initial_lora_weights(layout, 0)[None]), \
            FlopCounterMode(display=False) as counter:
        identities_loss(unet, group[:1], shared, args).backward()
    return counter.get_total_flops() / (2 * args.train_batch_size)  # instance + class samples


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# dense bfloat16 peak TFLOP/s of some chips, by a part of the name torch gives them (the first match wins)
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def main_architecture(args: argparse.Namespace) -> None:
    """Steps/s of the training step on a randomly initialised SD1.5 or (small) SDXL (CUDA when present, bf16
    autocast there, as --mixed_precision bf16), solo and K identities at once, and the fraction of the chip's
    bf16 peak they reach."""
    from bench_gpu_memory import DREAMBOOTH, frozen_base, sd15_pipeline, sdxl_pipeline, training_inputs

    from lora_w2w.layout import LoraLayout

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # float32 weights, as load_base loads them
    pipe = sdxl_pipeline(torch.float32, args.width_divisor) if args.sdxl else sd15_pipeline(torch.float32)
    architecture = f"SDXL (widths / {args.width_divisor})" if args.sdxl else "SD1.5"
    pipe.unet.register_to_config(sample_size=args.resolution // 8)  # the latents training_inputs makes
    identities, shared = training_inputs(frozen_base(pipe), args.identities)  # random cached latents, embeddings
    pipe.unet.to(device)
    shared = dataclasses.replace(shared, class_mean=shared.class_mean.to(device), class_std=shared.class_std.to(device),
                                 instance_conditioning=shared.instance_conditioning.to(device),
                                 class_conditioning=shared.class_conditioning.to(device))
    identities = [dataclasses.replace(i, mean=i.mean.to(device), std=i.std.to(device)) for i in identities]
    recipe = DREAMBOOTH
    layout = LoraLayout.from_unet(pipe.unet, recipe.lora_target_modules, recipe.lora_r, recipe.lora_alpha)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    flops = flops_per_sample(pipe.unet, layout, identities, shared, recipe)
    solo, multi = (seconds_per_identity_step(pipe.unet, layout, group, shared, recipe, args.steps, autocast)
                   for group in (identities[:1], identities))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((tflops for part, tflops in BF16_PEAK_TFLOPS if part in name), None)

    def rate(seconds: float) -> float:  # TFLOP/s of a step taking `seconds` per identity (2 samples each)
        return 2 * flops / seconds / 1e12

    print(f"{architecture} UNet at {args.resolution} px on {name}: {flops / 1e12:.3f} TFLOP per sample (forward and "
          f"backward), {len(layout)} LoRA layers")
    for label, seconds in (("solo", solo), (f"K={args.identities}", multi)):
        print(f"  {label}: {1 / seconds:.2f} identity-steps/s, {rate(seconds):.2f} TFLOP/s"
              + (f" = {rate(seconds) / peak:.1%} of the bf16 peak ({peak:g})" if peak else ""))
    print(json.dumps({"benchmark": "train_sdxl" if args.sdxl else "train_sd15", "step_ratio": round(solo / multi, 2),
                      "identity_steps_per_s": round(1 / multi, 3), "solo_steps_per_s": round(1 / solo, 3),
                      "tflops_per_sample": round(flops / 1e12, 3), "tflops_per_s": round(rate(multi), 2),
                      "peak_fraction": round(rate(multi) / peak, 3) if peak else None,
                      "solo_peak_fraction": round(rate(solo) / peak, 3) if peak else None,
                      "identities": args.identities, "resolution": args.resolution, "steps": args.steps,
                      "device": name, "autocast": "bf16" if cuda else "no",
                      **({"width_divisor": args.width_divisor} if args.sdxl else {})}))


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
    parser.add_argument("--solo-identities", type=int, default=8,
                        help="identities trained by the baseline, one run each (default: %(default)s; at most K)")
    parser.add_argument("--steps", type=int, default=LORA_RECIPE["max_train_steps"],
                        help="training steps per identity (default: the tiny recipe's %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--class-images", type=int, default=LORA_RECIPE["num_class_images"],
                        help="prior images, generated once before timing (default: the recipe's %(default)s; "
                             "fewer only to try the benchmark quickly)")
    parser.add_argument("--sd15", action="store_true",
                        help="instead: the training step on a randomly initialised SD1.5 (CUDA when present), "
                             "solo and --identities at once (use e.g. --identities 8 --steps 5): steps/s and the "
                             "fraction of the chip's bf16 peak")
    parser.add_argument("--sdxl", action="store_true",
                        help="instead: the same on SDXL's architecture, every width divided by --width-divisor (use "
                             "e.g. --identities 4 --steps 2 on a CPU)")
    parser.add_argument("--width-divisor", type=int, default=4,
                        help="with --sdxl: what SDXL's widths are divided by (1: full size) (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="with --sd15 or --sdxl: image size (default: 512 for SD1.5, 256 for SDXL)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="with --sd15 or --sdxl: the chip's dense bf16 peak in TFLOP/s (default: known for H100, "
                             "H200, A100)")
    args = parser.parse_args()
    if min(args.identities, args.solo_identities, args.steps, args.class_images, args.width_divisor) < 1:
        parser.error("--identities, --solo-identities, --steps, --class-images and --width-divisor must be at least 1")
    if args.sd15 and args.sdxl:
        parser.error("--sd15 and --sdxl: one or the other")
    if 32 % args.width_divisor:
        parser.error(f"--width-divisor {args.width_divisor}: expected a divisor of 32 (SDXL's norm groups)")
    torch.set_num_threads(args.threads)
    if args.sd15 or args.sdxl:
        args.resolution = args.resolution or (256 if args.sdxl else 512)
        return main_architecture(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(work)
        recipe = config_argv(DreamboothConfig(**dict(LORA_RECIPE, max_train_steps=args.steps,
                                                     num_class_images=args.class_images),
                                              pretrained_model_name_or_path=base, class_data_dir=str(work / "class")),
                             kebab=False)  # train_dreambooth.py's flags
        write_dataset(work / "faces", args.identities, first_seed=500_000, progress=False)
        faces = work / "faces" / "celeba_generated"
        folders = sorted(faces.iterdir())
        solo = [sys.executable, str(TRAIN_DREAMBOOTH), *recipe]
        run([*solo, "--instance_data_dir", str(folders[0]), "--output_dir", str(work / "warm"),
             "--max_train_steps", "1"], args.threads)  # the shared class images, generated once

        solo_folders = folders[:args.solo_identities]
        solo_seconds = sum(run([*solo, "--instance_data_dir", str(f), "--output_dir", str(work / "solo" / f.name)],
                               args.threads) for f in solo_folders)
        multi_seconds = run([sys.executable, "-m", "lora_w2w.train_identities", "--instance_root", str(faces),
                             "--output_root", str(work / "multi"), "--identities_per_batch", str(args.identities),
                             *recipe], args.threads)
        trained = [f.name for f in folders if (work / "multi" / f.name / "unet" / "adapter_model.safetensors").is_file()]
        assert len(trained) == args.identities, trained
        solo_step, multi_step, flops = step_seconds(base, faces, work / "class", args.identities, 10, recipe)
    peak = matmul_flops_per_second()

    solo_rate, multi_rate = 3600 * len(solo_folders) / solo_seconds, 3600 * args.identities / multi_seconds
    solo_rate_flops = 2 * flops / solo_step  # a solo step is 2 samples (instance + class)
    print(f"solo train_dreambooth.py runs: {solo_seconds:.1f} s for {len(solo_folders)} identities ({solo_rate:.0f}/hour)")
    print(f"one train-identities run, K={args.identities}: {multi_seconds:.1f} s ({multi_rate:.0f}/hour)")
    print(f"one step: solo {1000 * solo_step:.1f} ms, K={args.identities} {1000 * multi_step:.1f} ms per identity "
          f"({solo_rate_flops / 1e9:.0f} and {2 * flops / multi_step / 1e9:.0f} GFLOP/s; float32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s)")
    print(json.dumps({"benchmark": "train", "ratio": round(multi_rate / solo_rate, 2),
                      "identities_per_hour": round(multi_rate), "baseline_identities_per_hour": round(solo_rate),
                      "step_ratio": round(solo_step / multi_step, 2),
                      "step_ratio_ceiling": round(peak / solo_rate_flops, 2),
                      "identities": args.identities, "solo_identities": len(solo_folders), "steps": args.steps,
                      "class_images": args.class_images,
                      "threads": args.threads, "base": base}))


if __name__ == "__main__":
    main()
