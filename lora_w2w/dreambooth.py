"""Dreambooth LoRA training of identities (Ruiz et al. 2023) with the w2w paper's Sec. 3.1 recipe, the
defaults of `add_dreambooth_arguments`: "sks person" on an identity's images, prior preservation with
"person" images of the base model, a LoRA on to_q/to_v. The base may be of any family `bases` knows
(Stable Diffusion 1, 2 or XL, FLUX.1): its family conditions, calls and sets the target of the network.

The pieces shared by `train_dreambooth.py` (one identity, PEFT adapter) and `train_identities`
(many identities in one pass): reading an instance folder, generating class images once, caching
latent distributions and text embeddings (`diffusion`), a per-identity random stream
(`diffusion.StepSampler`) so that an identity trained among many sees exactly the batches, noise and
timesteps of a solo run, and the optimizer step over accumulated batches (`accumulated_step`).

Letters: I images, b batch per identity, C latent channels, h x w latent size.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bases import Conditioning, Family, family_of
from .checks import LEARNING_RATE, WEIGHT_DECAY, check_int, check_learning_rate, check_number, check_weight_decay
from .defaults import DEFAULT_BASE
from .diffusion import StepBatch, StepSampler, encode_images, latent_factors, prepare_image
from .errors import ArgumentError, SettingError, W2WError
from .flags import add_config_flags, spellings
from .images import IMAGE_SUFFIXES, read_image
from .layout import DEFAULT_ALPHA, DEFAULT_RANK, LoraLayout
from .storage import save_png


# ----------------------------------------------------------------------------- arguments

@dataclass(frozen=True)
class DreamboothConfig:
    """The Dreambooth recipe of an identity LoRA, as the original train_dreambooth.py's flags name it, with
    the paper's values as defaults; its fields are the flags of train_dreambooth.py and `w2w
    train-identities` (`add_dreambooth_arguments`)."""

    pretrained_model_name_or_path: str = field(default=DEFAULT_BASE, metadata={
        "help": "base diffusers pipeline: a folder or a hub id (default: the tiny world, %(default)s)"})
    instance_prompt: str = field(default="sks person", metadata={"help": "prompt of the identity's images"})
    class_prompt: str = field(default="person", metadata={"help": "prompt of the prior images"})
    with_prior_preservation: bool = field(default=True, metadata={
        "help": "add the prior-preservation loss on class images (default: on)"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the prior loss"})
    class_data_dir: str | None = field(default=None, metadata={
        "help": "folder of class images; missing ones are generated once with the base model "
                "(default: <output_dir>/class_images)"})
    num_class_images: int = field(default=200, metadata={"help": "class images used"})
    class_inference_steps: int = field(default=50, metadata={"help": "denoising steps when generating class images"})
    resolution: int | None = field(default=None, metadata={
        "help": "training resolution in pixels (default: the base model's, 512 for SD1.5)"})
    train_batch_size: int = field(default=1, metadata={"help": "instance images per step, plus as many class images"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate", "type": LEARNING_RATE})
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate schedule",
                                                            "choices": ("constant", "cosine", "linear")})
    max_train_steps: int = field(default=800, metadata={"help": "optimizer steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches averaged per optimizer step"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay", "type": WEIGHT_DECAY})
    use_lora: bool = field(default=True, metadata={
        "help": "train a LoRA (the only mode; kept for the original's command lines)"})
    lora_r: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "LoRA alpha; scaling = alpha / r"})
    lora_target_modules: tuple[str, ...] = field(default=("to_q", "to_v"), metadata={
        "help": "Linear layers that get a LoRA"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast of the frozen model's forward on GPUs",
                                                         "choices": ("no", "fp16", "bf16")})

    def __post_init__(self):
        for name, ok, expected in [("max_train_steps", self.max_train_steps >= 1, ">= 1"),
                                   ("train_batch_size", self.train_batch_size >= 1, ">= 1"),
                                   ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
                                   ("lora_r", self.lora_r >= 1, ">= 1")]:
            if not ok:
                raise SettingError(name, f"must be {expected}, got {getattr(self, name)}")
        checks = [("learning_rate", check_learning_rate), ("adam_weight_decay", check_weight_decay),
                  ("prior_loss_weight", lambda value, what: check_number(value, what, minimum=0.0)),
                  ("lora_alpha", lambda value, what: check_number(value, what, above=0.0))]
        for name, check in checks:
            try:
                check(getattr(self, name), "")
            except ArgumentError as error:
                raise SettingError(name, str(error)) from None
        if not self.use_lora:
            raise SettingError("use_lora", "off: only LoRA training is supported")
        if self.with_prior_preservation and self.num_class_images < 1:
            raise SettingError("num_class_images", f"must be >= 1 with prior preservation, got {self.num_class_images}")


def add_dreambooth_arguments(parser: argparse.ArgumentParser, kebab: bool) -> None:
    """DreamboothConfig's flags, in both spellings, kebab-case first for a `w2w` subcommand
    (`flags.spellings`); the base also as --base."""
    group = parser.add_argument_group("Dreambooth")
    base = spellings("pretrained_model_name_or_path", kebab=False)
    group.add_argument(*(["--base", *base] if kebab else [*base, "--base"]), dest="pretrained_model_name_or_path",
                       metavar="BASE" if kebab else None, default=DEFAULT_BASE,
                       help=DreamboothConfig.__dataclass_fields__["pretrained_model_name_or_path"].metadata["help"])
    add_config_flags(group, DreamboothConfig, kebab, both=True, skip=("pretrained_model_name_or_path",))


# flags that do not change the weights a run trains: where files go, and a flag with one value
NOT_TRAINING_SETTINGS = ("class_data_dir", "use_lora")


def training_settings(recipe: DreamboothConfig | argparse.Namespace) -> dict:
    """The settings of a recipe (or of parsed flags) that decide a LoRA's weights, as recorded with each
    trained adapter."""
    return {f.name: getattr(recipe, f.name) for f in fields(DreamboothConfig) if f.name not in NOT_TRAINING_SETTINGS}


# ----------------------------------------------------------------------------- images

def load_image_folder(folder: str | Path, resolution: int) -> torch.Tensor:
    """The images of a folder (sorted by name) as (I, 3, R, R) in [-1, 1]. Other files are skipped with a
    warning; a corrupt image or a folder without images is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise W2WError(f"{folder}: no such image folder")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(path.name)
            continue
        images.append(prepare_image(read_image(path), resolution))
    if skipped:
        warnings.warn(f"{folder}: skipped {len(skipped)} non-image files ({', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''})", stacklevel=2)
    if not images:
        raise W2WError(f"{folder}: no images (expected {', '.join(IMAGE_SUFFIXES[:3])} ... files)")
    return torch.stack(images)


def class_image_batch_size(resolution: int) -> int:
    """Class images generated at once: 16 at 64 px, 1 at 512 px."""
    return max(1, 2**16 // resolution**2)


def ensure_class_images(base: str, class_dir: Path, prompt: str, count: int, resolution: int, steps: int,
                        seed: int, device: torch.device) -> None:
    """Generate the class images that `class_dir` lacks with the base model (once; reused afterwards),
    float16 on CUDA, `class_image_batch_size` at a time, so that the phase stays below a training step's
    memory with the base held (benchmarks/README.md)."""
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (class_dir / f"{i:05d}.png").is_file()]
    if not missing:
        return
    from .pipeline import load_base_pipeline

    pipe = load_base_pipeline(base, device, progress=False)
    check_int(steps, "class inference steps", 1, pipe.scheduler.config.num_train_timesteps)
    family = family_of(pipe)
    batch_size = class_image_batch_size(resolution)
    for start in tqdm(range(0, len(missing), batch_size), desc=f"class images of {prompt!r}", unit="batch"):
        indices = missing[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seed * 100_003 + i) for i in indices]
        images = family.generate(pipe, [prompt] * len(indices), num_inference_steps=steps, generator=generators,
                                 height=resolution, width=resolution)
        for i, image in zip(indices, images):
            save_png(image, class_dir / f"{i:05d}.png")
    del pipe


# ----------------------------------------------------------------------------- cached inputs

@dataclass
class IdentityData:
    """An identity's cached inputs: instance latent distributions (I, C, h, w) and the step sampler."""

    name: str
    mean: torch.Tensor
    std: torch.Tensor
    sampler: StepSampler


@dataclass
class SharedData:
    """What all identities share: class latent distributions, both prompts' conditioning, the base's family,
    its VAE's latent factors and its training noise schedule."""

    class_mean: torch.Tensor     # (I_c, C, h, w)
    class_std: torch.Tensor      # (I_c, C, h, w)
    instance_conditioning: Conditioning  # (1, ...): (1, L, D) text embeddings, and what else the family adds
    class_conditioning: Conditioning     # (1, ...)
    latent_factors: tuple[float, float | None]  # the VAE's (scaling, shift): diffusion.latent_factors
    scheduler: object            # the family's training scheduler (a DDPMScheduler for Stable Diffusion)
    family: Family


def noisy_inputs(identity: IdentityData, shared: SharedData, batch: StepBatch):
    """(noisy latents (n, C, h, w), timesteps (n,), conditioning (n rows), target (n, C, h, w)), on the
    device of the cached latents."""
    mean = torch.cat([identity.mean[batch.instance], shared.class_mean[batch.prior]])  # (n, C, h, w)
    std = torch.cat([identity.std[batch.instance], shared.class_std[batch.prior]])     # (n, C, h, w)
    noisy, timesteps, target = shared.family.noisy_latents(mean, std, batch, shared.latent_factors, shared.scheduler)
    b, n = len(batch.instance), len(timesteps)
    conditioning = Conditioning.cat([shared.instance_conditioning.repeat(b), shared.class_conditioning.repeat(n - b)])
    return noisy, timesteps, conditioning, target


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float) -> torch.Tensor:
    """Instance MSE + prior_weight * class MSE for one identity's (n, C, h, w) prediction."""
    loss = F.mse_loss(prediction[:num_instance].float(), target[:num_instance].float())
    if len(prediction) > num_instance:
        loss = loss + prior_weight * F.mse_loss(prediction[num_instance:].float(), target[num_instance:].float())
    return loss


def add_identity_lora(unet, layout: LoraLayout, args: argparse.Namespace) -> torch.optim.AdamW:
    """A PEFT LoRA adapter (args' rank, alpha and targets) added to the UNet, started from
    initial_lora_weights(args.seed); returns the AdamW optimizer of its weights."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                target_modules=list(args.lora_target_modules), init_lora_weights=True))
    set_peft_model_state_dict(unet, layout.to_peft_state_dict(initial_lora_weights(layout, args.seed), prefix=""))
    params = [p for p in unet.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)


def identities_loss(unet, identities: list[IdentityData], shared: SharedData, args: argparse.Namespace,
                    autocast=contextlib.nullcontext) -> torch.Tensor:
    """One step's loss of K identities in one UNet call: each identity's samples (its instance and class
    latents, noise and timesteps from its own sampler) pass through the UNet together, and the loss is
    the sum of each identity's Dreambooth loss, so each identity's gradient is that of a solo run."""
    noisy, timesteps, conditioning, target = zip(*(noisy_inputs(identity, shared, identity.sampler.next())
                                                   for identity in identities))
    noisy, timesteps, target = torch.cat(noisy), torch.cat(timesteps), torch.cat(target)  # (K n, C, h, w), (K n,) ...
    with autocast():
        prediction = shared.family.predict(unet, noisy, timesteps, Conditioning.cat(conditioning))  # (K n, C, h, w)
    n = len(prediction) // len(identities)
    return sum(dreambooth_loss(prediction[i * n:(i + 1) * n], target[i * n:(i + 1) * n], args.train_batch_size,
                               args.prior_loss_weight) for i in range(len(identities)))


def initial_lora_weights(layout: LoraLayout, seed: int) -> torch.Tensor:
    """PEFT's default start, drawn from `seed`: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform,
    a = sqrt(5)), lora_B = 0; flat (N,)."""
    g = torch.Generator().manual_seed(seed + 1)
    parts = {}
    for layer in layout.layers:
        bound = 1 / math.sqrt(layer.in_features)
        lora_a = (torch.rand(layout.rank, layer.in_features, generator=g) * 2 - 1) * bound  # (r, in)
        parts[layer.name] = (lora_a, torch.zeros(layer.out_features, layout.rank))           # (out, r)
    return layout.join(parts)


def accumulated_step(batch_loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, batches: int,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """One optimizer step on the mean gradient of `batches` calls of `batch_loss` (each loss / batches goes
    through `backward`); returns the last batch's loss."""
    for _ in range(batches):
        loss = batch_loss()
        backward(loss / batches)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def lr_lambda(kind: str, total_steps: int):
    """Multiplier of the learning rate at each optimizer step."""
    if kind == "constant":
        return lambda step: 1.0
    if kind == "linear":
        return lambda step: max(0.0, 1 - step / total_steps)
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


# ----------------------------------------------------------------------------- the frozen base

@dataclass
class Base:
    """The frozen base pipeline used for training, its family and its training noise schedule."""

    pipe: object
    family: Family
    scheduler: object  # the family's training scheduler (a DDPMScheduler for Stable Diffusion)

    @property
    def network(self) -> torch.nn.Module:
        """The network that carries the LoRA (the UNet of Stable Diffusion 1, 2 and XL, FLUX's transformer)."""
        return self.family.network(self.pipe)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def resolution(self) -> int:
        """The base model's native image size (512 for SD1.5, 1024 for SDXL)."""
        return self.family.image_sizes(self.pipe)[0]


def load_base(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Base:
    """The base pipeline of a folder or hub id (of a family `bases` knows), frozen on `device`, with its
    family's training scheduler."""
    from .pipeline import load_base_pipeline

    if not Path(path).is_dir() and Path(path).exists():
        raise W2WError(f"{path}: expected a diffusers pipeline folder or a hub id")
    pipe = load_base_pipeline(path, device, dtype, progress=False)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    family = family_of(pipe)
    return Base(pipe, family, family.training_scheduler(pipe))


def prepare_shared(base: Base, args: argparse.Namespace, resolution: int, class_dir: Path) -> SharedData:
    """Generate missing class images, then cache their latent distributions and both prompts' conditioning."""
    device = base.network.device
    if args.with_prior_preservation:
        ensure_class_images(args.pretrained_model_name_or_path, class_dir, args.class_prompt, args.num_class_images,
                            resolution, args.class_inference_steps, args.seed, device)
        class_images = load_image_folder(class_dir, resolution)[: args.num_class_images]
        class_mean, class_std = encode_images(base.vae, class_images)
    else:
        class_mean = class_std = torch.zeros(0)
    return SharedData(class_mean.to(device), class_std.to(device),
                      base.family.encode_prompt(base.pipe, args.instance_prompt, resolution),
                      base.family.encode_prompt(base.pipe, args.class_prompt, resolution),
                      latent_factors(base.vae), base.scheduler, base.family)


def prepare_identity(name: str, images: torch.Tensor, base: Base, shared: SharedData, args: argparse.Namespace
                     ) -> IdentityData:
    """An identity's cached latent distributions of its images (I, 3, R, R) and its random stream
    (seeded by --seed, like a solo run)."""
    mean, std = encode_images(base.vae, images)
    sampler = StepSampler(args.seed, num_instance=len(mean), num_class=len(shared.class_mean),
                          batch_size=args.train_batch_size, latent_shape=tuple(mean.shape[1:]),
                          num_train_timesteps=shared.scheduler.config.num_train_timesteps)
    return IdentityData(name, mean.to(base.network.device), std.to(base.network.device), sampler)


def lora_layout(base: Base, args: argparse.Namespace) -> LoraLayout:
    """The LoRA layout for the flags; an error before training when the network lacks the target modules."""
    try:
        return LoraLayout.from_unet(base.network, args.lora_target_modules, args.lora_r, args.lora_alpha)
    except W2WError:
        raise W2WError(f"{args.pretrained_model_name_or_path}: the {type(base.network).__name__} has no Linear layer "
                       f"named {args.lora_target_modules} to put a LoRA on") from None


# ----------------------------------------------------------------------------- one identity (train_dreambooth.py)

def train_one(args: argparse.Namespace) -> torch.Tensor:
    """Train one identity's LoRA (a PEFT adapter); returns its flat weights (N,) and writes <output_dir>/unet/."""
    from accelerate import Accelerator
    from peft.utils import get_peft_model_state_dict

    from .formats import save_peft

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    base = load_base(args.pretrained_model_name_or_path, accelerator.device)
    layout = lora_layout(base, args)
    resolution = args.resolution or base.resolution
    output_dir = Path(args.output_dir)
    images = load_image_folder(args.instance_data_dir, resolution)  # bad input fails before any long work
    class_dir = Path(args.class_data_dir or output_dir / "class_images")
    shared = prepare_shared(base, args, resolution, class_dir)
    identity = prepare_identity(output_dir.name, images, base, shared, args)

    unet = base.network
    optimizer = add_identity_lora(unet, layout, args)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, args.max_train_steps))
    unet, optimizer = accelerator.prepare(unet, optimizer)

    progress = tqdm(range(args.max_train_steps), desc=f"dreambooth {identity.name}", disable=not accelerator.is_main_process)
    for _ in progress:
        loss = accumulated_step(lambda: identities_loss(unet, [identity], shared, args, accelerator.autocast),
                                optimizer, args.gradient_accumulation_steps, accelerator.backward)
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    weights = layout.from_peft_state_dict(state)
    if accelerator.is_main_process:
        save_peft(layout, weights, output_dir / "unet", args.pretrained_model_name_or_path, training_settings(args),
                  base.family.lora_naming())
    return weights
