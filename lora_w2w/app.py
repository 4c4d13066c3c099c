"""`w2w app`: weights2weights in the browser (Gradio), on the tiny world and the CPU by default.

    w2w app                                    # http://127.0.0.1:7860: files/tiny/base + files/tiny/space
    w2w app --base stablediffusionapi/realistic-vision-v51 --space files/official --device cuda

One page: sample a new identity, invert uploaded photos of one person (FFHQ's face alignment, inside an
automatic mask from the face's landmarks or a mask drawn with a brush), edit
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

import argparse
import functools
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home unless asked to

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from . import workbench  # noqa: E402
from .checks import COUNT, DEVICE, FINITE, SEED  # noqa: E402
from .defaults import DEFAULT_BASE, DEFAULT_SPACE  # noqa: E402
from .editing import DEFAULT_DEBIAS, binary_attributes, resolve_attribute  # noqa: E402
from .errors import NoFaceError, W2WError, exit_code  # noqa: E402
from .flags import OneLineParser, add_config_flags, config_from_args  # noqa: E402
from .inversion import CROPS, PRESETS, Photo, open_image  # noqa: E402
from .pipeline import image_grid  # noqa: E402
from .space import W2WModel  # noqa: E402
from .workbench import Workbench  # noqa: E402

EXPORT_FORMATS = ("w2w", "kohya", "peft")  # a w2w model file, a kohya .safetensors, a zipped PEFT folder
DEFAULT_MAX_UPLOAD = "20mb"  # photos and SD1.5 models fit
STRENGTH_RANGE = 4.0  # edit sliders span -4 ... +4 standard deviations of the dataset along the direction
STRENGTH_STEP = 0.25
DEBIAS_DEFAULT = tuple(resolve_attribute(name)[0] for name in DEFAULT_DEBIAS)  # `w2w edit`'s, as the table names them
DISPLAY_SIZE = 512  # an uploaded image smaller than this (short side) is shown enlarged, to draw the mask on
BRUSH_COLOR = "rgb(255, 64, 160)"  # the mask brush: any stroke (alpha > 0) is inside the mask
OUTSIDE_MASK = 0.3  # brightness of what lies outside the mask in the page's picture of what was fitted
SYSTEM_FONTS, SYSTEM_MONO_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"]
DEVICE_JOB = dict(concurrency_limit=1, concurrency_id="device")  # one job at a time on the device
PRIVATE = dict(api_visibility="private")  # the page's own events, not endpoints


@dataclass(frozen=True)
class AppConfig:
    """What `w2w app` serves, where, and its per-request limits; its fields are the command's flags."""

    space: str = field(default=DEFAULT_SPACE, metadata={
        "help": "space directory (default: the tiny world, %(default)s; SD1.5: files/official)"})
    base: str = field(default=DEFAULT_BASE, metadata={
        "help": "base diffusers pipeline the space was built for: folder or hub id (default: %(default)s; SD1.5: "
                "stablediffusionapi/realistic-vision-v51)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:1, mps ...",
                                                  "type": DEVICE})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (default: %(default)s, this machine only; 0.0.0.0: the network)"})
    port: int = field(default=7860, metadata={"help": "port"})
    share: bool = field(default=False, metadata={"help": "also open a public gradio.live link (goes online)"})
    max_upload: str = field(default=DEFAULT_MAX_UPLOAD, metadata={
        "help": "largest file a browser or client may upload, e.g. 20mb, 1gb"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3), metadata={"help": "seeds of the images every action shows",
                                                                    "type": SEED})
    steps: int = field(default=20, metadata={"help": "denoising steps of those images", "type": COUNT})
    guidance: float | None = field(default=None, metadata={
        "help": "guidance scale (default: the base's: 7.5 for Stable Diffusion, 3.5 for FLUX.1, its embedded "
                "guidance)", "type": FINITE})
    max_steps: int = field(default=200, metadata={"help": "most denoising steps a request may ask for",
                                                  "type": COUNT})
    max_seeds: int = field(default=16, metadata={"help": "most images (seeds) a request may ask for", "type": COUNT})
    max_inversion_steps: int = field(default=2000, metadata={"help": "most inversion steps a request may ask for",
                                                             "type": COUNT})


APP_DESCRIPTION = (
    "Serve a Gradio page on HOST:PORT: sample a new identity; upload an image, draw its mask with a brush and "
    "invert it (preset, steps, the loss in a progress bar); edit the model with a slider per attribute (standard "
    "deviations of the dataset, -4 to +4), debiased against the ticked attributes, with an injection timestep and "
    "a before/after comparison; generate with any prompt; download the model as a w2w model, a "
    "kohya/ComfyUI/A1111 .safetensors or a diffusers/PEFT folder (zip); upload any model `w2w export --model` "
    "reads. Each browser has its own current model; the pipeline and space are loaded once; device jobs run one "
    "at a time. Defaults: the tiny world on the CPU; for Stable Diffusion 1.5: --base "
    "stablediffusionapi/realistic-vision-v51 --space files/official.")

APP_API = """\
API (gradio_client; every model travels as a w2w model file, every image list is a gallery):
  /sample(seed)                              -> (model file, images)
  /edit(model file, edits, debias)           -> (model file, images)
        edits: {"ATTRIBUTE": STRENGTH, ...} as JSON, strengths in standard deviations of the dataset;
        debias: a list of attributes whose directions are removed (default: Male and Young, as `w2w edit`)
  /invert(image file, mask file or None, preset, steps[, crop, auto mask, more image files]) -> (model file, images)
        preset: real or ood; the mask is white where the image is fitted; crop: center (default) or face;
        auto mask: True fits the images without a mask file over the face, forehead and hair their landmarks outline;
        more image files: a list of further photos of the same person, inverted together with the first
  /generate(model file, prompt, seeds, steps) -> images     seeds: "0 1 2 3"
  /export(model file, format)                -> file        format: w2w, kohya or peft (a zip)
Example:
  from gradio_client import Client, handle_file
  client = Client("http://127.0.0.1:7860/")
  model, images = client.predict(0, api_name="/sample")
  edited, images = client.predict(handle_file(model), '{"Eyeglasses": 3}', ["Male", "Young"], api_name="/edit")
  kohya = client.predict(handle_file(edited), "kohya", api_name="/export")
Bad input gets the one line `w2w: error: ...` the other commands print, as a Gradio error."""


def error_line(error: Exception) -> str:
    """The line the CLI prints for `error`, with uploaded files named as the user named them (not by
    their path in Gradio's upload folder)."""
    upload_folder = re.escape(str(Path(gr.utils.get_upload_folder()).resolve()))
    message = re.sub(upload_folder + r"/[^/\s]+/", "", str(error))
    return f"w2w: error: {message}"


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
    toasts on the page: they are raised with stacklevel=2, so they name the workbench, which called the
    library; others go to the log."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if warning.filename == workbench.__file__:
            gr.Warning(html.escape(str(warning.message), quote=False))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


# ----------------------------------------------------------------------------- the actions (one workbench per process)

class Actions:
    """What the page and the API endpoints do, each action once for both, on one Workbench (the pipeline
    and the space, loaded once) within the app's per-request limits; files handed to Gradio go to a
    temporary folder that goes at exit."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.bench = Workbench(config.base, config.space, config.device, progress=False)
        self.bench.check()  # a space of another base fails before any request
        self.attributes = binary_attributes(self.bench.space)
        self._outputs = tempfile.TemporaryDirectory(prefix="w2w-app-")

    def sample(self, seed) -> W2WModel:
        if seed is None or not float(seed).is_integer():
            raise W2WError(f"seed {seed}: expected a whole number")
        model, = self.bench.sample(1, int(seed))
        return model

    def load(self, path: str | None) -> W2WModel:
        """A model file (the project's .safetensors or the original w2wmodel.pt) of this space."""
        if path is None:
            raise W2WError("no model file given")
        return self.bench.load(path)

    def edit(self, model: W2WModel, strengths: dict[str, float], debias: list[str]) -> W2WModel:
        """`model` moved by strength standard deviations along each attribute's direction (0: not moved),
        debiased against `debias` (each direction against the others, not itself)."""
        unknown = sorted(set(debias) - set(self.attributes))
        if unknown:
            raise W2WError(f"debias: no attribute {', '.join(map(repr, unknown))}; the space has: "
                           f"{', '.join(self.attributes)}")
        strengths = {name: value for name, value in strengths.items() if value != 0}
        return self.bench.edit(model, strengths, debias) if strengths else model

    def invert(self, images, masks, preset_name: str, steps, on_step=None, crop: str = "center",
               auto_mask: bool = False) -> tuple[W2WModel, list[Photo]]:
        """The model that reproduces `images` (photos of one person: files or PIL images) inside `masks`
        (one per image: a file, an image or None; or one for a single image), with the preset's settings for
        this space, `steps` optimiser steps and seed 0: what `w2w invert --image ... --crop CROP` computes.
        `auto_mask` gives every image without a mask the mask of its face's landmarks over face, forehead and
        hair (`--mask auto`). Returns the model and the photos as fitted."""
        if preset_name not in PRESETS:
            raise W2WError(f"unknown inversion preset {preset_name!r}; expected one of {', '.join(PRESETS)}")
        config = self.bench.inversion_config(preset_name, steps=check_steps(steps, self.config.max_inversion_steps,
                                                                            "inversion steps"))
        if not images:
            raise W2WError("no image to invert: upload one first")
        return self.bench.invert(images, masks, config, auto_mask=auto_mask, crop=crop, on_step=on_step)

    def images(self, model: W2WModel, prompt: str | None = None, negative_prompt: str = "", seeds=None,
               steps=None, guidance: float | None = None, edited: W2WModel | None = None,
               injection_timestep: int | None = None) -> list[Image.Image]:
        """One image per seed of `model` (with `edited` for t <= injection_timestep when given)."""
        config = self.config
        return self.bench.images(model, prompt or None, negative_prompt=negative_prompt or "",
                                 seeds=parse_seeds(config.seeds if seeds is None else seeds, config.max_seeds),
                                 steps=check_steps(config.steps if steps is None else steps, config.max_steps),
                                 guidance=config.guidance if guidance is None else float(guidance), edited=edited,
                                 injection_timestep=None if edited is None else int(injection_timestep))

    def export(self, model: W2WModel, fmt: str, name: str = "w2w_model") -> str:
        """`model` written as a w2w model file, a kohya .safetensors or a zipped PEFT folder; its path."""
        if fmt not in EXPORT_FORMATS:
            raise W2WError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        folder = Path(tempfile.mkdtemp(dir=self._outputs.name))  # a folder per file: names never collide
        names = {"w2w": f"{name}.safetensors", "kohya": f"{name}_kohya.safetensors", "peft": f"{name}_peft"}
        path = self.bench.export(model, fmt, folder / names[fmt])
        return shutil.make_archive(str(path), "zip", root_dir=path) if fmt == "peft" else str(path)


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


def progress_bar(progress: gr.Progress):
    """An inversion's on_step that moves a Gradio progress bar, the loss as its text."""
    return lambda done, total, loss: progress((done, total), desc=f"loss {loss:.4f}")


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


def build_app(actions: Actions) -> gr.Blocks:
    """The Blocks page and its API endpoints over one set of actions."""
    bench, config = actions.bench, actions.config
    with gr.Blocks(title="weights2weights", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(ABOUT.format(space=config.space, k=bench.space.num_components, m=bench.space.num_models,
                                 base=config.base))
        with gr.Row():
            with gr.Column(scale=1):
                ui = input_tabs()
            with gr.Column(scale=2):
                ui |= model_column()
        ui |= edit_section(actions) | generate_section(actions)
        ui = SimpleNamespace(state=gr.State(Session()), **ui)
        wire_models(actions, ui)
        wire_edit_and_generate(actions, ui)
        add_api(actions)
    app.queue(default_concurrency_limit=1)
    return app


def input_tabs() -> dict:
    """The tabs that make a model: sample, invert uploaded photos (with a mask drawn on one), upload a model."""
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
                                   info="FFHQ's alignment of the largest face")
            auto_box = gr.Checkbox(False, label="Auto mask (from the face)", elem_id="invert-auto-mask",
                                   info="images without a drawn mask: fitted over the face, forehead "
                                        "and hair its landmarks outline")
        with gr.Row():
            preset_radio = gr.Radio(list(PRESETS), value="real", label="Preset",
                                    info="real: photos of faces; ood: paintings, drawings")
            invert_steps = gr.Number(PRESETS["real"].steps, precision=0, label="Steps", elem_id="invert-steps")
        invert_button = gr.Button("Invert", variant="primary", elem_id="invert-button")
        fitted = gr.Gallery(label="Fitted: the crop, dimmed outside the mask", columns=4,
                            height=200, format="png", elem_id="invert-fitted")
    with gr.Tab("Upload a model"):
        model_file = gr.File(label="w2w model (.safetensors, or the original w2wmodel.pt)",
                             type="filepath", elem_id="model-file")
    return dict(seed=seed, sample_button=sample_button, invert_file=invert_file, invert_shown=invert_shown,
                editor=editor, crop_box=crop_box, auto_box=auto_box, preset_radio=preset_radio,
                invert_steps=invert_steps, invert_button=invert_button, fitted=fitted, model_file=model_file)


def model_column() -> dict:
    """The current model: its images, what it is, and its downloads."""
    gallery = gr.Gallery(label="Current model", columns=4, height=260, format="png", elem_id="current-gallery")
    status = gr.Markdown("**Current model:** none yet", elem_id="status")
    with gr.Row():
        downloads = [gr.DownloadButton("w2w model", interactive=False, elem_id="download-w2w"),
                     gr.DownloadButton("kohya / ComfyUI / A1111", interactive=False, elem_id="download-kohya"),
                     gr.DownloadButton("diffusers / PEFT (zip)", interactive=False, elem_id="download-peft")]
    return dict(gallery=gallery, status=status, downloads=downloads)  # the downloads in EXPORT_FORMATS' order


def edit_section(actions: Actions) -> dict:
    """A slider per attribute, the attributes to debias against, the injection timestep, before / after."""
    attributes, timesteps = actions.attributes, actions.bench.pipeline().scheduler.config.num_train_timesteps
    with gr.Accordion("Edit", open=True):
        gr.Markdown("Strengths in standard deviations of the dataset along each direction (0: unchanged).")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    sliders = [gr.Slider(-STRENGTH_RANGE, STRENGTH_RANGE, value=0, step=STRENGTH_STEP,
                                         label=name, min_width=180, elem_id=f"edit-{name}") for name in attributes]
                debias = gr.CheckboxGroup(attributes, value=[a for a in DEBIAS_DEFAULT if a in attributes],
                                          label="Debias against (keep these attributes)", elem_id="debias")
                injection = gr.Slider(0, timesteps, value=timesteps, step=10,
                                      label="Injection timestep T: the edit acts for t <= T "
                                            "(1000: all steps; 700-1000 global edits, 400-700 fine ones)",
                                      elem_id="injection")
            comparison = gr.ImageSlider(label="Before / after", type="pil", elem_id="comparison", scale=1)
    return dict(sliders=sliders, debias=debias, injection=injection, comparison=comparison)


def generate_section(actions: Actions) -> dict:
    """Images of the current model for any prompt and seeds."""
    config = actions.config
    with gr.Accordion("Generate", open=False):
        with gr.Row():
            prompt = gr.Textbox(actions.bench.space.prompt, label="Prompt ('sks person' is the identity)", scale=3)
            negative = gr.Textbox("", label="Negative prompt", scale=2)
        with gr.Row():
            seeds = gr.Textbox(" ".join(map(str, config.seeds)), label="Seeds")
            steps = gr.Slider(1, config.max_steps, value=config.steps, step=1, label="Steps")
            default = actions.bench.family().guidance if config.guidance is None else config.guidance
            guidance = gr.Slider(1, 15, value=default, step=0.5, label="Guidance")
        generate_button = gr.Button("Generate", variant="primary")
        generated = gr.Gallery(label="Generated", columns=4, format="png")
    return dict(prompt=prompt, negative=negative, seeds=seeds, steps=steps, guidance=guidance,
                generate_button=generate_button, generated=generated)


# ----------------------------------------------------------------------------- the page's handlers

def shown(images: list[Image.Image], seeds) -> list[tuple[Image.Image, str]]:
    """Images captioned with their seeds, for a gallery."""
    return [(image, f"seed {seed}") for seed, image in zip(seeds, images)]


def describe(session: Session, what: str) -> str:
    model = session.current
    return f"**Current model:** {what} · {len(model.coefficients):,} coefficients · space `{model.space_id}`"


def editor_picture(path) -> dict:
    image = display_copy(open_image(path).convert("RGB"))
    return {"background": image, "layers": [], "composite": image}


def invert_inputs(paths, editor_value, shown_index) -> tuple[list, list]:
    """The uploaded files as `w2w invert` fits them, the mask drawn on the one in the editor; without
    files, the image put into the editor."""
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
    return images, [drawn if i == drawn_on else None for i in range(len(images))]


def inverted_what(preset_name: str, steps, images: list, crop: bool, drawn: bool, photos: list[Photo]) -> str:
    """What the status line says of an inversion: its preset, steps, images, crop and masks."""
    what = [preset_name, f"{int(steps)} steps"] + [f"{len(images)} images"] * (len(images) > 1)
    what += ["face crop"] * bool(crop)
    auto_used = sum(photo.auto for photo in photos)  # a drawn mask wins over the automatic one
    how = [text for text, used in (("the mask drawn", drawn),
                                   ("auto masks" if auto_used > 1 else "the auto mask", auto_used)) if used]
    return f"inverted ({', '.join(what + ['with ' + ' and '.join(how) if how else 'without a mask'])})"


def wire_models(actions: Actions, ui: SimpleNamespace) -> None:
    """The page's sample, upload and invert, each making the session's model, then its downloads."""
    seeds = actions.config.seeds

    def new_model(session: Session, model: W2WModel, name: str, what: str):
        images = actions.images(model)
        session = replace(session, original=model, current=model, name=name, before=images)
        return (session, shown(images, seeds), describe(session, what), (image_grid(images), image_grid(images)),
                *[gr.update(value=0) for _ in ui.sliders])

    @reporting
    def on_sample(session, seed_value):
        return new_model(session, actions.sample(seed_value), f"sample_seed{int(seed_value)}",
                         f"sampled with seed {int(seed_value)}")

    @reporting
    def on_upload_model(session, path):
        if path is None:
            return (session, gr.skip(), gr.skip(), gr.skip(), *[gr.skip() for _ in ui.sliders])
        return new_model(session, actions.load(path), Path(path).stem, f"uploaded {Path(path).name}")

    @reporting
    def on_invert_file(paths):
        if not paths:
            return None, gr.update(choices=[], value=None)
        for path in paths:  # a file that is not an image is named now, not at the Invert click
            open_image(path)
        return editor_picture(paths[0]), gr.update(choices=[(Path(path).name, i) for i, path in enumerate(paths)],
                                                   value=0)

    @reporting
    def on_invert(session, paths, editor_value, shown_index, crop, auto, preset_name, steps_value,
                  progress=gr.Progress()):
        images, masks = invert_inputs(paths, editor_value, shown_index)
        try:
            with warnings_shown():
                model, photos = actions.invert(images, masks, preset_name, steps_value,
                                               crop="face" if crop else "center", auto_mask=bool(auto),
                                               on_step=progress_bar(progress))
        except NoFaceError as error:
            raise NoFaceError(f"{error} (here: untick Crop to face)") from None
        what = inverted_what(preset_name, steps_value, images, crop, any(m is not None for m in masks), photos)
        return (*new_model(session, model, "inverted", what),
                [(fitted_view(photo), fitted_caption(photo)) for photo in photos])

    new_outputs = [ui.state, ui.gallery, ui.status, ui.comparison, *ui.sliders]
    downloads = dict(fn=on_downloads(actions), inputs=ui.state, outputs=ui.downloads, **PRIVATE)
    ui.sample_button.click(on_sample, [ui.state, ui.seed], new_outputs, **DEVICE_JOB, **PRIVATE).then(**downloads)
    ui.model_file.upload(on_upload_model, [ui.state, ui.model_file], new_outputs, **DEVICE_JOB, **PRIVATE
                         ).then(**downloads)
    ui.invert_file.upload(on_invert_file, ui.invert_file, [ui.editor, ui.invert_shown], **PRIVATE)
    ui.invert_shown.input(reporting(lambda paths, index: editor_picture(paths[index]) if paths and index is not None
                                    else gr.skip()), [ui.invert_file, ui.invert_shown], ui.editor, **PRIVATE)
    ui.invert_button.click(on_invert, [ui.state, ui.invert_file, ui.editor, ui.invert_shown, ui.crop_box, ui.auto_box,
                                       ui.preset_radio, ui.invert_steps], [*new_outputs, ui.fitted], **DEVICE_JOB,
                           **PRIVATE).then(**downloads)
    ui.preset_radio.change(lambda name: PRESETS[name].steps, ui.preset_radio, ui.invert_steps, **PRIVATE)


def on_downloads(actions: Actions):
    """The handler that offers the session's current model in every export format (none: buttons off)."""
    @reporting
    def handler(session):
        if session.current is None:
            return [gr.update(value=None, interactive=False)] * len(EXPORT_FORMATS)
        return [gr.update(value=actions.export(session.current, fmt, session.name), interactive=True)
                for fmt in EXPORT_FORMATS]
    return handler


def wire_edit_and_generate(actions: Actions, ui: SimpleNamespace) -> None:
    """The page's edit (on a slider's release, the debias ticks, the injection timestep) and generate."""
    attributes = actions.attributes

    @reporting
    def on_edit(session, timestep, debias_against, *strengths):
        original = session.original
        if original is None:
            raise W2WError("no model to edit yet: sample, invert or upload one first")
        edited = actions.edit(original, dict(zip(attributes, strengths)), list(debias_against or []))
        images = actions.images(original, edited=edited, injection_timestep=timestep)
        moved = ", ".join(f"{a} {s:+g}" for a, s in zip(attributes, strengths) if s)
        session = replace(session, current=edited, name=session.name.removesuffix("_edited") +
                          ("_edited" if moved else ""))
        before = image_grid(session.before) if session.before else None
        return (session, shown(images, actions.config.seeds),
                describe(session, f"edited: {moved}" if moved else "unedited"), (before, image_grid(images)))

    @reporting
    def on_generate(session, prompt_text, negative_text, seeds_text, steps_value, guidance_value):
        seed_list = parse_seeds(seeds_text, actions.config.max_seeds)
        images = actions.images(session.require(), prompt_text, negative_text, seed_list, steps_value, guidance_value)
        return shown(images, seed_list)

    gr.on([slider.release for slider in ui.sliders] + [ui.debias.input, ui.injection.release], on_edit,
          [ui.state, ui.injection, ui.debias, *ui.sliders], [ui.state, ui.gallery, ui.status, ui.comparison],
          trigger_mode="always_last", **DEVICE_JOB, **PRIVATE
          ).then(on_downloads(actions), ui.state, ui.downloads, **PRIVATE)
    ui.generate_button.click(on_generate, [ui.state, ui.prompt, ui.negative, ui.seeds, ui.steps, ui.guidance],
                             ui.generated, **DEVICE_JOB, **PRIVATE)


# ----------------------------------------------------------------------------- the API endpoints (gradio_client)

def api_components(actions: Actions) -> SimpleNamespace:
    """The hidden inputs and outputs of the endpoints, which say their types and defaults to the clients."""
    attributes, config = actions.attributes, actions.config
    with gr.Column(visible=False):
        return SimpleNamespace(
            seed=gr.Number(0, precision=0, label="seed"),
            model=gr.File(label="model file", type="filepath"),
            out=gr.File(label="model file"),
            images=gr.Gallery(label="images", format="png"),
            edits=gr.Textbox("{}", label="edits: {attribute: strength in std} as JSON"),
            debias=gr.CheckboxGroup(attributes, value=[a for a in DEBIAS_DEFAULT if a in attributes],
                                    label="debias against"),
            image=gr.File(label="image file", type="filepath"),
            mask=gr.File(label="mask file (white: fitted) or None", type="filepath"),
            preset=gr.Radio(list(PRESETS), value="real", label="preset"),
            steps=gr.Number(PRESETS["real"].steps, precision=0, label="steps"),
            crop=gr.Radio(list(CROPS), value="center", label="crop: center or face"),
            auto=gr.Checkbox(False, label="auto mask (from the face's landmarks) for images without a mask file"),
            more=gr.File(label="more image files of the same person (no mask file)", type="filepath",
                         file_count="multiple"),
            prompt=gr.Textbox(actions.bench.space.prompt, label="prompt"),
            seeds=gr.Textbox(" ".join(map(str, config.seeds)), label="seeds"),
            gen_steps=gr.Number(config.steps, precision=0, label="steps"),
            format=gr.Radio(list(EXPORT_FORMATS), value="kohya", label="format"),
            file=gr.File(label="file"),
            buttons=[gr.Button(visible=False) for _ in range(5)])


def add_api(actions: Actions) -> None:
    """The endpoints of APP_API: every model travels as a w2w model file, every image list as a gallery."""
    api = api_components(actions)

    @reporting
    def sample(seed_value):
        """A new model sampled with `seed`: (model file, images of it)."""
        model = actions.sample(seed_value)
        return actions.export(model, "w2w", f"sample_seed{int(seed_value)}"), actions.images(model)

    @reporting
    def edit(path, edits, debias_against):
        """The model moved along attribute directions: (edited model file, images of it)."""
        strengths = parse_strengths(edits, actions.attributes)
        edited = actions.edit(actions.load(path), strengths, list(debias_against or []))
        return actions.export(edited, "w2w", "edited"), actions.images(edited)

    @reporting
    def invert(image_path, mask_path, preset_name, steps_value, crop="center", auto=False, more=None,
               progress=gr.Progress()):
        """The model that reproduces the image (inside the mask) and any more images of the person, cut by
        `crop`, with the auto mask on those without a mask: (model file, images of it)."""
        if image_path is None:
            raise W2WError("no image file given")
        images = [image_path, *(more or [])]
        with warnings_shown():
            model, _ = actions.invert(images, [mask_path] + [None] * (len(images) - 1), preset_name, steps_value,
                                      crop=crop, auto_mask=bool(auto), on_step=progress_bar(progress))
        return actions.export(model, "w2w", "inverted"), actions.images(model)

    @reporting
    def generate(path, prompt_text, seeds_text, steps_value):
        """Images of the model for a prompt, one per seed."""
        return actions.images(actions.load(path), prompt_text,
                              seeds=parse_seeds(seeds_text, actions.config.max_seeds), steps=steps_value)

    @reporting
    def export(path, fmt):
        """The model as a file: w2w (model), kohya (.safetensors) or peft (zipped folder)."""
        return actions.export(actions.load(path), fmt, Path(path).stem)

    sample_b, edit_b, invert_b, generate_b, export_b = api.buttons
    sample_b.click(sample, api.seed, [api.out, api.images], api_name="sample", **DEVICE_JOB)
    edit_b.click(edit, [api.model, api.edits, api.debias], [api.out, api.images], api_name="edit", **DEVICE_JOB)
    invert_b.click(invert, [api.image, api.mask, api.preset, api.steps, api.crop, api.auto, api.more],
                   [api.out, api.images], api_name="invert", **DEVICE_JOB)
    generate_b.click(generate, [api.model, api.prompt, api.seeds, api.gen_steps], api.images, api_name="generate",
                     **DEVICE_JOB)
    export_b.click(export, [api.model, api.format], api.file, api_name="export")


# ----------------------------------------------------------------------------- the command

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="w2w app", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(APP_DESCRIPTION, 100) + "\n\n" + APP_API)
    add_config_flags(parser, AppConfig)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`w2w app ARGS`: serve until interrupted; bad flags or files: one line, exit 2."""
    args = parse_args(argv)
    return exit_code("w2w app", lambda: launch(config_from_args(AppConfig, args)))


def launch(config: AppConfig) -> None:
    """Load the workbench once, build the page and serve it until interrupted."""
    app = build_app(Actions(config))
    print(f"w2w app: serving {config.space} on {config.base} at http://{config.host}:{config.port}/ (Ctrl+C stops)",
          flush=True)
    app.launch(server_name=config.host, server_port=config.port, share=config.share, max_file_size=config.max_upload,
               quiet=True, theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS),
               footer_links=["api"])


if __name__ == "__main__":
    sys.exit(main())
