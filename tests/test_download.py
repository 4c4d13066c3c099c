"""`w2w download`: the real huggingface_hub calls, against a hub cache written here in the layout the hub
reads (offline) and a stand-in Hub that answers as huggingface.co does for what does not exist."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_released_files
from huggingface_hub import constants

from lora_w2w.cli import main as w2w
from lora_w2w.dataset import WeightsDataset
from lora_w2w.download import W2W_REPO, download_release
from lora_w2w.errors import W2WError
from lora_w2w.layout import sd15_layout
from lora_w2w.official import import_official

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hub_cache: Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> Path:
    """`files` (path in the repository -> a file here) as huggingface_hub's cache holds a downloaded model
    repository; returns the snapshot folder. As huggingface_hub/file_download.py writes it: the content
    in `blob_path = os.path.join(storage_folder, "blobs", etag)`, at its path in the snapshot a relative
    symlink (`_create_symlink(blob_path, pointer_path, ...)`, "Use relative_dst in priority"), and the
    commit of the revision in `ref_path = Path(storage_folder) / "refs" / revision` (no newline); the
    storage folder is `repo_folder_name`'s "models--OWNER--NAME"."""
    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    for path, source in files.items():
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()  # an LFS file's etag is its sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def released_cache(tmp_path, layout):
    """HF_HOME holding the released files (the tiny UNet's layout, K = 4, M = 6) of W2W_REPO at main, and
    the released files themselves."""
    src = tmp_path / "released"
    src.mkdir()
    write_released_files(src, layout, k=4, m=6)
    hf_home = tmp_path / "hf_home"
    write_hub_cache(hf_home / "hub", W2W_REPO, {f"files/{p.name}": p for p in src.iterdir()})
    return hf_home, src


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache with HF_HUB_OFFLINE=1, as huggingface_hub reads them at call time
    (`constants.HF_HUB_CACHE` in snapshot_download, `constants.is_offline_mode()` in its HTTP session)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.mark.slow
def test_w2w_download_files_from_the_offline_cache_then_imports_as_the_released_files(released_cache, tmp_path):
    hf_home, src = released_cache
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")  # the cache is HF_HOME/hub unless those say otherwise
    command = [sys.executable, "-m", "lora_w2w.cli", "download", "files", "--out", str(tmp_path / "w2w")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"w2w import-official {tmp_path / 'w2w'} files/official" in done.stdout
    got = tmp_path / "w2w" / "files"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in src.iterdir())
    for path in got.iterdir():  # hard links into the cache's blobs: no second copy
        assert path.read_bytes() == (src / path.name).read_bytes() and path.stat().st_nlink == 2
    # import-official takes the folder above files/ and gives the space of the released files
    space = import_official(tmp_path / "w2w", tmp_path / "downloaded", trust_pickle=True)
    expected = import_official(src, tmp_path / "direct", trust_pickle=True)
    assert torch.equal(space.components, expected.components) and torch.equal(space.mean, expected.mean)
    assert space.attributes.equals(expected.attributes) and space.num_models == 6


def test_a_downloaded_weights_dataset_is_taken_by_collect_and_a_second_download_keeps_it(tmp_path, offline_hub,
                                                                                           capsys):
    n = sd15_layout().numel
    weights = torch.randn(3, n, generator=torch.Generator().manual_seed(0))  # (M, N) as released: torch.save(tensor)
    torch.save(weights, tmp_path / "dog_weights.pt")
    write_hub_cache(offline_hub, W2W_REPO, {"weights_datasets/dogs/dog_weights.pt": tmp_path / "dog_weights.pt"})
    assert w2w(["download", "weights", "dogs", "--out", str(tmp_path / "w2w")]) == 0
    got = tmp_path / "w2w" / "weights_datasets" / "dogs" / "dog_weights.pt"
    assert f"w2w collect --from-all-weights {got} data/dogs_weights" in capsys.readouterr().out
    before = got.stat()
    assert download_release("dogs", tmp_path / "w2w") == [got]
    assert (got.stat().st_ino, got.stat().st_ctime_ns) == (before.st_ino, before.st_ctime_ns)  # kept, not linked anew
    assert w2w(["collect", "--from-all-weights", str(got), str(tmp_path / "dataset")]) == 0
    dataset = WeightsDataset(tmp_path / "dataset")
    assert len(dataset) == 3 and torch.equal(dataset.read_rows(0, 3), weights)


def test_import_official_says_where_the_released_files_are(released_cache, tmp_path, capsys):
    hf_home, src = released_cache
    with pytest.raises(SystemExit) as exit:
        w2w(["import-official", str(tmp_path), str(tmp_path / "space")])
    snapshot = hf_home / "hub" / f"models--{W2W_REPO.replace('/', '--')}" / "snapshots" / COMMIT / "files"
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"w2w: error: {tmp_path}: missing mean.pt, std.pt, V.pt; they are in {src}: give "
                               f"that folder") and str(snapshot) not in lines[0]  # three levels down: not searched


class StandInHub(http.server.BaseHTTPRequestHandler):
    """huggingface.co's answer for a repository or revision that does not exist: 404 with the error code
    huggingface_hub reads (utils/_http.py: `error_code = response.headers.get("X-Error-Code")`, then
    `if error_code == "RevisionNotFound"` / `error_code == "RepoNotFound"`)."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RevisionNotFound" if "/revision/missing" in self.path else "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stand_in_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def stand_in_hub(stand_in_server, tmp_path, monkeypatch):
    """StandInHub as the Hub's endpoint (`constants.ENDPOINT`, read by each HfApi) and an empty cache."""
    monkeypatch.setattr(constants, "ENDPOINT", stand_in_server)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        w2w(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_offline_without_the_cache_the_error_names_hf_hub_offline_and_the_command(offline_hub, tmp_path, capsys):
    line = one_line_error(capsys, ["download", "weights", "dogs", "--out", str(tmp_path / "w2w")])
    assert line == (f"w2w: error: {W2W_REPO}: not in the Hugging Face cache ({offline_hub}) and HF_HUB_OFFLINE=1 "
                    f"keeps w2w off the network: unset it and run `w2w download weights dogs --out {tmp_path / 'w2w'}`")
    line = one_line_error(capsys, ["generate", "--base", "someone/sd15", "--prompt", "a person",
                                   "--out", str(tmp_path / "gen")])
    assert line.endswith("HF_HUB_OFFLINE=1 keeps w2w off the network: unset it and run `w2w download base someone/sd15`")
    line = one_line_error(capsys, ["download", "base", "someone/sd15"])
    assert line.startswith(f"w2w: error: someone/sd15: not in the Hugging Face cache ({offline_hub})")


@pytest.mark.parametrize("argv, message", [
    (["files", "--repo", "someone/nothing"],
     "someone/nothing: no such repository on the Hugging Face Hub (a private one needs `hf auth login`)"),
    (["files", "--revision", "missing"],
     f"{W2W_REPO}: no revision 'missing' on the Hugging Face Hub (expected a branch, tag or commit of the "
     f"repository; --revision)"),
    (["base", "someone/nothing"],
     "someone/nothing: no such repository on the Hugging Face Hub (a private one needs `hf auth login`)"),
    (["base", "someone/sd15", "--revision", "missing"], "someone/sd15: no revision 'missing' on the Hugging Face Hub"),
], ids=["files-repository", "files-revision", "base-repository", "base-revision"])
def test_a_repository_or_revision_that_does_not_exist_is_one_line(stand_in_hub, tmp_path, capsys, argv, message):
    out = ["--out", str(tmp_path / "w2w")] if argv[0] == "files" else []
    assert one_line_error(capsys, ["download", *argv, *out]).startswith(f"w2w: error: {message}")
    assert not (tmp_path / "w2w").exists()


def test_a_space_from_the_hub_cache(space, offline_hub, tmp_path):
    from lora_w2w import Space
    from lora_w2w.storage import save_space

    folder = save_space(space, tmp_path / "space")
    write_hub_cache(offline_hub, "someone/tiny-space", {p.name: p for p in folder.iterdir()})
    loaded = Space.from_pretrained("someone/tiny-space", k=4)
    assert loaded.id == space.id and loaded.num_components == 4 and list(loaded.attributes) == ["Male", "Bald"]
    write_hub_cache(offline_hub, "someone/released", {"files/mean.pt": folder / "space.json"})
    with pytest.raises(W2WError, match="someone/released: holds no w2w space .*`w2w download files --out "
                                       "downloads/w2w` and convert them with `w2w import-official`"):
        Space.from_pretrained("someone/released")
    with pytest.raises(W2WError, match=r"someone/nothing: not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        Space.from_pretrained("someone/nothing")
