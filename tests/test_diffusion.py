"""What training and inversion feed the diffusion model: a pipeline's image and latent sizes, images
prepared at that resolution, the seeded stream of draws, and the noisy latents with their target."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from lora_w2w.diffusion import StepSampler, image_sizes, noisy_latents, prepare_image
from lora_w2w.pipeline import load_base_pipeline

ROOT = Path(__file__).resolve().parents[1]


def configs(sample_size: int, vae_channels: tuple[int, ...]) -> SimpleNamespace:
    """What image_sizes reads of a pipeline: the UNet's sample size and the VAE's stages."""
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
                           vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=vae_channels)))


# ----------------------------------------------------------------------------- sizes

def test_image_sizes_of_the_toy_pipeline_are_diffusers_own(toy_world):
    """32 px images, 8 x 8 latents: the VAE's three stages halve the image twice, as the pipeline's
    vae_scale_factor says."""
    pipe = load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)
    assert image_sizes(pipe) == (32, 8)
    assert image_sizes(pipe) == (pipe.unet.config.sample_size * pipe.vae_scale_factor, pipe.unet.config.sample_size)


@pytest.mark.skipif(not (ROOT / "files" / "tiny" / "base" / "unet").is_dir(), reason="the tiny world is not built")
def test_image_sizes_of_the_tiny_world_and_sd15():
    """The tiny world draws 64 px from 16 x 16 latents; SD1.5 (four VAE stages) 512 px from 64 x 64."""
    pipe = load_base_pipeline(str(ROOT / "files" / "tiny" / "base"), device="cpu", progress=False)
    assert image_sizes(pipe) == (64, 16) == (pipe.unet.config.sample_size * pipe.vae_scale_factor,
                                             pipe.unet.config.sample_size)
    assert image_sizes(configs(64, (128, 256, 512, 512))) == (512, 64)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_prepare_image_is_a_square_in_minus_one_to_one(mode):
    """Any mode and size: the shorter side resized to R, the centre cut out, (3, R, R) float32 in [-1, 1]."""
    wide = Image.new("RGB", (96, 48), (0, 0, 0))
    wide.paste((255, 255, 255), (12, 0, 84, 48))  # white around the centre square, black sides
    if mode == "I;16":  # 16 bits per pixel: white is 65535
        image = Image.fromarray(np.asarray(wide.convert("L")).astype(np.uint16) * 257)
    else:
        image = wide.convert(mode)
    pixels = prepare_image(image, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels, torch.ones(3, 16, 16), atol=1e-6)  # only the white centre is left


def test_prepare_image_maps_black_to_minus_one_and_keeps_a_square():
    black = prepare_image(Image.new("RGB", (40, 40)), 40)
    assert torch.equal(black, -torch.ones(3, 40, 40))
    grey = prepare_image(Image.new("L", (10, 20), 51), 8)  # tall and grey: resized up, cut to the square
    assert grey.shape == (3, 8, 8) and torch.allclose(grey, torch.full((3, 8, 8), 51 / 127.5 - 1))


# ----------------------------------------------------------------------------- the seeded stream

SETTINGS = dict(num_instance=5, num_class=7, batch_size=2, latent_shape=(4, 3, 3), num_train_timesteps=1000)


def test_step_sampler_draws_from_its_seed_alone():
    """Two samplers of one seed draw the same batches; another seed other ones; the draws are, in order,
    instance indices, class indices, latent noise, diffusion noise and timesteps of one CPU generator
    (what checkpoints and the solo-run equivalence rely on)."""
    first, second = StepSampler(3, **SETTINGS), StepSampler(3, **SETTINGS)
    for _ in range(3):
        a, b = first.next(), second.next()
        assert all(torch.equal(getattr(a, f), getattr(b, f))
                   for f in ("instance", "prior", "latent_noise", "noise", "timesteps"))
    g = torch.Generator().manual_seed(4)
    batch = StepSampler(4, **SETTINGS).next()
    assert torch.equal(batch.instance, torch.randint(5, (2,), generator=g))
    assert torch.equal(batch.prior, torch.randint(7, (2,), generator=g))
    assert torch.equal(batch.latent_noise, torch.randn(4, 4, 3, 3, generator=g))
    assert torch.equal(batch.noise, torch.randn(4, 4, 3, 3, generator=g))
    assert torch.equal(batch.timesteps, torch.randint(1000, (4,), generator=g))
    assert not torch.equal(StepSampler(5, **SETTINGS).next().noise, batch.noise)


def test_step_sampler_without_class_images_draws_instances_only():
    batch = StepSampler(0, **{**SETTINGS, "num_class": 0}).next()
    assert batch.prior.shape == (0,) and batch.noise.shape == (2, 4, 3, 3) and batch.timesteps.shape == (2,)


def test_step_sampler_takes_its_settings_by_name():
    with pytest.raises(TypeError):
        StepSampler(0, 5, 7, 2, (4, 3, 3), 1000)


# ----------------------------------------------------------------------------- noisy latents

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_latents_and_their_target(prediction_type):
    """x_0 = (mean + std * latent noise) * scaling factor, noised by the scheduler; the target is the
    noise, or the velocity for a v-prediction scheduler."""
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    batch = StepSampler(1, **SETTINGS).next()
    mean, std = torch.randn(4, 4, 3, 3), torch.rand(4, 4, 3, 3)
    noisy, timesteps, target = noisy_latents(mean, std, batch, scaling_factor=0.5, scheduler=scheduler)
    latents = (mean + std * batch.latent_noise) * 0.5
    assert torch.equal(timesteps, batch.timesteps)
    assert torch.equal(noisy, scheduler.add_noise(latents, batch.noise, batch.timesteps))
    expected = batch.noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, batch.noise,
                                                                                        batch.timesteps)
    assert torch.equal(target, expected)


def test_noisy_latents_go_where_the_latent_distributions_are():
    """The sampler draws on the CPU; the step's tensors follow the cached latents (the meta device stands
    in for CUDA)."""
    latents = torch.zeros(4, 4, 3, 3, device="meta")
    outputs = noisy_latents(latents, latents, StepSampler(0, **SETTINGS).next(), scaling_factor=0.18215,
                            scheduler=DDPMScheduler())
    assert {t.device.type for t in outputs} == {"meta"}
