"""The encoder's files: the image folders it learns from, the encoder file, its fit, and a space's default
encoder.

    images = model_images("data/faces/celeba_generated", space)     # per dataset model, its images, in order
    features = image_features(images, config)                          # m -> model m's features, read when asked
    features = extract_features(images, config, "features/", workers=8)  # or: cached per model, in 8 processes
    encoder = train_encoder(space, features, config)
    save_encoder(encoder, "encoder.safetensors")                     # and encoder.fit.json beside it
    encoder = load_encoder("encoder.safetensors", space)             # SpaceError for another space's
    name_encoder("files/tiny/space", "files/tiny/encoder.safetensors")  # space.json names its default

An encoder file is safetensors: the ridge's feature mean (F,) and weights (F, K), the coefficients' mean and
std (K,) and the gain, and in its metadata the format, the space id, K, the features and the whole
EncoderConfig, and the held-out fit. A space names its default encoder in space.json (`encoder`: a path
relative to the space folder); the space id does not depend on it (it is space.json's `id`, a hash of the
tensors). `extract_features` caches each model's features in a folder, a safetensors file per model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .checks import check_int
from .encoder import FEATURES, CoefficientEncoder, EncoderConfig
from .errors import FileFormatError, W2WError
from .images import IMAGE_SUFFIXES
from .space import Space
from .storage import (FORMAT_VERSION, SPACE_JSON, Output, atomic_output, owns_only, read_safetensors_header,
                      read_space_description, write_file)

ENCODER_FORMAT = "w2w-encoder"
ENCODER_TENSORS = ("feature_mean", "weights", "coefficient_mean", "coefficient_std", "gain")
ENCODER_FILE = Output("encoder file")
FEATURES_FOLDER = Output("encoder features folder", folder=True, owns=owns_only(r"\d{6}_.+\.safetensors"))


# ----------------------------------------------------------------------------- the images of the dataset's models

def model_names(space: Space) -> list[str] | None:
    """The dataset models' names from the space's attribute table; None without one, or when its names are
    the row numbers 0 .. M-1 (a table that does not name the models, like the released identity_df.pt)."""
    if space.attributes is None:
        return None
    names = [str(name) for name in space.attributes.index]
    return None if names == [str(i) for i in range(len(names))] else names


def model_folders(root: str | os.PathLike, space: Space) -> list[Path]:
    """The image folders under `root`, one per dataset model of `space`, in the dataset's (alphanumeric) order
    as `w2w train-identities` took them; W2WError naming the first folder or model without a partner, and
    the first folder named otherwise than its model when the space names its models."""
    from .train_identities import identity_folders

    root = Path(root)
    folders = identity_folders(root)
    names, count = model_names(space), space.num_models
    if names is not None:
        for i, (folder, name) in enumerate(zip(folders, names)):
            if folder.name != name:
                raise W2WError(f"{root}: folder {i + 1} is {folder.name}, the space's model {i + 1} is {name}; "
                               f"expected one folder per model, named and ordered as the dataset's models")
    if len(folders) != count:
        first = (f"the first without a model: {folders[count].name}" if len(folders) > count else
                 f"the first model without a folder: {names[len(folders)] if names else f'model {len(folders) + 1}'}")
        raise W2WError(f"{root}: {len(folders)} folders for the {count} models of the space ({first}); expected one "
                       f"folder of images per model, in the dataset's order")
    return folders


def folder_images(folder: Path) -> list[Path]:
    """The image files of a model's folder, sorted by name; W2WError when it has none."""
    images = sorted(path for path in folder.iterdir()
                    if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise W2WError(f"{folder}: no images (expected {', '.join(IMAGE_SUFFIXES[:3])} ... files of the model's "
                       f"person)")
    return images


def model_images(root: str | os.PathLike, space: Space) -> list[list[Path]]:
    """The image files of each dataset model of `space`, from its folder under `root` (`model_folders`), all
    listed (and a folder without images refused) before any is read."""
    return [folder_images(folder) for folder in model_folders(root, space)]


def image_features(images: list[list[Path]], config: EncoderConfig) -> Callable[[int], torch.Tensor]:
    """A function m -> the features (I_m, F) of model m's image files, read when asked (`train_encoder`'s)."""
    from .inversion import open_image

    extract = FEATURES[config.features].extract
    return lambda m: extract([open_image(path) for path in images[m]], config)


FEATURE_CACHE_FORMAT = "w2w-encoder-features"


def _folder_features(folder: list[Path], config: EncoderConfig, cache: Path) -> tuple[int, int]:
    """Extract and cache the features of one model's image files, unless `cache` holds them already for the same
    files and features: `cache` (safetensors) gets the rows of the images with a face (all of them for pixels)
    and, in its metadata, the files and the features. Returns (images kept, images). Runs in a worker process."""
    from .inversion import open_image

    record = {"format": FEATURE_CACHE_FORMAT, "features": json.dumps(dataclasses.asdict(config)),
              "files": json.dumps([path.name for path in folder])}
    if cache.is_file():
        header = read_safetensors_header(cache)[0].get("__metadata__", {})
        if all(header.get(key) == value for key, value in record.items()):
            return int(header["kept"]), len(folder)
    features = FEATURES[config.features].extract([open_image(path) for path in folder], config)  # (I, F)
    kept = features[~features.isnan().any(1)].contiguous()                                      # (I', F)
    with atomic_output(cache) as tmp:
        save_file({"features": kept}, str(tmp), metadata={**record, "kept": str(len(kept))})
    return len(kept), len(folder)


def extract_features(images: list[list[Path]], config: EncoderConfig, cache: str | os.PathLike, workers: int = 1,
                     progress: bool = True) -> Callable[[int], torch.Tensor]:
    """The features of every model's image files (`images`, per model) extracted into the folder `cache`, one
    file per model (`_folder_features`), by `workers` processes: a run stopped part way resumes where it was.
    Images in which dlib finds no face are left out (their count printed); W2WError naming the folders in
    which it finds none. Returns m -> model m's features (I_m, F), read from the cache."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    check_int(workers, "workers", minimum=1)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    files = [cache / f"{m:06d}_{paths[0].parent.name}.safetensors" for m, paths in enumerate(images)]
    jobs = (images, [config] * len(images), files)
    bar = dict(total=len(images), desc=f"encoder: {config.features} features", disable=not progress)
    if workers == 1:
        counts = list(tqdm(map(_folder_features, *jobs), **bar))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            counts = list(tqdm(pool.map(_folder_features, *jobs, chunksize=8), **bar))
    faceless = [paths[0].parent for paths, (kept, _) in zip(images, counts) if kept == 0]
    if faceless:
        more = f" and {len(faceless) - 1} more folder(s)" if len(faceless) > 1 else ""
        raise W2WError(f"{faceless[0]}{more}: dlib finds no face in any of its images; expected photographs of "
                       f"the model's person (the other folders' features are kept in {cache})")
    skipped = [(paths[0].parent.name, total - kept) for paths, (kept, total) in zip(images, counts) if kept < total]
    if skipped:
        print(f"left out {sum(n for _, n in skipped):,} image(s) in which dlib finds no face, in "
              f"{len(skipped):,} folder(s) (the first: {skipped[0][0]}, {skipped[0][1]} image(s))")
    return lambda m: load_file(files[m])["features"]


def image_sources(images: list[list[Path]]) -> list[str]:
    """What a training checkpoint records of the images: FOLDER/FILE of each, in order."""
    return [f"{path.parent.name}/{path.name}" for paths in images for path in paths]


# ----------------------------------------------------------------------------- encoder files

def fit_path(path: str | os.PathLike) -> Path:
    """Where the held-out fit of the encoder file `path` is written: ENCODER.fit.json beside ENCODER.safetensors."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".safetensors" else path
    return stem.with_name(stem.name + ".fit.json")


def save_encoder(encoder: CoefficientEncoder, path: str | os.PathLike) -> Path:
    """Write the encoder as `path` (safetensors: weights, the coefficients' mean and std; metadata: space id,
    K, features, config, fit) and its fit as `fit_path(path)`, each atomically."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(encoder.config).items()}
    metadata = {"format": ENCODER_FORMAT, "version": str(FORMAT_VERSION), "space_id": encoder.space_id,
                "components": str(encoder.components), "features": encoder.config.features,
                "config": json.dumps(config, sort_keys=True), "fit": json.dumps(encoder.fit, sort_keys=True)}
    with atomic_output(path) as tmp:
        save_file(state, tmp, metadata=dict(sorted(metadata.items())))
    with atomic_output(fit_path(path)) as tmp:
        write_file(tmp, json.dumps({"encoder": Path(path).name, "space_id": encoder.space_id, **encoder.fit},
                                   indent=1))
    return Path(path)


def _metadata(path: Path) -> dict:
    """The encoder file's metadata, checked: format, version, features this lora_w2w knows."""
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != ENCODER_FORMAT:
        raise FileFormatError(f"{path}: not a w2w encoder (format {metadata.get('format')!r}, expected "
                              f"{ENCODER_FORMAT!r}); train one with `w2w train-encoder`")
    if not metadata.get("version", "").isdigit() or int(metadata["version"]) > FORMAT_VERSION:
        raise FileFormatError(f"{path}: encoder format version {metadata.get('version')!r}; this lora_w2w reads "
                              f"versions up to {FORMAT_VERSION}")
    if metadata.get("features") not in FEATURES:
        raise FileFormatError(f"{path}: an encoder on features {metadata.get('features')!r}, which this lora_w2w "
                              f"does not know (it knows {', '.join(FEATURES)})")
    for key in ("space_id", "config"):
        if key not in metadata:
            raise FileFormatError(f"{path}: the encoder's metadata lacks {key!r}")
    return metadata


def load_encoder(path: str | os.PathLike, space: Space | None = None) -> CoefficientEncoder:
    """The encoder file `path` on the CPU, in eval mode; with `space`, SpaceError unless it is that space's."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such encoder file")
    metadata = _metadata(path)
    try:
        config = EncoderConfig(**json.loads(metadata["config"]))
        fit = json.loads(metadata.get("fit", "{}"))
        state = load_file(path)
        missing = [name for name in ENCODER_TENSORS if name not in state]
        if missing:
            raise FileFormatError(f"{path}: no tensor {missing[0]!r} in the encoder file")
        encoder = CoefficientEncoder(config, metadata["space_id"], state["coefficient_mean"], state["coefficient_std"],
                                     fit)
        encoder.load_state_dict(state)
    except (json.JSONDecodeError, TypeError, RuntimeError, W2WError) as error:
        if isinstance(error, FileFormatError):
            raise
        reason = " ".join(str(error).split())[:200]
        raise FileFormatError(f"{path}: not a readable encoder ({reason})") from None
    if space is not None:
        encoder.check_space(space, f"the encoder {path}")
    return encoder.eval()


# ----------------------------------------------------------------------------- a space's default encoder

def default_encoder(space_directory: str | os.PathLike) -> Path | None:
    """The encoder the space at `space_directory` names in space.json (None when it names none)."""
    description = read_space_description(space_directory)
    if not description.get("encoder"):
        return None
    return Path(os.path.normpath(Path(space_directory) / description["encoder"]))


def name_encoder(space_directory: str | os.PathLike, encoder: str | os.PathLike) -> None:
    """Name `encoder` in the space's space.json as its default (a path relative to the space folder), after
    checking that it is the space's; space.json is rewritten atomically, every other key as it was."""
    from .storage import load_space

    directory = Path(space_directory)
    load_encoder(encoder, load_space(directory))
    description = read_space_description(directory)
    description["encoder"] = os.path.relpath(Path(encoder).resolve(), directory.resolve())
    with atomic_output(directory / SPACE_JSON) as tmp:
        write_file(tmp, json.dumps(description, indent=1))

