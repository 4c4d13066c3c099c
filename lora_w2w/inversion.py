"""Inversion (Dravid et al. 2024, Sec. 4.3): the model of a w2w space that best reproduces a person's images.

Adam on the first K coefficients c, started from zero, minimises the diffusion loss of the model with
weights w = unproject(c) on the images: mean |m * (eps_theta(x_t, t, "sks person"; w) - eps)|^2 over
random timesteps t and noise eps, with x_0 drawn from an image's VAE latent distribution and m its
optional mask at latent resolution. The latent distributions and the prompt's embedding are computed
once; every step draws an image (one of I photographs of the person, seeded) and a new latent from it,
so that the loss is averaged over the photographs. With one image this is the paper's inversion. The
base's family (`bases`) conditions and calls its network and sets the target (the noise eps above, or the
velocity of a v-prediction scheduler or of FLUX's flow matching).

    pipe = load_base_pipeline(DEFAULT_BASE)  # lora_w2w.defaults: the tiny world
    space = load_space(DEFAULT_SPACE)
    image, mask = load_target(EXAMPLES / "drawing.png", EXAMPLES / "drawing_mask.png", *image_sizes(pipe))
    model = invert(pipe, space, image, mask, preset("ood", space), seed=0, checkpoint="drawing.ckpt")
    save_model(model, "drawing.safetensors")

    # photographs: FFHQ's aligned face crop, a mask from the face's landmarks, several images of one person
    photos = read_photos(["me1.jpg", "me2.jpg"], [AUTO_MASK, AUTO_MASK], crop="face", size=image_sizes(pipe)[0])
    model = invert(pipe, space, *photo_targets(photos, *image_sizes(pipe)), preset("real", space))

Presets (the paper's): "real" photographs, K 10,000, lr 0.1, weight decay 1e-10, 400 steps; "ood"
paintings and other out-of-distribution images, K 1,000, lr 1, 800 steps. `preset(name, space)` fits
one to a space: K at most the space's, and the settings the space records for it (the tiny space
records its own learning rates, tiny/build.py's INVERSION_PRESETS: Adam moves each coefficient by
about lr a step, so the right lr depends on the scale of the space's coefficients). A model that ends
far outside the dataset's spread (a learning rate too high for the space) draws a warning.

Masks are binary images, white where the image is fitted; `check_mask` states the rule for "binary".
The automatic mask (AUTO_MASK) covers the face, forehead and hair, from the landmarks `faces` finds.
A checkpoint (coefficients, Adam state, step, random state) is written every `checkpoint_every`
steps; a run given an existing checkpoint resumes from it and ends exactly where an uninterrupted
run ends.

Letters: K components, N flattened LoRA numbers, I images of the person, B images drawn per step,
C latent channels, h x w latent size, R image size, L tokens, D text width.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .bases import Conditioning, Family, family_of
from .checks import (COUNT, LEARNING_RATE, WEIGHT_DECAY, check_int, check_learning_rate, check_seed,
                     check_weight_decay)
from .diffusion import StepBatch, StepSampler, encode_images, latent_factors, prepare_image
from .errors import SpaceError, W2WError
from .images import IMAGE_SUFFIXES, check_picture, eight_bit, read_image
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
# off the space's distribution (a learning rate too high for its scale) and draws noise (measured on the tiny
# space: files/tiny/README.md, "Inversion learning rates and distance from the dataset").
FAR_FROM_DATASET = 3.0
CROPS = ("center", "face")  # how a photograph becomes the square the model sees (see read_photos)
AUTO_MASK = "auto"          # the mask value asking for a mask over the face, forehead and hair from its landmarks
ALIGNED_SIZE = 512          # px of a face crop where the pipeline's resolution is not given: SD1.5's


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of one inversion (the real preset's by default); its fields are `w2w invert`'s flags,
    which default to the preset's."""

    components: int = field(default=10_000, metadata={
        "help": "K, the first K coefficients are optimised: at most the space's K (default: the preset's, at most "
                "the space's)", "type": COUNT, "flags": ("-k",)})
    lr: float = field(default=0.1, metadata={
        "help": "Adam learning rate (default: the preset's, or the one the space records for it)", "type": LEARNING_RATE})
    weight_decay: float = field(default=1e-10, metadata={
        "help": "Adam's L2 penalty on the coefficients (default: the preset's)", "type": WEIGHT_DECAY})
    steps: int = field(default=400, metadata={"help": "optimiser steps, the original's epochs (default: the preset's)",
                                              "type": COUNT})
    checkpoint_every: int = field(default=50, metadata={
        "help": "steps between checkpoints, when a checkpoint file is given (default: 50)", "type": COUNT})
    images_per_step: int = field(default=1, metadata={
        "help": "B, images of the person each step draws (with replacement) and averages; more cost more per step "
                "(default: 1)", "type": COUNT})

    def __post_init__(self):
        for name in ("components", "steps", "checkpoint_every", "images_per_step"):
            check_int(getattr(self, name), f"inversion {name}", minimum=1)
        check_learning_rate(self.lr, "inversion lr")
        check_weight_decay(self.weight_decay, "inversion weight_decay")


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


# ----------------------------------------------------------------------------- target image and mask


def open_image(source: str | os.PathLike | Image.Image, what: str = "image") -> Image.Image:
    """A PIL image from a path (`images.read_image`: loaded now, upright, 8 bits) or as given, within the
    reader's bounds; W2WError naming the file when it does not open."""
    if isinstance(source, Image.Image):
        return check_picture(source, what)
    return read_image(source, what)


def check_mask(mask: Image.Image, image_size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """The mask as a 0/255 array (H, W) after checking that it is binary (see MASK_GREY_FRACTION), not
    all black, and of the image's size or aspect ratio (so that both crop to the same region)."""
    (width, height), (image_width, image_height) = mask.size, image_size
    if abs((width / height) / (image_width / image_height) - 1) > ASPECT_TOLERANCE:
        raise W2WError(f"{name}: the mask is {width}x{height} but the image is {image_width}x{image_height}; "
                       f"expected the image's size or a scaled copy of it (same aspect ratio)")
    values = np.asarray(eight_bit(mask, name).convert("L"))  # (H, W) uint8
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
    """A binary mask image -> (1, 1, h, w) in [0, 1] at latent resolution (see `pool_mask`)."""
    name = "mask" if isinstance(mask, Image.Image) else str(mask)
    return pool_mask(check_mask(open_image(mask, "mask"), image_size, name), resolution, latent_size, name)


def pool_mask(values: np.ndarray, resolution: int, latent_size: int, name: str = "mask") -> torch.Tensor:
    """A mask (H, W) of 0..255 -> (1, 1, h, w) in [0, 1]: cropped like its image, then each latent cell
    holds the mean of its pixels (the fraction that is white, for a binary mask)."""
    pixels = (prepare_image(Image.fromarray(values), resolution)[:1] + 1) / 2  # (1, R, R)
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


@dataclass
class Photo:
    """One image as it is fitted: the picture after the crop, and its mask over it (or None)."""

    name: str
    picture: Image.Image
    mask: np.ndarray | None  # (H, W) 0..255 over the picture: binary from a file, soft when automatic
    auto: bool               # the mask was drawn around the detected face (AUTO_MASK)


def read_photos(images: Sequence[str | os.PathLike | Image.Image],
                masks: Sequence[str | os.PathLike | Image.Image | None] | None = None,
                crop: str = "center", size: int = ALIGNED_SIZE, detector: str = "hog") -> list[Photo]:
    """I images and their masks (a file or image, AUTO_MASK or None each) -> the photos to fit, checked.
    crop "center" keeps the image (the model's resize and centre crop follow); "face" cuts FFHQ's aligned
    square of its largest face at `size` px (`faces.align_face`; the pipeline's resolution) and a mask file
    with it. AUTO_MASK draws the mask of the face's landmarks over face, forehead and hair
    (`faces.landmark_mask`); where dlib's `detector` finds no face, with a warning, an ellipse over where
    FFHQ's alignment puts a face (`faces.template_mask`)."""
    from . import faces

    if crop not in CROPS:
        raise W2WError(f"unknown crop {crop!r}; expected one of {', '.join(CROPS)}")
    faces.check_detector(detector)
    masks = [None] * len(images) if masks is None else list(masks)
    if len(masks) != len(images):
        raise W2WError(f"{len(masks)} masks for {len(images)} images; expected one mask per image, in the images' "
                       f"order")
    photos = []
    for source, mask in zip(images, masks):
        name = "image" if isinstance(source, Image.Image) else str(source)
        picture = open_image(source, "image")
        original_size, alignment = picture.size, None
        if crop == "face":
            alignment = faces.align_face(picture, faces.find_face(picture, name, detector).landmarks, size)
            picture = alignment.image
        values, auto = None, isinstance(mask, str) and mask == AUTO_MASK
        if auto:
            found = alignment.landmarks if alignment else next(
                (face.landmarks for face in faces.detect_faces(picture, detector)), None)
            if found is None:
                warnings.warn(f"{name}: no face found for the automatic mask; fitting an ellipse over the centre of "
                              f"the image, where a face aligned as FFHQ's sits (draw one and pass --mask FILE "
                              f"otherwise)", stacklevel=2)
            values = np.asarray(faces.template_mask(picture.size) if found is None
                                else faces.landmark_mask(picture.size, found))
        elif mask is not None:
            values = check_mask(open_image(mask, "mask"), original_size,
                                "mask" if isinstance(mask, Image.Image) else str(mask))
            if alignment:  # the mask, at the original image's size, cut like the image
                values = np.asarray(alignment.warp(Image.fromarray(values).resize(original_size,
                                                                                   Image.Resampling.NEAREST)))
        photos.append(Photo(name, picture, values, auto))
    return photos


def masks_in_folder(images: Sequence[str | os.PathLike], folder: str | os.PathLike) -> list[Path]:
    """The mask of each image in `folder`, paired by file name: FOLDER/NAME.<any image suffix> for NAME.jpg."""
    folder = Path(folder)
    if not folder.is_dir():
        raise W2WError(f"{folder}: no such mask folder")
    masks = []
    for image in images:
        found = [folder / (Path(image).stem + suffix) for suffix in IMAGE_SUFFIXES
                 if (folder / (Path(image).stem + suffix)).is_file()]
        if len(found) != 1:
            raise W2WError(f"{folder}: {'no mask' if not found else f'{len(found)} masks'} for the image {image}; "
                           f"expected one file {Path(image).stem}.png (or another image suffix) there")
        masks.append(found[0])
    return masks


def photo_targets(photos: Sequence[Photo], resolution: int,
                  latent_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Photos -> images (I, 3, R, R) in [-1, 1], resized and centre-cropped, and masks (I, 1, h, w) in
    [0, 1] over the same crops (None when no photo has one; a photo without a mask among others with one
    is fitted everywhere). One photo with a mask file gives what `load_target` gives."""
    images = torch.cat([prepare_image(photo.picture, resolution)[None] for photo in photos])  # (I, 3, R, R)
    if all(photo.mask is None for photo in photos):
        return images, None
    ones = torch.ones(1, 1, latent_size, latent_size)
    return images, torch.cat([ones if photo.mask is None else pool_mask(photo.mask, resolution, latent_size,
                                                                        f"{photo.name}'s mask") for photo in photos])


# ----------------------------------------------------------------------------- the loss

@dataclass
class Target:
    """What every step needs of the image and the prompt, computed once."""

    latent_mean: torch.Tensor    # (I, C, h, w), unscaled, one row per image
    latent_std: torch.Tensor     # (I, C, h, w)
    mask: torch.Tensor | None    # (I, 1, h, w) in [0, 1]
    conditioning: Conditioning   # (1, ...) of the prompt, in the network's dtype: (1, L, D) text embeddings ...
    latent_factors: tuple[float, float | None]  # the VAE's (scaling, shift)
    dtype: torch.dtype           # the network's (reading unet.dtype walks all its parameters)
    family: Family               # the base's


def encode_target(pipe, images: torch.Tensor, masks: torch.Tensor | None, prompt: str) -> Target:
    """Encode the images (I, 3, R, R) with the VAE and the prompt with the text encoder(s), once."""
    family = family_of(pipe)
    mean, std = encode_images(pipe.vae, images)  # (I, C, h, w) each
    if masks is not None and masks.shape != (len(mean), 1, *mean.shape[2:]):
        raise W2WError(f"masks {tuple(masks.shape)} do not fit the latents {tuple(mean.shape)}: expected "
                       f"({len(mean)}, 1, {mean.shape[2]}, {mean.shape[3]}); load them with photo_targets")
    network = family.network(pipe)
    device, dtype = network.device, network.dtype
    conditioning = family.encode_prompt(pipe, prompt, images.shape[-1]).to(device, dtype)
    return Target(mean.to(device), std.to(device), None if masks is None else masks.to(device), conditioning,
                  latent_factors(pipe.vae), dtype, family)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (m * (prediction - target))^2 over all elements, as the original (masked cells count as 0)."""
    error = prediction.float() - target.float()  # (B, C, h, w)
    return (error if mask is None else mask * error).square().mean()


def inversion_loss(lora_unet: LoraUNet, basis: tuple[torch.Tensor, ...], coefficients: torch.Tensor,
                   target: Target, scheduler, batch: StepBatch) -> torch.Tensor:
    """The diffusion loss of the model `coefficients` (K,) in `basis` (mean, std, components) for one draw:
    on the B images of the target that `batch.instance` picks."""
    picked = batch.instance.to(target.latent_mean.device)                                       # (B,)
    noisy, timesteps, expected = target.family.noisy_latents(target.latent_mean[picked], target.latent_std[picked],
                                                             batch, target.latent_factors,
                                                             scheduler)                         # (B, C, h, w) each
    weights = unproject(coefficients, *basis)                                                   # (N,)
    conditioning = target.conditioning.repeat(len(picked))                                      # (B, L, D) ...
    prediction = target.family.predict(functools.partial(lora_unet, weights), noisy.to(target.dtype), timesteps,
                                       conditioning)                                            # (B, C, h, w)
    return masked_mse(prediction, expected, None if target.mask is None else target.mask[picked])


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

def run_fingerprint(space: Space, config: InversionConfig, seed: int, images: torch.Tensor,
                    masks: torch.Tensor | None) -> dict:
    """What a checkpoint must share with a run to resume it (the number of steps may grow)."""
    digest = hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if masks is not None:
        digest.update(masks.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    batch = {"images_per_step": config.images_per_step} if config.images_per_step > 1 else {}  # as before it existed
    return {"space": space.id, "components": config.components, "lr": config.lr,
            "weight_decay": config.weight_decay, "seed": seed, "image": digest.hexdigest()[:16]} | batch


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

def invert(pipe, space: Space, images: torch.Tensor | Sequence[torch.Tensor],
           masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
           config: InversionConfig = PRESETS["real"], seed: int = 0, progress: bool = True,
           checkpoint: str | os.PathLike | None = None,
           on_step: Callable[[int, int, float], None] | None = None, record: dict | None = None) -> W2WModel:
    """The model (K coefficients) of `space` that best reproduces `images`, I photographs of one person,
    (I, 3, R, R) in [-1, 1] or a list of (1, 3, R, R), inside `masks` (I, 1, h, w) or a list of (1, 1, h, w)
    or None (an image fitted everywhere) when given. Every step draws one of the images (seeded), so the
    loss is averaged over them; with one image this is the paper's single-image inversion. With
    `checkpoint`, the run's state is saved there every `config.checkpoint_every` steps and at the end, and
    a run finding it there resumes from it. `on_step(done, total, loss)` is called after every step (the
    app's progress bar). The model records its settings and seed, and `record`, what the caller knows of the
    images (their sha256, the preset's name: `provenance.inverted`)."""
    from .provenance import inverted

    images, masks = stack_targets(images, masks)
    k = space.check_k(config.components)
    check_seed(seed)
    family = family_of(pipe)
    network = family.network(pipe)
    family.check_layout(network, space.layout)
    device = network.device
    basis = tuple(t.to(device, torch.float32) for t in (space.mean, space.std, space.components[:k]))  # (N,) (N,) (K, N)
    target = encode_target(pipe, images, masks, space.prompt or TRIGGER_PROMPT)
    scheduler = family.training_scheduler(pipe)
    sampler = StepSampler(seed, num_instance=len(images), num_class=0, batch_size=config.images_per_step,
                          latent_shape=tuple(target.latent_mean.shape[1:]),
                          num_train_timesteps=scheduler.config.num_train_timesteps)
    coefficients = torch.zeros(k, device=device, requires_grad=True)  # (K,)
    optimizer = torch.optim.Adam([coefficients], lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = run_fingerprint(space, config, seed, images, masks)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = load_checkpoint(checkpoint, fingerprint, coefficients, optimizer, sampler)
        if start > config.steps:
            raise W2WError(f"{checkpoint}: the checkpoint is at step {start}, past the {config.steps} steps asked for")

    with differentiable_unet(network, space.layout) as lora_unet:
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
    model = W2WModel(coefficients.detach().cpu(), space.id, (inverted(config, seed, len(images), record),), space)
    far = norm_over_dataset(space, model.coefficients)
    if far is not None and far > FAR_FROM_DATASET:
        warnings.warn(f"the inverted model lies far outside the space's dataset (its coefficients' norm is {far:.1f}x "
                      f"the largest dataset model's) and likely draws noise: the learning rate {config.lr:g} is too "
                      f"high for this space; try {config.lr / 10:g}", stacklevel=2)
    return model


def stack_targets(images: torch.Tensor | Sequence[torch.Tensor],
                  masks: torch.Tensor | Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and masks as `invert` takes them -> (I, 3, R, R) and (I, 1, h, w) or None (a None among
    masks fits its image everywhere)."""
    if not isinstance(images, torch.Tensor):
        if not images:
            raise W2WError("no image to invert; expected at least one")
        images = torch.cat([image.reshape(-1, *image.shape[-3:]) for image in images])  # (I, 3, R, R)
    if masks is None or isinstance(masks, torch.Tensor):
        return images, masks
    if len(masks) != len(images):
        raise W2WError(f"{len(masks)} masks for {len(images)} images; expected one mask (or None) per image")
    given = [m for m in masks if m is not None]
    if not given:
        return images, None
    ones = torch.ones_like(given[0].reshape(1, *given[0].shape[-3:]))  # (1, 1, h, w)
    return images, torch.cat([ones if m is None else m.reshape(1, *m.shape[-3:]) for m in masks])


def norm_over_dataset(space: Space, coefficients: torch.Tensor) -> float | None:
    """|c| over the largest norm of a dataset model, on the first coefficients both have (None when the
    space has no dataset coefficients)."""
    if space.coefficients is None:
        return None
    k = min(len(coefficients), space.coefficients.shape[1])
    return float(coefficients[:k].float().norm() / space.coefficients[:, :k].float().norm(dim=1).max())
