"""`w2w app`: weights2weights in the browser (Gradio), on the tiny world and the CPU by default.

    w2w app                                    # http://127.0.0.1:7860: files/tiny/base + files/tiny/space
    w2w app --base stablediffusionapi/realistic-vision-v51 --space files/official --device cuda

One page: sample a new identity, invert uploaded photos of one person (cut around the face, inside an
automatic face ellipse or a mask drawn with a brush), edit
the current model with a slider per attribute (debiased, with delayed injection, before/after),
generate with any prompt, download it as a w2w model, a kohya/ComfyUI/A1111 LoRA or a PEFT folder
(zipped), or upload a model. The current model lives in each browser session's `gr.State`; the
pipeline and the space are loaded once per process, and device work runs one job at a time through
Gradio's queue. Every action is also an API endpoint for `gradio_client` (`w2w app --help`):

    client = Client("http://127.0.0.1:7860/")
    model, images = client.predict(0, api_name="/sample")
    model, images = client.predict(handle_file(model), '{"Eyeglasses": 3}', ["Male", "Young"], api_name="/edit")
    kohya = client.predict(handle_file(model), "kohya", api_name="/export")
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home unless asked to

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .bases import family_of  # noqa: E402
from .cli import DEFAULT_MAX_UPLOAD, DEFAULT_SPACE  # noqa: E402
from .diffusion import image_sizes  # noqa: E402
from .editing import apply_edits, attribute_directions  # noqa: E402
from .errors import NoFaceError, W2WError  # noqa: E402
from .formats import save_lora  # noqa: E402
from .inversion import (AUTO_MASK, CROPS, PRESETS, Photo, invert, open_image, photo_targets, preset,  # noqa: E402
                        read_photos)
from .pipeline import DEFAULT_BASE, generate, image_grid, load_base_pipeline  # noqa: E402
from .sampling import sample_models  # noqa: E402
from .space import W2WModel  # noqa: E402
from .storage import load_model, load_space, save_model  # noqa: E402

EXPORT_FORMATS = ("w2w", "kohya", "peft")  # a w2w model file, a kohya .safetensors, a zipped PEFT folder
STRENGTH_RANGE = 4.0  # edit sliders span -4 ... +4 standard deviations of the dataset along the direction
STRENGTH_STEP = 0.25
DEBIAS_DEFAULT = ("Male", "Young")
DISPLAY_SIZE = 512  # an uploaded image smaller than this (short side) is shown enlarged, to draw the mask on
BRUSH_COLOR = "rgb(255, 64, 160)"  # the mask brush: any stroke (alpha > 0) is inside the mask
OUTSIDE_MASK = 0.3  # brightness of what lies outside the mask in the page's picture of what was fitted
SYSTEM_FONTS, SYSTEM_MONO_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"]


@dataclass(frozen=True)
class AppConfig:
    """What `w2w app` serves and its limits."""

    space: str = field(default=DEFAULT_SPACE, metadata={"help": "space directory"})
    base: str = field(default=DEFAULT_BASE, metadata={"help": "base pipeline folder or hub id"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:1 ..."})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3), metadata={"help": "seeds of the images every action shows"})
    steps: int = field(default=20, metadata={"help": "denoising steps of those images"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    max_steps: int = field(default=200, metadata={"help": "most denoising steps a request may ask for"})
    max_seeds: int = field(default=16, metadata={"help": "most images (seeds) a request may ask for"})
    max_inversion_steps: int = field(default=2000, metadata={"help": "most inversion steps a request may ask for"})
    max_upload: str = field(default=DEFAULT_MAX_UPLOAD, metadata={"help": "largest upload, e.g. 20mb (Gradio refuses larger)"})


def error_line(error: Exception) -> str:
    """The line the CLI prints for `error`, with uploaded files named as the user named them (not by
    their path in Gradio's upload folder)."""
    upload_folder = re.escape(str(Path(gr.utils.get_upload_folder()).resolve()))
    message = re.sub(upload_folder + r"/[^/\s]+/", "", str(error))
    return f"w2w: error: {message}"


def binary_attributes(space) -> list[str]:
    """The ±1 columns of the space's attribute table: the attributes an edit slider moves."""
    if space.attributes is None:
        return []
    return [str(name) for name in space.attributes.columns if np.isin(space.attributes[name].to_numpy(), (-1, 1)).all()
            and len(np.unique(space.attributes[name].to_numpy())) == 2]


def parse_seeds(text: str | list | tuple, limit: int) -> list[int]:
    """'0 1 2 3' or '0, 1, 2, 3' (or a list) -> [0, 1, 2, 3]; W2WError beyond `limit` seeds."""
    parts = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        raise W2WError(f"seeds {text!r}: expected whole numbers such as 0 1 2 3") from None
    if not 1 <= len(seeds) <= limit:
        raise W2WError(f"seeds {text!r}: expected 1 to {limit} seeds, got {len(seeds)}")
    return seeds


def check_steps(steps, limit: int, what: str = "steps") -> int:
    """A whole number of steps in 1..limit, or W2WError naming the value."""
    if steps is None or not float(steps).is_integer() or not 1 <= int(steps) <= limit:
        raise W2WError(f"{what} {steps}: expected a whole number from 1 to {limit} (the app's limit)")
    return int(steps)


def parse_strengths(text: str, attributes: list[str]) -> dict[str, float]:
    """'{"Eyeglasses": 3, "Young": -1}' -> {"Eyeglasses": 3.0, "Young": -1.0}."""
    try:
        strengths = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise W2WError(f"edits {text!r}: not JSON ({error}); expected {{\"ATTRIBUTE\": STRENGTH, ...}}") from None
    if not isinstance(strengths, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in strengths.values()):
        raise W2WError(f"edits {text!r}: expected a JSON object of attribute names and numbers (standard deviations)")
    unknown = sorted(set(strengths) - set(attributes))
    if unknown:
        raise W2WError(f"no attribute {', '.join(map(repr, unknown))}; the space has: {', '.join(attributes)}")
    return {name: float(value) for name, value in strengths.items()}


def mask_from_layers(layers: list[Image.Image], size: tuple[int, int]) -> Image.Image | None:
    """The brush strokes of the image editor's layers (alpha > 0) as a binary mask of `size` (None: no stroke)."""
    alpha = None
    for layer in layers:
        strokes = np.asarray(layer.convert("RGBA"))[..., 3] > 0  # (H, W)
        alpha = strokes if alpha is None else alpha | strokes
    if alpha is None or not alpha.any():
        return None
    mask = Image.fromarray(np.where(alpha, 255, 0).astype(np.uint8), mode="L")
    return mask.resize(size, Image.NEAREST)


def display_copy(image: Image.Image) -> Image.Image:
    """The image enlarged for drawing on when its short side is under DISPLAY_SIZE (same aspect ratio)."""
    scale = DISPLAY_SIZE / min(image.size)
    if scale <= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def fitted_view(photo: Photo) -> Image.Image:
    """The picture a photo is fitted on (after its crop), dimmed to OUTSIDE_MASK outside its mask."""
    picture = np.asarray(photo.picture.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    if photo.mask is not None:
        weight = photo.mask.astype(np.float32)[..., None] / 255  # (H, W, 1), soft for the automatic mask
        picture = picture * (OUTSIDE_MASK + (1 - OUTSIDE_MASK) * weight)
    return Image.fromarray(np.round(picture).astype(np.uint8))


def fitted_caption(photo: Photo) -> str:
    name = Path(photo.name).name
    return f"{name}: {'auto mask' if photo.auto else 'no mask' if photo.mask is None else 'mask drawn'}"


@contextmanager
def warnings_shown():
    """The library's warnings to the user (a learning rate too high, no face for an automatic mask) become
    toasts on the page: they are raised with stacklevel=2, so they name this file; others go to the log."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if warning.filename == __file__:
            gr.Warning(html.escape(str(warning.message), quote=False))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


# ----------------------------------------------------------------------------- the engine (one per process)

class Engine:
    """The pipeline and space, loaded once; every device job holds `lock` (the UNet's weights are fused in place)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.space = load_space(config.space)
        self.pipe = load_base_pipeline(config.base, config.device, progress=False)
        self.family = family_of(self.pipe)
        self.family.check_layout(self.family.network(self.pipe), self.space.layout)  # another base's space: refused
        self.attributes = binary_attributes(self.space)
        self.lock = threading.Lock()
        self._outputs = tempfile.TemporaryDirectory(prefix="w2w-app-")  # files handed to Gradio; gone at exit
        self._directions: dict[tuple, dict] = {}

    # ------------------------------------------------------------------------- models

    def sample(self, seed) -> W2WModel:
        if seed is None or not float(seed).is_integer():
            raise W2WError(f"seed {seed}: expected a whole number")
        return sample_models(self.space, num=1, seed=int(seed))[0]

    def load(self, path: str) -> W2WModel:
        """A model file (the project's .safetensors or the original w2wmodel.pt) of this space."""
        model = load_model(path)
        model.check_space(self.space)
        return model

    def edit(self, model: W2WModel, strengths: dict[str, float], debias: list[str]) -> W2WModel:
        """`model` moved by strength standard deviations along each attribute's direction, debiased
        against `debias` (each direction against the others, not itself)."""
        unknown = sorted(set(debias) - set(self.attributes))
        if unknown:
            raise W2WError(f"debias: no attribute {', '.join(map(repr, unknown))}; the space has: "
                           f"{', '.join(self.attributes)}")
        strengths = {name: value for name, value in strengths.items() if value != 0}
        if not strengths:
            return model
        key = (tuple(sorted(strengths)), tuple(sorted(debias)))
        if key not in self._directions:
            self._directions[key] = attribute_directions(self.space, list(key[0]), debias_against=list(key[1]))
        return apply_edits(model, strengths, self._directions[key])

    def invert(self, images, masks, preset_name: str, steps, on_step=None, crop: str = "center",
               auto_mask: bool = False) -> tuple[W2WModel, list[Photo]]:
        """The model of the space that reproduces `images` (an image or a list: photos of one person, files
        or PIL images) inside `masks` (one per image: a file, an image or None; or one for a single image),
        with the preset's settings for this space, `steps` optimiser steps and seed 0: what `w2w invert
        --image ... --crop CROP` computes. `auto_mask` gives every image without a mask the ellipse over
        its detected face and hair (`--mask auto`). Returns the model and the photos as fitted."""
        if preset_name not in PRESETS:
            raise W2WError(f"unknown inversion preset {preset_name!r}; expected one of {', '.join(PRESETS)}")
        steps = check_steps(steps, self.config.max_inversion_steps, "inversion steps")
        config = preset(preset_name, self.space, steps=steps)
        single = (str, os.PathLike, Image.Image)
        images = [images] if isinstance(images, single) else list(images)
        if not images:
            raise W2WError("no image to invert: upload one first")
        masks = [None] * len(images) if masks is None else [masks] if isinstance(masks, single) else list(masks)
        if auto_mask:
            masks = [AUTO_MASK if mask is None else mask for mask in masks]  # a mask given wins over the automatic one
        photos = read_photos(images, masks, crop)
        targets, target_masks = photo_targets(photos, *image_sizes(self.pipe))
        with self.lock:
            model = invert(self.pipe, self.space, targets, target_masks, config, seed=0, progress=False,
                           on_step=on_step)
        return model, photos

    # ------------------------------------------------------------------------- images

    def images(self, model: W2WModel, prompt: str | None = None, negative_prompt: str = "", seeds=None,
               steps=None, guidance: float | None = None, edited: W2WModel | None = None,
               injection_timestep: int | None = None) -> list[Image.Image]:
        """One image per seed of `model` (with `edited` for t <= injection_timestep when given)."""
        seeds = parse_seeds(self.config.seeds if seeds is None else seeds, self.config.max_seeds)
        steps = check_steps(self.config.steps if steps is None else steps, self.config.max_steps)
        with self.lock:
            return generate(self.pipe, self.space, model, prompt or None, negative_prompt=negative_prompt or "",
                            seeds=seeds, num_inference_steps=steps,
                            guidance_scale=self.config.guidance if guidance is None else float(guidance),
                            edited=edited, injection_timestep=None if edited is None else int(injection_timestep))

    # ------------------------------------------------------------------------- files

    def export(self, model: W2WModel, fmt: str, name: str = "w2w_model") -> str:
        """`model` written as a w2w model file, a kohya .safetensors or a zipped PEFT folder; its path."""
        if fmt not in EXPORT_FORMATS:
            raise W2WError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        folder = Path(tempfile.mkdtemp(dir=self._outputs.name))  # a folder per file: names never collide
        if fmt == "w2w":
            return str(save_model(model, folder / f"{name}.safetensors"))
        weights = model.weights(self.space)
        if fmt == "kohya":
            return str(save_lora(self.space.layout, weights, folder / f"{name}_kohya.safetensors", "kohya",
                                 self.space.base_model, self.family.lora_naming()))
        peft = save_lora(self.space.layout, weights, folder / f"{name}_peft", "peft", self.space.base_model,
                         self.family.lora_naming())
        return shutil.make_archive(str(peft), "zip", root_dir=peft)


# ----------------------------------------------------------------------------- per-session state

@dataclass
class Session:
    """One browser session: the model edits start from, the current model (edited), its name and the
    images of the original (the 'before' of the comparison)."""

    original: W2WModel | None = None
    current: W2WModel | None = None
    name: str = "w2w_model"
    before: list = field(default_factory=list)

    def require(self) -> W2WModel:
        if self.current is None:
            raise W2WError("no model yet: sample, invert or upload one first")
        return self.current


def reporting(fn):
    """Run a handler; bad input becomes a gr.Error holding the CLI's one line (never a traceback). The
    wrapper keeps fn's signature, where Gradio finds the gr.Progress parameter."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (W2WError, OSError) as error:
            raise gr.Error(html.escape(error_line(error), quote=False), print_exception=False) from None
    return wrapper


# ----------------------------------------------------------------------------- the page

ABOUT = """# weights2weights
Every point of this space is a model: **sample** a new identity, **invert** photos into the space,
**edit** it along attribute directions, **generate** with any prompt and **download** it as a LoRA.
Space `{space}` (K = {k:,}, M = {m:,} models), base `{base}`."""


def build_app(engine: Engine) -> gr.Blocks:
    """The Blocks page and its API endpoints over one engine."""
    config, attributes = engine.config, engine.attributes
    device = dict(concurrency_limit=1, concurrency_id="device")  # one job at a time on the device

    def shown(images: list[Image.Image]) -> list[tuple[Image.Image, str]]:
        return [(image, f"seed {seed}") for seed, image in zip(config.seeds, images)]

    def describe(session: Session, what: str) -> str:
        model = session.current
        return f"**Current model:** {what} · {len(model.coefficients):,} coefficients · space `{model.space_id}`"

    with gr.Blocks(title="weights2weights", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        state = gr.State(Session())
        gr.Markdown(ABOUT.format(space=config.space, k=engine.space.num_components, m=engine.space.num_models, base=config.base))
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Sample"):
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="sample-seed")
                    sample_button = gr.Button("Sample a new model", variant="primary", elem_id="sample-button")
                with gr.Tab("Invert"):
                    invert_file = gr.File(label="Photos of one person to invert (one or several)", type="filepath",
                                          file_count="multiple", elem_id="invert-file")
                    invert_shown = gr.Dropdown([], label="Image in the editor (the mask drawn applies to it)",
                                               interactive=True, elem_id="invert-shown")
                    editor = gr.ImageEditor(label="Mask: draw the region to fit",
                                            type="pil", image_mode="RGBA", format="png", layers=False,
                                            transforms=(), brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed"),
                                            elem_id="invert-editor", height=420)
                    with gr.Row():
                        crop_box = gr.Checkbox(False, label="Crop to face", elem_id="invert-crop",
                                               info="the square around the largest face, framed as the paper's crops")
                        auto_box = gr.Checkbox(False, label="Auto mask (face ellipse)", elem_id="invert-auto-mask",
                                               info="images without a drawn mask: fitted inside an ellipse over the "
                                                    "face and hair")
                    with gr.Row():
                        preset_radio = gr.Radio(list(PRESETS), value="real", label="Preset",
                                                info="real: photos of faces; ood: paintings, drawings")
                        invert_steps = gr.Number(PRESETS["real"].steps, precision=0, label="Steps",
                                                 elem_id="invert-steps")
                    invert_button = gr.Button("Invert", variant="primary", elem_id="invert-button")
                    fitted = gr.Gallery(label="Fitted: the crop, dimmed outside the mask", columns=4,
                                        height=200, format="png", elem_id="invert-fitted")
                with gr.Tab("Upload a model"):
                    model_file = gr.File(label="w2w model (.safetensors, or the original w2wmodel.pt)",
                                         type="filepath", elem_id="model-file")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Current model", columns=4, height=260, format="png",
                                     elem_id="current-gallery")
                status = gr.Markdown("**Current model:** none yet", elem_id="status")
                with gr.Row():
                    download_w2w = gr.DownloadButton("w2w model", interactive=False, elem_id="download-w2w")
                    download_kohya = gr.DownloadButton("kohya / ComfyUI / A1111", interactive=False,
                                                       elem_id="download-kohya")
                    download_peft = gr.DownloadButton("diffusers / PEFT (zip)", interactive=False,
                                                      elem_id="download-peft")
        with gr.Accordion("Edit", open=True):
            gr.Markdown("Strengths in standard deviations of the dataset along each direction (0: unchanged).")
            with gr.Row():
                with gr.Column(scale=2):
                    with gr.Row():
                        sliders = [gr.Slider(-STRENGTH_RANGE, STRENGTH_RANGE, value=0, step=STRENGTH_STEP,
                                             label=name, min_width=180, elem_id=f"edit-{name}")
                                   for name in attributes]
                    debias = gr.CheckboxGroup(attributes, value=[a for a in DEBIAS_DEFAULT if a in attributes],
                                              label="Debias against (keep these attributes)", elem_id="debias")
                    injection = gr.Slider(0, engine.pipe.scheduler.config.num_train_timesteps,
                                          value=engine.pipe.scheduler.config.num_train_timesteps, step=10,
                                          label="Injection timestep T: the edit acts for t <= T "
                                                "(1000: all steps; 700-1000 global edits, 400-700 fine ones)",
                                          elem_id="injection")
                comparison = gr.ImageSlider(label="Before / after", type="pil", elem_id="comparison", scale=1)
        with gr.Accordion("Generate", open=False):
            with gr.Row():
                prompt = gr.Textbox(engine.space.prompt, label="Prompt ('sks person' is the identity)", scale=3)
                negative = gr.Textbox("", label="Negative prompt", scale=2)
            with gr.Row():
                seeds = gr.Textbox(" ".join(map(str, config.seeds)), label="Seeds")
                steps = gr.Slider(1, config.max_steps, value=config.steps, step=1, label="Steps")
                guidance = gr.Slider(1, 15, value=config.guidance, step=0.5, label="Guidance")
            generate_button = gr.Button("Generate", variant="primary")
            generated = gr.Gallery(label="Generated", columns=4, format="png")

        # ------------------------------------------------------------------------- browser handlers

        def new_model(session: Session, model: W2WModel, name: str, what: str):
            images = engine.images(model)
            session = replace(session, original=model, current=model, name=name, before=images)
            resets = [gr.update(value=0) for _ in sliders]
            return (session, shown(images), describe(session, what), (image_grid(images), image_grid(images)),
                    *resets)

        new_outputs = [state, gallery, status, comparison, *sliders]

        @reporting
        def on_sample(session, seed_value):
            model = engine.sample(seed_value)
            return new_model(session, model, f"sample_seed{int(seed_value)}", f"sampled with seed {int(seed_value)}")

        @reporting
        def on_upload_model(session, path):
            if path is None:
                return (session, gr.skip(), gr.skip(), gr.skip(), *[gr.skip() for _ in sliders])
            model = engine.load(path)
            return new_model(session, model, Path(path).stem, f"uploaded {Path(path).name}")

        def editor_picture(path):
            image = display_copy(open_image(path).convert("RGB"))
            return {"background": image, "layers": [], "composite": image}

        @reporting
        def on_invert_file(paths):
            if not paths:
                return None, gr.update(choices=[], value=None)
            for path in paths:  # a file that is not an image is named now, not at the Invert click
                open_image(path)
            return editor_picture(paths[0]), gr.update(choices=[(Path(path).name, i) for i, path in enumerate(paths)],
                                                     value=0)

        @reporting
        def on_invert_shown(paths, index):
            return editor_picture(paths[index]) if paths and index is not None else gr.skip()

        @reporting
        def on_invert(session, paths, editor_value, shown_index, crop, auto, preset_name, steps_value,
                      progress=gr.Progress()):
            """The uploaded files as `w2w invert` fits them; without files, the image put into the editor."""
            layers = (editor_value or {}).get("layers") or []
            if paths:
                images, drawn_on = list(paths), shown_index or 0
                drawn = mask_from_layers(layers, open_image(images[drawn_on]).size)
            else:
                background = (editor_value or {}).get("background")
                if background is None:
                    raise W2WError("no image to invert: upload one first")
                images, drawn_on = [background.convert("RGB")], 0
                drawn = mask_from_layers(layers, background.size)
            masks = [drawn if i == drawn_on else None for i in range(len(images))]
            try:
                with warnings_shown():
                    model, photos = engine.invert(
                        images, masks, preset_name, steps_value, crop="face" if crop else "center",
                        auto_mask=bool(auto),
                        on_step=lambda done, total, loss: progress((done, total), desc=f"loss {loss:.4f}"))
            except NoFaceError as error:
                raise NoFaceError(f"{error} (here: untick Crop to face)") from None
            what = [preset_name, f"{int(steps_value)} steps"] + [f"{len(images)} images"] * (len(images) > 1)
            what += ["face crop"] * bool(crop)
            auto_used = sum(photo.auto for photo in photos)  # a drawn mask wins over the automatic one
            how = [text for text, used in (("the mask drawn", drawn is not None),
                                           ("auto masks" if auto_used > 1 else "the auto mask", auto_used)) if used]
            what += ["with " + " and ".join(how) if how else "without a mask"]
            return (*new_model(session, model, "inverted", f"inverted ({', '.join(what)})"),
                    [(fitted_view(photo), fitted_caption(photo)) for photo in photos])

        @reporting
        def on_edit(session, timestep, debias_against, *strengths):
            original = session.original
            if original is None:
                raise W2WError("no model to edit yet: sample, invert or upload one first")
            edited = engine.edit(original, dict(zip(attributes, strengths)), list(debias_against or []))
            images = engine.images(original, edited=edited, injection_timestep=timestep)
            moved = ", ".join(f"{a} {s:+g}" for a, s in zip(attributes, strengths) if s)
            session = replace(session, current=edited, name=session.name.removesuffix("_edited") +
                              ("_edited" if moved else ""))
            before = image_grid(session.before) if session.before else None
            return (session, shown(images), describe(session, f"edited: {moved}" if moved else "unedited"),
                    (before, image_grid(images)))

        @reporting
        def on_generate(session, prompt_text, negative_text, seeds_text, steps_value, guidance_value):
            seed_list = parse_seeds(seeds_text, config.max_seeds)
            images = engine.images(session.require(), prompt_text, negative_text, seed_list, steps_value,
                                   guidance_value)
            return [(image, f"seed {s}") for s, image in zip(seed_list, images)]

        @reporting
        def on_downloads(session):
            if session.current is None:
                return [gr.update(value=None, interactive=False)] * 3
            return [gr.update(value=engine.export(session.current, fmt, session.name), interactive=True)
                    for fmt in EXPORT_FORMATS]

        downloads = [download_w2w, download_kohya, download_peft]
        private = dict(api_visibility="private")
        sample_button.click(on_sample, [state, seed], new_outputs, **device, **private
                            ).then(on_downloads, state, downloads, **private)
        model_file.upload(on_upload_model, [state, model_file], new_outputs, **device, **private
                          ).then(on_downloads, state, downloads, **private)
        invert_file.upload(on_invert_file, invert_file, [editor, invert_shown], **private)
        invert_shown.input(on_invert_shown, [invert_file, invert_shown], editor, **private)
        invert_button.click(on_invert, [state, invert_file, editor, invert_shown, crop_box, auto_box, preset_radio,
                                        invert_steps], [*new_outputs, fitted], **device, **private
                            ).then(on_downloads, state, downloads, **private)
        preset_radio.change(lambda name: PRESETS[name].steps, preset_radio, invert_steps, **private)
        gr.on([slider.release for slider in sliders] + [debias.input, injection.release], on_edit,
              [state, injection, debias, *sliders], [state, gallery, status, comparison], trigger_mode="always_last",
              **device, **private).then(on_downloads, state, downloads, **private)
        generate_button.click(on_generate, [state, prompt, negative, seeds, steps, guidance], generated, **device,
                              **private)

        # ------------------------------------------------------------------------- API endpoints (gradio_client)

        with gr.Column(visible=False):
            api_seed = gr.Number(0, precision=0, label="seed")
            api_model = gr.File(label="model file", type="filepath")
            api_out = gr.File(label="model file")
            api_images = gr.Gallery(label="images", format="png")
            api_edits = gr.Textbox("{}", label="edits: {attribute: strength in std} as JSON")
            api_debias = gr.CheckboxGroup(attributes, value=[a for a in DEBIAS_DEFAULT if a in attributes],
                                          label="debias against")
            api_image = gr.File(label="image file", type="filepath")
            api_mask = gr.File(label="mask file (white: fitted) or None", type="filepath")
            api_preset = gr.Radio(list(PRESETS), value="real", label="preset")
            api_steps = gr.Number(PRESETS["real"].steps, precision=0, label="steps")
            api_crop = gr.Radio(list(CROPS), value="center", label="crop: center or face")
            api_auto = gr.Checkbox(False, label="auto mask (face ellipse) for images without a mask file")
            api_more = gr.File(label="more image files of the same person (no mask file)", type="filepath",
                               file_count="multiple")
            api_prompt = gr.Textbox(engine.space.prompt, label="prompt")
            api_seeds = gr.Textbox(" ".join(map(str, config.seeds)), label="seeds")
            api_gen_steps = gr.Number(config.steps, precision=0, label="steps")
            api_format = gr.Radio(list(EXPORT_FORMATS), value="kohya", label="format")
            api_file = gr.File(label="file")
            api_buttons = [gr.Button(visible=False) for _ in range(5)]

        def model_argument(path) -> W2WModel:
            if path is None:
                raise W2WError("no model file given")
            return engine.load(path)

        @reporting
        def api_sample_fn(seed_value):
            """A new model sampled with `seed`: (model file, images of it)."""
            model = engine.sample(seed_value)
            return engine.export(model, "w2w", f"sample_seed{int(seed_value)}"), engine.images(model)

        @reporting
        def api_edit_fn(path, edits, debias_against):
            """The model moved along attribute directions: (edited model file, images of it)."""
            edited = engine.edit(model_argument(path), parse_strengths(edits, attributes), list(debias_against or []))
            return engine.export(edited, "w2w", "edited"), engine.images(edited)

        @reporting
        def api_invert_fn(image_path, mask_path, preset_name, steps_value, crop="center", auto=False, more=None,
                          progress=gr.Progress()):
            """The model that reproduces the image (inside the mask) and any more images of the person, cut by
            `crop`, with the auto mask on those without a mask: (model file, images of it)."""
            if image_path is None:
                raise W2WError("no image file given")
            images = [image_path, *(more or [])]
            with warnings_shown():
                model, _ = engine.invert(
                    images, [mask_path] + [None] * (len(images) - 1), preset_name, steps_value, crop=crop,
                    auto_mask=bool(auto),
                    on_step=lambda done, total, loss: progress((done, total), desc=f"loss {loss:.4f}"))
            return engine.export(model, "w2w", "inverted"), engine.images(model)

        @reporting
        def api_generate_fn(path, prompt_text, seeds_text, steps_value):
            """Images of the model for a prompt, one per seed."""
            return engine.images(model_argument(path), prompt_text, seeds=parse_seeds(seeds_text, config.max_seeds),
                                 steps=steps_value)

        @reporting
        def api_export_fn(path, fmt):
            """The model as a file: w2w (model), kohya (.safetensors) or peft (zipped folder)."""
            return engine.export(model_argument(path), fmt, Path(path).stem)

        sample_b, edit_b, invert_b, generate_b, export_b = api_buttons
        sample_b.click(api_sample_fn, api_seed, [api_out, api_images], api_name="sample", **device)
        edit_b.click(api_edit_fn, [api_model, api_edits, api_debias], [api_out, api_images], api_name="edit", **device)
        invert_b.click(api_invert_fn, [api_image, api_mask, api_preset, api_steps, api_crop, api_auto, api_more],
                       [api_out, api_images], api_name="invert", **device)
        generate_b.click(api_generate_fn, [api_model, api_prompt, api_seeds, api_gen_steps], api_images,
                         api_name="generate", **device)
        export_b.click(api_export_fn, [api_model, api_format], api_file, api_name="export")
    app.queue(default_concurrency_limit=1)
    return app


def launch(config: AppConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Load the engine once, build the page and serve it until interrupted."""
    engine = Engine(config)
    app = build_app(engine)
    print(f"w2w app: serving {config.space} on {config.base} at http://{host}:{port}/ (Ctrl+C stops)", flush=True)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=config.max_upload, quiet=True,
               theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS), footer_links=["api"])
