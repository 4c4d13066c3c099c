"""Reading and writing spaces and models in the project's safe format.

A space is a directory:
    space.safetensors   mean (N,), std (N,), components (K, N), [coefficients (M, K_c)], [explained_variance (K,)]
    space.json          format version, layout, base model, trigger prompt, space id, [inversion presets
                        measured on the space: {"ood": {"lr": 0.1}}]
    attributes.csv      optional, one row per dataset model
The safetensors file is written block by block and read through memory maps, so a 4 GB components
matrix never sits twice in memory and loading the first K' components reads only those K' rows.
A model is a small safetensors file: coefficients (k,) and, in its metadata, the id of its space and how
the model was made (`provenance`; a file without it, from before, loads with none).

Every output is checked before any work begins (`check_outputs`: not an input, not inside a space,
dataset or PEFT folder an input belongs to, not a device, FIFO or socket, not a directory where a file
goes, not a foreign folder where a space goes), written under a temporary name and renamed when
complete; a write the disk refuses is one line (`cannot write DIR: permission denied`). Inputs are
refused before they are opened when they are FIFOs, sockets or devices (`paths`).
Safetensors files are written by this module with sorted metadata: the same output, the same bytes.
Every file is checked once, where it is read: JSON against its schema (`schemas`), safetensors
headers against the format and the file's size, spaces' tensors against space.json.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from .checks import gigabytes
from .errors import FileFormatError, OutputError, PickleRefusedError, W2WError
from .layout import LoraLayout
from .paths import check_input, check_not_inside, member_folders, refuse_special_output
from .schemas import SAFETENSORS_HEADER, SAFETENSORS_ITEMSIZE, SPACE_DESCRIPTION, check, read_json, unique_keys
from .space import Space, W2WModel, check_finite

SPACE_FORMAT = "w2w-space"
MODEL_FORMAT = "w2w-model"
FORMAT_VERSION = 1
SPACE_TENSORS = "space.safetensors"
SPACE_JSON = "space.json"
ATTRIBUTES_CSV = "attributes.csv"

_HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on the JSON header
# A w2w model's header is about 200 bytes; this leaves room for metadata such as provenance, and refuses a
# header that costs seconds to parse (300,000 empty tensors in 19 MB) before it is read.
MODEL_HEADER_LIMIT = 2**20
WRITE_BLOCK_BYTES = 64 * 2**20  # large matrices are written in blocks of about this size


# ----------------------------------------------------------------------------- where outputs may go

@dataclass(frozen=True)
class Output:
    """What a command writes at a path: a file, or a folder (`folder`). `owns` says whether an existing
    folder is an earlier output of this kind, which may be replaced or added to; an empty folder
    always is. A file output may replace an earlier file, never a directory."""

    kind: str                                   # in messages: "model file", "space"
    folder: bool = False
    owns: Callable[[Path], bool] | None = None  # None: any existing folder is written into


def holds(*names: str) -> Callable[[Path], bool]:
    """A folder that holds one of `names`."""
    return lambda path: any((path / name).exists() for name in names)


FILE = Output("file")
MODEL_FILE = Output("model file")
IMAGE_FILE = Output("image file")
SPACE_FOLDER = Output("space", folder=True, owns=holds(SPACE_JSON))
FILES_FOLDER = Output("output folder", folder=True)
FILE_BLOCK_BYTES = 4096  # the least disk space a file takes
LOCKS_FOLDER = "w2w-locks"  # in the temporary folder, with the user's id: the lock files of `output_lock`
WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST}


def is_temporary(name: str) -> bool:
    """A temporary name of `atomic_output`."""
    return name.startswith(".") and (".partial-" in name or ".old-" in name)


def owns_only(pattern: str) -> Callable[[Path], bool]:
    """A folder that holds only files whose names match the regular expression `pattern` and
    temporary files of this project."""
    compiled = re.compile(pattern)
    return lambda path: all(compiled.fullmatch(entry.name) or is_temporary(entry.name) for entry in path.iterdir())


def _cannot_write(path: Path, error: OSError) -> OutputError:
    where = path if path.is_dir() else path.parent
    return OutputError(f"cannot write {where}: {os.strerror(error.errno).lower()}" if error.errno else
                       f"cannot write {where}: {error}")


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_writable(path: Path) -> None:
    """OutputError unless `path` can be created: its nearest existing ancestor is a writable folder."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {ancestor}: permission denied")


def check_output(path: str | os.PathLike, output: Output = FILE,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`path`, checked before any work begins (see `check_outputs`)."""
    check_outputs([(path, output)], inputs)
    return Path(path)


def check_disk(folder: str | os.PathLike, count: int, each: int, what: str) -> None:
    """OutputError when `count` outputs of about `each` bytes do not fit the disk free at `folder`."""
    folder = Path(folder)
    ancestor = folder if folder.is_dir() else _existing_ancestor(folder)
    free = shutil.disk_usage(ancestor).free
    if count * each > free:
        raise OutputError(f"{count:,} {what} need about {gigabytes(count * each)} on disk, {ancestor} has "
                          f"{gigabytes(free)} free: at most {free // each:,} fit")


def check_outputs(outputs: Iterable[tuple[str | os.PathLike | None, Output]],
                  inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Each of `outputs` (None: not written) checked before any work begins, in time linear in their
    number: two outputs differ; none is one of `inputs`, a folder holding one, or inside a space, weights
    dataset or PEFT folder that an input is or lies in; none is a device, FIFO or socket, a directory where
    a file goes, a file where a folder goes, or a non-empty folder that is not an earlier output of its
    kind; each is creatable. The inputs are checked not to be FIFOs, sockets or devices. Temporary files
    of killed runs writing an output are removed."""
    inputs = [given for given in inputs if given is not None]
    for given in inputs:
        check_input(given, "an input file or folder")
    sources = {Path(given).resolve(): given for given in inputs}
    folders = member_folders(inputs)
    seen: dict[Path, Path] = {}
    temporaries: dict[Path, dict[str, list[Path]]] = {}  # by folder: one listing each, however many outputs
    for path, output in ((Path(p), o) for p, o in outputs if p is not None):
        target = path.resolve()
        if target in seen:
            raise OutputError(f"{path}: named for two outputs of one command: choose two paths")
        seen[target] = path
        _check_one_output(path, target, output, sources, folders)
        if path.parent not in temporaries:
            temporaries[path.parent] = _stale_temporaries(path.parent)
        for stale in temporaries[path.parent].get(path.name, []):
            _remove(stale)


def _check_one_output(path: Path, target: Path, output: Output, sources: dict[Path, str | os.PathLike],
                      folders: dict[Path, tuple[str, str]]) -> None:
    """The checks of `check_outputs` on one output `path` (resolved: `target`)."""
    for source, given in sources.items():
        if source == target or target in source.parents:
            raise OutputError(f"{path}: is {'' if source == target else 'a folder holding '}the input {given}; "
                              f"writing there would destroy it: choose another output")
    check_not_inside(path, target, folders)
    refuse_special_output(path)
    if path.is_symlink() or path.exists():
        if output.folder and not path.is_dir():
            raise OutputError(f"{path}: exists and is a file, but a {output.kind} is a folder: choose another path")
        if not output.folder and path.is_dir():
            raise OutputError(f"{path}: is a directory, expected the path of a {output.kind}: "
                              f"name a file (nothing was written)")
        if output.folder and output.owns and any(path.iterdir()) and not output.owns(path):
            raise OutputError(f"{path}: a folder that is not a {output.kind} and not empty: choose another path "
                              f"(nothing was written)")
    check_writable(path)


# ----------------------------------------------------------------------------- atomic output

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: str) -> bool:
    """Whether a process `pid` runs on this machine (unknown: assume it does)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # not a pid, or a process of another user
        return True
    return True


def _stale_temporaries(folder: Path) -> dict[str, list[Path]]:
    """The temporary files in `folder` that processes which were killed left, by the output they were
    writing (`.NAME.partial-PID` and `.NAME.old-PID` under NAME)."""
    stale: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return stale
    for entry in folder.iterdir():
        name, sep, pid = entry.name.rpartition("-")
        output, dot, kind = name[1:].rpartition(".")
        if entry.name.startswith(".") and sep and dot and kind in ("partial", "old") and not _alive(pid):
            stale.setdefault(output, []).append(entry)
    return stale


def _remove_stale(path: Path) -> None:
    """Delete temporary siblings of `path` left by processes that were killed."""
    for stale in _stale_temporaries(path.parent).get(path.name, []):
        _remove(stale)


@contextmanager
def atomic_output(path: str | os.PathLike, output: Output = FILE) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) to write; it replaces `path` only when
    the block ends without error, and is deleted otherwise. An existing directory at `path` is
    replaced only when `output` is a folder that owns it, a device, FIFO or socket never; a refused or
    failed write raises OutputError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    refuse_special_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            check_output(path, output)
        _remove_stale(path)
        _remove(tmp)
    except OSError as error:
        raise _cannot_write(path, error) from None
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        if error.errno in WRITE_ERRORS and (error.filename is None or str(error.filename).startswith(str(tmp))):
            raise _cannot_write(path, error) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_file(path: Path, data: bytes | str) -> None:
    """`data` (text as UTF-8) as the file `path`, through this module's `open`."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def save_png(image, path: str | os.PathLike) -> Path:
    """A PIL image as the PNG file `path` (same image, same bytes), with the generation parameters `generate`
    put in its info as A1111's `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from .provenance import INFOTEXT_KEY

    text = PngInfo()
    if isinstance(image.info.get(INFOTEXT_KEY), str):
        text.add_text(INFOTEXT_KEY, image.info[INFOTEXT_KEY])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=text)
    with atomic_output(path, IMAGE_FILE) as tmp:
        write_file(tmp, buffer.getvalue())
    return Path(path)


def lock_folder() -> Path:
    """This user's folder of lock files, `w2w-locks-UID` in the temporary folder, made readable by the user
    alone: every user has their own (a folder shared by all would be made by the first user and refused to
    the others). OutputError when it is not a folder of this user's: another's could hold or swap the locks."""
    uid = os.getuid()
    locks = Path(tempfile.gettempdir()) / f"{LOCKS_FOLDER}-{uid}"
    try:
        locks.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(locks)
    except OSError as error:
        raise _cannot_write(locks, error) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        what = f"a folder of user {info.st_uid}" if stat.S_ISDIR(info.st_mode) else "not a folder"
        raise OutputError(f"{locks}: meant for your w2w locks (user {uid}), but {what}: remove it, or set TMPDIR to "
                          f"a folder of yours")
    return locks


@contextmanager
def output_lock(folder: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of the output `folder` while the block runs: a second process of this machine
    writing the same folder waits until the first is done, so their files never mix. The lock files
    live in this user's `lock_folder`, named by a hash of the folder's path, and stay out of outputs."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    locks = lock_folder()
    try:
        lock = FileLock(locks / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32] + ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if log:
                log(f"{folder}: another w2w process is writing here; waiting for it to finish")
            lock.acquire()
    except OSError as error:
        raise _cannot_write(locks, error) from None
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------- safetensors by memory map

SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}  # what SafetensorsWriter writes


class SafetensorsWriter:
    """A float32 (or `dtype`: float16) safetensors file of the given tensor shapes, filled block by block
    with plain file writes: nothing is held whole in memory and no written page stays mapped into the
    process. Blocks are converted to the file's dtype as they are written."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None,
                 dtype: np.dtype = np.float32):
        self.dtype = np.dtype(dtype)
        header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))}  # same output, same bytes
        offset = 0
        for name, shape in shapes.items():
            size = self.dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        start = 8 + len(encoded)
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.starts = {name: start + header[name]["data_offsets"][0] for name in shapes}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file.truncate(start + offset)

    def write_rows(self, name: str, row: int, block: np.ndarray) -> None:
        """Rows row .. row + len(block) of tensor `name` (the tensor's trailing dimensions per row)."""
        row_bytes = self.dtype.itemsize * int(np.prod(self.shapes[name][1:], dtype=np.int64))
        self.file.seek(self.starts[name] + row * row_bytes)
        self.file.write(np.ascontiguousarray(block, self.dtype).tobytes())

    def write_columns(self, name: str, column: int, block: np.ndarray) -> None:
        """Columns column .. column + block.shape[1] of the 2-d tensor `name`, one row at a time."""
        columns = self.shapes[name][1]
        for i, row in enumerate(np.asarray(block, self.dtype)):
            self.file.seek(self.starts[name] + self.dtype.itemsize * (i * columns + column))
            self.file.write(row.tobytes())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors_header(path: Path, limit: int = _HEADER_LIMIT, what: str = "") -> tuple[dict, int]:
    """(header, data start) of a safetensors file, checked: a header of at most `limit` bytes (a file of
    `what`, such as a w2w model, names its kind in the message), no key twice, the header's schema, each
    tensor's bytes against its dtype and shape, byte ranges that tile the data without overlap or gap, and
    the file's size."""
    check_input(path, "a safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > limit and length <= size - 8:
                raise FileFormatError(f"{path}: a safetensors header of {length:,} bytes; a {what or 'file'} has "
                                      f"at most {limit:,}")
            if not 0 < length <= min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length), object_pairs_hook=unique_keys)
    except FileFormatError:
        raise
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise FileFormatError(f"{path}: not a valid safetensors file ({error})") from None
    if not _plain_header(header):
        check(header, SAFETENSORS_HEADER, path)
    _check_byte_ranges(path, header, 8 + length, size)
    return header, 8 + length


def _natural(value) -> bool:
    return type(value) is int and value >= 0


def _plain_entry(info) -> bool:
    """Whether a tensor entry of a safetensors header is {dtype, shape, data_offsets} as the schema says."""
    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in SAFETENSORS_ITEMSIZE
            and isinstance(info.get("shape"), list) and all(map(_natural, info["shape"]))
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and all(map(_natural, info["data_offsets"])))


def _plain_header(header) -> bool:
    """Whether `header` fits SAFETENSORS_HEADER, checked in plain Python, without the schema's cost per
    tensor (a header listing 300,000 empty tensors took it half a minute); False sends it to the schema,
    which names what is wrong."""
    if not isinstance(header, dict):
        return False
    metadata = header.get("__metadata__", {})
    return (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
            and all(_plain_entry(info) for name, info in header.items() if name != "__metadata__"))


def _check_byte_ranges(path: Path, header: dict, start: int, size: int) -> None:
    """Each tensor's data_offsets [begin, end) hold its dtype x shape, and the ranges tile the data
    (bytes start .. size of the file) in order, as the safetensors format requires."""
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        (begin, end), needed = info["data_offsets"], SAFETENSORS_ITEMSIZE[info["dtype"]] * math.prod(info["shape"])
        if end - begin != needed:
            raise FileFormatError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes); "
                                  f"its dtype {info['dtype']} and shape {info['shape']} need {needed} bytes")
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise FileFormatError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {position} "
                                  f"(the tensors' data_offsets overlap or leave a gap)")
        position = end
    if start + position > size:
        raise FileFormatError(f"{path}: truncated: the tensors end at byte {start + position}, the file has {size}")
    if start + position < size:
        raise FileFormatError(f"{path}: {size - start - position} bytes after the last tensor's data; expected none")


def mmap_tensor(path: Path, header: dict, start: int, name: str, rows: int | None = None) -> torch.Tensor:
    """Tensor `name` (its first `rows` rows) as a copy-on-write memory map: only what is used is read."""
    if name not in header:
        raise FileFormatError(f"{path}: no tensor {name!r} (has {sorted(k for k in header if k != '__metadata__')})")
    info = header[name]
    if info["dtype"] != "F32":
        raise FileFormatError(f"{path}: tensor {name!r} is {info['dtype']}, expected F32")
    shape = list(info["shape"])
    if rows is not None:
        shape[0] = min(rows, shape[0])
    if int(np.prod(shape)) == 0:
        return torch.zeros(shape)
    array = np.memmap(path, np.float32, "c", start + info["data_offsets"][0], tuple(shape))
    return torch.from_numpy(array)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Float32 tensors into one safetensors file at `path`, block by block (no tensor is copied whole)."""
    with SafetensorsWriter(path, {k: tuple(v.shape) for k, v in tensors.items()}, metadata) as writer:
        for name, tensor in tensors.items():
            _copy_blocks(writer, name, tensor)


def _copy_blocks(writer: SafetensorsWriter, name: str, src: torch.Tensor) -> None:
    """Write tensor `name` from `src` in blocks of about WRITE_BLOCK_BYTES, along src's contiguous dimension:
    a transposed memory-mapped matrix (a view of V.pt, say) is read in its own row order."""
    src = src.detach().to("cpu", torch.float32)
    if src.ndim != 2:
        writer.write_rows(name, 0, src.numpy())
        return
    rows, columns = src.shape
    if src.stride(0) == 1 and src.stride(1) != 1:  # transposed: read the underlying rows, write columns
        step = max(1, WRITE_BLOCK_BYTES // (4 * max(rows, 1)))
        for j in range(0, columns, step):
            writer.write_columns(name, j, src[:, j:j + step].numpy())
    else:
        step = max(1, WRITE_BLOCK_BYTES // (4 * max(columns, 1)))
        for i in range(0, rows, step):
            writer.write_rows(name, i, src[i:i + step].numpy())


# ----------------------------------------------------------------------------- spaces

def save_space(space: Space, directory: str | os.PathLike) -> Path:
    """Write `space` to `directory` (replaced only once complete)."""
    directory = Path(directory)
    tensors = {"mean": space.mean, "std": space.std, "components": space.components}
    if space.coefficients is not None:
        tensors["coefficients"] = space.coefficients
    if space.explained_variance is not None:
        tensors["explained_variance"] = space.explained_variance
    with atomic_output(directory, SPACE_FOLDER) as tmp:
        tmp.mkdir()
        write_tensors(tmp / SPACE_TENSORS, tensors, {"format": SPACE_FORMAT, "space_id": space.id})
        description = {
            "format": SPACE_FORMAT,
            "version": FORMAT_VERSION,
            "id": space.id,
            "base_model": space.base_model,
            "prompt": space.prompt,
            "num_weights": space.num_weights,
            "num_components": space.num_components,
            "num_models": space.num_models,
            "layout": space.layout.to_dict(),
        }
        if space.inversion_presets:
            description["inversion_presets"] = space.inversion_presets
        write_file(tmp / SPACE_JSON, json.dumps(description, indent=1))
        if space.attributes is not None:
            write_file(tmp / ATTRIBUTES_CSV, space.attributes.to_csv())
    return directory


def read_description(path: Path, expected_format: str, when_missing: str, schema: dict) -> dict:
    """The parsed JSON file `path` describing a folder in the project's format `expected_format`, checked
    for format, version and `schema`; `when_missing` is the error when there is no such file."""
    if not check_input(path, f"a {expected_format} description (JSON)").is_file():
        raise FileFormatError(when_missing)
    description = read_json(path)
    if isinstance(description, dict):
        if description.get("format") != expected_format:
            raise FileFormatError(f"{path}: format {description.get('format')!r}, expected {expected_format!r}")
        version = description.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise FileFormatError(f"{path}: format version {version} is newer than this lora_w2w understands "
                                  f"({FORMAT_VERSION}); upgrade lora_w2w")
    check(description, schema, path)
    return description


def read_space_description(directory: str | os.PathLike) -> dict:
    """The parsed `space.json` of a space directory, checked against its schema."""
    return read_description(Path(directory) / SPACE_JSON, SPACE_FORMAT,
                            f"{directory}: not a w2w space (no {SPACE_JSON}); "
                            f"convert the released files with `w2w import-official`", SPACE_DESCRIPTION)


def read_attribute_table(path: Path) -> pd.DataFrame:
    """An attribute table (CSV, first column the model names, kept as strings); FileFormatError naming the
    file when it is empty, not CSV, names a model twice, or is a FIFO, socket or device."""
    check_input(path, "an attribute table (a CSV file)")
    try:
        table = pd.read_csv(path, index_col=0, converters={0: str})
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such attribute table (expected a CSV file, first column the model "
                              f"names)") from None
    except (ValueError, UnicodeDecodeError) as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        reason = " ".join(str(error).split())  # pandas' messages may span lines
        raise FileFormatError(f"{path}: not a readable CSV table ({reason}); expected a header row, then one row "
                              f"per model, the model name first") from None
    table.index = table.index.astype(str)
    repeated = table.index[table.index.duplicated()]
    if len(repeated):
        raise FileFormatError(f"{path}: model {repeated[0]!r} has {int((table.index == repeated[0]).sum())} rows")
    return table


SPACE_TENSOR_DIMENSIONS = {"mean": 1, "std": 1, "components": 2, "coefficients": 2, "explained_variance": 1}
REQUIRED_SPACE_TENSORS = ("mean", "std", "components")


def read_space_files(directory: Path) -> tuple[dict, dict, int]:
    """(space.json, header of space.safetensors, its data start) of a space, checked against each other:
    mean, std and components present, each of its number of dimensions, and as many components and
    weights as space.json says."""
    description = read_space_description(directory)
    path = directory / SPACE_TENSORS
    header, start = read_safetensors_header(path)
    for name in REQUIRED_SPACE_TENSORS:
        if name not in header:
            raise FileFormatError(f"{path}: no tensor {name!r}; a space holds {', '.join(REQUIRED_SPACE_TENSORS)}")
    for name, ndim in SPACE_TENSOR_DIMENSIONS.items():
        if name in header and len(header[name]["shape"]) != ndim:
            raise FileFormatError(f"{path}: tensor {name!r} has shape {header[name]['shape']}, expected {ndim} "
                                  f"dimensions")
    shape = header["components"]["shape"]
    expected = [description["num_components"], description["num_weights"]]
    if shape != expected:
        raise FileFormatError(f"{path}: components {shape}, but {SPACE_JSON} says K = {expected[0]} and "
                              f"N = {expected[1]}")
    return description, header, start


def load_space(directory: str | os.PathLike, k: int | None = None) -> Space:
    """Load a space, memory-mapped; with `k`, only the first k components (and coefficients) are read.
    Mean and std are checked for NaN/inf (the components are as they are used: see W2WModel.weights)."""
    directory = Path(directory)
    description, header, start = read_space_files(directory)
    tensors_path = directory / SPACE_TENSORS
    total = header["components"]["shape"][0]
    if k is not None and not 1 <= k <= total:
        raise FileFormatError(f"{k} components asked for, the space {directory} has K = {total}")

    def tensor(name, rows=None):
        return mmap_tensor(tensors_path, header, start, name, rows) if name in header else None

    coefficients = tensor("coefficients")
    if coefficients is not None and k is not None:
        coefficients = coefficients[:, :k]
    attributes = None
    if (directory / ATTRIBUTES_CSV).is_file():
        attributes = read_attribute_table(directory / ATTRIBUTES_CSV)
    mean, std = tensor("mean"), tensor("std")
    for name, values in (("mean", mean), ("std", std)):
        check_finite(values, f"{tensors_path}: tensor {name!r}")
    try:
        return Space(
            mean=mean, std=std, components=tensor("components", k),
            layout=LoraLayout.from_dict(description["layout"]), coefficients=coefficients, attributes=attributes,
            explained_variance=None if tensor("explained_variance") is None else tensor("explained_variance", k),
            base_model=description.get("base_model", ""), prompt=description.get("prompt", ""), id=description["id"],
            inversion_presets=description.get("inversion_presets", {}))
    except W2WError as error:
        raise type(error)(f"{directory}: {error}") from None


# ----------------------------------------------------------------------------- models

def save_model(model: W2WModel, path: str | os.PathLike) -> Path:
    """Write a model as `path` (a .safetensors file), how it was made in its metadata."""
    from .provenance import PROVENANCE_KEY, encode

    path = Path(path)
    metadata = {"format": MODEL_FORMAT, "version": str(FORMAT_VERSION)}
    if model.space_id:
        metadata["space_id"] = model.space_id
    if model.provenance:
        metadata[PROVENANCE_KEY] = encode(model.provenance)
    with atomic_output(path, MODEL_FILE) as tmp:
        write_tensors(tmp, {"coefficients": model.coefficients.detach()}, metadata)
    return path


def load_model(path: str | os.PathLike, trust_pickle: bool = False) -> W2WModel:
    """A model from the project's .safetensors file, or from the original `w2wmodel.pt` (1 x k real floating
    point numbers; a pickle that needs more than tensors only with `trust_pickle`). The project's file is
    read strictly: a header of at most MODEL_HEADER_LIMIT bytes, this format version, one tensor."""
    from .provenance import recorded

    path = check_input(path, "a w2w model file")
    if not path.is_file():
        raise FileFormatError(f"{path}: no such model file")
    if path.suffix == ".pt":
        coefficients = torch_load(path, trust_pickle)
        if not isinstance(coefficients, torch.Tensor):
            raise FileFormatError(f"{path}: expected a tensor of coefficients (1 x k), got {type(coefficients).__name__}")
        space_id, provenance = None, ()
    else:
        header, start = read_safetensors_header(path, MODEL_HEADER_LIMIT, "w2w model")
        metadata = header.get("__metadata__", {})
        if metadata.get("format") != MODEL_FORMAT:
            raise FileFormatError(f"{path}: not a w2w model (format {metadata.get('format')!r}, expected "
                                  f"{MODEL_FORMAT!r})")
        version = metadata.get("version")
        if version != str(FORMAT_VERSION):
            found = "without a format version" if version is None else f"format version {version!r}"
            raise FileFormatError(f"{path}: w2w model {found}; this lora_w2w reads version {FORMAT_VERSION} (a newer "
                                  f"file needs a newer lora_w2w)")
        extra = sorted(name for name in header if name not in ("__metadata__", "coefficients"))
        if extra:
            raise FileFormatError(f"{path}: {len(extra):,} tensor{'s' * (len(extra) > 1)} besides 'coefficients' "
                                  f"(first {extra[0]!r}); a w2w model holds that one tensor only")
        coefficients, space_id = mmap_tensor(path, header, start, "coefficients").clone(), metadata.get("space_id")
        provenance = recorded(metadata, str(path))
    try:
        model = W2WModel(coefficients, space_id, provenance)  # its dtype checked before the cast
    except W2WError as error:
        raise type(error)(f"{path}: {error}") from None
    return W2WModel(model.coefficients.float(), space_id, provenance)


def save_state(path: str | os.PathLike, kind: str, state: dict) -> None:
    """A run's state (tensors, numbers, strings, lists and dicts of them) written to `path` atomically,
    tagged `kind`, for `load_state`."""
    buffer = io.BytesIO()
    torch.save({"format": kind, **state}, buffer)
    with atomic_output(path) as tmp:
        write_file(tmp, buffer.getvalue())


def load_state(path: str | os.PathLike, kind: str) -> dict:
    """The state `save_state` wrote as `kind` (no code runs); FileFormatError for any other file."""
    state = torch_load(Path(path))
    if not isinstance(state, dict) or state.get("format") != kind:
        raise FileFormatError(f"{path}: not a {kind} file")
    return state


def torch_load(path: Path, trust_pickle: bool = False, mmap: bool = False):
    """torch.load with `weights_only=True` (tensors, dicts, tuples: no code runs). A file that needs
    full unpickling is refused unless `trust_pickle`."""
    if not check_input(path, "a torch file").is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise PickleRefusedError(
                f"{path} needs unpickling, which can run arbitrary code; pass --trust-pickle "
                f"(trust_pickle=True) only if you trust where it came from") from None
    except (RuntimeError, EOFError, OSError) as error:
        if mmap:  # a file of the old (non-zip) format cannot be memory-mapped
            return torch_load(path, trust_pickle)
        raise _unreadable(path, error) from None
    except Exception as error:  # a corrupt pickle fails in the unpickler in any way (IndexError, KeyError ...)
        raise _unreadable(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> FileFormatError:
    reason = " ".join(str(error).split())[:200] or type(error).__name__  # torch's messages span lines
    return FileFormatError(f"{path}: not a readable torch file ({reason})")
