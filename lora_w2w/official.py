"""Importing the released w2w files (torch.save pickles) into the project's safe space format.

    import_official("downloads/w2w", "files/official", trust_pickle=True)   # downloads/w2w/files/ holds them

Files read, where present: `files/` of the Hugging Face repository snap-research/weights2weights (`w2w
download files`), as the original code (github.com/snap-research/weights2weights, lora_w2w.py and
utils.py) reads them; tests/conftest.py's `write_released_files` writes them that way:
    mean.pt (N), std.pt (N), V.pt (N x K), proj_1000pc.pt (M x 1000), weight_dimensions.pt
    (PEFT key -> [numel, shape], numel a 1-element torch.Size: the original reads
    `weight_dimensions[key][0][0]`), identity_df.pt (pandas DataFrame), adapter_config.json.
`pinverse_1000pc.pt` is the pseudo-inverse of the coefficients and is derived when needed.
Tensors load with `weights_only=True`; a file that needs real unpickling (identity_df.pt, maybe
weight_dimensions.pt) is refused unless `trust_pickle`. V.pt is memory-mapped and copied block by
block into the new file, so it is never held twice.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from .errors import FileFormatError
from .formats import read_adapter_config
from .layout import DEFAULT_ALPHA, LoraLayout, sd15_layout
from .space import REAL_FLOAT_DTYPES, Space, check_finite
from .storage import SPACE_FOLDER, check_output, load_space, save_space, torch_load

OFFICIAL_BASE_MODEL = "stablediffusionapi/realistic-vision-v51"
REQUIRED = ("mean.pt", "std.pt", "V.pt")


def released_tensor(path: Path, shape_hint: str, trust_pickle: bool = False, mmap: bool = False) -> torch.Tensor:
    """A released .pt file that holds one tensor of real floating point numbers (float16, bfloat16, float32
    or float64; an integer, bool or complex one would be cast silently); FileFormatError naming the file
    and `shape_hint` otherwise."""
    value = torch_load(Path(path), trust_pickle, mmap=mmap)
    if not isinstance(value, torch.Tensor):
        raise FileFormatError(f"{path}: expected a tensor {shape_hint}, got {type(value).__name__}")
    if value.dtype not in REAL_FLOAT_DTYPES:
        raise FileFormatError(f"{path}: a tensor of {str(value.dtype).removeprefix('torch.')}; expected {shape_hint} "
                              f"real floating point numbers")
    return value


def _layout(src: Path, trust_pickle: bool) -> LoraLayout:
    """From weight_dimensions.pt when present, else Stable Diffusion 1.5's; alpha from adapter_config.json."""
    alpha, rank, targets = DEFAULT_ALPHA, None, None
    config_path = src / "adapter_config.json"
    if config_path.is_file():
        config = read_adapter_config(config_path)
        alpha, rank, targets = float(config.get("lora_alpha", alpha)), config.get("r"), config.get("target_modules")
    dimensions_path = src / "weight_dimensions.pt"
    if dimensions_path.is_file():
        return LoraLayout.from_weight_dimensions(torch_load(dimensions_path, trust_pickle), alpha,
                                                 source=str(dimensions_path))
    return sd15_layout(targets or ("to_q", "to_v"), int(rank or 1), alpha)


def released_folder(src: str | os.PathLike) -> Path:
    """The folder of the released files: `src`, or its `files/` (where `w2w download files --out SRC` puts
    them); FileFormatError naming the folders up to two levels below `src` that hold them when neither does."""
    src = Path(src)
    for folder in (src, src / "files"):
        if all((folder / name).is_file() for name in REQUIRED):
            return folder
    folder = src / "files" if (src / "files").is_dir() else src
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    below = sorted({str(path.parent) for depth in ("*", "*/*") for path in src.glob(f"{depth}/{REQUIRED[0]}")
                    if all((path.parent / name).is_file() for name in REQUIRED)})
    where = (f"they are in {' and '.join(below[:3])}: give that folder" if below else
             "fetch them with `w2w download files --out DIR` and give DIR")
    raise FileFormatError(f"{folder}: missing {', '.join(missing)}; {where} (the released w2w files: "
                          f"{', '.join(REQUIRED)}, proj_1000pc.pt, weight_dimensions.pt, identity_df.pt)")


def import_official(src: str | os.PathLike, dst: str | os.PathLike, trust_pickle: bool = False,
                    base_model: str = OFFICIAL_BASE_MODEL) -> Space:
    """Convert the released files in `src` (or in its `files/`) into a space directory `dst`; returns the
    space (memory-mapped)."""
    check_output(dst, SPACE_FOLDER, [src])
    src = released_folder(src)
    attributes = None
    if (src / "identity_df.pt").is_file():  # checked first: refusing it must not come after a 4 GB copy
        attributes = torch_load(src / "identity_df.pt", trust_pickle)
        if not isinstance(attributes, pd.DataFrame):
            raise FileFormatError(f"{src / 'identity_df.pt'}: expected a pandas DataFrame, got {type(attributes).__name__}")
    layout = _layout(src, trust_pickle)
    n = layout.numel
    mean = released_tensor(src / "mean.pt", f"({n},)").float().reshape(-1)
    std = released_tensor(src / "std.pt", f"({n},)").float().reshape(-1)
    basis = released_tensor(src / "V.pt", f"({n}, K)", mmap=True)  # (N, K): columns are the components
    if basis.ndim != 2 or basis.shape[0] != n or basis.dtype != torch.float32:
        raise FileFormatError(f"{src / 'V.pt'}: shape {tuple(basis.shape)} {basis.dtype}, expected ({n}, K) float32")
    coefficients = None
    if (src / "proj_1000pc.pt").is_file():
        coefficients = released_tensor(src / "proj_1000pc.pt", "(M, 1000)").float()
        check_finite(coefficients, str(src / "proj_1000pc.pt"))
    for name, tensor in (("mean.pt", mean), ("std.pt", std)):
        if tensor.shape != (n,):
            raise FileFormatError(f"{src / name}: {tensor.numel()} numbers, the layout has N = {n}")
        check_finite(tensor, str(src / name))
    if attributes is not None and coefficients is not None and len(attributes) != len(coefficients):
        raise FileFormatError(f"{src / 'identity_df.pt'}: {len(attributes)} rows but proj_1000pc.pt has "
                              f"{len(coefficients)} models")
    space = Space(mean, std, basis.T, layout, coefficients, attributes, base_model=base_model)
    save_space(space, dst)
    return load_space(dst)
