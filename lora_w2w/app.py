"""`w2w app`: weights2weights in the browser (Gradio), on the tiny world and the CPU by default.

    w2w app                                    # http://127.0.0.1:7860: files/tiny/base + files/tiny/space
    w2w app --base stablediffusionapi/realistic-vision-v51 --space files/official --device cuda

One page: sample a new identity, invert uploaded photos of one person (FFHQ's face alignment, inside an
automatic mask from the face's landmarks or a mask drawn with a brush; the encoder's model shown at once,
then refined), edit the current model with a slider per attribute (debiased, with delayed injection,
before/after), generate with any prompt, download it as a w2w model, a kohya/ComfyUI/A1111 LoRA or a PEFT folder
(zipped), or upload a model. The current model lives in each browser session's `gr.State`, and in the
browser's storage (`gr.BrowserState`), so that a reload keeps it; the pipeline and the space are loaded
once per process (an `Actions`' Workbench), and device work runs one job at a time through Gradio's
queue. What cannot be done is prevented (a button stays off until it can act) or answered with a
warning holding the CLI's one line, the page left as it was. Every action is also an API endpoint for
`gradio_client` (`w2w app --help`), which answers bad input with that line as its error:

    client = Client("http://127.0.0.1:7860/")
    model, images = client.predict(0, api_name="/sample")
    model, images = client.predict(handle_file(model), '{"Eyeglasses": 3}', ["Male", "Age"], api_name="/edit")
    kohya = client.predict(handle_file(model), "kohya", api_name="/export")

Files the app writes (images, models, downloads, uploads) are removed after --keep-files seconds, a
closed page's downloads at once.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import html
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home unless asked to

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from . import workbench  # noqa: E402
from .checks import COUNT, DEVICE, FINITE, SEED, argument, check_int, check_seed  # noqa: E402
from .defaults import DEFAULT_BASE, DEFAULT_SPACE  # noqa: E402
from .editing import attribute_names, binary_attributes, default_debias  # noqa: E402
from .encoder_files import default_encoder  # noqa: E402
from .errors import NoFaceError, W2WError, exit_code  # noqa: E402
from .flags import OneLineParser, add_config_flags, config_from_args  # noqa: E402
from .images import IMAGE_SUFFIXES  # noqa: E402
from .inversion import CROPS, PRESETS, Photo, open_image  # noqa: E402
from .pipeline import image_grid  # noqa: E402
from .space import W2WModel  # noqa: E402
from .workbench import Workbench  # noqa: E402

INITS = ("encoder", "zero")  # where an inversion starts: the encoder's prediction, or the space's mean (zero)
EXPORT_FORMATS = ("w2w", "kohya", "peft")  # a w2w model file, a kohya .safetensors, a zipped PEFT folder
MODEL_SUFFIXES = (".safetensors", ".pt")  # the model files an upload takes: the project's, the original w2wmodel.pt
DEFAULT_MAX_UPLOAD = "20mb"  # photos and SD1.5 models fit
# The page's inversion steps: a quarter of the real preset's 400, which the tiny world inverts in about 10 s of
# one core (benchmarks/README.md, the app); the preset's own count is the button beside it.
QUICK_INVERSION_STEPS = 100
KEEP_FILES = 3600  # seconds a file the app wrote stays on the server's disk (--keep-files)
SWEEP_EVERY_MAX = 300  # seconds between two sweeps of Gradio's cache at most (fewer for a shorter --keep-files)
MAX_EDITS_TEXT = 100_000  # characters of an edit's JSON: far more than every attribute's name and strength
STRENGTH_RANGE = 4.0  # edit sliders span -4 ... +4 standard deviations of the dataset along the direction
STRENGTH_STEP = 0.25
DISPLAY_SIZE = 512  # an uploaded image smaller than this (short side) is shown enlarged, to draw the mask on
BRUSH_COLOR = "rgb(255, 64, 160)"  # the mask brush: any stroke (alpha > 0) is inside the mask
OUTSIDE_MASK = 0.3  # brightness of what lies outside the mask in the page's picture of what was fitted
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # hosts only this machine reaches
SYSTEM_FONTS, SYSTEM_MONO_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"]
DEVICE_JOB = dict(concurrency_limit=1, concurrency_id="device")  # one job at a time on the device
PRIVATE = dict(api_visibility="private")  # the page's own events, not endpoints
PORT = argument(check_int, minimum=1, maximum=65535)


def upload_size(text: str) -> str:
    """The argparse type of --max-upload: a size as Gradio reads it (a whole number and b, kb, mb, gb or tb)."""
    if not re.fullmatch(r"0*[1-9]\d{0,15}\s*[kmgt]?b", text.strip(), re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size such as 20mb, 1gb or 500kb, got {text!r}")
    return text.strip().lower()


def user_password(text: str) -> str:
    """The argparse type of --auth: USER:PASSWORD, both given."""
    user, colon, password = text.partition(":")
    if not (user and colon and password):
        raise argparse.ArgumentTypeError("expected USER:PASSWORD (both given, split at the first colon)")
    return text


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
        "help": "address to listen on (default: %(default)s, this machine only; 0.0.0.0: the network, which warns "
                "unless --auth is given)"})
    port: int = field(default=7860, metadata={"help": "port, 1 to 65535", "type": PORT})
    auth: str | None = field(default=None, metadata={
        "help": "ask for this user name and password before serving the page or the API (Gradio's login); "
                "other users of this machine can read it in its process list", "type": user_password,
        "metavar": "USER:PASSWORD"})
    share: bool = field(default=False, metadata={"help": "also open a public gradio.live link (goes online)"})
    max_upload: str = field(default=DEFAULT_MAX_UPLOAD, metadata={
        "help": "largest file a browser or client may upload, e.g. 20mb, 1gb", "type": upload_size})
    keep_files: int = field(default=KEEP_FILES, metadata={
        "help": "seconds a file the app wrote (images, models, downloads, uploads) stays on the server's disk; "
                "a closed page's downloads go at once", "type": COUNT})
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
    encoder: str | None = field(default=None, metadata={
        "help": "encoder file of the space (`w2w train-encoder`) the Invert tab starts from (default: the one the "
                "space names in its space.json, if any)", "metavar": "PATH"})


APP_DESCRIPTION = (
    "Serve a Gradio page on HOST:PORT: sample a new identity; upload photos of one person, draw a mask with a "
    f"brush or take the automatic one, and invert them ({QUICK_INVERSION_STEPS} steps by default, the preset's "
    "own count one click away, the steps and the time left in a progress bar; from the encoder's model, shown at "
    "once, when the space names an encoder or --encoder gives one); edit the model with a slider per "
    "attribute (standard deviations of the dataset, -4 to +4), debiased against the ticked attributes, with an "
    "injection timestep and a before/after comparison; generate with any prompt; download the model as a w2w "
    "model, a kohya/ComfyUI/A1111 .safetensors or a diffusers/PEFT folder (zip); upload any model `w2w export "
    "--model` reads. Each browser has its own current model, kept across a reload; the pipeline and space are "
    "loaded once; device jobs run one at a time. Defaults: the tiny world on the CPU; for Stable Diffusion 1.5: "
    "--base stablediffusionapi/realistic-vision-v51 --space files/official.")

APP_API = f"""\
API (gradio_client; every model travels as a w2w model file, every image list is a gallery):
  /sample(seed)                              -> (model file, images)
  /edit(model file, edits, debias)           -> (model file, images)
        edits: {{"ATTRIBUTE": STRENGTH, ...}} as JSON, strengths in standard deviations of the dataset;
        debias: a list of attributes whose directions are removed (default: Male and Age, as `w2w edit`);
        attributes go by the sliders' names (Beard, Age) or the table's (No_Beard, Young)
  /invert(image file, mask file or None, preset, steps[, crop, auto mask, more image files, init])
                                             -> (model file, images)
        preset: real or ood; steps: default {PRESETS["real"].steps}; the mask is white where the image is fitted;
        crop: center (default) or face; auto mask: True fits the images without a mask file over the face,
        forehead and hair their landmarks outline; more image files: a list of further photos of the same
        person, inverted together with the first; init: zero (default) or encoder (start from the encoder's
        prediction, the mean over the images, as `w2w invert --init encoder`; steps 0: that prediction alone)
  /generate(model file, prompt, seeds, steps) -> images     seeds: "0 1 2 3"
  /export(model file, format)                -> file        format: w2w, kohya or peft (a zip)
Numbers may come as numbers or as text ("3").
Example:
  from gradio_client import Client, handle_file
  client = Client("http://127.0.0.1:7860/")
  model, images = client.predict(0, api_name="/sample")
  edited, images = client.predict(handle_file(model), '{{"Eyeglasses": 3}}', ["Male", "Age"], api_name="/edit")
  kohya = client.predict(handle_file(edited), "kohya", api_name="/export")
Bad input gets the one line `w2w: error: ...` the other commands print, as the error of the call."""


def error_line(error: Exception) -> str:
    """The line the CLI prints for `error`, with uploaded files named as the user named them (not by
    their path in Gradio's upload folder)."""
    upload_folder = re.escape(str(Path(gr.utils.get_upload_folder()).resolve()))
    message = re.sub(upload_folder + r"/[^/\s]+/", "", str(error))
    return f"w2w: error: {message}"


# ----------------------------------------------------------------------------- values from a page or a client

def whole_number(value, what: str) -> int:
    """A whole number as a page or a client sends it: an int, a float such as 3.0 or text such as '3'."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and re.fullmatch(r"[+-]?\d{1,30}", text):
        return int(text)
    if isinstance(text, (int, float, str)) and not isinstance(text, bool):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise W2WError(f"{what} {value!r}: expected a whole number")


def one_of(value, choices, what: str) -> str:
    """`value` when it is one of `choices`, else W2WError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise W2WError(f"{what} {value!r}: expected one of {', '.join(choices)}")
    return value


def yes_or_no(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise W2WError(f"{what} {value!r}: expected true or false")
    return value


def attribute_list(value, attributes: list[str], what: str = "debias") -> list[str]:
    """A list of the space's attribute names (None: none), else W2WError naming what is wrong."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise W2WError(f"{what} {value!r}: expected a list of attribute names")
    unknown = sorted(set(value) - set(attributes))
    if unknown:
        raise W2WError(f"{what}: no attribute {', '.join(map(repr, unknown))}; the space has: {', '.join(attributes)}")
    return list(value)


def parse_seeds(text: str | list | tuple, limit: int) -> list[int]:
    """'0 1 2 3' or '0, 1, 2, 3' (or a list) -> [0, 1, 2, 3]; W2WError beyond `limit` seeds."""
    parts = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    if not 1 <= len(parts) <= limit:
        raise W2WError(f"seeds {text!r}: expected 1 to {limit} seeds, got {len(parts)}")
    try:
        return [check_seed(whole_number(part, "seed")) for part in parts]
    except W2WError:
        raise W2WError(f"seeds {text!r}: expected whole numbers from 0 to 2^63 - 1 such as 0 1 2 3") from None


def check_steps(steps, limit: int, what: str = "steps", minimum: int = 1) -> int:
    """A whole number of steps in minimum..limit, or W2WError naming the value."""
    number = whole_number(steps, what) if steps is not None else None
    if number is None or not minimum <= number <= limit:
        raise W2WError(f"{what} {steps}: expected a whole number from {minimum} to {limit} (the app's limit)")
    return number


def parse_strengths(text, attributes: list[str]) -> dict[str, float]:
    """'{"Eyeglasses": 3, "Age": 1}' -> {"Eyeglasses": 3.0, "Age": 1.0}."""
    shown = repr(text) if len(str(text)) <= 80 else f"{str(text)[:60]!r}... ({len(str(text)):,} characters)"
    if text is not None and not isinstance(text, str) or len(text or "") > MAX_EDITS_TEXT:
        raise W2WError(f"edits {shown}: expected a JSON object of at most {MAX_EDITS_TEXT:,} characters")
    try:
        strengths = json.loads(text or "{}")
    except (json.JSONDecodeError, RecursionError) as error:
        why = "nested too deep" if isinstance(error, RecursionError) else error
        raise W2WError(f"edits {shown}: not JSON ({why}); expected {{\"ATTRIBUTE\": STRENGTH, ...}}") from None
    return check_strengths(strengths, attributes, f"edits {shown}")


def check_strengths(strengths, attributes: list[str], what: str = "edits") -> dict[str, float]:
    """{attribute: finite number} -> {attribute: float}, the attributes the space's, else W2WError."""
    if not isinstance(strengths, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in strengths.values()):
        raise W2WError(f"{what}: expected a JSON object of attribute names and numbers (standard deviations)")
    attribute_list(list(strengths), attributes, "edits")
    return {name: float(value) for name, value in strengths.items()}


def check_suffix(path: str, suffixes, what: str) -> str:
    """`path` when its name ends in one of `suffixes`, else W2WError naming the file and the suffixes taken.
    The page checks an upload's type here rather than with gr.File(file_types=...), whose refusal leaves
    the upload box in Gradio's error state."""
    if Path(path).suffix.lower() not in suffixes:
        raise W2WError(f"{Path(path).name}: not {what}; expected a file ending in {', '.join(suffixes)}")
    return path


def safe_name(name) -> str:
    """A file name stem from the page (letters, digits, . _ -), else w2w_model: names never make paths."""
    return name if isinstance(name, str) and re.fullmatch(r"[\w-][\w.-]{0,79}", name) else "w2w_model"


# ----------------------------------------------------------------------------- pictures

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
    and the space, loaded once) within the app's per-request limits, every value checked as it comes from
    a page or a client. Files handed to Gradio go to a temporary folder, a folder per owner (a page's
    session, or the API): `forget` removes an owner's, each export those older than `keep_files` seconds,
    and the whole folder goes at exit."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.bench = Workbench(config.base, config.space, config.device, progress=False)
        self.bench.check()  # a space of another base fails before any request
        self.attributes = attribute_names(self.bench.space)  # the sliders' names: friendly (Beard, Age) via editing
        self.names = [*self.attributes, *(c for c in binary_attributes(self.bench.space) if c not in self.attributes)]
        # the encoder inversions may start from (--encoder, else the space's default; None: none), loaded now, so
        # that another space's is refused at start
        named = config.encoder or default_encoder(config.space)
        self.encoder = None if named is None else self.bench.encoder(named)
        self._outputs = tempfile.TemporaryDirectory(prefix="w2w-app-")

    @property
    def outputs(self) -> Path:
        return Path(self._outputs.name)

    def sample(self, seed) -> W2WModel:
        model, = self.bench.sample(1, check_seed(whole_number(seed, "seed")))
        return model

    def load(self, path: str | None) -> W2WModel:
        """A model file (the project's .safetensors or the original w2wmodel.pt) of this space."""
        if path is None:
            raise W2WError("no model file given")
        return self.bench.load(path)

    def edit(self, model: W2WModel, strengths: dict[str, float], debias) -> W2WModel:
        """`model` moved by strength standard deviations along each attribute's direction (0: not moved),
        debiased against `debias` (each direction against the others, not itself)."""
        debias = attribute_list(debias, self.names)
        strengths = {name: value for name, value in strengths.items() if value != 0}
        return self.bench.edit(model, strengths, debias) if strengths else model

    def inversion_steps(self, steps, init) -> int:
        """The steps of an inversion from `init` (encoder: 0 is the encoder's prediction alone), checked."""
        if one_of(init, INITS, "init") == "encoder" and self.encoder is None:
            raise W2WError(f"init 'encoder': the space {self.config.space} names no encoder and `w2w app --encoder "
                           f"PATH` was not given; expected zero")
        return check_steps(steps, self.config.max_inversion_steps, "inversion steps", int(init == "zero"))

    def invert(self, images, masks, preset_name, steps, on_step=None, crop="center",
               auto_mask=False, init="zero") -> tuple[W2WModel, list[Photo]]:
        """The model that reproduces `images` (photos of one person: files or PIL images) inside `masks`
        (one per image: a file, an image or None; or one for a single image), with the preset's settings for
        this space, `steps` optimiser steps and seed 0, from `init` (zero, or encoder: the mean of the
        encoder's predictions): what `w2w invert --image ... --crop CROP [--init encoder]` computes.
        `auto_mask` gives every image without a mask the mask of its face's landmarks over face, forehead and
        hair (`--mask auto`). Returns the model and the photos as fitted."""
        steps = self.inversion_steps(steps, init)
        config = self.bench.inversion_config(one_of(preset_name, PRESETS, "inversion preset"), steps=steps)
        if not images:
            raise W2WError("no image to invert: upload one first")
        return self.bench.invert(images, masks, config, auto_mask=yes_or_no(auto_mask, "auto mask"),
                                 crop=one_of(crop, CROPS, "crop"), on_step=on_step,
                                 encoder=self.encoder if init == "encoder" else None)

    def images(self, model: W2WModel, prompt: str | None = None, negative_prompt: str = "", seeds=None,
               steps=None, guidance: float | None = None, edited: W2WModel | None = None,
               injection_timestep: int | None = None) -> list[Image.Image]:
        """One image per seed of `model` (with `edited` for t <= injection_timestep when given)."""
        config = self.config
        return self.bench.images(model, str(prompt) if prompt else None, negative_prompt=str(negative_prompt or ""),
                                 seeds=parse_seeds(config.seeds if seeds is None else seeds, config.max_seeds),
                                 steps=check_steps(config.steps if steps is None else steps, config.max_steps),
                                 guidance=config.guidance if guidance is None else float(guidance), edited=edited,
                                 injection_timestep=None if edited is None else int(injection_timestep))

    def export(self, model: W2WModel, fmt, name: str = "w2w_model", owner: str = "api") -> str:
        """`model` written as a w2w model file, a kohya .safetensors or a zipped PEFT folder in `owner`'s
        folder; its path."""
        fmt = one_of(fmt, EXPORT_FORMATS, "export format")
        self.sweep()
        owned = self.owned(owner)
        owned.mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=owned))  # a folder per file: names never collide
        name = safe_name(name)
        names = {"w2w": f"{name}.safetensors", "kohya": f"{name}_kohya.safetensors", "peft": f"{name}_peft"}
        path = self.bench.export(model, fmt, folder / names[fmt])
        return shutil.make_archive(str(path), "zip", root_dir=path) if fmt == "peft" else str(path)

    def sweep(self) -> None:
        """Remove the exports older than keep_files seconds (Gradio has its own copy of each by then), and
        the empty files as old that Gradio 6's gr.File leaves in its cache, one per file it hands to a
        handler (`File._process_single_file` makes a NamedTemporaryFile it never uses; delete_cache does
        not know them)."""
        oldest = time.time() - self.config.keep_files
        leftovers = Path(gr.utils.get_upload_folder()).glob("tmp*")
        for path in [*self.outputs.glob("*/*"), *leftovers]:
            try:
                status = path.lstat()
                if status.st_mtime >= oldest:
                    continue
                if path.is_dir() and path.parent.parent == self.outputs:
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_file() and status.st_size == 0:
                    path.unlink()
            except FileNotFoundError:  # removed meanwhile by another request's sweep
                continue

    def owned(self, owner: str) -> Path:
        """The folder of `owner`'s exports, named by a hash: the owner's name comes from the client."""
        return self.outputs / hashlib.sha256(str(owner).encode()).hexdigest()[:16]

    def forget(self, owner: str) -> None:
        """Remove the files exported for `owner` (a page's session that ended)."""
        shutil.rmtree(self.owned(owner), ignore_errors=True)


# ----------------------------------------------------------------------------- per-session state

@dataclass
class Session:
    """One browser session: the model edits start from, the current model (it edited by `strengths`
    with `debias` and `injection`), its name, how it was made, the images of the original (the 'before'
    of the comparison) and the model the downloads hold."""

    original: W2WModel | None = None
    current: W2WModel | None = None
    name: str = "w2w_model"
    what: str = ""
    strengths: dict = field(default_factory=dict)
    debias: tuple = ()
    injection: int | None = None
    before: list = field(default_factory=list)
    offered: W2WModel | None = None


def kept_value(session: Session) -> dict:
    """What the browser keeps of a session (JSON) so that a reload brings the model back."""
    return dict(space=session.original.space_id, name=session.name, what=session.what,
                original=session.original.coefficients.tolist(), current=session.current.coefficients.tolist(),
                strengths=session.strengths, debias=list(session.debias), injection=session.injection)


def kept_session(actions: Actions, value) -> Session | None:
    """The session a browser kept (`kept_value`; None: nothing kept), every value checked: the browser
    may send anything."""
    if not value:
        return None
    problem = "expected the app's own record of a model"
    if not isinstance(value, dict) or not {"original", "current", "space"} <= set(value):
        raise W2WError(f"the model this browser kept: {problem}")
    models, k = [], actions.bench.space.num_components
    for key in ("original", "current"):
        numbers = value[key]
        if not isinstance(numbers, list) or not 0 < len(numbers) <= k or not all(
                isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
            raise W2WError(f"the model this browser kept: {key}: {problem}")
        model = W2WModel(torch.tensor(numbers, dtype=torch.float32), value["space"])  # (K,)
        model.check_space(actions.bench.space)
        models.append(model)
    injection = value.get("injection")
    return Session(*models, name=safe_name(value.get("name")), what=str(value.get("what") or "a model")[:200],
                   strengths=check_strengths(value.get("strengths") or {}, actions.names),
                   debias=tuple(attribute_list(value.get("debias"), actions.names)),
                   injection=None if injection is None else whole_number(injection, "injection timestep"))


def progress_bar(progress: gr.Progress, clock=time.monotonic):
    """An inversion's on_step that moves a Gradio progress bar: the steps done, the loss and the time left
    at the pace of the steps so far, by `clock` (the first step also holds the run's setup, so it is not
    counted)."""
    first = []  # the time and count of the first step reported

    def on_step(done: int, total: int, loss: float) -> None:
        now = clock()
        if not first:
            first.append((now, done))
        (start, start_done), = first
        pace = (now - start) / (done - start_done) if done > start_done else None  # seconds per step
        left = "estimating the time left" if pace is None else f"about {math.ceil(pace * (total - done))} s left"
        progress((done, total), desc=f"loss {loss:.4f}, {left}", unit="steps")
    return on_step


def reporting(fn):
    """An API endpoint: bad input becomes a gr.Error holding the CLI's one line (never a traceback). The
    wrapper keeps fn's signature, where Gradio finds the gr.Progress parameter."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (W2WError, OSError) as error:
            raise gr.Error(html.escape(error_line(error), quote=False), print_exception=False) from None
    return wrapper


def warn(error: Exception) -> None:
    """The CLI's one line for `error` as a warning on the page."""
    gr.Warning(html.escape(error_line(error), quote=False))


def answered(fn):
    """A page handler: what cannot be done becomes a warning holding the CLI's one line, and no output
    changes (gr.skip()): the page never shows an errored output. A generator's outputs yielded before
    stay."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generating(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (W2WError, OSError) as error:
                warn(error)
                yield gr.skip()
        return generating

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (W2WError, OSError) as error:
            warn(error)
            return gr.skip()
    return wrapper


# ----------------------------------------------------------------------------- the page

ABOUT = """# weights2weights
Every point of this space is a model: **sample** a new identity, **invert** photos into the space,
**edit** it along attribute directions, **generate** with any prompt and **download** it as a LoRA.
Space `{space}` (K = {k:,}, M = {m:,} models), base `{base}`."""


def build_app(actions: Actions) -> gr.Blocks:
    """The Blocks page and its API endpoints over one set of actions."""
    bench, config = actions.bench, actions.config
    sweep_every = min(config.keep_files, SWEEP_EVERY_MAX)
    with gr.Blocks(title="weights2weights", analytics_enabled=False,
                   delete_cache=(sweep_every, config.keep_files)) as app:
        gr.Markdown(ABOUT.format(space=config.space, k=bench.space.num_components, m=bench.space.num_models,
                                 base=config.base))
        with gr.Row():
            with gr.Column(scale=1):
                ui = input_tabs(actions)
            with gr.Column(scale=2):
                ui |= model_column()
        ui |= edit_section(actions) | generate_section(actions)
        # The browser keeps the model under a name of the space (the record is checked when it comes back; it
        # holds nothing the browser was not shown, so its key need not be secret and survives a restart).
        ui = SimpleNamespace(state=gr.State(Session()), photos=gr.State([]), **ui,
                             kept=gr.BrowserState(None, storage_key=f"w2w-app-{bench.space.id}",
                                                  secret=f"w2w-app-{bench.space.id}"))
        wire_session(actions, ui, app)
        wire_models(actions, ui)
        wire_photos(actions, ui)
        wire_edit_and_generate(actions, ui)
        add_api(actions)
    app.queue(default_concurrency_limit=1)
    return app


def input_tabs(actions: Actions) -> dict:
    """The tabs that make a model: sample, invert uploaded photos (with a mask drawn on one), upload a model."""
    full_steps = actions.bench.inversion_config("real").steps
    with gr.Tab("Sample"):
        seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="sample-seed")
        sample_button = gr.Button("Sample a new model", variant="primary", elem_id="sample-button")
    with gr.Tab("Invert"):
        invert_file = gr.File(label=f"Photos of one person to invert (one or several: {', '.join(IMAGE_SUFFIXES)})",
                              type="filepath", file_count="multiple", elem_id="invert-file")
        add_box = gr.Checkbox(False, label="Add to these photos", elem_id="invert-add",
                              info="unticked, a new upload replaces them")
        invert_shown = gr.Dropdown([], label="Photo in the editor (the mask drawn applies to it)",
                                   interactive=True, elem_id="invert-shown")
        editor = gr.ImageEditor(label="Mask: draw the region to fit", sources=(),
                                type="pil", image_mode="RGBA", format="png", layers=False,
                                transforms=(), brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed"),
                                elem_id="invert-editor", height=420)
        with gr.Row():
            crop_box = gr.Checkbox(False, label="Crop to face", elem_id="invert-crop",
                                   info="FFHQ's alignment of the largest face")
            auto_box = gr.Checkbox(False, label="Auto mask (from the face)", elem_id="invert-auto-mask",
                                   info="photos without a drawn mask: fitted over the face, forehead "
                                        "and hair its landmarks outline")
        with gr.Row(equal_height=True):
            preset_radio = gr.Radio(list(PRESETS), value="real", label="Preset",
                                    info="real: photos of faces; ood: paintings, drawings")
            invert_steps = gr.Number(QUICK_INVERSION_STEPS, precision=0, minimum=0, label="Steps",
                                     elem_id="invert-steps")
            full_button = gr.Button(f"Full preset: {full_steps} steps", size="sm", elem_id="invert-full")
        has_encoder = actions.encoder is not None
        init_radio = gr.Radio(list(INITS), value=INITS[not has_encoder], label="Start from", interactive=has_encoder,
                              elem_id="invert-init",
                              info="encoder: its model at once, then refined by the steps (0: the encoder's alone)"
                              if has_encoder else "zero only: this space names no encoder (w2w app --encoder PATH)")
        invert_button = gr.Button("Invert", variant="primary", interactive=False, elem_id="invert-button")
        fitted = gr.Gallery(label="Fitted: each photo as fitted, dimmed outside its mask", columns=4,
                            height=240, object_fit="contain", format="png", elem_id="invert-fitted")
    with gr.Tab("Upload a model"):
        model_file = gr.File(label="w2w model (.safetensors, or the original w2wmodel.pt)", type="filepath",
                             elem_id="model-file")
    return dict(seed=seed, sample_button=sample_button, invert_file=invert_file, add_box=add_box,
                invert_shown=invert_shown, editor=editor, crop_box=crop_box, auto_box=auto_box,
                preset_radio=preset_radio, invert_steps=invert_steps, full_button=full_button,
                init_radio=init_radio, invert_button=invert_button, fitted=fitted, model_file=model_file)


def model_column() -> dict:
    """The current model: its images, what it is, and its downloads."""
    gallery = gr.Gallery(label="Current model", columns=4, height=260, format="png", elem_id="current-gallery")
    status = gr.Markdown("**Current model:** none yet: sample, invert or upload one", elem_id="status")
    with gr.Row():
        downloads = [gr.DownloadButton("w2w model", interactive=False, elem_id="download-w2w"),
                     gr.DownloadButton("kohya / ComfyUI / A1111", interactive=False, elem_id="download-kohya"),
                     gr.DownloadButton("diffusers / PEFT (zip)", interactive=False, elem_id="download-peft")]
    return dict(gallery=gallery, status=status, downloads=downloads)  # the downloads in EXPORT_FORMATS' order


def edit_section(actions: Actions) -> dict:
    """A slider per attribute, the attributes to debias against, the injection timestep, before / after;
    the sliders are off until there is a model."""
    attributes, timesteps = actions.attributes, actions.bench.pipeline().scheduler.config.num_train_timesteps
    with gr.Accordion("Edit", open=True):
        gr.Markdown("Strengths in standard deviations of the dataset along each direction (0: unchanged).")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    sliders = [gr.Slider(-STRENGTH_RANGE, STRENGTH_RANGE, value=0, step=STRENGTH_STEP, label=name,
                                         min_width=180, interactive=False, elem_id=f"edit-{name}")
                               for name in attributes]
                debias = gr.CheckboxGroup(attributes, value=default_debias(actions.bench.space),
                                          label="Debias against (keep these attributes)", elem_id="debias")
                injection = gr.Slider(0, timesteps, value=timesteps, step=10, interactive=False,
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
            seeds = gr.Textbox(" ".join(map(str, config.seeds)), label="Seeds", elem_id="generate-seeds")
            steps = gr.Slider(1, config.max_steps, value=config.steps, step=1, label="Steps")
            default = actions.bench.family().guidance if config.guidance is None else config.guidance
            guidance = gr.Slider(1, 15, value=default, step=0.5, label="Guidance")
        generate_button = gr.Button("Generate", variant="primary", interactive=False, elem_id="generate-button")
        generated = gr.Gallery(label="Generated", columns=4, format="png", elem_id="generated")
    return dict(prompt=prompt, negative=negative, seeds=seeds, steps=steps, guidance=guidance,
                generate_button=generate_button, generated=generated)


# ----------------------------------------------------------------------------- the page's handlers

def shown(images: list[Image.Image], seeds) -> list[tuple[Image.Image, str]]:
    """Images captioned with their seeds, for a gallery."""
    return [(image, f"seed {seed}") for seed, image in zip(seeds, images)]


def describe(session: Session, note: str = "") -> str:
    """The status line: how the current model was made and edited, its size and space."""
    model = session.current
    moved = ", ".join(f"{name} {value:+g}" for name, value in session.strengths.items())
    return (f"**Current model:** {html.escape(session.what)}{'; edited: ' + moved if moved else ''}"
            f"{f' ({note})' if note else ''} · {len(model.coefficients):,} coefficients · space `{model.space_id}`")


def model_outputs(ui: SimpleNamespace) -> list:
    """What a new model changes on the page (`shown_session`)."""
    return [ui.state, ui.kept, ui.gallery, ui.status, ui.comparison, ui.generated, ui.fitted, ui.generate_button,
            ui.injection, ui.debias, *ui.sliders]


def shown_session(actions: Actions, ui: SimpleNamespace, session: Session, fitted=(), restored: bool = False) -> dict:
    """The page of a new current model: its images, what it is, the comparison, the sliders at its strengths
    and on; the generated images cleared, and the fitted photos those of its inversion (or none). A session
    `restored` from the browser's record brings back its debias ticks and injection timestep too."""
    before = actions.images(session.original)
    after = actions.images(session.original, edited=session.current,
                           injection_timestep=session.injection) if session.strengths else before
    session = replace(session, before=before, offered=None)
    timestep = session.injection if session.injection is not None else ui.injection.maximum
    return {ui.state: session, ui.kept: kept_value(session), ui.gallery: shown(after, actions.config.seeds),
            ui.status: describe(session, "kept by this browser" if restored else ""),
            ui.comparison: (image_grid(before), image_grid(after)), ui.generated: [], ui.fitted: list(fitted),
            ui.generate_button: gr.update(interactive=True), ui.injection: gr.update(value=timestep, interactive=True),
            **({ui.debias: list(session.debias)} if restored else {}),
            **{slider: gr.update(value=session.strengths.get(name, 0), interactive=True)
               for name, slider in zip(actions.attributes, ui.sliders)}}


def offered(actions: Actions, ui: SimpleNamespace, session: Session, owner: str) -> dict:
    """The session's current model offered in every export format, in `owner`'s folder."""
    name = safe_name(session.name) + ("_edited" if session.strengths else "")
    files = [actions.export(session.current, fmt, name, owner) for fmt in EXPORT_FORMATS]
    return {ui.state: replace(session, offered=session.current),
            **{button: gr.update(value=f, interactive=True) for button, f in zip(ui.downloads, files)}}


def downloads_event(actions: Actions, ui: SimpleNamespace) -> dict:
    """The event that offers the session's current model in every export format, once per model."""
    @answered
    def offer(session: Session, request: gr.Request):
        if session.current is None or session.offered is session.current:
            return gr.skip()
        return offered(actions, ui, session, request.session_hash)

    return dict(fn=offer, inputs=ui.state, outputs=[ui.state, *ui.downloads], show_progress="hidden", **PRIVATE)


def wire_session(actions: Actions, ui: SimpleNamespace, app: gr.Blocks) -> None:
    """A page (re)loaded shows the model its browser kept; a page closed has its downloads removed."""
    @answered
    def on_load(value):
        session = kept_session(actions, value)
        return gr.skip() if session is None else shown_session(actions, ui, session, restored=True)

    def on_unload(request: gr.Request):
        actions.forget(request.session_hash)

    app.load(on_load, ui.kept, model_outputs(ui), show_progress_on=ui.gallery, **DEVICE_JOB, **PRIVATE
             ).then(**downloads_event(actions, ui))
    app.unload(on_unload)


def wire_models(actions: Actions, ui: SimpleNamespace) -> None:
    """The page's sample, upload and invert, each making the session's model, then its downloads."""
    @answered
    def on_sample(seed_value):
        seed = check_seed(whole_number(seed_value, "seed"))
        session = Session(actions.sample(seed), name=f"sample_seed{seed}", what=f"sampled with seed {seed}")
        return shown_session(actions, ui, replace(session, current=session.original))

    @answered
    def on_upload_model(path):
        try:
            model = actions.load(check_suffix(path, MODEL_SUFFIXES, "a model file"))
        except (W2WError, OSError) as error:  # named, and taken out of the upload box; nothing else changes
            warn(error)
            return {ui.model_file: None}
        return shown_session(actions, ui, Session(model, model, Path(path).stem, f"uploaded {Path(path).name}"))

    @answered
    def on_invert(photos, editor_value, shown_index, crop, auto, preset_name, steps_value, init,
                  request: gr.Request, progress=gr.Progress()):
        """With init encoder: the encoder's model at once (shown, offered), then the refined one."""
        if not photos:
            raise W2WError("no photo to invert: upload one first")
        steps = actions.inversion_steps(steps_value, init)
        index = shown_index if isinstance(shown_index, int) and 0 <= shown_index < len(photos) else 0
        drawn = mask_from_layers((editor_value or {}).get("layers") or [], open_image(photos[index]).size)
        masks = [drawn if i == index else None for i in range(len(photos))]
        how = dict(crop="face" if crop else "center", auto_mask=bool(auto), init=init)
        for phase_steps in ([0] if init == "encoder" else []) + [steps] * (steps > 0):
            try:
                with warnings_shown():
                    model, fitted = actions.invert(photos, masks, preset_name, phase_steps, progress_bar(progress),
                                                   **how)
            except NoFaceError as error:
                raise NoFaceError(f"{error} (here: untick Crop to face)") from None
            what = inverted_what(preset_name, phase_steps, photos, crop, drawn is not None, fitted, init)
            page = shown_session(actions, ui, Session(model, model, "inverted", what),
                                 fitted=[(fitted_view(photo), fitted_caption(photo)) for photo in fitted])
            if phase_steps == steps:
                yield page
                return
            session = page[ui.state]  # the encoder's model: shown at once, then offered while the steps refine it
            yield page | {ui.status: describe(replace(session, what=f"{what}, refining {steps} steps ..."))}
            yield offered(actions, ui, session, request.session_hash)

    outputs, downloads = model_outputs(ui), downloads_event(actions, ui)
    job = dict(show_progress_on=ui.gallery, **DEVICE_JOB, **PRIVATE)
    ui.sample_button.click(on_sample, ui.seed, outputs, **job).then(**downloads)
    ui.model_file.upload(on_upload_model, ui.model_file, [*outputs, ui.model_file], **job).then(**downloads)
    # minimal: the progress over the gallery lets the images beneath show (the encoder's, while the steps refine it)
    ui.invert_button.click(on_invert, [ui.photos, ui.editor, ui.invert_shown, ui.crop_box, ui.auto_box,
                                       ui.preset_radio, ui.invert_steps, ui.init_radio], [*outputs, *ui.downloads],
                           **job, show_progress="minimal").then(**downloads)


def inverted_what(preset_name: str, steps, images: list, crop: bool, drawn: bool, photos: list[Photo],
                  init: str = "zero") -> str:
    """What the status line says of an inversion: its preset, steps, images, crop and masks, and its start."""
    encoded = init == "encoder" and not steps  # the encoder's model alone
    what = [preset_name] + [f"{int(steps)} steps"] * (not encoded) + [f"{len(images)} images"] * (len(images) > 1)
    what += ["face crop"] * bool(crop)
    auto_used = sum(photo.auto for photo in photos)  # a drawn mask wins over the automatic one
    how = [text for text, used in (("the mask drawn", drawn),
                                   ("auto masks" if auto_used > 1 else "the auto mask", auto_used)) if used]
    head = "the encoder's model" if encoded else "inverted"
    start = ", from the encoder's model" if init == "encoder" and not encoded else ""
    return f"{head} ({', '.join(what + ['with ' + ' and '.join(how) if how else 'without a mask'])}){start}"


def photos_shown(ui: SimpleNamespace, photos: list[str], index: int = 0) -> dict:
    """The Invert tab for `photos`: the list, the photo `index` in the editor, the choice of it, the button."""
    choices = [(Path(path).name, i) for i, path in enumerate(photos)]
    picture = display_copy(open_image(photos[index]).convert("RGB")) if photos else None
    return {ui.photos: photos, ui.invert_file: photos or None, ui.invert_button: gr.update(interactive=bool(photos)),
            ui.editor: {"background": picture, "layers": [], "composite": picture} if photos else None,
            ui.invert_shown: gr.update(choices=choices, value=index if photos else None)}


def wire_photos(actions: Actions, ui: SimpleNamespace) -> None:
    """The Invert tab's photos: a new upload replaces them (or adds to them, "Add" ticked), a removed one
    goes, the editor shows the chosen one; the preset's full step count is a click away."""
    def on_upload(photos, files, add):
        files = list(files or [])
        new = files[len(photos):] if files[:len(photos)] == photos else files  # Gradio appends an upload
        try:
            for path in new:  # a photo the library cannot read is named now, not at the Invert click
                open_image(check_suffix(path, IMAGE_SUFFIXES, "an image file"))
        except W2WError as error:
            warn(error)
            return {ui.invert_file: photos or None}  # the list as it was
        photos = (photos if add else []) + [path for path in new if not (add and path in photos)]
        return photos_shown(ui, photos, photos.index(new[0]) if new else 0)

    tab = [ui.photos, ui.invert_file, ui.invert_button, ui.editor, ui.invert_shown]
    ui.invert_file.upload(on_upload, [ui.photos, ui.invert_file, ui.add_box], tab, show_progress="hidden",
                          **PRIVATE)
    gr.on([ui.invert_file.clear, ui.invert_file.delete], answered(lambda files: photos_shown(ui, list(files or []))),
          ui.invert_file, tab, show_progress="hidden", **PRIVATE)
    ui.invert_shown.input(answered(lambda photos, index: photos_shown(ui, photos, index)[ui.editor] if photos
                                   and index in range(len(photos)) else gr.skip()),
                          [ui.photos, ui.invert_shown], ui.editor, show_progress="hidden", **PRIVATE)
    full = {name: actions.bench.inversion_config(name).steps for name in PRESETS}
    ui.preset_radio.change(lambda name: gr.update(value=f"Full preset: {full[name]} steps"), ui.preset_radio,
                           ui.full_button, show_progress="hidden", **PRIVATE)
    ui.full_button.click(lambda name: full[name], ui.preset_radio, ui.invert_steps, show_progress="hidden", **PRIVATE)


def wire_edit_and_generate(actions: Actions, ui: SimpleNamespace) -> None:
    """The page's edit (on a slider's release, the debias ticks, the injection timestep) and generate."""
    attributes, seeds = actions.attributes, actions.config.seeds

    @answered
    def on_edit(session, timestep, debias_against, *strengths):
        if session.original is None:  # a debias tick before any model: nothing to edit yet
            return gr.skip()
        moved = {name: float(value) for name, value in zip(attributes, strengths) if value}
        edited = actions.edit(session.original, moved, list(debias_against or []))
        images = actions.images(session.original, edited=edited, injection_timestep=timestep)
        session = replace(session, current=edited, strengths=moved, debias=tuple(debias_against or ()),
                          injection=int(timestep))
        return {ui.state: session, ui.kept: kept_value(session), ui.gallery: shown(images, seeds),
                ui.status: describe(session),
                ui.comparison: (image_grid(session.before) if session.before else None, image_grid(images))}

    @answered
    def on_generate(session, prompt_text, negative_text, seeds_text, steps_value, guidance_value):
        if session.current is None:
            raise W2WError("no model yet: sample, invert or upload one first")
        seed_list = parse_seeds(seeds_text, actions.config.max_seeds)
        return shown(actions.images(session.current, prompt_text, negative_text, seed_list, steps_value,
                                    guidance_value), seed_list)

    gr.on([slider.release for slider in ui.sliders] + [ui.debias.input, ui.injection.release], on_edit,
          [ui.state, ui.injection, ui.debias, *ui.sliders], [ui.state, ui.kept, ui.gallery, ui.status, ui.comparison],
          trigger_mode="always_last", show_progress_on=ui.gallery, **DEVICE_JOB, **PRIVATE
          ).then(**downloads_event(actions, ui))
    ui.generate_button.click(on_generate, [ui.state, ui.prompt, ui.negative, ui.seeds, ui.steps, ui.guidance],
                             ui.generated, show_progress_on=ui.generated, **DEVICE_JOB, **PRIVATE)


# ----------------------------------------------------------------------------- the API endpoints (gradio_client)

def api_components(actions: Actions) -> SimpleNamespace:
    """The hidden inputs and outputs of the endpoints, which say their types and defaults to the clients.
    The inputs hand the endpoints what the client sent (text boxes, and choices that take any value), so
    that the endpoints check it and answer in one line: Gradio's own number and choice components would
    fail on a NaN or an unknown name before them, with an empty error."""
    attributes, config = actions.attributes, actions.config

    def choices(values, value, label, **more):
        return gr.Dropdown(list(values), value=value, label=label, allow_custom_value=True, **more)

    with gr.Column(visible=False):
        return SimpleNamespace(
            seed=gr.Textbox("0", label="seed: a whole number"),
            model=gr.File(label="model file", type="filepath"),
            out=gr.File(label="model file"),
            images=gr.Gallery(label="images", format="png"),
            edits=gr.Textbox("{}", label="edits: {attribute: strength in std} as JSON"),
            debias=choices(attributes, default_debias(actions.bench.space), "debias against",
                           multiselect=True),
            image=gr.File(label="image file", type="filepath"),
            mask=gr.File(label="mask file (white: fitted) or None", type="filepath"),
            preset=choices(PRESETS, "real", "preset"),
            steps=gr.Textbox(str(PRESETS["real"].steps), label="steps: a whole number"),
            crop=choices(CROPS, "center", "crop: center or face"),
            auto=gr.Checkbox(False, label="auto mask (from the face's landmarks) for images without a mask file"),
            more=gr.File(label="more image files of the same person (no mask file)", type="filepath",
                         file_count="multiple"),
            init=choices(INITS, "zero", "init: zero or encoder (the encoder's prediction, refined by the steps)"),
            prompt=gr.Textbox(actions.bench.space.prompt, label="prompt"),
            seeds=gr.Textbox(" ".join(map(str, config.seeds)), label="seeds"),
            gen_steps=gr.Textbox(str(config.steps), label="steps: a whole number"),
            format=choices(EXPORT_FORMATS, "kohya", "format"),
            file=gr.File(label="file"),
            buttons=[gr.Button(visible=False) for _ in range(5)])


def add_api(actions: Actions) -> None:
    """The endpoints of APP_API: every model travels as a w2w model file, every image list as a gallery."""
    api = api_components(actions)

    @reporting
    def sample(seed_value):
        """A new model sampled with `seed`: (model file, images of it)."""
        model = actions.sample(seed_value)
        return actions.export(model, "w2w", f"sample_seed{whole_number(seed_value, 'seed')}"), actions.images(model)

    @reporting
    def edit(path, edits, debias_against):
        """The model moved along attribute directions: (edited model file, images of it)."""
        strengths = parse_strengths(edits, actions.names)
        edited = actions.edit(actions.load(path), strengths, debias_against)
        return actions.export(edited, "w2w", "edited"), actions.images(edited)

    @reporting
    def invert(image_path, mask_path, preset_name, steps_value, crop="center", auto=False, more=None, init="zero",
               progress=gr.Progress()):
        """The model that reproduces the image (inside the mask) and any more images of the person, cut by
        `crop`, with the auto mask on those without a mask, from `init`: (model file, images of it)."""
        if image_path is None:
            raise W2WError("no image file given")
        images = [image_path, *(more or [])]
        with warnings_shown():
            model, _ = actions.invert(images, [mask_path] + [None] * (len(images) - 1), preset_name, steps_value,
                                      progress_bar(progress), crop=crop, auto_mask=auto, init=init)
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
    invert_b.click(invert, [api.image, api.mask, api.preset, api.steps, api.crop, api.auto, api.more, api.init],
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
    """Load the workbench once, build the page and serve it until interrupted; a warning first when it
    serves beyond this machine without a login."""
    if config.auth is None and (config.host not in LOOPBACK or config.share):
        where = "a public gradio.live link" if config.share else f"{config.host}, beyond this machine,"
        warnings.warn(f"serving on {where} without authentication: anyone who reaches it can use the app and its "
                      f"device; pass --auth USER:PASSWORD", stacklevel=2)
    app = build_app(Actions(config))
    print(f"w2w app: serving {config.space} on {config.base} at http://{config.host}:{config.port}/ (Ctrl+C stops)",
          flush=True)
    app.launch(server_name=config.host, server_port=config.port, share=config.share, max_file_size=config.max_upload,
               auth=tuple(config.auth.split(":", 1)) if config.auth else None, quiet=True,
               theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS), footer_links=["api"])


if __name__ == "__main__":
    sys.exit(main())
