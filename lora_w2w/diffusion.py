"""What training and inversion both feed a diffusion model: images at the pipeline's resolution, their
VAE latent distributions, prompt embeddings, and the seeded draws of images, latents, noise and
timesteps that make the noisy latents x_t and the UNet's training target.

    resolution, latent_size = image_sizes(pipe)                       # (512, 64) for SD1.5
    images = torch.stack([prepare_image(picture, resolution)])         # (I, 3, R, R) in [-1, 1]
    mean, std = encode_images(pipe.vae, images)                        # (I, C, h, w) each
    text = encode_prompt(pipe.tokenizer, pipe.text_encoder, "sks person")  # (1, L, D)
    sampler = StepSampler(0, num_instance=len(mean), num_class=0, batch_size=1,
                          latent_shape=tuple(mean.shape[1:]), num_train_timesteps=1000)
    batch = sampler.next()
    noisy, timesteps, target = noisy_latents(mean[batch.instance], std[batch.instance], batch,
                                             scaling_factor=pipe.vae.config.scaling_factor, scheduler=scheduler)

Letters: I images, b instance samples per step, n samples per step (instance and class), C latent
channels, h x w latent size, R image size, L tokens, D text width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import eight_bit


# ----------------------------------------------------------------------------- images

def image_sizes(pipe) -> tuple[int, int]:
    """(image resolution R, latent size h) of anything with a `unet` and a `vae` (a pipeline of a UNet family;
    `bases.Family.image_sizes` for any family): (512, 64) for SD1.5, (64, 16) for the tiny world. Each VAE
    stage but the last halves R."""
    latent_size = int(pipe.unet.config.sample_size)
    return latent_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1), latent_size


def prepare_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """Any mode and size -> RGB, shorter side resized to `resolution`, centre-cropped; (3, R, R) in [-1, 1]."""
    image = eight_bit(image)
    image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA", "RGBA") else image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


# ----------------------------------------------------------------------------- encoders

def encode_batch_size(resolution: int) -> int:
    """Images VAE-encoded at once: 32 at 64 px, 1 at 512 px."""
    return max(1, 2**17 // resolution**2)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (I, 3, R, R) -> latent distribution mean and std (I, C, h, w), unscaled; `encode_batch_size`
    images at a time, so that the phase stays below a training step's memory (benchmarks/README.md)."""
    means, stds = [], []
    for chunk in images.split(encode_batch_size(images.shape[-1])):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    """prompt -> text embedding (1, L, D), as the pipeline computes it."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


# ----------------------------------------------------------------------------- noise and timesteps

@dataclass
class StepBatch:
    """One step's randomness: b instance then b class samples (n in all)."""

    instance: torch.Tensor   # (b,) indices into the instance images
    prior: torch.Tensor      # (b,) indices into the class images (empty without class images)
    latent_noise: torch.Tensor  # (n, C, h, w) draws from N(0, 1) for sampling the latent distributions
    noise: torch.Tensor      # (n, C, h, w) the diffusion noise
    timesteps: torch.Tensor  # (n,)


class StepSampler:
    """The random stream of one run, from its seed alone, drawn on the CPU: an identity trained among many
    sees the batches, latents, noise and timesteps of a solo run with the same seed, and runs agree
    across devices."""

    def __init__(self, seed: int, *, num_instance: int, num_class: int, batch_size: int,
                 latent_shape: tuple[int, ...], num_train_timesteps: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.num_instance, self.num_class, self.batch_size = num_instance, num_class, batch_size
        self.latent_shape, self.num_train_timesteps = latent_shape, num_train_timesteps

    def next(self) -> StepBatch:
        g, b = self.generator, self.batch_size
        instance = torch.randint(self.num_instance, (b,), generator=g)
        prior = torch.randint(self.num_class, (b,), generator=g) if self.num_class else torch.zeros(0, dtype=torch.long)
        n = b + len(prior)
        return StepBatch(instance, prior, torch.randn(n, *self.latent_shape, generator=g),
                     torch.randn(n, *self.latent_shape, generator=g),
                     torch.randint(self.num_train_timesteps, (n,), generator=g))


def latent_factors(vae) -> tuple[float, float | None]:
    """(scaling factor, shift factor) of a VAE's config: x_0 = (z - shift) * scaling for a latent z of the
    VAE (SD1.5 0.18215 and no shift; SDXL 0.13025; FLUX.1 0.3611 and 0.1159)."""
    return float(vae.config.scaling_factor), vae.config.get("shift_factor")


def noisy_latents(mean: torch.Tensor, std: torch.Tensor, batch: StepBatch, *, scaling_factor: float,
                  scheduler, shift_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent distributions (n, C, h, w) of a batch's n samples -> (noisy latents x_t (n, C, h, w),
    timesteps (n,), the UNet's target (n, C, h, w): the noise, or the velocity for a v-prediction
    scheduler), on the device of `mean`: x_0 = (mean + std * latent noise - shift_factor) * scaling_factor."""
    latent_noise, noise, timesteps = (t.to(mean.device) for t in (batch.latent_noise, batch.noise, batch.timesteps))
    latents = mean + std * latent_noise                                  # (n, C, h, w)
    if shift_factor is not None:
        latents = latents - shift_factor
    latents = latents * scaling_factor                                   # (n, C, h, w)
    noisy = scheduler.add_noise(latents, noise, timesteps)              # (n, C, h, w)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise
