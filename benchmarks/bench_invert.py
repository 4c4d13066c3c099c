"""Seconds per inversion step of `lora_w2w.inversion.invert` versus the original's way of doing a step,
and seconds per image of `pipeline.generate` with a fused w2w model versus the base pipeline alone,
on the tiny world's architecture with a random space of K = 1000 components, in the same process.

    nice python benchmarks/bench_invert.py [--steps 40] [--repeats 5] [--threads 1]     # or: make bench-invert

The baseline does what the original inversion.py does every step: read and crop the image file (its
DataLoader), encode the image with the VAE, tokenize and encode the prompt, and in every LoRA layer
rebuild lora_A and lora_B from the coefficients (c @ V_layerᵀ * std + mean, in a forward hook per
layer like the original's LoRAModule); then the same UNet forward, masked MSE, backward and Adam step. The headline `ratio` compares both
in float32 (the same arithmetic, so it measures only what the implementation does differently).
The original ran its models and coefficients in bfloat16 (cast, not autocast); that variant is timed
too and reported as `ratio_vs_bf16_baseline`: on a CPU bfloat16 may be slower or faster than
float32 depending on the chip, so it says little about a GPU.

Our time per step is a whole `invert()` call divided by its steps: it includes the one-time work
(encoding the image and prompt, attaching and removing the adapter), so short runs overstate it.
`ratio_floor_by_caching` is the ratio if the only saving were the cached image and prompt encodings.
Repetitions alternate between the methods; medians are reported. The last line is one JSON object
{"benchmark": "invert", "ratio": <step time / baseline step time>, "generate_ratio": <with model / base alone>, ...}.

`--sd15` times the inversion step on Stable Diffusion 1.5's architecture at 512 px instead (randomly
initialised from its configs, as `bench_gpu_memory.py` builds it: no download; on CUDA when present,
in bfloat16 there as `w2w invert` and the original run, else float32 (~12 GB of RAM, tens of seconds
per step on a CPU)). There the encoders the original re-runs are no longer small
(`tflops` in the output: the VAE encoder at 512 px against the UNet's forward and backward, counted
on fake tensors), so this is the configuration the comparison is about; `flop_ratio` is the ratio
if time followed flops, which a GPU running both near its peak would approach (not measured). Our
step there is the steady state: an `invert()` run's time less its one-time `encode_target` (timed
separately in the same run, paid once per run); no generation, no bfloat16.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from lora_w2w.diffusion import StepSampler, encode_images, encode_prompt, image_sizes, prepare_image
from lora_w2w.inversion import InversionConfig, differentiable_unet, encode_target, inversion_loss, invert, load_target
from lora_w2w.layout import LoraLayout
from lora_w2w.pipeline import generate, load_base_pipeline
from lora_w2w.space import Space, W2WModel
from lora_w2w.workbench import job_dtype
from lora_w2w.storage import read_space_description

TINY_BASE = Path("files/tiny/base")
TINY_SPACE = Path("files/tiny/space")
IMAGE = Path("inversion/images/face.png")


# ----------------------------------------------------------------------------- setup

def base_pipeline():
    """The trained tiny base when present, else a randomly initialised one of the same size (same cost)."""
    if (TINY_BASE / "model_index.json").is_file():
        return load_base_pipeline(str(TINY_BASE), device="cpu", progress=False), str(TINY_BASE)
    from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline

    pipe = build_pipeline(TinyPipelineConfig(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, "random TinyPipelineConfig()"


def tiny_layout(unet) -> LoraLayout:
    """The tiny space's layout (the UNet's to_q/to_v rank 1 without it)."""
    if (TINY_SPACE / "space.json").is_file():
        return LoraLayout.from_dict(read_space_description(TINY_SPACE)["layout"])
    return LoraLayout.from_unet(unet)


def random_space(layout: LoraLayout, k: int) -> Space:
    """K random orthonormal components over `layout`."""
    g = torch.Generator().manual_seed(0)
    n = layout.numel
    components = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].T.float()  # (K, N)
    return Space(0.01 * torch.randn(n, generator=g), 0.02 + 0.01 * torch.rand(n, generator=g), components, layout)


# ----------------------------------------------------------------------------- the original's step

class PerLayerLora:
    """The original LoRAModule as forward hooks: every call of every LoRA Linear rebuilds its lora_A and
    lora_B from the coefficients, w_l = (c @ V_lᵀ) * std_l + mean_l, with V_l the layer's rows of V (N x K)."""

    def __init__(self, unet, space: Space, coefficients: torch.Tensor, dtype: torch.dtype):
        self.coefficients = coefficients  # (K,)
        self.handles = []
        device = coefficients.device
        basis = space.components.T.contiguous().to(device, dtype)  # (N, K), the released V
        mean, std = space.mean.to(device, dtype), space.std.to(device, dtype)
        offset, layout = 0, space.layout
        for layer in layout.layers:
            n = layer.numel(layout.rank)
            part = (basis[offset:offset + n], mean[offset:offset + n], std[offset:offset + n])
            hook = self.hook(part, layer.in_features, layout.rank, layout.scaling)
            self.handles.append(unet.get_submodule(layer.name).register_forward_hook(hook))
            offset += n

    def hook(self, part, in_features: int, rank: int, scaling: float):
        v, mean, std = part  # (n_l, K), (n_l,), (n_l,)

        def add_lora(module, inputs, output):
            w = (self.coefficients @ v.T) * std + mean           # (n_l,)
            lora_a = w[:rank * in_features].view(rank, in_features)  # (r, in)
            lora_b = w[rank * in_features:].view(-1, rank)           # (out, r)
            return output + scaling * (inputs[0] @ lora_a.T) @ lora_b.T
        return add_lora


def baseline_run(pipe, unet, space: Space, image_path: Path, steps: int, lr: float, dtype: torch.dtype) -> None:
    """`steps` steps the way the original inversion.py takes them (image file, VAE and text encoder every step)."""
    device = unet.device
    coefficients = torch.zeros(space.num_components, dtype=dtype, device=device, requires_grad=True)  # (K,)
    lora = PerLayerLora(unet, space, coefficients, dtype)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae, text_encoder = pipe.vae, pipe.text_encoder
    resolution, latent_size = image_sizes(pipe)
    mask = torch.ones(1, 1, latent_size, latent_size, dtype=dtype, device=device)
    for _ in range(steps):
        with Image.open(image_path) as picture:
            image = prepare_image(picture, resolution)[None].to(device, dtype)                     # (1, 3, R, R)
        latents = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor             # (1, C, h, w)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = pipe.tokenizer("sks person", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        text = text_encoder(ids)[0]                                                               # (1, L, D)
        prediction = unet(noisy, timesteps, text).sample
        loss = F.mse_loss(mask * prediction.float(), mask * noise.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for handle in lora.handles:
        handle.remove()


# ----------------------------------------------------------------------------- timing

def seconds(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="inversion steps per timed run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions (default: %(default)s)")
    parser.add_argument("--components", type=int, default=1000, help="K of the random space (default: %(default)s)")
    parser.add_argument("--generate-steps", type=int, default=25,
                        help="denoising steps per generated image (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings steady on a shared machine (default: %(default)s)")
    parser.add_argument("--sd15", action="store_true",
                        help="time the step on SD1.5's architecture at 512 px (random weights; use e.g. --steps 2 "
                             "--repeats 1)")
    return parser.parse_args()


def sd15_flops(k: int) -> dict[str, float]:
    """Teraflops of SD1.5's VAE encode of one 512 px image, prompt encode and inversion step (forward and
    backward), counted on fake tensors (shapes only: seconds, no memory)."""
    from bench_gpu_memory import ForgetFakeMemo, sd15_pipeline
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    counted = {}
    with fake, ForgetFakeMemo(fake):
        pipe = sd15_pipeline(torch.float32)
        for module in (pipe.vae, pipe.text_encoder, pipe.unet):
            module.requires_grad_(False)
        layout = LoraLayout.from_unet(pipe.unet)
        basis = (torch.zeros(layout.numel), torch.ones(layout.numel), torch.randn(k, layout.numel))  # (N,) (N,) (K, N)
        image = torch.rand(1, 3, 512, 512) * 2 - 1                                                 # (1, 3, R, R)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        target = encode_target(pipe, image, None, "sks person")
        sampler = StepSampler(0, num_instance=1, num_class=0, batch_size=1,
                              latent_shape=tuple(target.latent_mean.shape[1:]),
                              num_train_timesteps=scheduler.config.num_train_timesteps)
        coefficients = torch.zeros(k, requires_grad=True)
        with differentiable_unet(pipe.unet, layout) as lora_unet:
            parts = {"vae_encode": lambda: encode_images(pipe.vae, image),
                     "text_encode": lambda: encode_prompt(pipe.tokenizer, pipe.text_encoder, "sks person"),
                     "step": lambda: inversion_loss(lora_unet, basis, coefficients, target, scheduler,
                                                    sampler.next()).backward()}
            for name, part in parts.items():
                with FlopCounterMode(display=False) as counter:
                    part()
                counted[name] = counter.get_total_flops() / 1e12
    return counted


def main_sd15(args: argparse.Namespace) -> None:
    """The inversion step on SD1.5's architecture at 512 px: ours (steady state) against the original's."""
    from bench_gpu_memory import sd15_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = job_dtype("invert", device)  # bfloat16 on CUDA, as `w2w invert` and the original run there
    pipe = sd15_pipeline(dtype).to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    baseline_unet = copy.deepcopy(pipe.unet)
    space = random_space(LoraLayout.from_unet(pipe.unet), args.components)
    image, _ = load_target(IMAGE, None, *image_sizes(pipe))
    config = InversionConfig(components=args.components, lr=1.0, weight_decay=0.0, steps=args.steps)
    timed = {"invert": lambda: invert(pipe, space, image, None, config, progress=False),
             "encode_target": lambda: encode_target(pipe, image, None, "sks person"),
             "baseline": lambda: baseline_run(pipe, baseline_unet, space, IMAGE, args.steps, 1.0, dtype)}
    invert(pipe, space, image, None, dataclasses.replace(config, steps=1), progress=False)  # warm-up: one step each
    baseline_run(pipe, baseline_unet, space, IMAGE, 1, 1.0, dtype)
    times = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            times[name].append(seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    step = (median["invert"] - median["encode_target"]) / args.steps
    baseline_step = median["baseline"] / args.steps
    flops = sd15_flops(args.components)
    print(f"SD1.5 at 512 px, inversion step: {step:.2f} s (plus {median['encode_target']:.2f} s once per run), "
          f"original-style step {baseline_step:.2f} s")
    print(json.dumps({
        "benchmark": "invert", "ratio": round(step / baseline_step, 3), "step_s": round(step, 3),
        "baseline_step_s": round(baseline_step, 3), "encode_once_s": round(median["encode_target"], 3),
        "flop_ratio": round(flops["step"] / sum(flops.values()), 3), "tflops": {n: round(f, 4) for n, f in flops.items()},
        "components": args.components, "num_weights": space.num_weights, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "base": "SD1.5 architecture, random weights, 512 px",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
    }))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.sd15:
        return main_sd15(args)
    pipe, base = base_pipeline()
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    space = random_space(tiny_layout(pipe.unet), args.components)
    image, _ = load_target(IMAGE, None, *image_sizes(pipe))
    config = InversionConfig(components=args.components, lr=1.0, weight_decay=0.0, steps=args.steps)
    bf16 = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    baselines = {torch.float32: (pipe, copy.deepcopy(pipe.unet).requires_grad_(False)),
                 torch.bfloat16: (bf16, bf16.unet.requires_grad_(False))}
    model = W2WModel(torch.randn(args.components, generator=torch.Generator().manual_seed(1)), space.id)

    def ours():
        invert(pipe, space, image, None, config, progress=False)

    def baseline(dtype):
        return lambda: baseline_run(baselines[dtype][0], baselines[dtype][1], space, IMAGE, args.steps, 1.0, dtype)

    def with_model():
        generate(pipe, space, model, num_inference_steps=args.generate_steps)

    def base_alone():
        generate(pipe, space, None, num_inference_steps=args.generate_steps)

    def vae_encode():
        encode_images(pipe.vae, image)

    def text_encode():
        encode_prompt(pipe.tokenizer, pipe.text_encoder, "sks person")

    timed = {"ours": ours, "baseline": baseline(torch.float32), "baseline_bf16": baseline(torch.bfloat16),
             "with_model": with_model, "base_alone": base_alone, "vae_encode": vae_encode, "text_encode": text_encode}
    for fn in timed.values():  # warm-up
        fn()
    times = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            times[name].append(seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    step, baseline_step, bf16_step = (median[n] / args.steps for n in ("ours", "baseline", "baseline_bf16"))
    floor = (baseline_step - median["vae_encode"] - median["text_encode"]) / baseline_step  # caching alone, at best
    print(f"inversion step: {1000 * step:.1f} ms, original-style step {1000 * baseline_step:.1f} ms (float32), "
          f"{1000 * bf16_step:.1f} ms (bfloat16)")
    print(f"of which the original spends {1000 * median['vae_encode']:.1f} ms encoding the image and "
          f"{1000 * median['text_encode']:.1f} ms the prompt; this implementation does both once per run")
    print(f"generation: {1000 * median['with_model']:.1f} ms with a w2w model, {1000 * median['base_alone']:.1f} ms "
          f"base alone ({args.generate_steps} steps)")
    print(json.dumps({
        "benchmark": "invert", "ratio": round(step / baseline_step, 3),
        "generate_ratio": round(median["with_model"] / median["base_alone"], 3),
        "ratio_vs_bf16_baseline": round(step / bf16_step, 3),
        "step_ms": round(1000 * step, 2), "baseline_step_ms": round(1000 * baseline_step, 2),
        "baseline_bf16_step_ms": round(1000 * bf16_step, 2), "vae_encode_ms": round(1000 * median["vae_encode"], 2),
        "text_encode_ms": round(1000 * median["text_encode"], 2), "ratio_floor_by_caching": round(floor, 3),
        "generate_ms": round(1000 * median["with_model"], 1), "base_generate_ms": round(1000 * median["base_alone"], 1),
        "components": args.components, "num_weights": space.num_weights, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "base": base, "device": "cpu",
    }))


if __name__ == "__main__":
    main()
