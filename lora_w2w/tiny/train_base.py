"""Train the tiny Stable Diffusion pipeline (lora_w2w.tiny.base_model) on procedural faces, from a seed.

Stages: render identities with their descriptive captions; (a) train the VAE; (b) encode every image
once and set `scaling_factor` from the latents' std; (c) train UNet + CLIP text encoder jointly
(epsilon prediction, DDPM 1000 steps, caption dropout for classifier-free guidance). Checkpoints go
to --work-dir, so a killed run resumes; the diffusers folder is written atomically, with a sample grid.

    python -m lora_w2w.tiny.train_base --out files/tiny/base          # ~70 min on 2 CPU cores
    python -m lora_w2w.tiny.train_base --out /tmp/base --toy          # seconds: the tests' run
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make training 10-30x slower when other processes share the
# cores; must be set before torch loads its OpenMP runtime (effective when run as a script).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from lora_w2w.diffusion import image_sizes
from lora_w2w.storage import atomic_output
from lora_w2w.tiny import synthetic
from lora_w2w.tiny.base_model import (
    TinyPipelineConfig,
    build_pipeline,
    build_tokenizer,
    count_parameters,
    save_pipeline,
    training_scheduler,
)

# Identities used by the weights dataset have seeds 0 .. 99_999; the base model never sees them.
FIRST_SEED = 1_000_000
SAMPLE_SEED = 2_000_000  # held-out identities whose captions prompt the sample grid

# Sizes by preset; every value can be overridden by its flag. "full" takes ~70 min on 2 CPU cores.
PRESETS = {
    "full": dict(
        num_identities=4000, images_per_identity=8,
        vae_steps=2400, vae_batch=32, vae_crop=32, vae_full_steps=300,
        unet_steps=5600, unet_batch=32,
        checkpoint_every=200, log_every=50, samples=8, sample_steps=25, pipeline=TinyPipelineConfig(),
    ),
    "toy": dict(
        num_identities=8, images_per_identity=2,
        vae_steps=25, vae_batch=8, vae_crop=32, vae_full_steps=5,
        unet_steps=30, unet_batch=8,
        checkpoint_every=10, log_every=5, samples=2, sample_steps=4,
        pipeline=TinyPipelineConfig(text_hidden=32, text_layers=1, text_heads=2,
                                    vae_channels=(32, 32, 32), unet_channels=(32, 32, 32)),
    ),
}


# -----------------------------------------------------------------------------
# data


def render_faces(first_seed: int, num_identities: int, images_per_identity: int, size: int, progress: bool = True):
    """Images (M, 3, size, size) uint8 and their captions (M) for identities first_seed ..,
    each image drawn with the view write_dataset() would use."""
    images, captions = [], []
    for seed in tqdm(range(first_seed, first_seed + num_identities), desc="render", disable=not progress):
        identity = synthetic.sample_identity(seed)
        for k in range(images_per_identity):
            view_seed = synthetic.dataset_view_seed(seed, k)
            images.append(np.asarray(synthetic.render(identity, view_seed, size)))  # (H, W, 3)
            captions.append(synthetic.caption(identity, smiling=synthetic.view_smiling(view_seed)))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (M, 3, H, W)
    return images, captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range SD's VAE works in."""
    return images.float() / 127.5 - 1.0


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random crop x[:, :, i:i+crop, j:j+crop] per batch (convolutions do not care where)."""
    i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=generator).tolist()
    return x[:, :, i : i + crop, j : j + crop]


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    """The checkpoint at `path` if it exists; it must come from a run with the same `fingerprint`."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        print(f"error: checkpoint {path} comes from a run with other settings ({state['fingerprint']}); "
              f"use the same flags or another --work-dir", file=sys.stderr)
        raise SystemExit(2)
    return state


@dataclass
class Stage:
    """Bookkeeping of one training stage, kept in its checkpoint."""

    step: int = 0
    seconds: float = 0.0
    losses: list = None  # mean loss per `log_every` steps

    def __post_init__(self):
        self.losses = [] if self.losses is None else self.losses

    def end_step(self, value: float, running: list, bar, total: int, args, started: float, label: str) -> bool:
        """Count one step of value `value`: progress bar, a logged mean every `log_every` steps; True when
        a checkpoint is due (its elapsed time is then recorded)."""
        self.step += 1
        running.append(value)
        bar.update()
        bar.set_postfix({label: f"{np.mean(running[-50:]):.4f}"})
        last = self.step == total
        if self.step % args.log_every == 0 or last:
            self.losses.append(float(np.mean(running)))
            running.clear()
        if self.step % args.checkpoint_every == 0 or last:
            self.seconds = time.time() - started
            return True
        return False


# -----------------------------------------------------------------------------
# (a) VAE


def image_gradient_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: penalises blurred edges."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(target)) + F.l1_loss(dy(recon), dy(target))


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float, edge_weight: float):
    """LDM's autoencoder loss without the perceptual and GAN terms: L1 + edge L1 + kl_weight * KL,
    the KL summed over latent numbers per image like the reconstruction over pixels."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample  # (B, 3, H, W)
    kl = posterior.kl().mean() / x[0].numel()  # per image, divided by its number of pixel values
    return F.l1_loss(recon, x) + edge_weight * image_gradient_loss(recon, x) + kl_weight * kl


def train_vae(vae, images: torch.Tensor, args, path: Path, fingerprint: dict) -> Stage:
    """Train `vae` on `images` (M, 3, H, W) uint8: random crops first, full images at the end."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.vae_steps)
    stage = Stage()
    state = load_checkpoint(path, fingerprint)
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        generator.set_state(state["generator"])
        stage = Stage(**state["stage"])
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=stage.step, desc="vae", disable=not args.progress)
    running, started = [], time.time() - stage.seconds
    while stage.step < args.vae_steps:
        index = torch.randint(0, len(images), (args.vae_batch,), generator=generator)  # (B,)
        x = random_flip(to_model_range(images[index]), generator)  # (B, 3, H, W)
        if stage.step < args.vae_steps - args.vae_full_steps:
            x = random_crop(x, args.vae_crop, generator)  # (B, 3, crop, crop)
        loss = vae_loss(vae, x, generator, args.vae_kl_weight, args.vae_edge_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        if stage.end_step(loss.item(), running, bar, args.vae_steps, args, started, "loss"):
            save_checkpoint(path, dict(fingerprint=fingerprint, vae=vae.state_dict(), optimizer=optimizer.state_dict(),
                                       lr_schedule=lr_schedule.state_dict(), generator=generator.get_state(),
                                       stage=asdict(stage)))
    bar.close()
    vae.eval()
    return stage


@torch.no_grad()
def reconstruction_grid(vae, images: torch.Tensor) -> Image.Image:
    """Images (N, 3, H, W) uint8 in the top row, their VAE reconstructions (posterior mean) below."""
    recon = vae.decode(vae.encode(to_model_range(images)).latent_dist.mode()).sample  # (N, 3, H, W)
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rows = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)  # (3, 2H, N*W)
    return Image.fromarray(rows.permute(1, 2, 0).numpy())


# -----------------------------------------------------------------------------
# (b) latents


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch: int, progress: bool = True) -> torch.Tensor:
    """The VAE posterior of every image: (M, 2C, h, w) = mean and std stacked on channels."""
    out = []
    for start in tqdm(range(0, len(images), batch), desc="encode", disable=not progress):
        posterior = vae.encode(to_model_range(images[start : start + batch])).latent_dist
        out.append(torch.cat([posterior.mean, posterior.std], dim=1))  # (B, 2C, h, w)
    return torch.cat(out)


def sample_latents(posteriors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from each posterior (B, 2C, h, w) -> (B, C, h, w), unscaled."""
    mean, std = posteriors.chunk(2, dim=1)
    return mean + std * torch.randn(mean.shape, generator=generator)


# -----------------------------------------------------------------------------
# (c) UNet + text encoder


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023): min(SNR, gamma) / SNR."""
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]  # (B,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


class EMA:
    """Exponential moving average of parameters (shadow copies, float32)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget fast
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(pipe, posteriors: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, args,
               path: Path, fingerprint: dict) -> Stage:
    """Train pipe.unet and pipe.text_encoder jointly on latents of `posteriors` (M, 2C, h, w) with
    captions `input_ids` (M, L); a caption becomes `empty_ids` (L,) with probability args.caption_dropout.
    On return the modules hold their EMA weights."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = training_scheduler(args.pipeline)
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.unet_steps)
    ema = EMA(modules, args.ema_decay)
    stage = Stage()
    state = load_checkpoint(path, fingerprint)
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema.shadow = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        generator.set_state(state["generator"])
        stage = Stage(**state["stage"])
    unet.train()
    text_encoder.train()
    bar = tqdm(total=args.unet_steps, initial=stage.step, desc="unet", disable=not args.progress)
    running, started = [], time.time() - stage.seconds
    while stage.step < args.unet_steps:
        index = torch.randint(0, len(posteriors), (args.unet_batch,), generator=generator)  # (B,)
        latents = sample_latents(posteriors[index], generator) * scaling  # (B, C, h, w)
        drop = torch.rand(args.unet_batch, generator=generator) < args.caption_dropout  # (B,)
        ids = torch.where(drop[:, None], empty_ids[None], input_ids[index])  # (B, L)
        noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.unet_batch,),
                                  generator=generator)  # (B,)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
        text = text_encoder(ids)[0]  # (B, L, D)
        pred = unet(noisy, timesteps, text).sample  # (B, C, h, w)
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_sample * min_snr_weights(noise_scheduler, timesteps, args.snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update(stage.step)
        mse = per_sample.mean().item()  # the plain epsilon MSE, comparable across runs
        if stage.end_step(mse, running, bar, args.unet_steps, args, started, "mse"):
            save_checkpoint(path, dict(fingerprint=fingerprint, unet=unet.state_dict(),
                                       text_encoder=text_encoder.state_dict(), ema=ema.shadow,
                                       optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(),
                                       generator=generator.get_state(), stage=asdict(stage),
                                       scaling_factor=scaling))  # to sample from a checkpoint
    bar.close()
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()
    return stage


# -----------------------------------------------------------------------------
# samples


def sample_grid(pipe, prompts: list[str], per_prompt: int, seed: int, steps: int = 25, guidance: float = 5.0,
                text_width: int = 300) -> Image.Image:
    """One row per prompt: the prompt's text, then `per_prompt` images from seeds seed, seed + 1, ..."""
    size, _ = image_sizes(pipe)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for k in range(per_prompt):
        generator = torch.Generator().manual_seed(seed + k)
        images.append(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                           height=size, width=size).images)  # per prompt, one seed
    grid = Image.new("RGB", (text_width + per_prompt * size, len(prompts) * size), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        draw.multiline_text((4, row * size + 4), textwrap.fill(prompt, width=text_width // 6), fill="black")
        for k in range(per_prompt):
            grid.paste(images[k][row], (text_width + k * size, row * size))
    return grid


def held_out_prompts(count: int) -> list[str]:
    """Captions of identities the base never saw, smiling on every other one."""
    return [synthetic.caption(synthetic.sample_identity(SAMPLE_SEED + i), smiling=i % 2 == 1) for i in range(count)]


# -----------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder of the trained diffusers pipeline (replaced atomically).")
    parser.add_argument("--work-dir", default=None,
                        help="Checkpoints for resuming; default outputs/train_base/<name of --out>.")
    parser.add_argument("--toy", action="store_true", help="Tiny sizes that train in seconds (for the tests).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation and training randomness.")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED,
                        help="Seed of the first rendered identity (the weights dataset uses 0 .. 99,999).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    size = parser.add_argument_group("sizes (default: the 'full' preset, or 'toy' with --toy)")
    size.add_argument("--num-identities", type=int, help="Identities rendered for training.")
    size.add_argument("--images-per-identity", type=int, help="Images (views) per identity.")
    size.add_argument("--vae-steps", type=int, help="VAE optimisation steps.")
    size.add_argument("--vae-batch", type=int, help="VAE batch size.")
    size.add_argument("--vae-crop", type=int, help="Side of the random crops the VAE trains on first.")
    size.add_argument("--vae-full-steps", type=int, help="Last VAE steps, on full images instead of crops.")
    size.add_argument("--unet-steps", type=int, help="UNet + text encoder optimisation steps.")
    size.add_argument("--unet-batch", type=int, help="UNet batch size.")
    size.add_argument("--checkpoint-every", type=int, help="Steps between checkpoints.")
    size.add_argument("--log-every", type=int, help="Steps per logged mean loss.")
    size.add_argument("--samples", type=int, help="Prompts (rows) of the sample grid.")
    size.add_argument("--sample-steps", type=int, help="DDIM steps of the sample grid's images.")
    train = parser.add_argument_group("optimisation")
    train.add_argument("--vae-lr", type=float, default=1e-3, help="VAE AdamW learning rate (cosine decay).")
    train.add_argument("--vae-kl-weight", type=float, default=1e-6, help="KL weight, in LDM's units.")
    train.add_argument("--vae-edge-weight", type=float, default=1.0, help="Weight of the image-gradient L1 loss.")
    train.add_argument("--unet-lr", type=float, default=5e-4, help="UNet + text encoder AdamW learning rate.")
    train.add_argument("--warmup", type=int, default=100, help="Linear learning-rate warm-up steps.")
    train.add_argument("--caption-dropout", type=float, default=0.15,
                       help="Probability that a caption is replaced by the empty prompt (classifier-free guidance).")
    train.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-gamma loss weighting.")
    train.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of UNet and text encoder.")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    args = parser.parse_args(argv)

    preset = PRESETS["toy" if args.toy else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.work_dir is None:
        args.work_dir = os.path.join("outputs", "train_base", Path(args.out).name)
    positive = ["num_identities", "images_per_identity", "vae_steps", "vae_batch", "vae_crop", "unet_steps",
                "unet_batch", "checkpoint_every", "log_every", "samples", "sample_steps",
                "threads"]
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not 0 <= args.vae_full_steps <= args.vae_steps:
        parser.error(f"--vae-full-steps must be in [0, --vae-steps={args.vae_steps}], got {args.vae_full_steps}")
    if not 0 < args.vae_crop <= args.pipeline.image_size:
        parser.error(f"--vae-crop must be in [1, {args.pipeline.image_size}], got {args.vae_crop}")
    if not 0 <= args.caption_dropout < 1:
        parser.error(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


def main(args: argparse.Namespace) -> dict:
    """Train and write the pipeline to args.out; returns the training report (also in training.json)."""
    torch.set_num_threads(args.threads)
    config: TinyPipelineConfig = args.pipeline
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    images, captions = render_faces(args.first_seed, args.num_identities, args.images_per_identity,
                                    config.image_size, args.progress)  # (M, 3, H, W) uint8, (M,)
    render_seconds = time.time() - t0
    tokenizer = build_tokenizer(synthetic.CAPTION_WORDS, work / "tokenizer", max_length=config.max_length)
    longest = max(len(ids) for ids in tokenizer(captions).input_ids)
    assert longest <= config.max_length, f"a caption has {longest} tokens > max_length {config.max_length}"
    tokens = tokenizer(captions, padding="max_length", max_length=config.max_length, return_tensors="pt")
    empty_ids = tokenizer("", padding="max_length", max_length=config.max_length, return_tensors="pt").input_ids[0]
    pipe = build_pipeline(config, seed=args.seed, tokenizer=tokenizer)

    data = dict(seed=args.seed, first_seed=args.first_seed, num_identities=args.num_identities,
                images_per_identity=args.images_per_identity, pipeline=asdict(config))
    # step counts stay out of the fingerprints: a resumed run may be lengthened or shortened
    vae_fingerprint = dict(data, **{k: getattr(args, k) for k in (
        "vae_batch", "vae_crop", "vae_lr", "vae_kl_weight", "vae_edge_weight")})
    vae_stage = train_vae(pipe.vae, images, args, work / "vae.pt", vae_fingerprint)
    reconstructions = reconstruction_grid(pipe.vae, images[:: max(1, len(images) // 12)][:12])
    reconstructions.save(work / "reconstructions.png")

    t1 = time.time()
    posteriors = encode_posteriors(pipe.vae, images, batch=64, progress=args.progress)  # (M, 2C, h, w)
    latent_std = sample_latents(posteriors, torch.Generator().manual_seed(args.seed)).std().item()
    pipe.vae.register_to_config(scaling_factor=1.0 / latent_std)
    encode_seconds = time.time() - t1

    unet_fingerprint = dict(vae_fingerprint, vae_steps=vae_stage.step, **{k: getattr(args, k) for k in (
        "unet_batch", "unet_lr", "warmup", "caption_dropout", "snr_gamma", "ema_decay")})
    unet_stage = train_unet(pipe, posteriors, tokens.input_ids, empty_ids, args, work / "unet.pt", unet_fingerprint)

    t2 = time.time()
    grid = sample_grid(pipe, held_out_prompts(args.samples), per_prompt=4, seed=args.seed, steps=args.sample_steps)
    pngs = {}
    for name, picture in (("samples.png", grid), ("reconstructions.png", reconstructions)):
        pngs[name] = io.BytesIO()
        picture.save(pngs[name], format="PNG")
    report = dict(
        parameters={n: count_parameters(getattr(pipe, n)) for n in ("unet", "text_encoder", "vae")},
        images=len(images), longest_caption_tokens=longest, scaling_factor=pipe.vae.config.scaling_factor,
        vae=dict(steps=vae_stage.step, seconds=vae_stage.seconds, loss=vae_stage.losses),
        unet=dict(steps=unet_stage.step, seconds=unet_stage.seconds, epsilon_mse=unet_stage.losses),
        seconds=dict(render=render_seconds, encode=encode_seconds, samples=time.time() - t2),
        args={k: (asdict(v) if k == "pipeline" else v) for k, v in vars(args).items()},
    )
    save_pipeline(pipe, args.out, extra_files={"training.json": json.dumps(report, indent=1).encode(),
                                               **{name: png.getvalue() for name, png in pngs.items()}})
    print(f"wrote {args.out} ({sum(report['parameters'].values()) / 1e6:.2f} M parameters, "
          f"VAE {vae_stage.seconds / 60:.1f} min, UNet {unet_stage.seconds / 60:.1f} min)")
    return report


if __name__ == "__main__":
    main(parse_args())
