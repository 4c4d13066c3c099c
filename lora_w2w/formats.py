"""LoRA files <-> flat weight vectors (N,) in a layout's order.

- PEFT/diffusers folder: `adapter_model.safetensors` (PEFT keys `base_model.model.<module>.lora_A.weight`)
  + `adapter_config.json`, which `PeftModel.from_pretrained(unet, folder)` loads, and beside them
  `pytorch_lora_weights.safetensors` (keys `unet.<module>...`, the LoRA config in its metadata), which
  `pipe.load_lora_weights(folder)` picks. This is also the layout of the released models and of
  `train_dreambooth.py`'s output (`<output_dir>/unet/`).
- kohya / A1111 / ComfyUI: one safetensors file, keys `lora_unet_<module with _>.lora_down.weight`
  (r x in), `.lora_up.weight` (out x r) and `.alpha` (scaling alpha / r); diffusers converts it.

A file's alpha may differ from the layout's: lora_B is rescaled so that scaling * B @ A is kept.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FileFormatError, LayoutError
from .layout import PEFT_PREFIX, LoraLayout
from .storage import Output, atomic_output, holds, read_safetensors_header, write_file, write_tensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers reads a LoRA's config from
TRAINING_METADATA_KEY = "w2w_training"  # the training settings of a trained adapter, as JSON
KOHYA_PREFIX = "lora_unet_"
FORMATS = ("peft", "kohya")
PEFT_FOLDER = Output("PEFT LoRA folder", folder=True, owns=holds(PEFT_CONFIG))
KOHYA_FILE = Output("kohya LoRA file")
LORA_OUTPUTS = {"peft": PEFT_FOLDER, "kohya": KOHYA_FILE}  # what save_lora writes, by format


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
              training: dict | None = None) -> Path:
    """Write weights (N,) as a PEFT/diffusers LoRA folder; `training`, the settings it was trained with,
    goes into the metadata of adapter_model.safetensors (`recorded_training` reads it)."""
    weights = _weights(layout, weights)
    state = layout.to_peft_state_dict(weights)
    config = _lora_config(layout, base_model)
    diffusers_state = {"unet." + key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
    metadata = {"unet." + key: value for key, value in
                {"r": layout.rank, "lora_alpha": layout.alpha, "target_modules": sorted(layout.target_modules)}.items()}
    with atomic_output(directory, PEFT_FOLDER) as tmp:
        tmp.mkdir()
        extra = {} if training is None else {TRAINING_METADATA_KEY: json.dumps(training, sort_keys=True)}
        write_tensors(tmp / PEFT_WEIGHTS, state, {"format": "pt", **extra})
        write_file(tmp / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True))
        write_tensors(tmp / DIFFUSERS_WEIGHTS, diffusers_state,
                      {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return Path(directory)


def recorded_training(directory: str | os.PathLike) -> dict | None:
    """The training settings recorded in a PEFT folder by `save_peft`, or None when there are none."""
    header, _ = read_safetensors_header(Path(directory) / PEFT_WEIGHTS)
    recorded = header.get("__metadata__", {}).get(TRAINING_METADATA_KEY)
    return None if recorded is None else json.loads(recorded)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as error:
        raise FileFormatError(f"{path}: corrupt or not a safetensors file ({error})") from None


def _rescale(layout: LoraLayout, weights: torch.Tensor, file_alpha: float, file_rank: int, path: Path) -> torch.Tensor:
    """Express a LoRA saved with scaling file_alpha / file_rank in the layout's scaling."""
    if file_rank != layout.rank:
        raise LayoutError(f"{path}: LoRA rank {file_rank}, the layout expects rank {layout.rank}")
    factor = (file_alpha / file_rank) / layout.scaling
    if factor == 1.0:
        return weights
    parts = layout.split(weights.clone())
    for _, lora_b in parts.values():
        lora_b.mul_(factor)
    return layout.join(parts)


def load_peft(layout: LoraLayout, path: str | os.PathLike) -> torch.Tensor:
    """A PEFT folder (or its `unet/` subfolder, or a single PEFT/diffusers .safetensors file) -> weights (N,)."""
    path = Path(path)
    if path.is_dir() and not (path / PEFT_WEIGHTS).is_file() and (path / "unet" / PEFT_WEIGHTS).is_file():
        path = path / "unet"
    weights_file = path / PEFT_WEIGHTS if path.is_dir() else path
    if not weights_file.is_file():
        raise FileFormatError(f"{path}: no {PEFT_WEIGHTS} (expected a PEFT LoRA folder)")
    state = _load_safetensors(weights_file)
    try:
        weights = layout.from_peft_state_dict(state)
    except LayoutError as error:
        raise LayoutError(f"{weights_file}: {error}") from None
    config_file = weights_file.parent / PEFT_CONFIG
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        weights = _rescale(layout, weights, float(config.get("lora_alpha", layout.alpha)),
                           int(config.get("r", layout.rank)), config_file)
    return weights


# ----------------------------------------------------------------------------- kohya / A1111 / ComfyUI

def kohya_name(module: str) -> str:
    """'down_blocks.0.attentions.0...attn1.to_q' -> 'lora_unet_down_blocks_0_attentions_0_..._attn1_to_q'."""
    return KOHYA_PREFIX + module.replace(".", "_")


def save_kohya(layout: LoraLayout, weights: torch.Tensor, path: str | os.PathLike, base_model: str = "") -> Path:
    """Write weights (N,) as a kohya-style LoRA .safetensors file."""
    weights = _weights(layout, weights)
    state = {}
    for name, (lora_a, lora_b) in layout.split(weights).items():
        key = kohya_name(name)
        state[f"{key}.lora_down.weight"] = lora_a.contiguous()  # (r, in)
        state[f"{key}.lora_up.weight"] = lora_b.contiguous()    # (out, r)
        state[f"{key}.alpha"] = torch.tensor(float(layout.alpha))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(layout.rank),
                "ss_network_alpha": str(layout.alpha), "ss_base_model_version": "sd_v1",
                "ss_sd_model_name": base_model, "w2w_target_modules": ",".join(layout.target_modules)}
    with atomic_output(path, KOHYA_FILE) as tmp:
        write_tensors(tmp, state, metadata)
    return Path(path)


def load_kohya(layout: LoraLayout, path: str | os.PathLike) -> torch.Tensor:
    """A kohya-style LoRA .safetensors file -> weights (N,)."""
    path = Path(path)
    state = _load_safetensors(path)
    by_kohya = {kohya_name(layer.name): layer.name for layer in layout.layers}
    parts, alphas = {}, set()
    for key, tensor in state.items():
        stem, _, kind = key.partition(".")
        if stem not in by_kohya:
            raise LayoutError(f"{path}: key {key!r} names no LoRA layer of the layout")
        entry = parts.setdefault(by_kohya[stem], {})
        if kind == "alpha":
            alphas.add(float(tensor))
        elif kind in ("lora_down.weight", "lora_up.weight"):
            entry[kind] = tensor
        else:
            raise FileFormatError(f"{path}: unexpected key {key!r}")
    if len(alphas) > 1:
        raise FileFormatError(f"{path}: layers have different alphas {sorted(alphas)}; expected one")
    try:
        weights = layout.join({name: (p["lora_down.weight"], p["lora_up.weight"]) for name, p in parts.items()})
    except KeyError as error:
        raise FileFormatError(f"{path}: a layer lacks {error.args[0]}") from None
    alpha = alphas.pop() if alphas else float(layout.rank)  # kohya: no alpha means alpha = rank
    return _rescale(layout, weights, alpha, layout.rank, path)


# ----------------------------------------------------------------------------- dispatch

def save_lora(layout: LoraLayout, weights: torch.Tensor, path: str | os.PathLike, fmt: str, base_model: str = "") -> Path:
    """Write weights (N,) in format `fmt` ('peft': a folder, 'kohya': a file)."""
    if fmt == "peft":
        return save_peft(layout, weights, path, base_model)
    if fmt == "kohya":
        return save_kohya(layout, weights, path, base_model)
    raise FileFormatError(f"unknown LoRA format {fmt!r}; expected one of {', '.join(FORMATS)}")


def load_lora(layout: LoraLayout, path: str | os.PathLike) -> torch.Tensor:
    """A PEFT folder/file or kohya file, recognised by its keys -> weights (N,)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        keys = read_safetensors_header(path)[0].keys() - {"__metadata__"}
        if keys and all(key.startswith(KOHYA_PREFIX) for key in keys):
            return load_kohya(layout, path)
    return load_peft(layout, path)

