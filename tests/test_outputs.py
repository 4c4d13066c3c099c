"""Writing rules: no output replaces an input, a directory or a foreign folder; a refused write is one
line and leaves no temporary file; the same output written twice gives the same bytes. Under 5 s on
2 cores."""
import errno
import hashlib
import io

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
