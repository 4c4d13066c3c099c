"""What a path given to a command may be: inputs are regular files or folders, and outputs are never
special files nor inside a folder of files that belong together (a space, a weights dataset, a PEFT
LoRA folder) that an input of the same command belongs to.

A FIFO, a socket or a device is refused before it is opened: reading a FIFO blocks until another
process writes to it, /dev/zero never ends, and writing an output over a device as root replaces the
device (`w2w edit --out /dev/null` would destroy the machine's /dev/null).

    check_input("me.jpg", "an image file")        # FileFormatError for a FIFO, socket or device
    refuse_special_output("out.safetensors")      # OutputError for a device, FIFO or socket
    member_folders(["files/tiny/space"])          # {resolved folder: (kind, input)}: the space itself
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from .errors import FileFormatError, OutputError

SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
# Folders whose files belong together, each kind with the sets of files that mark one (all of a set): an
# output written inside one changes it. The names are those of storage.SPACE_JSON and SPACE_TENSORS,
# dataset.INDEX_JSON and its first shard, formats.PEFT_CONFIG and PEFT_WEIGHTS (a PEFT folder in the
# original's layout keeps them in unet/).
MEMBER_FOLDERS = (("space", (("space.json", "space.safetensors"),)),
                  ("weights dataset", (("index.json", "weights-00000.safetensors"),)),
                  ("PEFT LoRA folder", (("adapter_config.json",), ("adapter_model.safetensors",),
                                        ("unet/adapter_config.json",), ("unet/adapter_model.safetensors",))))


def special_kind(path: str | os.PathLike, follow: bool = True) -> str | None:
    """'a FIFO (named pipe)', 'a socket', 'a character device' or 'a block device' when `path` is one
    (`follow`: through symbolic links); None for a regular file, a folder, a link (not followed) or nothing."""
    try:
        mode = os.stat(path).st_mode if follow else os.lstat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable or a name the system refuses: the reader says why
        return None
    return next((kind for test, kind in SPECIAL_FILES if test(mode)), None)


def check_input(path: str | os.PathLike, what: str = "a regular file") -> Path:
    """`path` as a Path; FileFormatError when it is a FIFO, socket or device (see the module docstring).
    Checked before the file is opened; a missing file is left to the reader, which names what it expected."""
    kind = special_kind(path)
    if kind:
        raise FileFormatError(f"{path}: is {kind}, not a regular file; expected {what}")
    return Path(path)


def refuse_special_output(path: str | os.PathLike) -> None:
    """OutputError when `path` itself (not followed through a link) is a FIFO, socket or device: an
    output renamed over it would replace it."""
    kind = special_kind(path, follow=False)
    if kind:
        raise OutputError(f"{path}: is {kind}; outputs are written as regular files and folders and would replace "
                          f"it: choose another path (nothing was written)")


def member_kind(folder: Path) -> str | None:
    """The kind of folder of MEMBER_FOLDERS that `folder` is, or None."""
    for kind, marks in MEMBER_FOLDERS:
        if any(all((folder / name).is_file() for name in names) for names in marks):
            return kind
    return None


def member_folders(inputs: Iterable[str | os.PathLike]) -> dict[Path, tuple[str, str]]:
    """{resolved folder: (its kind, the input given)} for every space, weights dataset or PEFT LoRA
    folder that an input is, or lies inside (at any depth); an input that does not exist (a hub id such
    as a --base) lies in none."""
    folders: dict[Path, tuple[str, str]] = {}
    for given in inputs:
        source = Path(given).resolve()
        if not source.exists():
            continue
        for folder in ([source] if source.is_dir() else []) + list(source.parents):
            if folder not in folders:
                kind = member_kind(folder)
                if kind:
                    folders[folder] = (kind, str(given))
    return folders


def check_not_inside(path: str | os.PathLike, target: Path, folders: dict[Path, tuple[str, str]]) -> None:
    """OutputError when the resolved output `target` lies inside one of `folders` (see `member_folders`)."""
    for folder in target.parents:
        if folder in folders:
            kind, given = folders[folder]
            where = "is" if Path(given).resolve() == folder else "holds"
            raise OutputError(f"{path}: inside the {kind} {folder}, which {where} the input {given}; writing there "
                              f"would change it: choose a path outside it (nothing was written)")
