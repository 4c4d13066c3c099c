"""Writing rules: no output replaces an input, a directory, a foreign folder or a device, FIFO or socket,
nor lies inside a space, dataset or PEFT folder an input belongs to; a refused write is one line and
leaves no temporary file; the same output written twice gives the same bytes; every user has a lock
folder of their own. About 6 s on 2 cores (load average 11)."""
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_w2w import storage
from lora_w2w.cli import main
from lora_w2w.dataset import add_models, matrix_source
from lora_w2w.errors import OutputError
from lora_w2w.formats import save_kohya, save_peft
from lora_w2w.space import W2WModel
from lora_w2w.storage import atomic_output, load_space, save_model, save_png, save_space, save_state


def digest(path):
    """A hash of a file, or of every file under a folder (names and bytes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + file.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(space, tmp_path):
    """A space, a model of it, a dataset of 3 models, an image and a folder of someone else's files."""
    save_space(space, tmp_path / "space")
    save_model(W2WModel(torch.randn(4), space.id), tmp_path / "model.safetensors")
    add_models(tmp_path / "dataset", matrix_source(torch.randn(3, space.num_weights), ["a", "b", "c"]), space.layout)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "face.png")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"not mine")
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "mean.pt").write_bytes(b"released")
    (tmp_path / "mine" / "photos").mkdir(parents=True)  # a user's folder that happens to hold a PEFT config
    (tmp_path / "mine" / "adapter_config.json").write_text("{}")
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    return tmp_path


def refused(argv, capsys):
    """Run the CLI; the one line it printed (it must exit with 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_no_command_writes_over_an_input_a_directory_or_a_foreign_folder(world, capsys):
    t = world
    before = {p.name: digest(p) for p in t.iterdir()}
    space, model = ["--space", t / "space"], t / "model.safetensors"
    cases = [
        (["invert", "--image", t / "face.png", "--out", t / "face.png"], "is the input"),
        (["invert", "--image", t / "face.png", "--checkpoint", t / "face.png", "--out", t / "m.safetensors"],
         "is the input"),
        (["invert", "--image", t / "face.png", "--checkpoint", t / "m.safetensors", "--out", t / "m.safetensors"],
         "named for two outputs"),
        (["export", *space, "--model", model, "--format", "kohya", "--out", model], "is the input"),
        (["export", *space, "--model", model, "--out", t / "space"], "is the input"),
        (["export", *space, "--model", model, "--out", t / "photos"], "a folder that is not a PEFT LoRA folder"),
        (["export", *space, "--model", model, "--format", "kohya", "--out", t / "photos"], "is a directory"),
        (["build", t / "dataset", t / "dataset", "-k", "1"], "is the input"),
        (["build", t / "dataset", t, "-k", "1"], "is a folder holding the input"),
        (["build", t / "dataset", t / "new", "-k", "1", "--state", t / "dataset"], "is the input"),
        (["build", t / "dataset", t / "new", "-k", "1", "--state", t / "photos"], "not a build state folder"),
        (["build", t / "dataset", t / "photos", "-k", "1"], "a folder that is not a space and not empty"),
        (["build", t / "dataset", t / "model.safetensors", "-k", "1"], "exists and is a file"),
        (["import-official", t / "official", t / "official"], "is the input"),
        (["import-official", t / "official", t / "photos"], "a folder that is not a space"),
        (["import-official", "--model", model, model], "is the input"),
        (["edit", *space, "--model", model, "--edit", "Bald=1", "--out", t / "photos"], "is a directory"),
        (["edit", *space, "--model", model, "--edit", "Bald=1", "--out", model], "is the input"),
        (["sample", *space, "--out", t / "model.safetensors"], "exists and is a file"),
        (["collect", t / "dataset", t / "dataset"], "is the input"),
        (["collect", t / "dataset", t / "photos"], "a folder that is not a weights dataset"),
        (["generate", *space, "--model", model, "--out", t / "face.png"], "exists and is a file"),
        (["sample", *space, "--out", t / "model.safetensors" / "samples"], "model.safetensors is a file"),
        (["edit", *space, "--model", model, "--edit", "Bald=1", "--out", t / "face.png" / "m.safetensors"],
         "face.png is a file, not a folder"),
        (["invert", "--image", t / "face.png", "--checkpoint", t / "face.png" / "c", "--out", t / "m.safetensors"],
         "cannot write"),
        # issue 37: never inside a space, dataset or PEFT folder that an input is or lies in
        (["invert", "--image", t / "face.png", *space, "--out", t / "space" / "space.json"],
         f"inside the space {t / 'space'}, which is the input {t / 'space'}"),
        (["export", *space, "--model", model, "--format", "kohya", "--out", t / "space" / "space.safetensors"],
         "inside the space"),
        (["edit", *space, "--model", model, "--edit", "Bald=1", "--out", t / "space" / "new.safetensors"],
         "inside the space"),
        (["export", "--dataset", t / "dataset", "--dataset-model", "a", "--format", "kohya", "--out",
          t / "dataset" / "weights-00000.safetensors"], f"inside the weights dataset {t / 'dataset'}"),
        (["sample", *space, "--out", t / "space" / "samples"], "inside the space"),
        (["export", *space, "--model", model, "--out", t / "mine"], "a folder that is not a PEFT LoRA folder"),
    ]
    for argv, message in cases:
        err = refused(argv, capsys)
        assert message in err, (argv, err)
    assert {p.name: digest(p) for p in t.iterdir()} == before  # nothing changed, nothing new


def test_atomic_output_replaces_its_own_kind_only(world, space):
    t = world
    with pytest.raises(OutputError, match="photos: a folder that is not a space and not empty"):
        save_space(space, t / "photos")
    with pytest.raises(OutputError, match="photos: is a directory"):
        with atomic_output(t / "photos") as tmp:
            tmp.write_text("x")
    assert (t / "photos" / "holiday.jpg").read_bytes() == b"not mine"
    space.prompt = "another prompt"
    save_space(space, t / "space")  # an earlier space is replaced
    assert load_space(t / "space").prompt == "another prompt"
    (t / "empty").mkdir()
    save_space(space, t / "empty")  # so is an empty folder
    assert [p.name for p in t.iterdir() if p.name.startswith(".")] == []


def fail_writes(code):
    """An `open` for storage whose writes fail with OSError `code` (as a full or read-only disk does)."""
    class Failing(io.FileIO):
        def write(self, data):
            raise OSError(code, __import__("os").strerror(code))

    return lambda path, mode="r", *args, **kwargs: Failing(path, mode.replace("b", "")) if "w" in mode else \
        open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EACCES, "permission denied")])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_temporary_file(world, space, monkeypatch, code, words,
                                                                          capsys):
    t = world
    monkeypatch.setattr(storage, "open", fail_writes(code), raising=False)
    out = t / "out"
    writes = [lambda: save_model(W2WModel(torch.randn(4), space.id), out / "m.safetensors"),
              lambda: save_space(space, out / "space"),
              lambda: save_png(Image.new("RGB", (8, 8)), out / "x.png"),
              lambda: save_state(out / "state.ckpt", "test", {"step": 1}),
              lambda: save_kohya(space.layout, torch.zeros(space.num_weights), out / "k.safetensors"),
              lambda: save_peft(space.layout, torch.zeros(space.num_weights), out / "peft")]
    for write in writes:
        with pytest.raises(OutputError, match=f"^cannot write {out}: {words}$"):
            write()
    assert list(out.iterdir()) == []
    err = refused(["sample", "--space", t / "space", "--out", out], capsys)
    assert err == f"w2w: error: cannot write {out}: {words}\n"
    assert list(out.iterdir()) == []


def test_the_same_output_twice_gives_the_same_bytes(world, space):
    t = world
    model = W2WModel(torch.randn(4), space.id)
    weights = torch.randn(space.num_weights)
    writes = {"m.safetensors": lambda p: save_model(model, p), "k.safetensors": lambda p: save_kohya(space.layout,
              weights, p, "base"), "peft": lambda p: save_peft(space.layout, weights, p, "base", {"lr": 1, "b": 2}),
              "space": lambda p: save_space(space, p), "s.ckpt": lambda p: save_state(p, "t", {"x": torch.ones(2)})}
    for name, write in writes.items():
        hashes = set()
        for attempt in range(4):  # safetensors' own writer ordered metadata keys by a random hash
            write(t / f"{name}")
            hashes.add(digest(t / name))
        assert len(hashes) == 1, name
    header, _ = storage.read_safetensors_header(t / "k.safetensors")
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_devices_fifos_and_sockets_are_never_outputs(world, space, capsys):
    """As root, a file renamed over a device node replaces it (`--out /dev/null` would destroy the machine's
    /dev/null): a copy of /dev/null made with mknod here, a FIFO and a socket are refused before any work."""
    import os
    import socket
    import stat

    t = world
    os.mknod(t / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(t / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(t / "sock"))
    space_flag, model = ["--space", t / "space"], t / "model.safetensors"
    for name, kind in (("null", "a character device"), ("fifo", "a FIFO (named pipe)"), ("sock", "a socket")):
        for argv in (["edit", *space_flag, "--model", model, "--edit", "Bald=1", "--out", t / name],
                     ["export", *space_flag, "--model", model, "--format", "kohya", "--out", t / name],
                     ["export", *space_flag, "--model", model, "--out", t / name],
                     ["sample", *space_flag, "--out", t / name],
                     ["import-official", "--model", model, t / name]):
            err = refused(argv, capsys)
            assert f"{t / name}: is {kind}; outputs are written as regular files and folders" in err, (argv, err)
        with pytest.raises(OutputError, match=f"is {re.escape(kind)}"):
            save_model(W2WModel(torch.randn(4), space.id), t / name)
    assert stat.S_ISCHR(os.lstat(t / "null").st_mode) and os.lstat(t / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(t / "fifo").st_mode) and stat.S_ISSOCK(os.lstat(t / "sock").st_mode)


def test_a_peft_export_replaces_only_an_earlier_export(world, capsys):
    t = world
    export = ["export", "--space", t / "space", "--model", t / "model.safetensors", "--out", t / "lora"]
    for _ in range(2):  # a new folder, then the earlier export
        assert main([str(a) for a in export]) == 0
    (t / "lora" / "README.md").write_text("my notes")
    err = refused(export, capsys)
    assert "lora: a folder that is not a PEFT LoRA folder and not empty" in err
    assert (t / "lora" / "README.md").read_text() == "my notes"


OTHER_USER = 4242  # a uid with no account: a second user of the machine


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_every_user_has_a_lock_folder_of_their_own(space, monkeypatch, capsys):
    """Root runs `sample` first, then another user (a forked child that drops to OTHER_USER): each gets a
    lock folder of their own, where the second used to be refused a folder the first had made. A lock
    folder of root's name made by another user is refused in one line."""
    from lora_w2w import estimate, formats, sampling  # noqa: F401  imported before the fork, as root

    shared = Path(tempfile.mkdtemp(prefix="w2w-users-"))  # in the system's temporary folder: every user reaches it
    try:
        shared.chmod(0o1777)  # as /tmp: everyone writes, no one removes another's files
        monkeypatch.setattr(tempfile, "tempdir", str(shared))
        (shared / "w2w-locks").mkdir(mode=0o755)  # what earlier versions made, shared by every user
        save_space(space, shared / "space")
        sample = ["sample", "--space", str(shared / "space"), "--num", "1", "--out"]
        assert main(sample + [str(shared / "root")]) == 0
        assert (shared / "w2w-locks-0").stat().st_mode & 0o777 == 0o700
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                os.setgid(OTHER_USER)
                os.setuid(OTHER_USER)
                code = main(sample + [str(shared / "other")])
            except SystemExit as exit_info:
                code = exit_info.code if isinstance(exit_info.code, int) else 1
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert (shared / "other" / "sample_000.safetensors").stat().st_uid == OTHER_USER
        assert (shared / f"w2w-locks-{OTHER_USER}").stat().st_uid == OTHER_USER
        shutil.rmtree(shared / "w2w-locks-0")
        (shared / "w2w-locks-0").mkdir()
        os.chown(shared / "w2w-locks-0", OTHER_USER, OTHER_USER)  # another user's folder, under root's name
        err = refused(sample + [str(shared / "again")], capsys)
        assert f"w2w-locks-0: meant for your w2w locks (user 0), but a folder of user {OTHER_USER}" in err, err
    finally:
        shutil.rmtree(shared)
