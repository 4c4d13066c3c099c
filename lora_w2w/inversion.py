"""Inversion (Dravid et al. 2024, Sec. 4.3): the model of a w2w space that best reproduces one image.

Adam on the first K coefficients c, started from zero, minimises the diffusion loss of the model with
weights w = unproject(c) on the image: mean |m * (eps_theta(x_t, t, "sks person"; w) - eps)|^2 over
random timesteps t and noise eps, with x_0 drawn from the image's VAE latent distribution and m an
optional mask at latent resolution. The latent distribution and the prompt's embedding are computed
once; every step draws a new latent from them.

    pipe = load_base_pipeline("files/tiny/base")
    space = load_space("files/tiny/space")
    image, mask = load_target("inversion/images/drawing.png", "inversion/images/drawing_mask.png", *target_sizes(pipe))
    model = invert(pipe, space, image, mask, preset("ood", space), seed=0, checkpoint="drawing.ckpt")
    save_model(model, "drawing.safetensors")

Presets (the paper's): "real" photographs, K 10,000, lr 0.1, weight decay 1e-10, 400 steps; "ood"
paintings and other out-of-distribution images, K 1,000, lr 1, 800 steps. `preset(name, space)` fits
one to a space: K at most the space's, and the settings the space records for it (the tiny space
records lr 0.1 for "ood": with 14,336 standardized weights instead of 99,648 its coefficients are
smaller, and at lr 1 they walk far off the dataset; and lr 0.3 for "real": at 0.1 they have not
converged in 400 steps). A model that ends far outside the dataset's spread (a learning rate too
high for the space) draws a warning.

Masks are binary images, white where the image is fitted; `check_mask` states the rule for "binary".
A checkpoint (coefficients, Adam state, step, random state) is written every `checkpoint_every`
steps; a run given an existing checkpoint resumes from it and ends exactly where an uninterrupted
run ends.

Letters: K components, N flattened LoRA numbers, C latent channels, h x w latent size, R image size,
L tokens, D text width.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .dreambooth import Batch, StepSampler, encode_images, encode_prompt, prepare_image
from .errors import SpaceError, W2WError
from .layout import LoraLayout
from .network import LoraUNet
from .space import TRIGGER_PROMPT, Space, W2WModel, unproject
from .storage import load_state, save_state

CHECKPOINT_FORMAT = "w2w-inversion-checkpoint"

# A mask is binary when, after conversion to L, at most MASK_GREY_FRACTION of its pixels lie strictly
# between MASK_BLACK and MASK_WHITE: the grey allowed is antialiasing along edges and JPEG noise, not
# a grey-scale picture. It is then thresholded at 128.
MASK_BLACK, MASK_WHITE = 16, 239
MASK_GREY_FRACTION = 0.05
ASPECT_TOLERANCE = 0.01  # relative difference of aspect ratios under which a mask fits its image
# An inverted model whose coefficients' norm passes FAR_FROM_DATASET x the largest dataset model's has walked
# off the space's distribution (a learning rate too high for its scale) and draws noise: on the tiny space,
# good inversions end within 1.3x, a run at 10x the tiny space's learning rate at 6.7x.
FAR_FROM_DATASET = 3.0


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of one inversion."""

    components: int = 10_000     # K: the first K coefficients are optimised; must be <= the space's K
    lr: float = 0.1              # Adam learning rate
    weight_decay: float = 1e-10  # Adam's L2 penalty on the coefficients
    steps: int = 400             # optimiser steps (the original's "epochs" over its one image)
    checkpoint_every: int = 50   # steps between checkpoints, when a checkpoint path is given

    def __post_init__(self):
        checks = [("components", self.components >= 1, ">= 1"), ("steps", self.steps >= 1, ">= 1"),
                  ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("checkpoint_every", self.checkpoint_every >= 1, ">= 1")]
        for name, ok, expected in checks:
            if not ok:
                raise W2WError(f"inversion {name} must be {expected}, got {getattr(self, name)}")


PRESETS = {
    "real": InversionConfig(components=10_000, lr=0.1, weight_decay=1e-10, steps=400),
    "ood": InversionConfig(components=1_000, lr=1.0, weight_decay=0.0, steps=800),
}


def preset(name: str, space: Space | None = None, **overrides) -> InversionConfig:
    """The paper's PRESETS[name], fitted to `space` when given (the settings the space records for the
    preset, such as a learning rate measured on its scale, and K at most the space's), then the
    overrides that are not None."""
    if name not in PRESETS:
        raise W2WError(f"unknown inversion preset {name!r}; expected one of {', '.join(PRESETS)}")
    config = PRESETS[name]
    if space is not None:
        recorded = space.inversion_presets.get(name, {})
        unknown = sorted(set(recorded) - {f.name for f in dataclasses.fields(InversionConfig)})
        if unknown:
            raise SpaceError(f"the space's inversion preset {name!r} has unknown settings {', '.join(unknown)}; "
                             f"expected some of components, lr, weight_decay, steps")
        config = dataclasses.replace(config, **recorded)
        config = dataclasses.replace(config, components=min(config.components, space.num_components))
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, as the original (float16 gradients can underflow), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- target image and mask

def target_sizes(pipe) -> tuple[int, int]:
    """(image resolution R, latent size h) of a pipeline: (512, 64) for SD1.5, (64, 16) for the tiny world."""
    latent_size = int(pipe.unet.config.sample_size)
    return latent_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1), latent_size


def open_image(source: str | os.PathLike | Image.Image, what: str = "image") -> Image.Image:
    """A PIL image from a path (loaded now) or as given; W2WError naming the file when it does not open."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise W2WError(f"{source}: no such {what} file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise W2WError(f"{source}: not a readable {what} ({error})") from None


def check_mask(mask: Image.Image, image_size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """The mask as a 0/255 array (H, W) after checking that it is binary (see MASK_GREY_FRACTION), not
    all black, and of the image's size or aspect ratio (so that both crop to the same region)."""
    (width, height), (image_width, image_height) = mask.size, image_size
    if abs((width / height) / (image_width / image_height) - 1) > ASPECT_TOLERANCE:
        raise W2WError(f"{name}: the mask is {width}x{height} but the image is {image_width}x{image_height}; "
                       f"expected the image's size or a scaled copy of it (same aspect ratio)")
    values = np.asarray(mask.convert("L"))  # (H, W) uint8
    grey = float(((values > MASK_BLACK) & (values < MASK_WHITE)).mean())
    if grey > MASK_GREY_FRACTION:
        raise W2WError(f"{name}: not a binary mask: {grey:.0%} of its pixels are grey (between {MASK_BLACK} and "
                       f"{MASK_WHITE}); expected black (0) and white (255), grey only on antialiased edges "
                       f"(at most {MASK_GREY_FRACTION:.0%} of the pixels)")
    binary = np.where(values >= 128, 255, 0).astype(np.uint8)
    if not binary.any():
        raise W2WError(f"{name}: the mask is black everywhere; expected white (255) where the image is to be fitted")
    return binary


def load_mask(mask: str | os.PathLike | Image.Image, image_size: tuple[int, int], resolution: int,
              latent_size: int) -> torch.Tensor:
    """A binary mask image -> (1, 1, h, w) in [0, 1] at latent resolution: cropped like the image, then each
    latent cell holds the fraction of its pixels that are white."""
    name = "mask" if isinstance(mask, Image.Image) else str(mask)
    binary = check_mask(open_image(mask, "mask"), image_size, name)
    pixels = (prepare_image(Image.fromarray(binary), resolution)[:1] + 1) / 2  # (1, R, R)
    cells = F.adaptive_avg_pool2d(pixels.clamp(0, 1)[None], latent_size)      # (1, 1, h, w)
    if not cells.any():
        raise W2WError(f"{name}: the white region lies outside the image's centre crop; nothing left to fit")
    return cells


def load_target(image: str | os.PathLike | Image.Image, mask: str | os.PathLike | Image.Image | None,
                resolution: int, latent_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Any image (size, mode) -> (1, 3, R, R) in [-1, 1], resized and centre-cropped; the mask (or None)
    -> (1, 1, h, w) in [0, 1] over the same crop (see `load_mask`)."""
    picture = open_image(image, "image")
    target = prepare_image(picture, resolution)[None]  # (1, 3, R, R)
    return target, None if mask is None else load_mask(mask, picture.size, resolution, latent_size)


# ----------------------------------------------------------------------------- the loss

@dataclass
class Target:
    """What every step needs of the image and the prompt, computed once."""

    latent_mean: torch.Tensor    # (1, C, h, w), unscaled
    latent_std: torch.Tensor     # (1, C, h, w)
    mask: torch.Tensor | None    # (1, 1, h, w) in [0, 1]
    text: torch.Tensor           # (1, L, D) embedding of the prompt, in the UNet's dtype
    scaling_factor: float        # vae.config.scaling_factor
    dtype: torch.dtype           # the UNet's (reading unet.dtype walks all its parameters)


def encode_target(pipe, image: torch.Tensor, mask: torch.Tensor | None, prompt: str) -> Target:
    """Encode the image (1, 3, R, R) with the VAE and the prompt with the text encoder, once."""
    mean, std = encode_images(pipe.vae, image)  # (1, C, h, w) each
    if mask is not None and mask.shape != (1, 1, *mean.shape[2:]):
        raise W2WError(f"mask {tuple(mask.shape)} does not fit the latent {tuple(mean.shape)}: expected "
                       f"(1, 1, {mean.shape[2]}, {mean.shape[3]}); load it with load_target")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    return Target(mean.to(device), std.to(device), None if mask is None else mask.to(device),
                  encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt).to(device, dtype),
                  float(pipe.vae.config.scaling_factor), dtype)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (m * (prediction - target))^2 over all elements, as the original (masked cells count as 0)."""
    error = prediction.float() - target.float()  # (1, C, h, w)
    return (error if mask is None else mask * error).square().mean()


def inversion_loss(lora_unet: LoraUNet, basis: tuple[torch.Tensor, ...], coefficients: torch.Tensor,
                   target: Target, scheduler, batch: Batch) -> torch.Tensor:
    """The diffusion loss of the model `coefficients` (K,) in `basis` (mean, std, components) for one draw."""
    device = target.latent_mean.device
    latent_noise, noise, timesteps = (x.to(device) for x in (batch.latent_noise, batch.noise, batch.timesteps))
    latents = (target.latent_mean + target.latent_std * latent_noise) * target.scaling_factor  # (1, C, h, w)
    noisy = scheduler.add_noise(latents, noise, timesteps)                                    # (1, C, h, w)
    weights = unproject(coefficients, *basis)                                                 # (N,)
    prediction = lora_unet(weights, noisy.to(target.dtype), timesteps, target.text).sample      # (1, C, h, w)
    if scheduler.config.prediction_type == "v_prediction":
        noise = scheduler.get_velocity(latents, noise, timesteps)
    return masked_mse(prediction, noise, target.mask)


@contextmanager
def differentiable_unet(unet, layout: LoraLayout) -> Iterator[LoraUNet]:
    """A LoraUNet over `unet` with every base weight frozen; afterwards the UNet is as it was (its
    layers and requires_grad flags restored)."""
    lora_unet = LoraUNet(unet, layout)
    try:
        yield lora_unet
    finally:
        lora_unet.remove()


# ----------------------------------------------------------------------------- checkpoints

def run_fingerprint(space: Space, config: InversionConfig, seed: int, image: torch.Tensor,
                    mask: torch.Tensor | None) -> dict:
    """What a checkpoint must share with a run to resume it (the number of steps may grow)."""
    digest = hashlib.sha256(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if mask is not None:
        digest.update(mask.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"space": space.id, "components": config.components, "lr": config.lr,
            "weight_decay": config.weight_decay, "seed": seed, "image": digest.hexdigest()[:16]}


def save_checkpoint(path: str | os.PathLike, fingerprint: dict, step: int, coefficients: torch.Tensor,
                    optimizer: torch.optim.Optimizer, sampler: StepSampler) -> None:
    """Write the state of a run after `step` steps (atomically)."""
    save_state(path, CHECKPOINT_FORMAT, {"fingerprint": fingerprint, "step": step,
                                         "coefficients": coefficients.detach().cpu(),
                                         "optimizer": optimizer.state_dict(), "rng": sampler.generator.get_state()})


def load_checkpoint(path: str | os.PathLike, fingerprint: dict, coefficients: torch.Tensor,
                    optimizer: torch.optim.Optimizer, sampler: StepSampler) -> int:
    """Restore a run's state from `path`; returns the number of steps it had done."""
    state = load_state(path, CHECKPOINT_FORMAT)
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise W2WError(f"{path}: a checkpoint of another run ({key} {state['fingerprint'].get(key)!r} there, "
                           f"{value!r} here); delete it or choose another checkpoint path")
    with torch.no_grad():
        coefficients.copy_(state["coefficients"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.generator.set_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------- inversion

def invert(pipe, space: Space, image: torch.Tensor, mask: torch.Tensor | None = None,
           config: InversionConfig = PRESETS["real"], seed: int = 0, progress: bool = True,
           checkpoint: str | os.PathLike | None = None,
           on_step: Callable[[int, int, float], None] | None = None) -> W2WModel:
    """The model (K coefficients) of `space` that best reproduces `image` (1, 3, R, R) in [-1, 1], inside
    `mask` (1, 1, h, w) when given. With `checkpoint`, the run's state is saved there every
    `config.checkpoint_every` steps and at the end, and a run finding it there resumes from it.
    `on_step(done, total, loss)` is called after every step (the app's progress bar)."""
    k = space.check_k(config.components)
    device = pipe.unet.device
    basis = tuple(t.to(device, torch.float32) for t in (space.mean, space.std, space.components[:k]))  # (N,) (N,) (K, N)
    target = encode_target(pipe, image, mask, space.prompt or TRIGGER_PROMPT)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    sampler = StepSampler(seed, 1, 0, 1, tuple(target.latent_mean.shape[1:]), scheduler.config.num_train_timesteps)
    coefficients = torch.zeros(k, device=device, requires_grad=True)  # (K,)
    optimizer = torch.optim.Adam([coefficients], lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = run_fingerprint(space, config, seed, image, mask)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = load_checkpoint(checkpoint, fingerprint, coefficients, optimizer, sampler)
        if start > config.steps:
            raise W2WError(f"{checkpoint}: the checkpoint is at step {start}, past the {config.steps} steps asked for")

    with differentiable_unet(pipe.unet, space.layout) as lora_unet:
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="inversion",
                   disable=not progress)
        for step in bar:
            loss = inversion_loss(lora_unet, basis, coefficients, target, scheduler, sampler.next())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            done = step + 1
            if on_step is not None:
                on_step(done, config.steps, loss.item())
            if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(checkpoint, fingerprint, done, coefficients, optimizer, sampler)
    model = W2WModel(coefficients.detach().cpu(), space.id)
    far = norm_over_dataset(space, model.coefficients)
    if far is not None and far > FAR_FROM_DATASET:
        warnings.warn(f"the inverted model lies far outside the space's dataset (its coefficients' norm is {far:.1f}x "
                      f"the largest dataset model's) and likely draws noise: the learning rate {config.lr:g} is too "
                      f"high for this space; try {config.lr / 10:g}", stacklevel=2)
    return model


def norm_over_dataset(space: Space, coefficients: torch.Tensor) -> float | None:
    """|c| over the largest norm of a dataset model, on the first coefficients both have (None when the
    space has no dataset coefficients)."""
    if space.coefficients is None:
        return None
    k = min(len(coefficients), space.coefficients.shape[1])
    return float(coefficients[:k].float().norm() / space.coefficients[:, :k].float().norm(dim=1).max())


def invert_file(base: str, space: Space, image: str | os.PathLike, mask: str | os.PathLike | None = None,
                config: InversionConfig = PRESETS["real"], seed: int = 0, device: str | torch.device = "auto",
                dtype: torch.dtype | None = None, checkpoint: str | os.PathLike | None = None,
                progress: bool = True) -> W2WModel:
    """Load the base pipeline (a folder or hub id), check that the space fits its UNet, load the image
    and mask files and invert (for the CLI and inversion/invert.py)."""
    from .network import check_layout
    from .pipeline import load_base_pipeline, resolve_device

    space.check_k(config.components)
    open_image(image, "image")  # a missing or corrupt file fails before the pipeline loads
    device = resolve_device(device)
    pipe = load_base_pipeline(base, device, dtype or default_dtype(device), progress=False)
    check_layout(pipe.unet, space.layout)
    target, target_mask = load_target(image, mask, *target_sizes(pipe))
    return invert(pipe, space, target, target_mask, config, seed, progress, checkpoint)
