"""Fetching from the Hugging Face Hub: the released w2w files, the weights datasets and base models.

    w2w download files --out downloads/w2w              # files/ of snap-research/weights2weights
    w2w download weights identities --out downloads/w2w # weights_datasets/identities/all_weights.pt (26 GB)
    w2w download weights dogs --out downloads/w2w       # weights_datasets/dogs/dog_weights.pt
    w2w download base stablediffusionapi/realistic-vision-v51
    Space.from_pretrained("OWNER/NAME")                   # a w2w space at the top of a repository (download_space)

Everything goes through huggingface_hub's cache (HF_HOME, by default ~/.cache/huggingface): a killed
download resumes where it stopped, a finished one is not fetched again, and a cached one is found with
HF_HUB_OFFLINE=1. `--out` then holds the files at their paths in the repository, as hard links into the
cache (no second copy) where the filesystem allows, copies otherwise. A base model is only cached: the
commands load it by its id from there (`--base ID`).
"""
from __future__ import annotations

import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub.errors import LocalEntryNotFoundError

from .errors import W2WError
from .storage import FILE, FILES_FOLDER, atomic_output, check_output

W2W_REPO = "snap-research/weights2weights"  # the released files: Hugging Face model repository
DEFAULT_OUT = "downloads/w2w"
# what `w2w download files` and `w2w download weights NAME` fetch: patterns of paths in W2W_REPO
RELEASES = {
    "files": ("files/*",),
    "identities": ("weights_datasets/identities/all_weights.pt",),  # 64,974 x 99,648 float32
    "dogs": ("weights_datasets/dogs/dog_weights.pt",),               # 120 dog-breed models
}
WEIGHTS_DATASETS = ("identities", "dogs")
SPACE_FILES = ("space.json", "space.safetensors", "attributes.csv")  # a space in the project's format (storage)


def release_command(name: str, out: str | os.PathLike = DEFAULT_OUT, repo_id: str = W2W_REPO,
                    revision: str | None = None) -> str:
    """The `w2w download` command that fetches the release `name` (a key of RELEASES)."""
    what = "files" if name == "files" else f"weights {name}"
    return " ".join([f"w2w download {what} --out {out}", *([f"--repo {repo_id}"] if repo_id != W2W_REPO else []),
                     *([f"--revision {revision}"] if revision else [])])


def download_release(name: str, out: str | os.PathLike = DEFAULT_OUT, repo_id: str = W2W_REPO,
                     revision: str | None = None) -> list[Path]:
    """Fetch the release `name` (a key of RELEASES) of `repo_id` at `revision` into the hub's cache and put
    its files under `out` at their paths in the repository; returns them."""
    from huggingface_hub import constants, snapshot_download

    patterns, command = RELEASES[name], release_command(name, out, repo_id, revision)
    out = check_output(out, FILES_FOLDER)
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))
    except (OSError, ValueError) as error:
        raise hub_error(error, repo_id, revision, command) from None
    found = sorted(path.relative_to(snapshot) for path in snapshot.rglob("*")
                   if path.is_file() and any(fnmatch(path.relative_to(snapshot).as_posix(), p) for p in patterns))
    if not found and constants.HF_HUB_OFFLINE:  # a cached snapshot of the repository without these files
        raise hub_error(LocalEntryNotFoundError(str(snapshot)), repo_id, revision, command)
    if not found:
        raise W2WError(f"{repo_id}{_at(revision)}: holds no {' or '.join(patterns)} (the files of `{command}`); give "
                       f"the repository that does with --repo")
    for relative in found:
        place(snapshot / relative, out / relative)
    return [out / relative for relative in found]


def download_space(repo_id: str, revision: str | None = None) -> Path:
    """The cached folder of the w2w space at the top of the Hugging Face repository `repo_id` (SPACE_FILES),
    fetched at `revision` into huggingface_hub's cache; W2WError when the repository holds none."""
    from huggingface_hub import snapshot_download

    command = f"python -c \"from lora_w2w import Space; Space.from_pretrained('{repo_id}')\""
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(SPACE_FILES)))
    except (OSError, ValueError) as error:
        raise hub_error(error, repo_id, revision, command) from None
    if not (snapshot / SPACE_FILES[0]).is_file():
        raise W2WError(f"{repo_id}{_at(revision)}: holds no w2w space ({SPACE_FILES[0]} at its top); the released "
                       f"files of {W2W_REPO} are pickles: fetch them with `{release_command('files')}` and convert "
                       f"them with `w2w import-official`")
    return snapshot


def download_base(repo_id: str, revision: str | None = None) -> Path:
    """Fetch the diffusers pipeline `repo_id` at `revision` into the hub's cache: the files its loading
    reads (diffusers picks them: safetensors over pickles, no fp16 variants); returns the cached folder.
    The Hub is asked first, so that a missing repository or revision is one line before diffusers logs
    its fallbacks; without the Hub, a cached pipeline is found."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi

    command = f"w2w download base {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        HfApi().model_info(repo_id, revision=revision)
        online = True
    except Exception as error:  # httpx's connection errors are no OSError
        if not _unreachable(error) and isinstance(error, (OSError, ValueError)):
            raise hub_error(error, repo_id, revision, command) from None
        if not _unreachable(error):
            raise
        online = False
    try:
        return Path(DiffusionPipeline.download(repo_id, revision=revision, local_files_only=not online))
    except (OSError, ValueError) as error:
        raise hub_error(error, repo_id, revision, command) from None


def place(cached: Path, target: Path) -> None:
    """Put the cached file `cached` at `target`: a hard link to the cache's copy (its blob), else a copy
    that keeps its time; nothing is done when `target` already is that file."""
    blob = cached.resolve()
    if target.is_file() and (os.path.samefile(target, blob) or _same_copy(target, blob)):
        return
    with atomic_output(target, FILE) as temporary:
        try:
            os.link(blob, temporary)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(blob, temporary)


def _same_copy(a: Path, b: Path) -> bool:
    """Whether `a` is a copy of `b` made by `place` (same size and modification time)."""
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


# ----------------------------------------------------------------------------- errors

def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or during."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _unreachable(error: BaseException) -> bool:
    """A failure to reach the Hub: offline mode, or a connection error of any of the HTTP clients the hub
    libraries use (builtin ConnectionError, httpx's TransportError, requests' ConnectionError)."""
    return isinstance(error, LocalEntryNotFoundError) or any(
        cls.__name__ in ("ConnectionError", "TransportError", "TimeoutError") for cls in type(error).__mro__)


def hub_error(error: BaseException, repo_id: str, revision: str | None, command: str) -> W2WError:
    """The one-line W2WError for a failed fetch of `repo_id` at `revision`: no such repository or revision,
    or not in the cache while the Hub cannot be reached (HF_HUB_OFFLINE or the network), with `command`,
    the command that fetches it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, IncompleteSnapshotError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    chain = _chain(error)
    first = {kind: next((e for e in chain if isinstance(e, kind)), None)
             for kind in (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError, HfHubHTTPError,
                          HFValidationError, IncompleteSnapshotError)}
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if first[RevisionNotFoundError]:
        return W2WError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub (expected a branch, tag or "
                        f"commit of the repository; --revision)")
    if first[GatedRepoError]:
        return W2WError(f"{repo_id}: a gated repository: accept its terms on https://huggingface.co/{repo_id}, "
                        f"log in with `hf auth login`, then run `{command}`")
    if first[RepositoryNotFoundError]:
        return W2WError(f"{repo_id}: no such repository on the Hugging Face Hub (a private one needs `hf auth login`)")
    if first[HFValidationError]:
        return W2WError(f"{repo_id}: not a Hugging Face repository id (expected OWNER/NAME): {message}")
    if first[HfHubHTTPError] and first[HfHubHTTPError].response is not None and not _unreachable(error):
        status = first[HfHubHTTPError].response.status_code
        return W2WError(f"{repo_id}: the Hugging Face Hub answered {status} ({message}); run `{command}` again later")
    if not any(_unreachable(e) for e in chain):
        return W2WError(f"{repo_id}: cannot fetch it ({message})")
    why = ("HF_HUB_OFFLINE=1 keeps w2w off the network: unset it and run" if constants.HF_HUB_OFFLINE else
           "the Hugging Face Hub cannot be reached: on a machine with network access run")
    if first[IncompleteSnapshotError]:
        return W2WError(f"{repo_id}{_at(revision)}: the download in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                        f"is incomplete and {why} `{command}` to finish it")
    return W2WError(f"{repo_id}{_at(revision)}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why} "
                    f"`{command}`")
