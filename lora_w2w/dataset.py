"""The weights dataset: every model's flat LoRA weights, a matrix (M, N) kept in chunks on disk.

    w2w collect runs/ data/weights                    # runs/<name>/unet/adapter_model.safetensors, ...
    w2w collect --from-all-weights all_weights.pt data/weights --names names.txt

    dataset = WeightsDataset("data/weights")
    len(dataset), dataset.layout.numel, dataset.names[:2]   # M, N, the first model names
    weights = dataset["alice"]                              # (N,), by name or by row index
    for start, chunk in dataset.iter_chunks(1024):          # chunk (r, N): rows start .. start + r
        ...

On disk, a directory:
    index.json                   format, version, layout, base model, shard size, dtype, model names
                                 in row order, and the shards (file name, rows) in row order
    weights-00000.safetensors    one tensor `weights` (rows, N) per shard, float32, or float16 for a
                                 dataset made with `w2w collect --dtype float16`
A float16 dataset takes half the disk and half the bytes per pass of a PCA; its weights are rounded
to 11 significant bits (relative error at most 2^-11). Reads always give float32.
Rows are in plain string order of the model names (the training folder names), the rule that
reproduces the released `all_weights.pt`. Shards are written under a temporary name and renamed,
and `index.json` last: a collect killed midway leaves the previous dataset as it was, and a rerun
finishes the job. A second collect into the same dataset on this machine waits until the first
is done (`storage.output_lock`).

Adding models: collect skips names the dataset has. New names that sort after the last one fill the
last shard and new ones. A new name that sorts before existing ones makes collect rewrite every
shard from the one where it falls to the end, so that rows stay in name order (the report says how
many existing rows were rewritten). Rows are never removed.

Reads go through memory maps of only the rows or columns asked for, dropped after the copy: the
process holds a chunk, not the matrix (the OS page cache does the rest).

Letters: M models, N flattened LoRA numbers, r rows of a chunk.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import FileFormatError, LayoutError, W2WError
from .formats import (KOHYA_PREFIXES, PEFT_CONFIG, find_peft_weights, layer_scalings, load_lora, peft_weights_file,
                      read_adapter_config, read_peft_shapes)
from .layout import LoraLayout
from .schemas import dataset_index
from .space import check_finite
from .storage import (SAFETENSORS_DTYPES, Output, SafetensorsWriter, atomic_output, check_output,
                      is_temporary, output_lock, owns_only, read_description, read_safetensors_header,
                      read_space_description, torch_load, write_file)

DATASET_FORMAT = "w2w-weights"
FORMAT_VERSION = 1
INDEX_JSON = "index.json"
SHARD_TENSOR = "weights"
DEFAULT_SHARD_SIZE = 1024
_SHARD_NAME = re.compile(r"weights-(\d{5,})\.safetensors")
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}  # of the shards, by index.json name
INDEX_SCHEMA = dataset_index(list(DTYPES))
# a dataset, or the shards a first collect killed before its index.json left
DATASET_FOLDER = Output("weights dataset", folder=True, owns=owns_only(rf"{INDEX_JSON}|{_SHARD_NAME.pattern}"))


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Shard:
    """One shard file: rows `start` .. `start + rows` of the matrix."""

    file: str
    start: int
    rows: int


@dataclass(frozen=True)
class _Piece:
    """The part of a read of rows start .. stop that one shard holds: its rows lo .. hi, `offset` the file
    position of row lo, and `target` the rows of the read (0 = `start`) they fill."""

    shard: Shard
    offset: int
    lo: int
    hi: int
    target: slice


class WeightsDataset:
    """A weights dataset on disk (see the module docstring), read chunk by chunk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = read_index(self.path)
        self.layout = LoraLayout.from_dict(index["layout"])
        self.base_model: str = index.get("base_model", "")
        self.shard_size: int = int(index["shard_size"])
        self.dtype_name: str = index.get("dtype", "float32")  # datasets written before float16 have no dtype
        self.dtype = DTYPES[self.dtype_name]                  # of the shards on disk
        stored = SAFETENSORS_DTYPES[self.dtype]
        self.names: tuple[str, ...] = tuple(index["names"])
        self.shards: list[Shard] = []
        self._data_starts: list[int] = []  # byte offset of each shard's data
        start, n = 0, self.layout.numel
        for entry in index["shards"]:
            shard = Shard(entry["file"], start, int(entry["rows"]))
            file = self.path / shard.file
            header, data_start = read_safetensors_header(file)  # names the file when truncated or corrupt
            info = header.get(SHARD_TENSOR, {})
            if info.get("dtype") != stored or info.get("shape") != [shard.rows, n]:
                raise FileFormatError(f"{file}: tensor {SHARD_TENSOR!r} is {info.get('dtype')} "
                                      f"{info.get('shape')}, the index expects {stored} [{shard.rows}, {n}]")
            self.shards.append(shard)
            self._data_starts.append(data_start + info["data_offsets"][0])
            start += shard.rows
        if start != len(self.names):
            raise FileFormatError(f"{self.path / INDEX_JSON}: the shards hold {start} rows but {len(self.names)} "
                                  f"model names are listed")
        self._rows = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        """M."""
        return len(self.names)

    def __repr__(self) -> str:
        return (f"WeightsDataset({str(self.path)!r}: M = {len(self)}, N = {self.layout.numel}, "
                f"{len(self.shards)} {self.dtype_name} shards)")

    def row(self, key: int | str) -> int:
        """The row of a model given by name or by index (negative counts from the end)."""
        if isinstance(key, str):
            if key not in self._rows:
                raise W2WError(f"{self.path}: no model named {key!r} (the dataset has {len(self)} models, "
                               f"from {self.names[0]!r} to {self.names[-1]!r})")
            return self._rows[key]
        index = int(key)
        if not -len(self) <= index < len(self):
            raise W2WError(f"{self.path}: model index {index} is out of range for M = {len(self)} models")
        return index % len(self)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        """A model's flat weights (N,), by name or row index."""
        i = self.row(key)
        return self.read_rows(i, i + 1)[0]

    def read_rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start .. stop of the matrix, (r, N) float32, read straight from the shard files into
        `out` (a contiguous (r, N) float32 tensor, to reuse one buffer) or a new tensor (float16 shards
        through a buffer of one shard's piece)."""
        n = self.layout.numel
        if out is None:
            out = torch.empty(stop - start, n)
        elif out.shape != (stop - start, n) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 ({stop - start}, {n}) tensor, got {tuple(out.shape)} "
                             f"{out.dtype}")
        for piece in self._pieces(start, stop):
            target = out[piece.target].numpy()
            stored = target if self.dtype == target.dtype else np.empty(target.shape, self.dtype)
            with open(self.path / piece.shard.file, "rb") as f:
                f.seek(piece.offset)
                if f.readinto(memoryview(stored).cast("B")) != stored.nbytes:
                    raise FileFormatError(f"{self.path / piece.shard.file}: truncated while reading rows "
                                          f"{piece.lo}..{piece.hi}")
            if stored is not target:
                target[...] = stored
        return out

    def read_block(self, row_start: int, row_stop: int, column_start: int, column_stop: int) -> torch.Tensor:
        """The block rows row_start .. row_stop x columns column_start .. column_stop, (r, c) float32: a
        strided read of each shard through a memory map dropped after the copy."""
        n = self.layout.numel
        out = torch.empty(row_stop - row_start, column_stop - column_start)
        for piece in self._pieces(row_start, row_stop):
            rows = np.memmap(self.path / piece.shard.file, self.dtype, "r", piece.offset, (piece.hi - piece.lo, n))
            out[piece.target].numpy()[...] = rows[:, column_start:column_stop]
            del rows  # unmap: the pages read stay in the page cache, not in this process
        return out

    def row_files(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """Where rows start .. stop lie on disk, in row order: (shard file path, byte offset of its first row
        there, rows), for a reader without this class (the Dask PCA's workers)."""
        return [(str(self.path / piece.shard.file), piece.offset, piece.hi - piece.lo)
                for piece in self._pieces(start, stop)]

    def read_columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns start .. stop of every row, (M, c) float32."""
        return self.read_block(0, len(self), start, stop)

    def iter_chunks(self, rows: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, chunk (r, N)) for consecutive chunks of `rows` rows (the last may be shorter)."""
        if rows < 1:
            raise ValueError(f"rows per chunk must be >= 1, got {rows}")
        for first in range(start, len(self), rows):
            yield first, self.read_rows(first, min(first + rows, len(self)))

    def _pieces(self, start: int, stop: int) -> Iterator[_Piece]:
        """The shards' parts of rows start .. stop, in row order."""
        first = max(0, bisect.bisect_right([s.start for s in self.shards], start) - 1)
        for shard, data_start in zip(self.shards[first:], self._data_starts[first:]):
            if shard.start >= stop:
                break
            lo, hi = max(start - shard.start, 0), min(stop - shard.start, shard.rows)
            if hi > lo:
                yield _Piece(shard, data_start + self.dtype.itemsize * lo * self.layout.numel, lo, hi,
                             slice(shard.start + lo - start, shard.start + hi - start))


def read_index(path: Path) -> dict:
    """The checked `index.json` of a dataset directory."""
    file = path / INDEX_JSON
    index = read_description(file, DATASET_FORMAT,
                             f"{path}: not a weights dataset (no {INDEX_JSON}); make one with `w2w collect`",
                             INDEX_SCHEMA)
    check_name_order(index["names"], str(file))
    return index


def check_name_order(names: Sequence[str], what: str) -> None:
    """FileFormatError naming the first row where `names`, the model names of rows 0 .. M - 1 of `what`,
    are not unique and in string order."""
    for i in range(1, len(names)):
        if not names[i - 1] < names[i]:
            raise FileFormatError(f"{what}: model names must be unique and in string order (the order of the "
                                  f"rows), but {names[i - 1]!r} comes before {names[i]!r} (row {i})")


# ----------------------------------------------------------------------------- sources of new models

@dataclass
class Source:
    """New models to add: `names` in string order, and `rows(wanted)`, the weights (N,) of the names in
    the set `wanted`, in name order."""

    names: list[str]
    rows: Callable[[set[str]], Iterator[torch.Tensor]]


def discover_loras(root: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """The LoRAs under `root` by model name, in string order, and the sub-folders that hold none.
    A model is a folder `<name>/` with PEFT weights (`adapter_model.safetensors` or `.bin`, in it or in
    `unet/` as training and the original code write them), or a file `<name>.safetensors` (kohya, PEFT or
    diffusers). Names starting with '.' (temporary files) and other files are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileFormatError(f"{root}: no such folder (expected a folder of LoRA folders or files)")
    found: dict[str, Path] = {}
    empty: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if find_peft_weights(entry) is not None:
                name = entry.name
            else:
                empty.append(entry.name)
                continue
        elif entry.suffix == ".safetensors":
            name = entry.stem
        else:
            continue
        if name in found:
            raise FileFormatError(f"{root}: two LoRAs named {name!r}: {found[name].name} and {entry.name}")
        found[name] = entry
    if not found:
        raise FileFormatError(f"{root}: no LoRA found (expected <name>/adapter_model.safetensors, "
                              f"<name>/unet/adapter_model.safetensors or <name>.safetensors)"
                              + (f"; {len(empty)} folders hold none, e.g. {empty[0]!r}" if empty else ""))
    return dict(sorted(found.items())), empty


def layout_of_lora(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[LoraLayout, str]:
    """(layout, base model id) of a PEFT LoRA folder or PEFT/diffusers file, from its tensor shapes and
    adapter_config.json. A kohya file does not name its modules unambiguously: use a space's layout."""
    path = peft_weights_file(Path(path))
    shapes = read_peft_shapes(path, trust_pickle)
    if any(key.startswith(KOHYA_PREFIXES) for key in shapes):
        raise LayoutError(f"{path}: a kohya file does not say its module names; pass --space (a space with "
                          f"the layout) or --layout-from a PEFT LoRA folder")
    try:
        layout = LoraLayout.from_shapes(shapes)
    except LayoutError as error:
        raise LayoutError(f"{path}: {error}") from None
    config_file = path.parent / PEFT_CONFIG
    if not config_file.is_file():
        return layout, ""
    config = read_adapter_config(config_file)
    layer_scalings(layout, config, config_file)  # its targets and ranks fit the weights
    alpha = float(config.get("lora_alpha", layout.alpha))
    if config.get("use_rslora"):  # PEFT's scaling alpha / sqrt(r), as the layout's alpha / r
        alpha *= math.sqrt(layout.rank)
    layout = LoraLayout(layout.layers, layout.rank, alpha, layout.target_modules)
    return layout, config.get("base_model_name_or_path") or ""


def layout_of_space(directory: str | os.PathLike) -> tuple[LoraLayout, str]:
    """(layout, base model id) of a space directory."""
    description = read_space_description(directory)
    return LoraLayout.from_dict(description["layout"]), description.get("base_model", "")


def folder_source(loras: dict[str, Path], layout: LoraLayout, trust_pickle: bool = False) -> Source:
    """A source reading each LoRA file or folder into the layout (a folder's adapter_model.bin only with
    `trust_pickle`); a file that does not fit, or weights with NaN/inf, raise an error naming the model."""
    def rows(wanted):
        for name, path in loras.items():
            if name not in wanted:
                continue
            try:
                weights = load_lora(layout, path, trust_pickle)
                check_finite(weights, f"weights of model {name!r} ({path})")
            except W2WError as error:
                message = str(error) if name in str(error) else f"model {name!r}: {error}"
                raise type(error)(message) from None
            yield weights

    return Source(list(loras), rows)


def matrix_source(matrix, names: Sequence[str], block_rows: int = DEFAULT_SHARD_SIZE, what: str = "matrix") -> Source:
    """A source from a matrix (M, N): a tensor (memory-mapped or not) or any object with `shape` and
    row slicing `matrix[a:b]` -> (r, N), read `block_rows` rows at a time."""
    names = list(names)
    if len(names) != matrix.shape[0]:
        raise FileFormatError(f"{what}: {matrix.shape[0]} rows but {len(names)} model names")
    check_name_order(names, what)

    def rows(wanted):
        for start in range(0, len(names), block_rows):
            block_names = names[start:start + block_rows]
            if wanted.isdisjoint(block_names):
                continue
            block = torch.as_tensor(matrix[start:start + block_rows]).float()  # (r, N)
            for i, (name, weights) in enumerate(zip(block_names, block)):
                if name in wanted:
                    check_finite(weights, f"weights of model {name!r} (row {start + i} of {what})")
                    yield weights

    return Source(names, rows)


# ----------------------------------------------------------------------------- writing

@dataclass
class CollectReport:
    """What a collect did: models added, existing rows rewritten, folders skipped (no LoRA)."""

    dataset: WeightsDataset
    added: int
    rewritten: int
    skipped: list[str]

    def __str__(self) -> str:
        d = self.dataset
        text = (f"{d.path}: added {self.added} models, rewrote {self.rewritten} existing rows; now M = {len(d):,}, "
                f"N = {d.layout.numel:,} in {len(d.shards)} shards")
        if self.skipped:
            text += (f"; skipped {len(self.skipped)} folders without a LoRA ({', '.join(self.skipped[:3])}"
                     f"{', ...' if len(self.skipped) > 3 else ''})")
        return text


def _shard_number(name: str) -> int | None:
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _write_shard(path: Path, rows: Iterator[tuple[str, torch.Tensor]], count: int, n: int,
                 dtype: np.dtype) -> list[str]:
    """Write the next `count` (name, weights (N,)) of `rows` as a shard of `dtype`; returns their names."""
    names = []
    with atomic_output(path) as tmp:
        with SafetensorsWriter(tmp, {SHARD_TENSOR: (count, n)}, {"format": DATASET_FORMAT}, dtype) as writer:
            for i in range(count):
                name, weights = next(rows)
                writer.write_rows(SHARD_TENSOR, i, weights.numpy()[None])
                names.append(name)
    return names


def _merge(old_names: Sequence[str], old_rows: Iterator[torch.Tensor], new_names: Sequence[str],
           new_rows: Iterator[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weights) of two name-sorted sequences with disjoint names, in name order."""
    i = j = 0
    while i < len(old_names) or j < len(new_names):
        if j == len(new_names) or (i < len(old_names) and old_names[i] < new_names[j]):
            yield old_names[i], next(old_rows)
            i += 1
        else:
            yield new_names[j], next(new_rows)
            j += 1


def add_models(path: str | os.PathLike, source: Source, layout: LoraLayout | None, base_model: str = "",
               shard_size: int = DEFAULT_SHARD_SIZE, log: Callable[[str], None] | None = None,
               dtype: str = "float32") -> CollectReport:
    """Add the models of `source` that the dataset at `path` lacks, creating it when absent (then
    `layout` is required) with shards of `dtype` (a name of DTYPES); returns a report. An existing
    dataset keeps its layout (a different `layout` is refused), base model, shard size and dtype."""
    path = Path(path)
    if shard_size < 1:
        raise W2WError(f"the shard size must be >= 1, got {shard_size}")
    if dtype not in DTYPES:
        raise W2WError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_output(path, DATASET_FOLDER)
    created = not path.exists()
    with output_lock(path, log):  # a second collect into the same dataset waits for this one
        try:
            return _add_models(path, source, layout, base_model, shard_size, log, dtype)
        except W2WError:  # a refused model: a folder this run created holds nothing collected, so it goes
            if created and not (path / INDEX_JSON).exists():
                shutil.rmtree(path, ignore_errors=True)
            raise


def _add_models(path: Path, source: Source, layout: LoraLayout | None, base_model: str, shard_size: int,
                log: Callable[[str], None] | None, dtype: str) -> CollectReport:
    """`add_models` while holding the dataset's lock."""
    old = None
    if (path / INDEX_JSON).exists():
        old = WeightsDataset(path)
        mismatch = layout and old.layout.describe_mismatch(layout)
        if mismatch:
            raise LayoutError(f"{path}: the dataset's LoRA layout differs from the new models' ({mismatch})")
        layout, shard_size, base_model, dtype = old.layout, old.shard_size, old.base_model or base_model, old.dtype_name
    if layout is None:
        raise LayoutError(f"{path}: a new dataset needs a LoRA layout")
    n = layout.numel
    old_names = list(old.names) if old else []
    have = set(old_names)
    new = [name for name in source.names if name not in have]
    if not new:
        if old is None:
            raise W2WError(f"{path}: no models to collect")
        return CollectReport(old, 0, 0, [])

    # keep the shards before the one where the first new name falls; rewrite from there to the end
    shards = list(old.shards) if old else []
    position = bisect.bisect_left(old_names, new[0])
    keep = bisect.bisect_right([s.start for s in shards], position) - 1
    if keep < 0 or (position == len(old_names) and shards[keep].rows == shard_size):
        keep += 1  # a new dataset, or appending after a full last shard
    first_row = shards[keep].start if keep < len(shards) else len(old_names)
    rewrite = old_names[first_row:]
    old_rows = (row for _, chunk in old.iter_chunks(shard_size, first_row) for row in chunk) if old else iter(())
    rows = _merge(rewrite, old_rows, new, source.rows(set(new)))

    # numbered after the listed shards: a shard a killed run left unlisted is written over
    number = max([_shard_number(s.file) for s in shards], default=-1) + 1
    shards, names = shards[:keep], old_names[:first_row]
    total = first_row + len(rewrite) + len(new)
    for start in range(first_row, total, shard_size):
        count = min(shard_size, total - start)
        file = f"weights-{number:05d}.safetensors"
        names += _write_shard(path / file, rows, count, n, DTYPES[dtype])
        shards.append(Shard(file, start, count))
        number += 1
        if log:
            log(f"{path / file}: rows {start}..{start + count} of {total}")
    index = {"format": DATASET_FORMAT, "version": FORMAT_VERSION, "num_weights": n, "shard_size": shard_size,
             "dtype": dtype, "base_model": base_model, "layout": layout.to_dict(),
             "shards": [{"file": s.file, "rows": s.rows} for s in shards], "names": names}
    with atomic_output(path / INDEX_JSON) as tmp:
        write_file(tmp, json.dumps(index, indent=0))
    _remove_unlisted(path, {s.file for s in shards})
    return CollectReport(WeightsDataset(path), len(new), len(rewrite), [])


def _remove_unlisted(path: Path, listed: set[str]) -> None:
    """Delete shard files the index no longer lists and temporary files of killed runs."""
    for file in path.iterdir():
        stale_shard = _shard_number(file.name) is not None and file.name not in listed
        if stale_shard or is_temporary(file.name):
            file.unlink()


# ----------------------------------------------------------------------------- the two collect commands

def collect_folders(root: str | os.PathLike, out: str | os.PathLike, layout: LoraLayout | None = None,
                    base_model: str = "", shard_size: int = DEFAULT_SHARD_SIZE,
                    log: Callable[[str], None] | None = None, dtype: str = "float32",
                    trust_pickle: bool = False) -> CollectReport:
    """Add every LoRA under `root` (see `discover_loras`) to the dataset `out` (a new one with shards of
    `dtype`); `trust_pickle` lets adapter_model.bin pickles be read. The layout is, in order: `layout`,
    the existing dataset's, the first LoRA's."""
    loras, empty = discover_loras(root)
    if layout is None and (Path(out) / INDEX_JSON).exists():
        layout = WeightsDataset(out).layout
    elif layout is None:
        layout, found_base = layout_of_lora(next(iter(loras.values())), trust_pickle)
        base_model = base_model or found_base
    report = add_models(out, folder_source(loras, layout, trust_pickle), layout, base_model, shard_size, log, dtype)
    report.skipped = empty
    return report


def read_names(path: str | os.PathLike) -> list[str]:
    """Model names, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file (expected model names, one per line)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def collect_all_weights(all_weights: str | os.PathLike, out: str | os.PathLike, layout: LoraLayout | None = None,
                        names: Sequence[str] | None = None, trust_pickle: bool = False, base_model: str = "",
                        shard_size: int = DEFAULT_SHARD_SIZE, log: Callable[[str], None] | None = None,
                        dtype: str = "float32") -> CollectReport:
    """Copy the released `all_weights.pt` (M, N), memory-mapped, into the dataset `out`, shard by shard.
    Without `names`, models are named by their zero-padded row number. The layout is, in order:
    `layout`, the existing dataset's, Stable Diffusion 1.5's (the released one)."""
    all_weights = Path(all_weights)
    if layout is None:
        if (Path(out) / INDEX_JSON).exists():
            layout = WeightsDataset(out).layout
        else:
            from .layout import sd15_layout
            layout = sd15_layout()
    matrix = torch_load(all_weights, trust_pickle, mmap=True)
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise FileFormatError(f"{all_weights}: expected a tensor (M, N), got "
                              f"{tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__}")
    if matrix.shape[1] != layout.numel:
        raise LayoutError(f"{all_weights}: {matrix.shape[1]:,} numbers per model, the layout has N = {layout.numel:,} "
                          f"(pass --space or --layout-from for another base model)")
    if names is None:
        width = len(str(max(matrix.shape[0] - 1, 0)))
        names = [f"{i:0{width}d}" for i in range(matrix.shape[0])]
    source = matrix_source(matrix, names, shard_size, str(all_weights))
    return add_models(out, source, layout, base_model, shard_size, log, dtype)
