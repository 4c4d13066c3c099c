"""The one way to generate images: a base diffusers pipeline + w2w LoRA weights, fused into the network
that carries them (the UNet of Stable Diffusion 1, 2 and XL, FLUX's transformer; `bases`), so that a step
costs what the base model's step costs.

    pipe = load_base_pipeline(DEFAULT_BASE, device="auto")  # or "stablediffusionapi/realistic-vision-v51"
    images = generate(pipe, space, model, seeds=[0, 1, 2, 3])     # prompt: the space's, "sks person"
    images = generate(pipe, space, model, "sks person with a hat", seeds=[0])

`generate` takes a space and a w2w model; `generate_from_weights` takes raw LoRA weights (N,) in a
layout, for weights that are no model of a space (a Dreambooth LoRA, a slider) or the base model alone.

Delayed injection (the paper's Sec. 4.2): with `edited` and `injection_timestep` T, the model is used
for timesteps t > T and `edited` for t <= T, so coarse structure comes from the original identity and
the edit acts on the finer details (T 700-1000 for global edits, 400-700 for fine ones).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from .bases import family_of, family_of_base
from .checks import (SIZE_STEP, available_memory, check_int, check_number, check_seed, check_size, gigabytes,
                     resolve_device)
from .defaults import DEFAULT_BASE
from .errors import ArgumentError, W2WError
from .estimate import LARGE_GENERATION, JobClock
from .layout import LoraLayout
from .network import FusedLora
from .provenance import INFOTEXT_KEY, hub_id, infotext
from .space import Space, W2WModel

TEXT_ENCODER_NOTICE = "No LoRA keys associated to CLIPTextModel"  # diffusers' warning for a LoRA of the UNet alone


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, family=None) -> torch.dtype:
    """None/'auto' -> on CUDA the generation dtype of the base's `family` (float16; bfloat16 for FLUX.1),
    float32 elsewhere."""
    if dtype in (None, "auto"):
        return (torch.float16 if family is None else family.cuda_dtype) if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_base_pipeline(base: str = DEFAULT_BASE, device: str | torch.device = "auto", dtype=None, progress: bool = True):
    """The pipeline of a folder or hub id, of a family w2w knows (`bases.FAMILIES`: chosen from its config
    files, so that another kind of pipeline is refused before its weights load), without safety checker,
    on `device`; `progress`: the progress bars of its loading and of its denoising."""
    device = resolve_device(device)
    local = Path(base).is_dir()
    if not local and (base.startswith((".", "/")) or base.startswith("files/")):
        raise W2WError(f"{base}: no such pipeline folder (the tiny world's base is built by `make tiny-world`)")
    if not local:
        check_cached_offline(base)
    family = family_of_base(base)
    try:
        with loading_bars(progress):
            pipe = family.load_pipeline(base, resolve_dtype(dtype, device, family), local_files_only=local)
    except (OSError, ValueError) as error:
        raise loading_error(base, local, error, "the pipeline") from None
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


@contextmanager
def loading_bars(shown: bool):
    """diffusers' and transformers' loading progress bars shown or not while the block runs, through their own
    switches, which are put back as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    switches = [(library, library.is_progress_bar_enabled()) for library in (diffusers_logging, transformers_logging)]
    for library, _ in switches:
        (library.enable_progress_bar if shown else library.disable_progress_bar)()
    try:
        yield
    finally:
        for library, was in switches:
            (library.enable_progress_bar if was else library.disable_progress_bar)()


def generate(pipe, space: Space, model: W2WModel | torch.Tensor | None = None, prompt: str | None = None, *,
             edited: W2WModel | torch.Tensor | None = None, **settings) -> list[Image.Image]:
    """Images of `prompt` (default: the space's trigger prompt), one per seed, with a w2w `model` of
    `space` fused into the UNet: a W2WModel, its coefficients (k,), or None for the base model alone.
    `edited` (a model likewise) with `injection_timestep` T: `model` for t > T, `edited` for t <= T.
    `settings`: those of `generate_from_weights` (seeds, num_inference_steps, guidance_scale, ...)."""
    if not isinstance(space, Space):
        raise TypeError(f"generate(pipe, space, model, prompt) takes a Space, got {type(space).__name__}; for a "
                        f"layout and raw LoRA weights call generate_from_weights(pipe, layout, weights, prompt)")

    models = [m if m is None or isinstance(m, W2WModel) else W2WModel(m) for m in (model, edited)]
    about = {"w2w space": space.id}
    for name, m in zip(("w2w model", "w2w edited"), models):
        if m is not None:
            about |= {name: m.id} | ({f"{name} made by": m.made_by} if m.provenance else {})
    return generate_from_weights(pipe, space.layout, None if models[0] is None else models[0].weights(space),
                                 space.prompt if prompt is None else prompt,
                                 edited=None if models[1] is None else models[1].weights(space), about=about,
                                 **settings)


def generate_from_weights(pipe, layout: LoraLayout | None, weights: torch.Tensor | None, prompt: str, *,
                          negative_prompt: str = "", seeds=(0,), num_inference_steps: int = 50,
                          guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                          scale: float = 1.0, edited: torch.Tensor | None = None,
                          injection_timestep: int | None = None, about: dict | None = None,
                          log: Callable[[str], None] | None = None) -> list[Image.Image]:
    """Images of `prompt`, one per seed, with LoRA `weights` (N,) fused into the base's network (None: the
    base model alone). With `edited` and `injection_timestep` T: `weights` for t > T, `edited` for t <= T.
    `guidance_scale` None: the family's default (7.5 for Stable Diffusion, 3.5 for FLUX.1).
    More than LARGE_GENERATION seeds with a `log`: the first image alone, then the time the rest will take.
    Each image's info holds its generation parameters as A1111 writes them (`provenance.infotext`: prompt,
    seed, steps, guidance, size, the base model, and `about`'s fields), which `save_png` keeps."""
    if (edited is None) != (injection_timestep is None):
        raise W2WError("delayed injection needs both the edited weights and the injection timestep")
    seeds = [check_seed(s) for s in seeds]
    check_int(num_inference_steps, "steps", 1, pipe.scheduler.config.num_train_timesteps)  # before diffusers refuses
    family = family_of(pipe)
    guidance_scale = family.guidance if guidance_scale is None else check_number(guidance_scale, "guidance scale")
    if injection_timestep is not None:
        check_int(injection_timestep, "injection timestep", 0, pipe.scheduler.config.num_train_timesteps)
    check_generation_memory(pipe, len(seeds), *(None if s is None else check_size(s) for s in (height, width)))
    network = family.network(pipe)
    if weights is not None or edited is not None:
        family.check_layout(network, layout)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    state = {"fused": None}

    def use(w):
        if state["fused"] is not None:
            state["fused"].remove()
        state["fused"] = None if w is None else FusedLora(network, layout, w.to(pipe.device), scale)

    def swap_before_fine_steps(pipeline, step_index, timestep, callback_kwargs):
        timesteps = pipeline.scheduler.timesteps
        if step_index + 1 < len(timesteps) and timesteps[step_index] > injection_timestep >= timesteps[step_index + 1]:
            use(edited)
        return callback_kwargs

    delayed = edited is not None

    resolution, _ = family.image_sizes(pipe)

    def images_of(batch: list[torch.Generator]) -> list[Image.Image]:
        use(edited if delayed and injection_timestep >= family.first_timestep(
            pipe, num_inference_steps, height or resolution, width or resolution) else weights)
        return family.generate(pipe, [prompt] * len(batch), negative_prompt, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, height=height, width=width, generator=batch,
                               callback_on_step_end=swap_before_fine_steps if delayed else None)

    clock = JobClock(len(seeds), "images", LARGE_GENERATION, log)
    try:
        if not clock.pending:
            images = images_of(generators)
        else:
            images = images_of(generators[:1])
            clock.tick()
            images += images_of(generators[1:])
    finally:
        use(None)
    injection = {} if injection_timestep is None else {"w2w injection timestep": injection_timestep}
    for seed, image in zip(seeds, images):
        fields = generation_fields(pipe, image, seed, num_inference_steps, guidance_scale) | (about or {}) | injection
        image.info[INFOTEXT_KEY] = infotext(prompt, negative_prompt, fields)
    return images


def generation_fields(pipe, image: Image.Image, seed: int, steps: int, guidance: float) -> dict:
    """A1111's parameters of an image the pipeline generated: steps, sampler (the scheduler's class), CFG scale,
    seed, size and the base model (`provenance.hub_id`)."""
    base = {"Model": hub_id(pipe.name_or_path)} if getattr(pipe, "name_or_path", None) else {}
    return {"Steps": steps, "Sampler": type(pipe.scheduler).__name__, "CFG scale": guidance, "Seed": seed,
            "Size": f"{image.width}x{image.height}"} | base


@contextmanager
def quiet_text_encoder_notice():
    """While the block runs, diffusers' warning that a LoRA holds no text-encoder weights (TEXT_ENCODER_NOTICE,
    from its loaders.lora_base logger) is dropped: a w2w LoRA is the UNet's alone. Only that message."""
    logger = logging.getLogger("diffusers.loaders.lora_base")
    notice = logging.Filter()
    notice.filter = lambda record: TEXT_ENCODER_NOTICE not in record.getMessage()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def num_train_timesteps(base: str) -> int:
    """The number of training timesteps of the base pipeline's scheduler, from its config files alone (a
    pipeline of no family w2w knows is refused first)."""
    from diffusers import DDPMScheduler

    if not Path(base).is_dir():
        check_cached_offline(base)
    return int(DDPMScheduler.from_config(family_of_base(base).scheduler_config).config.num_train_timesteps)


def check_cached_offline(base: str) -> None:
    """W2WError, before diffusers logs its own attempts, when the hub model `base` is not in the Hugging Face
    cache and HF_HUB_OFFLINE forbids fetching it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(base, "model_index.json"), str):
        from huggingface_hub.errors import OfflineModeIsEnabled

        from .download import hub_error

        raise hub_error(OfflineModeIsEnabled(), base, None, f"w2w download base {base}")


def loading_error(base: str, local: bool, error: BaseException, what: str) -> W2WError:
    """The one-line error for `error`, raised loading `what` of `base`: for a hub id, what the Hub said or
    why it could not be reached, and the command that fetches the model."""
    if not local:
        from .download import hub_error

        return hub_error(error, base, None, f"w2w download base {base}")
    return W2WError(f"{base}: cannot load {what} ({str(error).splitlines()[0]})")


def base_resolution(base: str) -> int:
    """The image resolution R of the base pipeline (its family's `image_sizes`) from its config files alone (the
    network's and the VAE's): a face crop is cut at it before the pipeline loads."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    local = Path(base).is_dir()
    if not local:
        check_cached_offline(base)
    family = family_of_base(base)
    try:
        vae = AutoencoderKL.load_config(base, subfolder="vae", local_files_only=local)
    except (OSError, ValueError) as error:
        raise loading_error(base, local, error, "the VAE's config") from None
    configs = {family.network_name: family.network_config, "vae": vae}
    return family.image_sizes(SimpleNamespace(**{name: SimpleNamespace(config=SimpleNamespace(**config))
                                                 for name, config in configs.items()}))[0]


def generation_bytes(pipe, images: int, height: int, width: int) -> int:
    """About the peak memory of generating `images` images of height x width at once: the VAE decoder's
    full-resolution activations (3 alive at a time, per image), the network's (`Family.activation_bytes`:
    the UNet's at latent resolution, FLUX's transformer's over its tokens), and the grid image."""
    family = family_of(pipe)
    itemsize = torch.finfo(family.network(pipe).dtype).bits // 8
    pixels = height * width
    vae = 3 * pipe.vae.config.block_out_channels[0] * pixels * itemsize * images
    return vae + family.activation_bytes(pipe, images, height, width) + 3 * pixels * images


def check_generation_memory(pipe, images: int, height: int | None, width: int | None) -> None:
    """ArgumentError when `generation_bytes` passes the memory free on the pipeline's device, saying
    which size fits."""
    default, _ = family_of(pipe).image_sizes(pipe)
    height, width = height or default, width or default
    free = available_memory(pipe.device)
    if generation_bytes(pipe, images, height, width) <= free:
        return
    per_pixel = generation_bytes(pipe, images, SIZE_STEP, SIZE_STEP) / SIZE_STEP**2
    side = int(math.sqrt(free / per_pixel)) // SIZE_STEP * SIZE_STEP
    raise ArgumentError(f"{images} images of {width} x {height} pixels need about "
                        f"{gigabytes(generation_bytes(pipe, images, height, width))}, the {pipe.device.type} has "
                        f"{gigabytes(free)} free: at most --size {side} fits (or give fewer seeds)")


LABEL_FONT_SIZE = 12  # px: PIL's bundled default font, so nothing is downloaded
LABEL_PAD = 4  # px around a label


def image_grid(images: list[Image.Image], columns: int | None = None, *, row_labels: list[str] | None = None,
               column_labels: list[str] | None = None) -> Image.Image:
    """Images of one size in a grid, `columns` wide (default: about square), with optional labels left of
    each row and above each column."""
    if not images:
        raise W2WError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    for name, labels, count in (("row", row_labels, rows), ("column", column_labels, columns)):
        if labels is not None and len(labels) != count:
            raise W2WError(f"{len(labels)} {name} labels for a grid of {count} {name}s")
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    line = LABEL_FONT_SIZE + 2 * LABEL_PAD
    left = max((math.ceil(font.getlength(t)) for t in row_labels), default=0) + 2 * LABEL_PAD if row_labels else 0
    top = line if column_labels else 0
    width, height = images[0].size
    grid = Image.new("RGB", (left + columns * width, top + rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, (left + (i % columns) * width, top + (i // columns) * height))
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(row_labels or []):
        draw.text((LABEL_PAD, top + r * height + height // 2), text, fill="black", font=font, anchor="lm")
    for c, text in enumerate(column_labels or []):
        draw.text((left + c * width + width // 2, top // 2), text, fill="black", font=font, anchor="mm")
    return grid
