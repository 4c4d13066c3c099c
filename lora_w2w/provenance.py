"""How a model was made, said by every file it goes into.

A W2WModel carries `provenance`: its steps, oldest first, each a small JSON object naming what `made` it:

    {"made": "sample", "seed": 3, "index": 0, "components": 250, "factor": 1.0}
    {"made": "edit", "strengths": {"Beard": 3.0}, "debias": ["Male"], "method": "mean_difference", "components": 250}
    {"made": "invert", "images_sha256": ["9f86..."], "preset": "real", "components": 250, "lr": 0.1, ...}
    {"made": "project", "lora": "alice.safetensors", "lora_sha256": "2c26...", "components": 250, "residual": 0.01}
    {"made": "import", "file": "w2wmodel.pt", "sha256": "fcde..."}

An edit adds its step to the edited model's. No step holds a time or a folder, so the same model made twice
is the same file. Where the steps go:

- a w2w model file: its safetensors metadata `w2w_provenance` (JSON), beside `space_id`;
- a kohya file (A1111, ComfyUI): Stability AI's ModelSpec keys (`modelspec.architecture`, `.title`,
  `.trigger_phrase`, `.date`, `.resolution`, `.description` ...) and the `ss_*` keys of kohya's own training
  that A1111's and ComfyUI's LoRA readers show (`kohya_metadata`), and `w2w_provenance`;
- a PEFT folder: a README.md model card in the Hub's format (`model_card`), and `w2w_provenance` in the
  metadata of its weights;
- a generated PNG: A1111's `parameters` text chunk (`infotext`): prompt, seed, steps, guidance, size, the
  base model and the w2w model's id.

`w2w info` shows all of it. Base models are named as kohya names them (`hub_id`): a hub id as it is, a
folder by its name.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import FileFormatError
from .space import TRIGGER_PROMPT, Space, W2WModel

PROVENANCE_KEY = "w2w_provenance"  # a file's safetensors metadata: the model's steps, as JSON
SPACE_ID_KEY, MODEL_ID_KEY = "w2w_space_id", "w2w_model_id"  # a LoRA file's metadata: the model it was made from
CITATION = ("Dravid, Gandelsman, Wang, Abdal, Wetzstein, Efros and Aberman, *Interpreting the Weight Space of "
            "Customized Diffusion Models*, NeurIPS 2024 (arXiv:2406.09413)")
HUB_CACHE_FOLDER = re.compile(r"/models--([^/]+?)--([^/]+)/snapshots/")  # huggingface_hub's cache layout
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


# ----------------------------------------------------------------------------- steps

def sampled(seed: int, index: int, components: int, factor: float) -> dict:
    """The step of the `index`-th model drawn with `seed` on the first `components` coefficients."""
    return {"made": "sample", "seed": seed, "index": index, "components": components, "factor": factor}


def edited(strengths: dict[str, float], debias: list[str], method: str, components: int) -> dict:
    """The step of an edit: strengths by attribute name (friendly, signs folded in), the attributes debiased
    against, the directions' method and K."""
    return {"made": "edit", "strengths": dict(sorted(strengths.items())), "debias": sorted(debias), "method": method,
            "components": components}


def inverted(config, seed: int, images: int, record: dict | None = None) -> dict:
    """The step of an inversion of `images` images with the InversionConfig `config`; `record`: what the caller
    knows besides (the images' sha256, the preset's name)."""
    settings = {name: getattr(config, name) for name in ("components", "lr", "weight_decay", "steps",
                                                         "images_per_step")}
    return {"made": "invert", "images": images, **settings, "seed": seed, **(record or {})}


def projected(lora: str | os.PathLike, lora_sha256: str, components: int, residual: float) -> dict:
    """The step of a LoRA file projected onto the first `components` components."""
    return {"made": "project", "lora": Path(lora).name, "lora_sha256": lora_sha256, "components": components,
            "residual": round(residual, 6)}


def imported(path: str | os.PathLike) -> dict:
    """The step of a model converted from another file (the original `w2wmodel.pt`)."""
    return {"made": "import", "file": Path(path).name, "sha256": file_sha256(path)}


def file_sha256(path: str | os.PathLike) -> str:
    """What `sha256sum FILE` prints of the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_sha256(source: str | os.PathLike | Image.Image) -> str:
    """An image's sha256: of its file's bytes, or, for an image given as pixels, of its mode, size and pixels."""
    if not isinstance(source, Image.Image):
        return file_sha256(source)
    digest = hashlib.sha256(f"{source.mode} {source.size[0]}x{source.size[1]} ".encode())
    digest.update(source.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- in words

def _signed(strengths: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:+g}" for name, value in strengths.items())


def step_text(step: dict) -> str:
    """One step in words: 'sample seed 3', 'edit Beard +3 (debias Male)', 'invert 1 image (preset real ...)'."""
    made = step.get("made", "?")
    if made == "sample":
        draw = f", draw {step['index'] + 1}" if step.get("index") else ""
        factor = f", factor {step['factor']:g}" if step.get("factor", 1) != 1 else ""
        return f"sample seed {step.get('seed')}{draw}{factor}"
    if made == "edit":
        debias = f" (debias {', '.join(step['debias'])})" if step.get("debias") else ""
        return f"edit {_signed(step.get('strengths', {}))}{debias}"
    if made == "invert":
        count = step.get("images", 1)
        preset = [f"preset {step['preset']}"] if step.get("preset") else []
        settings = preset + [f"{step.get('steps')} steps", f"lr {step.get('lr'):g}", f"K {step.get('components')}"]
        return f"invert {count} image{'s' * (count != 1)} ({', '.join(settings)})"
    if made == "project":
        return f"project {step.get('lora')} (K {step.get('components')}, residual {step.get('residual'):.4f})"
    if made == "import":
        return f"import {step.get('file')}"
    return str(made)


def describe(steps) -> str:
    """The steps in words, oldest first: 'sample seed 3; edit Beard +3 (debias Male)'."""
    return "; ".join(step_text(step) for step in steps)


def step_details(step: dict) -> str:
    """A step with every value it records, by name (sha256 digests cut to 16 digits): for `w2w info` and model
    cards, the same however the step was read."""
    def shown(value) -> str:
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            return value[:16]
        if isinstance(value, list):
            return "[" + ", ".join(map(shown, value)) + "]"
        if isinstance(value, dict):
            return "[" + _signed(value) + "]"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return f"{step.get('made')}: " + ", ".join(f"{key} {shown(step[key])}" for key in sorted(step) if key != "made")


# ----------------------------------------------------------------------------- as metadata

def encode(steps) -> str:
    """The steps as the JSON of a file's metadata (sorted keys: the same steps, the same bytes)."""
    return json.dumps(list(steps), sort_keys=True, separators=(",", ":"))


def decode(text: str, where: str) -> tuple[dict, ...]:
    """The steps `encode` wrote; FileFormatError naming `where` when they are not a JSON list of steps."""
    try:
        steps = json.loads(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{where}: metadata {PROVENANCE_KEY!r} is not JSON ({error})") from None
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("made"), str) for s in steps):
        raise FileFormatError(f"{where}: metadata {PROVENANCE_KEY!r} is not a list of steps; expected "
                              f'[{{"made": "sample", ...}}, ...]')
    return tuple(steps)


def recorded(metadata: dict[str, str], where: str) -> tuple[dict, ...]:
    """The steps in a safetensors file's metadata; none for a file written without them."""
    return decode(metadata[PROVENANCE_KEY], where) if PROVENANCE_KEY in metadata else ()


# ----------------------------------------------------------------------------- names and dates

def hub_id(base: str) -> str:
    """How files name a base model: a hub id as it is; a folder of the Hugging Face cache
    (.../models--OWNER--NAME/snapshots/REVISION) by its hub id; any other folder by its name, as kohya's
    training names a local model in ss_sd_model_name (`os.path.basename`)."""
    path = Path(base)
    if path.exists():
        match = HUB_CACHE_FOLDER.search(path.resolve().as_posix() + "/")
        return f"{match[1]}/{match[2]}" if match else path.resolve().name
    return base if HUB_ID.fullmatch(base) else path.name


def today() -> str:
    """The date a file records (modelspec.date, ISO 8601): the UTC date of SOURCE_DATE_EPOCH when it is set
    (the reproducible-builds convention), else today's."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = int(epoch) if epoch and epoch.isdigit() else time.time()
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).date().isoformat()


# ----------------------------------------------------------------------------- LoRA files

@dataclass(frozen=True)
class LoraAbout:
    """What a LoRA file says of itself besides its base model: a title, the phrase that triggers the
    identity, the base's resolution R (None: not known), and the model it was made from."""

    title: str = "w2w LoRA"
    trigger_phrase: str = TRIGGER_PROMPT
    resolution: int | None = None
    provenance: tuple[dict, ...] = ()
    space_id: str | None = None
    model_id: str | None = None

    @classmethod
    def of(cls, model: W2WModel, space: Space, resolution: int | None = None) -> "LoraAbout":
        """What a LoRA of `model` in `space` says of itself."""
        return cls(f"w2w model {model.id}", space.prompt or TRIGGER_PROMPT, resolution, model.provenance, space.id,
                   model.id)

    def metadata(self) -> dict[str, str]:
        """The w2w keys of the file's safetensors metadata."""
        keys = {PROVENANCE_KEY: encode(self.provenance) if self.provenance else None, SPACE_ID_KEY: self.space_id,
                MODEL_ID_KEY: self.model_id}
        return {key: value for key, value in keys.items() if value is not None}

    def description(self) -> str:
        """How the model was made, in Markdown (ModelSpec's description, the model card's section)."""
        lines = [f"- {step_details(step)}" for step in self.provenance] or ["- not recorded"]
        where = (f"a point of the w2w space `{self.space_id}`, a linear space of identity LoRAs ({CITATION})"
                 if self.space_id else f"made with lora_w2w, which implements {CITATION}")
        return f"A LoRA, {where}. How it was made, oldest step first:\n\n" + "\n".join(lines)


# The line that says a model card is lora_w2w's, which a new export of the folder replaces (formats.PEFT_FOLDER)
MODEL_CARD_MARK = "<!-- written by lora_w2w: a new export of the model replaces this file -->"
MODELSPEC_VERSION = "1.0.0"  # github.com/Stability-AI/ModelSpec
# ModelSpec's architecture of a LoRA by kohya's ss_base_model_version (the base family's, `bases`), as kohya's
# library/sai_model_spec.py writes them: ARCH_SD_V1, ARCH_SD_V2_512, ARCH_SD_V2_768_V, ARCH_SD_XL_V1_BASE and, for
# FLUX.1 (dev or schnell: the family does not tell them apart), ARCH_FLUX_1_UNKNOWN = "flux-1", + "/lora"
MODELSPEC_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                           "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
                           "flux1": "flux-1"}
# the code whose names the keys follow: kohya's determine_implementation, IMPL_DIFFUSERS for SD1/SD2 LoRAs and
# IMPL_STABILITY_AI for SDXL's (whose keys it names as sgm does); FLUX.1's keys follow diffusers' names
MODELSPEC_IMPLEMENTATIONS = {"sdxl_base_v1-0": "https://github.com/Stability-AI/generative-models"}


def kohya_metadata(about: LoraAbout, base_model: str, output_name: str, data_sha256: str,
                   family_keys: dict[str, str]) -> dict[str, str]:
    """The ModelSpec and kohya keys of a kohya LoRA file (besides the network's ss_network_*):

    - ModelSpec 1.0 (Stability AI): sai_model_spec, architecture, implementation and title (MUST), description,
      date and hash_sha256 (SHOULD: "a hash of all tensor content (ie excluding the header section), with 0x
      prefix"), resolution and trigger_phrase (image generation keys);
    - kohya's training keys that the LoRA readers show. A1111's extensions-builtin/Lora/network.py reads
      `self.alias = self.metadata.get('ss_output_name', self.name)` and `ss_base_model_version`/`ss_v2` in
      `detect_version`; its ui_edit_user_metadata.py lists `'ss_output_name': "Output name:"`,
      `'ss_sd_model_name': "Model:"` and the training tags of `ss_tag_frequency`. ComfyUI's "View Lora info"
      (pythongosssss/ComfyUI-Custom-Scripts, web/js/modelInfo.js) shows `this.metadata.ss_output_name` as
      Name, `this.metadata.ss_sd_model_name` as Base Model, `ss_resolution` (`"(512, 512)"`) or else
      `this.metadata["modelspec.resolution"]` as Resolution, and `JSON.parse(this.metadata.ss_tag_frequency)`
      ({dataset: {tag: count}}) as its tags. ss_sd_model_name is the base's hub id (`hub_id`).
    `family_keys`: the base family's kohya keys (`formats.LoraNaming.kohya_metadata`: ss_base_model_version,
    ss_v2 for SD2), which name the architecture."""
    version = family_keys.get("ss_base_model_version", "sd_v1")
    keys = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(version, version) + "/lora",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATIONS.get(version, "diffusers"),
        "modelspec.title": about.title,
        "modelspec.description": about.description(),
        "modelspec.date": today(),
        "modelspec.hash_sha256": "0x" + data_sha256,
        "modelspec.trigger_phrase": about.trigger_phrase,
        "ss_output_name": output_name,
        "ss_v2": "False",  # kohya writes str(bool(args.v2)); SD2's family keys say "True"
        **family_keys,
        "ss_tag_frequency": json.dumps({"w2w": {about.trigger_phrase: 1}}),
    }
    if base_model:
        keys["ss_sd_model_name"] = hub_id(base_model)
    if about.resolution:
        keys["modelspec.resolution"] = f"{about.resolution}x{about.resolution}"
        keys["ss_resolution"] = str((about.resolution, about.resolution))
    return keys | about.metadata()


def model_card(about: LoraAbout, base_model: str, rank: int) -> str:
    """A PEFT folder's README.md in the format the Hugging Face Hub reads (huggingface_hub's ModelCardData as
    YAML front matter, as diffusers' training scripts write it): base_model (a hub id only: the Hub takes no
    folder there), library_name, tags and instance_prompt, the trigger phrase the Hub shows; then how the
    model was made, how to load it, and the w2w citation."""
    from huggingface_hub import ModelCardData

    base = hub_id(base_model) if base_model else ""
    on_hub = bool(HUB_ID.fullmatch(base))
    data = ModelCardData(base_model=base if on_hub else None, library_name="diffusers",
                         pipeline_tag="text-to-image", instance_prompt=about.trigger_phrase,
                         tags=["text-to-image", "diffusers", "lora", "stable-diffusion", "weights2weights"])
    made_on = f" of `{base}`" if on_hub else f" of a local base model (`{base}`)" if base else ""
    return f"""---
{data.to_yaml()}
---
{MODEL_CARD_MARK}

# {about.title}

A rank-{rank} LoRA{made_on}. Trigger phrase: `{about.trigger_phrase}`.

## How it was made

{about.description()}

## Use

```python
pipe.load_lora_weights("path/to/this/folder")
image = pipe("a photo of {about.trigger_phrase}").images[0]
```

## Citation

```bibtex
@inproceedings{{dravid2024interpreting,
  title     = {{Interpreting the Weight Space of Customized Diffusion Models}},
  author    = {{Dravid, Amil and Gandelsman, Yossi and Wang, Kuan-Chieh and Abdal, Rameen and
               Wetzstein, Gordon and Efros, Alexei A. and Aberman, Kfir}},
  booktitle = {{Advances in Neural Information Processing Systems}},
  year      = {{2024}}
}}
```
"""


# ----------------------------------------------------------------------------- generated images

INFOTEXT_KEY = "parameters"  # A1111's PNG text chunk of the generation parameters (modules/images.py)
# A1111's modules/infotext_utils.py: re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
INFOTEXT_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _infotext_value(value) -> str:
    """A value as A1111 writes it: as it is, or JSON-quoted when it holds a comma, colon, quote or newline."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if re.search(r'[,:"\n]', text) else text


def infotext(prompt: str, negative_prompt: str, fields: dict) -> str:
    """A1111's generation parameters: the prompt, 'Negative prompt: ...' when there is one, then one line of
    'Key: value' pairs, which A1111's `parse_generation_parameters` reads back (it takes the last line as the
    parameters when INFOTEXT_PARAM finds 3 pairs or more)."""
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {_infotext_value(value)}" for key, value in fields.items())])


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) of an A1111 infotext, read as A1111's parse_generation_parameters
    reads it."""
    *lines, last = text.strip().split("\n")
    if len(INFOTEXT_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    split = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")), len(lines))
    negative = "\n".join(lines[split:]).removeprefix("Negative prompt: ")
    fields = {}
    for key, value in INFOTEXT_PARAM.findall(last):
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key] = value
    return "\n".join(lines[:split]), negative, fields
