"""The one engine under every front end (the `w2w` commands, the app, the demo, inversion/invert.py and
the tiny world's tables): a base pipeline and a space, each loaded once, and the jobs they share.
Front ends parse and present; the jobs live here.

    bench = Workbench(DEFAULT_BASE, DEFAULT_SPACE, device="auto")          # nothing is loaded yet
    model, = bench.sample(1, seed=0)
    edited = bench.edit(model, {"Beard": 3.0})          # friendly names; debias: editing.DEFAULT_DEBIAS
    images = bench.images(model, edited=edited, injection_timestep=700, seeds=range(4))
    model, photos = bench.invert(["me1.jpg", "me2.jpg"], auto_mask=True, preset="real", crop="face")
    bench.export(model, "kohya", "me_kohya.safetensors")

The dtype of each job (`job_dtype`): on CUDA, generation runs in float16 (bfloat16 for FLUX.1) and inversion
and training in bfloat16 (float16 gradients underflow); float32 elsewhere. The pipeline is loaded once per
dtype the jobs ask for: once on the CPU, and on CUDA once for generating and once for inverting when both are
asked.
Device jobs hold `lock` (a model is fused into the network's weights in place), so threads may share a bench.
The base may be of any family `bases` knows (Stable Diffusion 1, 2, XL, FLUX.1): its family conditions and calls
the network that carries the LoRA, and names the layers in the LoRA files `export` writes.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from .defaults import DEFAULT_BASE, DEFAULT_SPACE, require
from .editing import DEFAULT_DIRECTION_METHOD, Direction, apply_edits, attribute_directions, debias_or_default
from .errors import SettingError, SpaceError, W2WError
from .formats import SD_NAMING, LoraNaming
from .space import Space, W2WModel

JOBS = ("generate", "invert", "train")
GRADIENT_DTYPE_ON_CUDA = torch.bfloat16  # inversion and training: float16 gradients underflow
EXPORT_FORMATS = ("w2w", "peft", "kohya")  # a w2w model file, a PEFT/diffusers folder, a kohya .safetensors


def job_dtype(job: str, device: str | torch.device, family=None) -> torch.dtype:
    """The dtype a job runs the base model in on `device`: on CUDA, to generate, the base `family`'s
    (`pipeline.resolve_dtype`: float16, bfloat16 for FLUX.1), bfloat16 to invert and to train on the bench
    (text sliders; as the original; float16 gradients underflow); float32 elsewhere. Dreambooth training
    loads its own float32 base (`--mixed_precision`, the original's)."""
    from .pipeline import resolve_dtype

    if job not in JOBS:
        raise W2WError(f"unknown job {job!r}; expected one of {', '.join(JOBS)}")
    device = torch.device(device)
    if job == "generate":
        return resolve_dtype(None, device, family)
    return GRADIENT_DTYPE_ON_CUDA if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- files beside a model

def beside_model(out: str | os.PathLike, tail: str) -> Path:
    """OUT + tail for the model file OUT.safetensors (or OUT): the name of a file written beside it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return stem.with_name(stem.name + tail)


def export_path(out: str | os.PathLike, fmt: str) -> Path:
    """Where `--export` (`w2w invert`, `w2w sample`) writes the LoRA beside the model OUT.safetensors:
    OUT_lora/ (peft) or OUT_lora.safetensors (kohya)."""
    return beside_model(out, "_lora" + (".safetensors" if fmt == "kohya" else ""))


def fitted_path(out: str | os.PathLike, what: str, index: int, count: int) -> Path:
    """Where `w2w invert` shows what it fitted beside the model OUT.safetensors: OUT.mask.png, OUT.crop.png,
    or OUT.mask.1.png ... with several images (numbered in --image order)."""
    return beside_model(out, f".{what}" + (f".{index + 1}" if count > 1 else "") + ".png")


def save_fitted(out: str | os.PathLike, photos: list, crop: str) -> list[tuple[str, str, Path]]:
    """Write what an inversion fitted beside the model `out`: each photo's face crop (crop "face") and its
    automatic mask; returns (what, the photo's name, the file) for each file written."""
    from .storage import save_png

    written = []
    for index, photo in enumerate(photos):
        shown = [("crop", photo.picture)] if crop == "face" else []
        shown += [("mask", Image.fromarray(photo.mask))] if photo.auto else []
        for what, picture in shown:
            path = fitted_path(out, what, index, len(photos))
            save_png(picture, path)
            written.append((what, photo.name, path))
    return written


def pair_masks(images: Sequence, masks: Sequence | None = None, mask_dir: str | os.PathLike | None = None,
               auto_mask: bool = False) -> list | None:
    """A mask per image (a file or image, AUTO_MASK or None each): `masks` as given (one per image), or the
    files of `mask_dir` paired with the images by name; with `auto_mask`, AUTO_MASK for every image left
    without one (a mask given wins)."""
    from .inversion import AUTO_MASK, masks_in_folder

    if mask_dir is not None:
        if masks is not None:
            raise W2WError("give masks or a mask folder, not both")
        masks = masks_in_folder(images, mask_dir)
    if auto_mask:
        masks = [AUTO_MASK if mask is None else mask for mask in masks or [None] * len(images)]
    return None if masks is None else list(masks)


# ----------------------------------------------------------------------------- the workbench

class Workbench:
    """A base pipeline (a diffusers folder or hub id) and a space (a directory, or a Space), each loaded on
    first use, once, on `device` ('auto': CUDA when present); `dtype` None follows `job_dtype`, a dtype
    replaces it for every job. `progress`: progress bars (denoising, inversion). A bench without a base
    (base None) runs no model and writes LoRA files under Stable Diffusion 1's names."""

    def __init__(self, base: str | os.PathLike | None = DEFAULT_BASE,
                 space: str | os.PathLike | Space | None = DEFAULT_SPACE, device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, progress: bool = True):
        self.base, self.source, self.progress = None if base is None else str(base), space, progress
        self._device, self.dtype = device, dtype
        self._space = space if isinstance(space, Space) else None
        self._pipes: dict[torch.dtype, object] = {}  # shared with the benches of `using`
        self._directions: dict[tuple, dict[str, Direction]] = {}
        self._naming: LoraNaming | None = None
        self._family = None
        self.lock = threading.RLock()

    @property
    def device(self) -> torch.device:
        """The device, resolved (and checked against this machine) when first asked for."""
        from .checks import resolve_device

        if not isinstance(self._device, torch.device):
            self._device = resolve_device(self._device)
        return self._device

    @property
    def space(self) -> Space:
        """The space, memory-mapped: a job reads only the components it uses."""
        if self._space is None:
            if self.source is None:
                raise SpaceError("no space given: pass --space DIR")
            from .storage import load_space

            require(self.source)
            self._space = load_space(self.source)
        return self._space

    def job_dtype(self, job: str) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return job_dtype(job, self.device, self.family() if self.device.type == "cuda" else None)

    def family(self):
        """The base's family (`bases`): the loaded pipeline's, else read from the base's config files, once."""
        if self._family is None:
            from .bases import family_of, family_of_base

            if self._pipes:
                self._family = family_of(next(iter(self._pipes.values())))
            else:
                self._require_base()
                self._family = family_of_base(self.base)
        return self._family

    def resolution(self) -> int:
        """R, the base pipeline's image size: from a pipeline loaded already, else from its config files alone
        (a face crop is cut at it before the pipeline loads)."""
        from .bases import family_of
        from .pipeline import base_resolution

        if self._pipes:
            pipe = next(iter(self._pipes.values()))
            return family_of(pipe).image_sizes(pipe)[0]
        self._require_base()
        return base_resolution(self.base)

    def _require_base(self) -> None:
        if self.base is None:
            raise W2WError("no base pipeline given: pass --base (a folder or hub id)")
        require(self.base)

    def pipeline(self, job: str = "generate"):
        """The base pipeline in the job's dtype, loaded on first use."""
        dtype = self.job_dtype(job)
        with self.lock:
            if dtype not in self._pipes:
                from .pipeline import load_base_pipeline

                self._require_base()
                pipe = load_base_pipeline(self.base, self.device, dtype, progress=self.progress)
                pipe.set_progress_bar_config(desc="denoising", leave=False, disable=not self.progress)
                self._pipes[dtype] = pipe
            return self._pipes[dtype]

    def check(self, job: str = "generate") -> None:
        """Load the job's pipeline and the space; LayoutError when the space's LoRAs do not fit the network of
        the base's family (the UNet of Stable Diffusion)."""
        from .bases import family_of

        pipe = self.pipeline(job)
        family = family_of(pipe)
        family.check_layout(family.network(pipe), self.space.layout)

    def lora_naming(self) -> LoraNaming:
        """How LoRA files of this space name its layers: as the base's family names them, once the space's layout
        is checked against the base's network (a pipeline loaded already, else one built on the meta device
        from the base's config files alone); Stable Diffusion 1's names on a bench without a base."""
        if self._naming is None:
            from .bases import family_of, lora_naming_of_base

            if self.base is None:
                self._naming = SD_NAMING
            elif self._pipes:
                pipe = next(iter(self._pipes.values()))
                family = family_of(pipe)
                family.check_layout(family.network(pipe), self.space.layout)
                self._naming = family.lora_naming()
            else:
                require(self.base)
                self._naming = lora_naming_of_base(self.base, self.space.layout)
        return self._naming

    @classmethod
    def around(cls, pipe, space: str | os.PathLike | Space | None, progress: bool = True) -> "Workbench":
        """A bench over a pipeline loaded already, on its device: the jobs that run in its dtype use it, any
        other loads its own from the pipeline's folder or hub id (inversion on CUDA in bfloat16, say)."""
        bench = cls(pipe.name_or_path, space, pipe.device, progress=progress)
        bench._pipes[pipe.unet.dtype] = pipe
        return bench

    def using(self, space: Space) -> "Workbench":
        """A bench of another space (a space cut from the same dataset, say) over this bench's pipelines."""
        bench = Workbench(self.base, space, self._device, self.dtype, self.progress)
        bench._pipes, bench.lock = self._pipes, self.lock
        return bench

    # ------------------------------------------------------------------------- models

    def sample(self, num: int = 1, seed: int = 0, components: int | None = None,
               factor: float = 1.0) -> Iterator[W2WModel]:
        """`num` new models (the paper's sampling, on the first `components` coefficients), one at a time."""
        from .sampling import iter_sample_models

        return iter_sample_models(self.space, num, seed, components, factor)

    def load(self, path: str | os.PathLike) -> W2WModel:
        """A model file (the project's .safetensors or the original w2wmodel.pt) of this space."""
        from .storage import load_model

        model = load_model(path)
        model.check_space(self.space)
        return model

    def directions(self, attributes: Sequence[str], debias: Sequence[str] = (), components: int | None = None,
                   method: str = DEFAULT_DIRECTION_METHOD, debias_mode: str = "project") -> dict[str, Direction]:
        """The attributes' directions (friendly or table names; keyed by the table's columns), each debiased
        against `debias` (but itself); fitted once per request."""
        key = (tuple(sorted(attributes)), tuple(sorted(debias)), components, method, debias_mode)
        if key not in self._directions:
            self._directions[key] = attribute_directions(self.space, list(key[0]), components, method, list(key[1]),
                                                         debias_mode)
        return self._directions[key]

    def edit(self, model: W2WModel, strengths: dict[str, float], debias: Sequence[str] | None = None,
             components: int | None = None, method: str = DEFAULT_DIRECTION_METHOD,
             debias_mode: str = "project") -> W2WModel:
        """`model` moved by `strengths[a]` standard deviations of the dataset along each attribute a's direction
        (friendly names, `editing.attribute_names`, or the table's), debiased against `debias` (None:
        `editing.default_debias`, what the CLI and the app keep by default)."""
        model.check_space(self.space)
        debias = debias_or_default(self.space, debias)
        return apply_edits(model, strengths, self.directions(list(strengths), debias, components, method,
                                                             debias_mode))

    # ------------------------------------------------------------------------- images

    def images(self, model: W2WModel | None = None, prompt: str | None = None, *, edited: W2WModel | None = None,
               injection_timestep: int | None = None, negative_prompt: str = "", seeds: Sequence[int] = (0,),
               steps: int = 50, guidance: float | None = None, size: int | None = None,
               log: Callable[[str], None] | None = None) -> list[Image.Image]:
        """One image per seed of `prompt` (default: the space's) with `model` fused into the network, or the base
        model alone (model None; with a prompt it needs no space). Delayed injection: `edited` for the
        timesteps t <= `injection_timestep`. `guidance` None: the base family's (7.5 for Stable Diffusion, 3.5
        for FLUX.1). `log` hears the estimated time of a job of many seeds."""
        from .pipeline import generate, generate_from_weights

        settings = dict(negative_prompt=negative_prompt, seeds=list(seeds), num_inference_steps=steps,
                        guidance_scale=guidance, height=size, width=size, injection_timestep=injection_timestep,
                        log=log)
        with self.lock:
            pipe = self.pipeline("generate")
            if model is None and edited is None and prompt is not None:
                return generate_from_weights(pipe, None, None, prompt, **settings)
            return generate(pipe, self.space, model, prompt, edited=edited, **settings)

    # ------------------------------------------------------------------------- inversion

    def inversion_config(self, preset_name: str = "real", **overrides):
        """The preset's settings for this space (what it records for the preset, K at most its K), then the
        overrides that are not None (components, steps, lr, weight_decay, checkpoint_every, images_per_step)."""
        from .inversion import preset

        config = preset(preset_name, self.space, **overrides)
        if config.components > self.space.num_components:
            raise SettingError("components", f"{config.components}: the space {self.source} has K = "
                               f"{self.space.num_components}; pass {self.space.num_components} or fewer")
        return config

    def invert(self, images, masks=None, config=None, *, preset: str | None = None,
               mask_dir: str | os.PathLike | None = None, auto_mask: bool = False, crop: str = "center",
               detector: str = "hog", seed: int = 0, checkpoint: str | os.PathLike | None = None,
               on_step: Callable[[int, int, float], None] | None = None) -> tuple[W2WModel, list]:
        """The model of the space that reproduces `images` (photographs of one person: files or PIL images,
        or one of them) inside their masks (`pair_masks`: one per image, or one for a single image), each
        image cut by `crop` ("center", or "face": FFHQ's alignment at the pipeline's resolution, the face
        found by dlib's `detector`), with `config` (an InversionConfig; default: the settings of `preset`,
        "real" unless named, on this space). With `checkpoint`, the run saves its state there and resumes
        from it; `on_step(done, total, loss)` after each step. The model records the images' sha256, the
        preset's name and the settings. Returns the model and the photos as fitted. Bad files, masks and
        faceless photos fail before the pipeline loads."""
        from .bases import family_of
        from .inversion import ALIGNED_SIZE, invert, photo_targets, read_photos
        from .provenance import image_sha256

        single = (str, os.PathLike, Image.Image)
        images = [images] if isinstance(images, single) else list(images)
        if not images:
            raise W2WError("no image to invert: give one at least")
        masks = [masks] if isinstance(masks, single) else masks
        config = config or self.inversion_config(preset or "real")
        self.space.check_k(config.components)
        size = self.resolution() if crop == "face" else ALIGNED_SIZE
        photos = read_photos(images, pair_masks(images, masks, mask_dir, auto_mask), crop, size, detector)
        record = {"images_sha256": [image_sha256(image) for image in images], "crop": crop,  # read_photos opened them
                  **({"preset": preset} if preset else {})}
        with self.lock:
            self.check("invert")
            pipe = self.pipeline("invert")
            targets, target_masks = photo_targets(photos, *family_of(pipe).image_sizes(pipe))
            model = invert(pipe, self.space, targets, target_masks, config, seed, self.progress, checkpoint, on_step,
                           record)
        return model, photos

    def project(self, lora: str | os.PathLike, components: int | None = None,
                trust_pickle: bool = False) -> tuple[W2WModel, float]:
        """The model of the LoRA file or folder `lora` (of the space's layout) on the first `components`
        components (default: all), and the standardized residual |z - cV| / |z| of what the space cannot
        express; the model records the file's name and sha256."""
        from .formats import load_lora, peft_weights_file
        from .provenance import file_sha256, projected
        from .space import check_finite

        space = self.space if components is None else self.space.truncate(components)
        weights = load_lora(space.layout, lora, trust_pickle, self.lora_naming())
        check_finite(weights, f"the weights of {lora}")
        coefficients = space.project(weights)  # (K,)
        residual = float(space.residual(weights, coefficients))
        step = projected(lora, file_sha256(peft_weights_file(Path(lora))), space.num_components, residual)
        return W2WModel(coefficients, space.id, (step,), self.space), residual

    # ------------------------------------------------------------------------- files

    def export(self, model: W2WModel, fmt: str, path: str | os.PathLike) -> Path:
        """`model` written to `path` as a w2w model file, a PEFT/diffusers folder or a kohya .safetensors (its
        keys named as the base's family names them: `lora_naming`), each saying how the model was made
        (`provenance`); the path written."""
        from .formats import save_lora
        from .provenance import LoraAbout
        from .storage import save_model

        if fmt not in EXPORT_FORMATS:
            raise W2WError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        if fmt == "w2w":
            return Path(save_model(model, path))
        about = LoraAbout.of(model, self.space, self.known_resolution())
        return Path(save_lora(self.space.layout, model.weights(self.space), path, fmt, self.space.base_model,
                              self.lora_naming(), about))

    def known_resolution(self) -> int | None:
        """R (`resolution`) of the space's base model when it is this bench's base and its config files can be
        read here, else None: an export records it, and needs no base model."""
        from .provenance import hub_id

        if self.base is None or hub_id(self.base) != hub_id(self.space.base_model or self.base):
            return None
        try:
            return self.resolution()
        except W2WError:
            return None

