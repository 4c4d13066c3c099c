"""LoRA files <-> flat weight vectors (N,) in a layout's order.

- PEFT/diffusers folder: `adapter_model.safetensors` (PEFT keys `base_model.model.<module>.lora_A.weight`)
  + `adapter_config.json`, which `PeftModel.from_pretrained(unet, folder)` loads, and beside them
  `pytorch_lora_weights.safetensors` (keys `unet.<module>...`, the LoRA config in its metadata), which
  `pipe.load_lora_weights(folder)` picks. This is also the layout of the released models and of
  `train_dreambooth.py`'s output (`<output_dir>/unet/`). Read too: the original code's folders
  (`<path>/unet/`, keys `base_model.model.<module>.lora_A.identity1.weight`: one adapter named
  `identity1`), any other single adapter name, and, only with `trust_pickle`, the `adapter_model.bin`
  pickle older PEFT versions wrote.
- kohya / A1111 / ComfyUI: one safetensors file, keys `lora_unet_<module with _>.lora_down.weight`
  (r x in), `.lora_up.weight` (out x r) and `.alpha` (scaling alpha / r); diffusers converts it.

Each file says where it came from (`provenance.LoraAbout`): a PEFT folder in a README.md model card and
in its weights' metadata, a kohya file in ModelSpec's and kohya's metadata keys.

A file's alpha may differ from the layout's: lora_B is rescaled so that scaling * B @ A is kept. A PEFT
folder's adapter_config.json is read as PEFT reads it: use_rslora (scaling alpha / sqrt(r)), alpha_pattern
and rank_pattern (per layer) change the scaling, and target_modules must cover the layers of the weights.
Key names beyond PEFT's are a base family's (`LoraNaming`, given by `bases.Family.lora_naming`): the
network diffusers loads a LoRA into (`unet.` keys), and the module names kohya-style files use (SD1/SD2:
diffusers' own, `lora_unet_down_blocks_0_...`; SDXL: kohya sd-scripts' `lora_unet_input_blocks_4_1_...`;
FLUX: the `transformer.` keys diffusers loads and `lora_transformer_transformer_blocks_0_attn_to_q...`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FileFormatError, LayoutError, PickleRefusedError
from .layout import PEFT_PREFIX, LoraLayout
from .paths import check_input
from .provenance import MODEL_CARD_MARK, LoraAbout, kohya_metadata, model_card
from .schemas import ADAPTER_CONFIG, FLOAT_DTYPES, read_json
from .space import TRIGGER_PROMPT
from .storage import Output, atomic_output, owns_only, read_safetensors_header, torch_load, write_file, write_tensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PICKLE_WEIGHTS = "adapter_model.bin"  # older PEFT: torch.save(state_dict, "adapter_model.bin")
# where a PEFT folder keeps its weights, in order of preference: beside the config, or in unet/ as the
# original's save_model_for_diffusers and train_dreambooth.py write them
PEFT_WEIGHT_FILES = (PEFT_WEIGHTS, f"unet/{PEFT_WEIGHTS}", PEFT_PICKLE_WEIGHTS, f"unet/{PEFT_PICKLE_WEIGHTS}")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
MODEL_CARD = "README.md"  # a PEFT folder's model card, which the Hugging Face Hub shows
TRAINING_METADATA_KEY = "w2w_training"  # the training settings of a trained adapter, as JSON
KOHYA_PREFIX = "lora_unet_"  # kohya-style keys of a UNet (Stable Diffusion 1, 2 and XL)
KOHYA_TRANSFORMER_PREFIX = "lora_transformer_"  # of FLUX's transformer, as ComfyUI and diffusers read them
KOHYA_PREFIXES = (KOHYA_PREFIX, KOHYA_TRANSFORMER_PREFIX)
FORMATS = ("peft", "kohya")
_PEFT_FILES = owns_only("|".join(re.escape(name) for name in (PEFT_WEIGHTS, PEFT_CONFIG, DIFFUSERS_WEIGHTS,
                                                                MODEL_CARD)))


def _earlier_export(folder: Path) -> bool:
    """A folder holding only what save_peft writes, its README.md the model card it wrote (MODEL_CARD_MARK):
    a README of anyone else's makes the folder theirs."""
    card = folder / MODEL_CARD
    if not _PEFT_FILES(folder) or not card.exists():
        return _PEFT_FILES(folder)
    with open(card, "rb") as file:
        return card.is_file() and MODEL_CARD_MARK.encode() in file.read(2**16)


# what save_peft writes: a folder holding anything else is someone's and is not written into
PEFT_FOLDER = Output("PEFT LoRA folder", folder=True, owns=_earlier_export)
KOHYA_FILE = Output("kohya LoRA file")
LORA_OUTPUTS = {"peft": PEFT_FOLDER, "kohya": KOHYA_FILE}  # what save_lora writes, by format


def same_module(module: str) -> str:
    """A module path as it is: kohya-style files of Stable Diffusion 1 and 2 spell diffusers' own."""
    return module


@dataclass(frozen=True)
class LoraNaming:
    """How a base family's LoRA files name the layers of its network (the defaults: Stable Diffusion 1's)."""

    network: str = "unet"  # diffusers' keys `<network>.<module>...`: the pipeline attribute load_lora_weights fills
    kohya_prefix: str = KOHYA_PREFIX  # what kohya-style keys start with
    kohya_module: Callable[[str], str] = same_module  # diffusers' module path -> the one kohya-style keys spell
    kohya_metadata: dict[str, str] = field(default_factory=lambda: {"ss_base_model_version": "sd_v1"})

    def kohya_name(self, module: str) -> str:
        """'down_blocks.0.attentions.0...attn1.to_q' -> 'lora_unet_down_blocks_0_attentions_0_..._attn1_to_q'
        (through `kohya_module` first)."""
        return self.kohya_prefix + self.kohya_module(module).replace(".", "_")


SD_NAMING = LoraNaming()


def _weights(layout: LoraLayout, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.detach().to("cpu", torch.float32)
    if weights.ndim == 2 and weights.shape[0] == 1:
        weights = weights[0]
    if weights.shape != (layout.numel,):
        raise LayoutError(f"weights {tuple(weights.shape)} do not fit the layout: expected ({layout.numel},)")
    return weights


def _lora_config(layout: LoraLayout, base_model: str) -> dict:
    """The adapter config PEFT writes for this layout."""
    from peft import LoraConfig

    config = LoraConfig(r=layout.rank, lora_alpha=layout.alpha, target_modules=list(layout.target_modules),
                        init_lora_weights=True, base_model_name_or_path=base_model or None)
    data = config.to_dict()
    data["target_modules"] = sorted(data["target_modules"])  # PEFT keeps a set: make the file reproducible
    return data


# ----------------------------------------------------------------------------- PEFT / diffusers folder

def save_peft(layout: LoraLayout, weights: torch.Tensor, directory: str | os.PathLike, base_model: str = "",
              training: dict | None = None, naming: LoraNaming = SD_NAMING,
              about: LoraAbout | None = None) -> Path:
    """Write weights (N,) as a PEFT/diffusers LoRA folder with its model card (`about`: what it says of itself;
    default: a LoRA trained with `training`); `training`, the settings it was trained with, goes into the
    metadata of adapter_model.safetensors (`recorded_training` reads it); diffusers' file names the family's
    network (`naming.network`)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY  # where diffusers reads a LoRA's config from

    if about is None:
        about = LoraAbout() if training is None else LoraAbout(
            "Dreambooth LoRA", training.get("instance_prompt", TRIGGER_PROMPT), provenance=({"made": "dreambooth",
                                                                                              **training},))
    weights = _weights(layout, weights)
    state = layout.to_peft_state_dict(weights)
    config = _lora_config(layout, base_model)
    network = naming.network + "."
    diffusers_state = {network + key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
    metadata = {network + key: value for key, value in
                {"r": layout.rank, "lora_alpha": layout.alpha, "target_modules": sorted(layout.target_modules)}.items()}
    with atomic_output(directory, PEFT_FOLDER) as tmp:
        tmp.mkdir()
        extra = {} if training is None else {TRAINING_METADATA_KEY: json.dumps(training, sort_keys=True)}
        write_tensors(tmp / PEFT_WEIGHTS, state, {"format": "pt", **extra, **about.metadata()})
        write_file(tmp / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True))
        write_tensors(tmp / DIFFUSERS_WEIGHTS, diffusers_state,
                      {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, sort_keys=True),
                       **about.metadata()})
        write_file(tmp / MODEL_CARD, model_card(about, base_model, layout.rank))
    return Path(directory)


def recorded_training(directory: str | os.PathLike) -> dict | None:
    """The training settings recorded in a PEFT folder by `save_peft`, or None when there are none."""
    header, _ = read_safetensors_header(Path(directory) / PEFT_WEIGHTS)
    recorded = header.get("__metadata__", {}).get(TRAINING_METADATA_KEY)
    try:
        return None if recorded is None else json.loads(recorded)
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{directory}/{PEFT_WEIGHTS}: metadata {TRAINING_METADATA_KEY!r} is not JSON "
                              f"({error})") from None


def check_lora_file(path: Path) -> None:
    """A LoRA .safetensors file's header checked (see read_safetensors_header), and its tensors floating point."""
    header, _ = read_safetensors_header(path)
    for key, info in header.items():
        if key != "__metadata__" and info["dtype"] not in FLOAT_DTYPES:
            raise FileFormatError(f"{path}: tensor {key!r} is {info['dtype']}; expected LoRA weights of one of "
                                  f"{', '.join(FLOAT_DTYPES)}")


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json checked against its schema: r an integer >= 1, lora_alpha a finite number > 0 ..."""
    return read_json(path, ADAPTER_CONFIG)


def kohya_alpha(tensor: torch.Tensor, key: str, path: Path) -> float:
    """The value of a kohya `.alpha` tensor: one finite number > 0."""
    if tensor.numel() != 1:
        raise FileFormatError(f"{path}: {key!r} has shape {list(tensor.shape)}; expected one number")
    alpha = float(tensor)
    if not (math.isfinite(alpha) and alpha > 0):
        raise FileFormatError(f"{path}: {key!r} is {alpha}; expected a finite number > 0")
    return alpha


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        check_lora_file(path)
        return load_file(path)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as error:
        raise FileFormatError(f"{path}: corrupt or not a safetensors file ({error})") from None


def _rescale(layout: LoraLayout, weights: torch.Tensor, scalings: dict[str, float]) -> torch.Tensor:
    """Express a LoRA saved with each layer's `scalings` (layer name -> scaling) in the layout's scaling:
    each lora_B times its scaling / layout.scaling, so that scaling * B @ A is kept."""
    factors = {name: scaling / layout.scaling for name, scaling in scalings.items()}
    if all(factor == 1.0 for factor in factors.values()):
        return weights
    parts = layout.split(weights.clone())
    for name, (_, lora_b) in parts.items():
        lora_b.mul_(factors[name])
    return layout.join(parts)


def targeted(name: str, targets: list[str] | str) -> bool:
    """Whether PEFT's `target_modules` (a list of names or name endings, or a regular expression) puts a
    LoRA on the module `name`, as peft.tuners.tuners_utils.check_target_module_exists decides (an invalid
    expression puts none)."""
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error:
            return False
    return any(name == target or name.endswith("." + target) for target in targets)


def layer_scalings(layout: LoraLayout, config: dict, path: Path) -> dict[str, float]:
    """Each layer's scaling in a PEFT LoRA of adapter_config.json `config`, as PEFT computes it: lora_alpha / r,
    or lora_alpha / sqrt(r) with use_rslora, with alpha and r of a layer from alpha_pattern and rank_pattern
    (matched by PEFT's get_pattern_key). LayoutError naming `path` when a layer gets another rank than the
    layout's, or target_modules leaves out a layer that the weights hold (PEFT would not load it)."""
    from peft.utils.other import get_pattern_key

    rank, alpha = int(config.get("r", layout.rank)), float(config.get("lora_alpha", layout.alpha))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_modules")
    scalings = {}
    for layer in layout.layers:
        if targets is not None and not targeted(layer.name, targets):
            raise LayoutError(f"{path}: target_modules {targets!r} leaves out {layer.name}, whose weights the LoRA "
                              f"holds (PEFT would not load them)")
        try:
            layer_rank = int(ranks.get(get_pattern_key(ranks.keys(), layer.name), rank))
            layer_alpha = float(alphas.get(get_pattern_key(alphas.keys(), layer.name), alpha))
        except re.error as error:
            raise FileFormatError(f"{path}: a key of rank_pattern or alpha_pattern is not a regular expression "
                                  f"({error})") from None
        if layer_rank != layout.rank:
            raise LayoutError(f"{path}: LoRA rank {layer_rank} for {layer.name}, the layout expects rank {layout.rank}")
        scalings[layer.name] = layer_alpha / (math.sqrt(layer_rank) if config.get("use_rslora") else layer_rank)
    return scalings


def find_peft_weights(folder: Path) -> Path | None:
    """The weights file of a PEFT LoRA folder (see PEFT_WEIGHT_FILES), or None when it has none."""
    for name in PEFT_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def peft_weights_file(path: Path) -> Path:
    """The weights file of a PEFT folder, or `path` itself when it is a file."""
    if check_input(path, "a LoRA file or a PEFT LoRA folder").is_file():
        return path
    found = find_peft_weights(path) if path.is_dir() else None
    if found is None:
        raise FileFormatError(f"{path}: no {PEFT_WEIGHTS} (expected a PEFT LoRA folder with one of "
                              f"{', '.join(PEFT_WEIGHT_FILES)})")
    return found


def read_peft_state(file: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT weights file; an `adapter_model.bin` pickle is read only with `trust_pickle`."""
    if file.suffix != ".bin":
        return _load_safetensors(file)
    if not trust_pickle:
        raise PickleRefusedError(f"{file} is a pickle (older PEFT versions wrote {PEFT_PICKLE_WEIGHTS}) and unpickling "
                                 f"can run arbitrary code; pass --trust-pickle (trust_pickle=True) only if you trust "
                                 f"where it came from")
    state = torch_load(file, trust_pickle=True)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise FileFormatError(f"{file}: expected a state dict of LoRA tensors, got {type(state).__name__}")
    return state


def read_peft_shapes(file: Path, trust_pickle: bool = False) -> dict[str, list[int]]:
    """Key -> shape of a PEFT weights file, sorted by key; for safetensors from its header alone."""
    if file.suffix == ".bin":
        return {key: list(t.shape) for key, t in sorted(read_peft_state(file, trust_pickle).items())}
    header, _ = read_safetensors_header(file)
    return {key: info["shape"] for key, info in sorted(header.items()) if key != "__metadata__"}


def load_peft(layout: LoraLayout, path: str | os.PathLike, trust_pickle: bool = False) -> torch.Tensor:
    """A PEFT folder (see PEFT_WEIGHT_FILES) or a single PEFT/diffusers .safetensors file -> weights (N,)."""
    weights_file = peft_weights_file(Path(path))
    state = read_peft_state(weights_file, trust_pickle)
    try:
        weights = layout.from_peft_state_dict(state).float()
    except LayoutError as error:
        raise LayoutError(f"{weights_file}: {error}") from None
    config_file = weights_file.parent / PEFT_CONFIG
    if config_file.is_file():
        weights = _rescale(layout, weights, layer_scalings(layout, read_adapter_config(config_file), config_file))
    return weights


# ----------------------------------------------------------------------------- kohya / A1111 / ComfyUI

def save_kohya(layout: LoraLayout, weights: torch.Tensor, path: str | os.PathLike, base_model: str = "",
               naming: LoraNaming = SD_NAMING, about: LoraAbout | None = None) -> Path:
    """Write weights (N,) as a kohya-style LoRA .safetensors file, keys and base model version as the
    family's `naming` says, with the ModelSpec and kohya keys that say what it is (`about`;
    `provenance.kohya_metadata`)."""
    weights = _weights(layout, weights)
    state = {}
    for name, (lora_a, lora_b) in layout.split(weights).items():
        key = naming.kohya_name(name)
        state[f"{key}.lora_down.weight"] = lora_a.contiguous()  # (r, in)
        state[f"{key}.lora_up.weight"] = lora_b.contiguous()    # (out, r)
        state[f"{key}.alpha"] = torch.tensor(float(layout.alpha))
    data = hashlib.sha256()  # of the tensors' bytes as written, in order: the file's data after its header
    for tensor in state.values():
        data.update(tensor.to(torch.float32).numpy().astype("<f4").tobytes())
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(layout.rank),
                "ss_network_alpha": str(layout.alpha), "w2w_target_modules": ",".join(layout.target_modules),
                **kohya_metadata(about or LoraAbout(), base_model, Path(path).stem, data.hexdigest(),
                                 naming.kohya_metadata)}
    with atomic_output(path, KOHYA_FILE) as tmp:
        write_tensors(tmp, state, metadata)
    return Path(path)


def load_kohya(layout: LoraLayout, path: str | os.PathLike, naming: LoraNaming = SD_NAMING) -> torch.Tensor:
    """A kohya-style LoRA .safetensors file, keys named as the family's `naming` says -> weights (N,)."""
    path = Path(path)
    state = _load_safetensors(path)
    by_kohya = {naming.kohya_name(layer.name): layer.name for layer in layout.layers}
    parts, alphas = {}, set()
    for key, tensor in state.items():
        stem, _, kind = key.partition(".")
        if stem not in by_kohya:
            raise LayoutError(f"{path}: key {key!r} names no LoRA layer of the layout (or names it as another "
                              f"base family's files do: give the base the space was built for, --base)")
        entry = parts.setdefault(by_kohya[stem], {})
        if kind == "alpha":
            alphas.add(kohya_alpha(tensor, key, path))
        elif kind in ("lora_down.weight", "lora_up.weight"):
            entry[kind] = tensor
        else:
            raise FileFormatError(f"{path}: unexpected key {key!r}")
    if len(alphas) > 1:
        raise FileFormatError(f"{path}: layers have different alphas {sorted(alphas)}; expected one")
    shapes = {f"{name}.{part}.weight": p[kind].shape for name, p in parts.items()
              for part, kind in (("lora_A", "lora_down.weight"), ("lora_B", "lora_up.weight")) if kind in p}
    try:
        layout.check_fits(LoraLayout.from_shapes(shapes))
    except LayoutError as error:
        raise LayoutError(f"{path}: {error}") from None
    weights = layout.join({name: (p["lora_down.weight"], p["lora_up.weight"]) for name, p in parts.items()})
    alpha = alphas.pop() if alphas else float(layout.rank)  # kohya: no alpha means alpha = rank
    return _rescale(layout, weights, {layer.name: alpha / layout.rank for layer in layout.layers})


# ----------------------------------------------------------------------------- dispatch

def save_lora(layout: LoraLayout, weights: torch.Tensor, path: str | os.PathLike, fmt: str, base_model: str = "",
              naming: LoraNaming = SD_NAMING, about: LoraAbout | None = None) -> Path:
    """Write weights (N,) in format `fmt` ('peft': a folder, 'kohya': a file), keys named as the base
    family's `naming` says, saying `about` themselves."""
    if fmt == "peft":
        return save_peft(layout, weights, path, base_model, naming=naming, about=about or LoraAbout())
    if fmt == "kohya":
        return save_kohya(layout, weights, path, base_model, naming, about)
    raise FileFormatError(f"unknown LoRA format {fmt!r}; expected one of {', '.join(FORMATS)}")


def load_lora(layout: LoraLayout, path: str | os.PathLike, trust_pickle: bool = False,
              naming: LoraNaming = SD_NAMING) -> torch.Tensor:
    """A PEFT folder/file or kohya file (its keys named as the base family's `naming` says), recognised by
    its keys -> weights (N,); `trust_pickle` lets a PEFT folder's adapter_model.bin be read."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        keys = read_safetensors_header(path)[0].keys() - {"__metadata__"}
        if keys and all(key.startswith(naming.kohya_prefix) for key in keys):
            return load_kohya(layout, path, naming)
    return load_peft(layout, path, trust_pickle)

