"""Fuzzing every file the project reads: given a mutated file, every command that reads it exits with 0
or 2 (one line `w2w: error: ...`), never a traceback, leaves no new file and changes no input.

A valid file of each kind (model, space, weights dataset, PEFT folder, kohya file, the released files,
image, mask) is mutated: truncated, bits flipped at seeded positions, a safetensors header or a JSON
file with a key removed or a value replaced by another JSON type, and, through hypothesis
(derandomized, so CI is deterministic), numbers and JSON values at those keys. The CLI runs in this
process (`lora_w2w.cli.main`), as `w2w` does apart from the interpreter start.
Numbers given on the command line are fuzzed elsewhere. 90 s of CPU (one core): user + sys of
`time python -m pytest -q tests/test_fuzz.py`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import random
import shutil
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_w2w.cli import main
from lora_w2w.formats import save_kohya, save_peft
from lora_w2w.layout import sd15_layout
from lora_w2w.space import W2WModel
from lora_w2w.storage import load_space, save_model

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "inversion" / "images" / "face.png"
FACE_MASK = ROOT / "inversion" / "images" / "face_mask.png"
REMOVED = object()  # a key path's value deleted instead of replaced
OTHER_VALUES = [None, -1, 0, 1.5, 2**70, math.nan, "x", [], {}]  # put in place of each value (hypothesis: more)
FLIPS = 6  # bit flips per file: half in a safetensors header, half anywhere
HYPOTHESIS = settings(derandomize=True, max_examples=12, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5)


# ----------------------------------------------------------------------------- running a command

def run(argv: list) -> tuple[int | str, str]:
    """(exit code, stderr) of `w2w ARGV` in this process; code 'traceback' when an exception escaped."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code
        except BaseException:  # what the CLI must never let through
            return "traceback", traceback.format_exc()
    return code, err.getvalue()


_hashes: dict[tuple, str] = {}  # sha256 by (path, size, mtime, inode): a file is hashed again once it changes


def sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _hashes:
        _hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _hashes[key]


def tree(root: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under root, by relative path."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else sha256(p) for p in sorted(root.rglob("*"))}


@dataclass
class Command:
    """`w2w ARGV`, run in folder `work`; `outputs` (relative to work) are what it may write on success."""

    argv: list
    outputs: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # inputs it adds to on success, put back after it


def check(work: Path, commands: list[Command], case: str, failures: list[str], must_succeed: bool = False) -> None:
    """Run each command on the inputs in `work` as they are now; record in `failures` any that ends other
    than with exit 0 (or, unless `must_succeed`, 2 and one error line), that changes an input, or that leaves
    a file it should not."""
    for command in commands:
        kept = {name: (work / name).with_name(f"{Path(name).name}.kept") for name in command.restored}
        for name, copy_path in kept.items():
            shutil.copytree(work / name, copy_path)
        before = tree(work)
        code, err = run(command.argv)
        after = tree(work)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        writable = command.outputs + command.restored
        written = [k for k in changed if any(k == o or k.startswith(o + "/") for o in writable)]
        name = f"{case}: w2w {' '.join(str(a).replace(str(work) + '/', '') for a in command.argv)}"
        if code not in (0, 2) or "Traceback" in err or (must_succeed and code != 0):
            failures.append(f"{name}: exit {code}\n{err.strip().splitlines()[-1] if err.strip() else ''}")
        elif code == 2 and sum(line.startswith("w2w: error: ") for line in err.splitlines()) != 1:
            failures.append(f"{name}: exit 2 without one error line: {err!r}")
        elif code == 2 and changed:
            failures.append(f"{name}: exit 2 but changed {changed}")
        elif code == 0 and set(changed) != set(written):
            failures.append(f"{name}: changed files that are not its outputs: {sorted(set(changed) - set(written))}")
        for output in command.outputs:
            path = work / output
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for name, copy_path in kept.items():
            shutil.rmtree(work / name)
            copy_path.rename(work / name)


# ----------------------------------------------------------------------------- mutations

def byte_mutations(data: bytes, seed: int, header_end: int | None = None) -> list[tuple[str, bytes]]:
    """Truncations at a few lengths and FLIPS single-bit flips (half before `header_end` when given)."""
    cuts = sorted({0, 1, 7, 8, len(data) // 2, len(data) - 1})
    mutations = [(f"truncated to {cut} bytes", data[:cut]) for cut in cuts if cut < len(data)]
    rng = random.Random(seed)
    for i in range(FLIPS):
        end = header_end if header_end and i % 2 == 0 else len(data)
        position, bit = rng.randrange(end), rng.randrange(8)
        flipped = bytearray(data)
        flipped[position] ^= 1 << bit
        mutations.append((f"bit {bit} of byte {position} flipped", bytes(flipped)))
    return mutations


def key_paths(value, prefix: tuple = ()):
    """Every key path into a JSON value (the root too); a list by its first item only."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from key_paths(item, prefix + (key,))
    elif isinstance(value, list) and value:
        yield from key_paths(value[0], prefix + (0,))


def replaced(value, path: tuple, new):
    """A copy of `value` with the item at `path` replaced by `new` (or removed, for REMOVED)."""
    if not path:
        return new
    value = copy.deepcopy(value)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if new is REMOVED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value


def json_mutations(value, keep=lambda path: True) -> list[tuple[str, object]]:
    """Each key removed, and each value replaced by each of OTHER_VALUES (at the key paths `keep` accepts)."""
    mutations = []
    for path in filter(keep, key_paths(value)):
        if path:
            mutations.append((f"{list(path)} removed", replaced(value, path, REMOVED)))
        mutations += [(f"{list(path)} = {other!r}", replaced(value, path, other)) for other in OTHER_VALUES]
    return mutations


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header, body: bytes) -> bytes:
    """A safetensors file as safetensors writes one: 8-byte little-endian header length, JSON header, data."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def safetensors_mutations(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """Byte mutations, header mutations, and the changes a header can hide from a reader: another dtype,
    a shape larger than the data, overlapping data_offsets."""
    header, body = split_safetensors(data)
    mutations = byte_mutations(data, seed, header_end=len(data) - len(body))
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first = tensors[0]
    every_key_of = (first, "__metadata__")  # the other tensors' entries are alike: one of them is removed
    mutations += [(f"header {name}", join_safetensors(h, body))
                  for name, h in json_mutations(header, lambda path: not path or path[0] in every_key_of)]
    mutations.append((f"header without {tensors[-1]}", join_safetensors(replaced(header, (tensors[-1],), REMOVED),
                                                                          body)))
    for dtype in ("I32", "F16", "F64", "U8", "BOOL"):
        mutations.append((f"{first} as {dtype}", join_safetensors(replaced(header, (first, "dtype"), dtype), body)))
    bigger = [4 * s for s in header[first]["shape"]]
    mutations.append((f"{first} shape {bigger}", join_safetensors(replaced(header, (first, "shape"), bigger), body)))
    if len(tensors) > 1:
        overlapping = replaced(header, (tensors[1], "data_offsets"), header[first]["data_offsets"])
        mutations.append((f"{tensors[1]} over {first}", join_safetensors(overlapping, body)))
    return mutations


def mutations_of(path: Path, seed: int) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return safetensors_mutations(data, seed)
    if path.suffix == ".json":
        return byte_mutations(data, seed) + [(name, json.dumps(v).encode()) for name, v in
                                             json_mutations(json.loads(data))]
    if path.suffix == ".csv":
        lines = data.split(b"\n")
        return byte_mutations(data, seed) + [("no rows", lines[0] + b"\n"), ("a column less in row 1",
                                             b"\n".join([lines[0], lines[1].rsplit(b",", 1)[0], *lines[2:]]))]
    return byte_mutations(data, seed)


def fuzz(work: Path, readers: dict[str, list[Command]]) -> list[str]:
    """Mutate each file (relative to work) in turn, run every command that reads it, restore the file."""
    failures: list[str] = []
    for seed, (name, commands) in enumerate(readers.items()):
        path = work / name
        original = path.read_bytes()
        try:
            for case, data in mutations_of(path, seed):
                path.write_bytes(data)
                check(work, commands, f"{name} {case}", failures)
        finally:
            path.write_bytes(original)
    return failures


# ----------------------------------------------------------------------------- valid files of each kind

@pytest.fixture(scope="module")
def world(toy_world, toy_space, tmp_path_factory):
    """A folder with a valid file of each kind the project reads, all for the toy pipeline's layout."""
    work = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(toy_space, work / "space")
    description = json.loads((work / "space" / "space.json").read_text())
    description["inversion_presets"] = {"ood": {"lr": 0.1, "steps": 1}}
    (work / "space" / "space.json").write_text(json.dumps(description, indent=1))
    space = load_space(work / "space")
    g = torch.Generator().manual_seed(0)
    save_model(W2WModel(torch.randn(4, generator=g), space.id), work / "model.safetensors")
    for i in range(4):
        save_peft(space.layout, 0.01 * torch.randn(space.num_weights, generator=g), work / "loras" / f"m{i}" / "unet",
                  "toy/base")
    save_kohya(space.layout, 0.01 * torch.randn(space.num_weights, generator=g), work / "kohya" / "k0.safetensors")
    assert main(["collect", str(work / "loras"), str(work / "dataset"), "--shard-size", "2"]) == 0
    save_peft(space.layout, 0.01 * torch.randn(space.num_weights, generator=g), work / "more" / "m9", "toy/base")
    (work / "attributes.csv").write_text("name,Male\n" + "".join(f"m{i},{(-1) ** i}\n" for i in range(4)))
    layout, k, m = sd15_layout(), 2, 4  # the released files are for Stable Diffusion 1.5
    official = work / "official"
    official.mkdir()
    torch.save(0.01 * torch.randn(layout.numel, generator=g), official / "mean.pt")
    torch.save(0.01 + torch.rand(layout.numel, generator=g), official / "std.pt")
    torch.save(torch.linalg.qr(torch.randn(layout.numel, k, generator=g))[0], official / "V.pt")  # (N, K)
    torch.save(torch.randn(m, k, generator=g), official / "proj_1000pc.pt")
    torch.save(torch.randn(1, k, generator=g), official / "w2wmodel.pt")  # a saved model: 1 x K coefficients
    (official / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 27,
                                                              "target_modules": ["to_q", "to_v"]}))
    shutil.copy(FACE, work / "face.png")
    shutil.copy(FACE_MASK, work / "mask.png")
    return work


def space_commands(work: Path, toy_world: Path) -> list[Command]:
    space = work / "space"
    return [Command(["info", space]),
            Command(["sample", "--space", space, "--num", 2, "--export", "peft", "--out", work / "out"], ["out"]),
            Command(["edit", "--space", space, "--model", work / "model.safetensors", "--edit", "Male=1", "--out",
                     work / "edited.safetensors"], ["edited.safetensors"]),
            Command(["directions", "--space", space, "--components", 4]),
            Command(["export", "--space", space, "--model", work / "model.safetensors", "--format", "kohya",
                     "--out", work / "lora.safetensors"], ["lora.safetensors"])]


def invert_command(work: Path, toy_world: Path, image: str = "face.png", mask: str | None = None) -> Command:
    return Command(["invert", "--image", work / image, *(["--mask", work / mask] if mask else []), "--preset", "ood",
                    "--components", 2, "--steps", 1, "--space", work / "space", "--base", toy_world / "base",
                    "--device", "cpu", "--out", work / "inverted.safetensors"], ["inverted.safetensors"])


def report(failures: list[str]) -> str:
    return f"{len(failures)} failures:\n" + "\n".join(failures[:30])



def assert_none(failures: list[str]) -> None:
    assert not failures, report(failures)


# ----------------------------------------------------------------------------- which command reads which file

def space_readers(world: Path, toy_world: Path) -> dict[str, list[Command]]:
    commands = space_commands(world, toy_world)
    return {name: commands for name in ("space/space.json", "space/space.safetensors", "space/attributes.csv")}


def model_readers(world: Path) -> dict[str, list[Command]]:
    model = world / "model.safetensors"
    return {"model.safetensors": [
        Command(["info", model]),
        Command(["export", "--space", world / "space", "--model", model, "--out", world / "lora"], ["lora"]),
        Command(["edit", "--space", world / "space", "--model", model, "--edit", "Male=1", "--out",
                 world / "edited.safetensors"], ["edited.safetensors"]),
        Command(["import-official", "--model", model, world / "imported.safetensors"], ["imported.safetensors"])]}


def dataset_readers(world: Path) -> dict[str, list[Command]]:
    dataset = world / "dataset"
    build = Command(["build", dataset, world / "built", "--components", 2, "--attributes", world / "attributes.csv"],
                    ["built", "built.build-state"])
    commands = [Command(["info", dataset]),
                Command(["export", "--dataset", dataset, "--dataset-model", "m1", "--out", world / "lora"], ["lora"]),
                build, Command(["collect", world / "more", dataset], restored=["dataset"])]
    return {"dataset/index.json": commands, "dataset/weights-00001.safetensors": commands, "attributes.csv": [build]}


def lora_readers(world: Path) -> dict[str, list[Command]]:
    """A PEFT folder (its weights, config and diffusers file) and a kohya file, read by info and collect."""
    peft = world / "loras" / "m0"
    read_peft = [Command(["info", peft]), Command(["collect", world / "loras", world / "collected"], ["collected"])]
    return {"loras/m0/unet/adapter_model.safetensors": read_peft, "loras/m0/unet/adapter_config.json": read_peft,
            "loras/m0/unet/pytorch_lora_weights.safetensors":
                [Command(["info", peft / "unet" / "pytorch_lora_weights.safetensors"])],
            "kohya/k0.safetensors": [Command(["info", world / "kohya" / "k0.safetensors"]),
                                     Command(["collect", world / "kohya", world / "collected", "--layout-from", peft],
                                             ["collected"])]}


def released_readers(world: Path) -> dict[str, list[Command]]:
    commands = [Command(["import-official", world / "official", world / "imported"], ["imported"])]
    model = world / "official" / "w2wmodel.pt"
    return {**{name: commands for name in ("official/mean.pt", "official/V.pt", "official/proj_1000pc.pt",
                                           "official/adapter_config.json")},
            "official/w2wmodel.pt": [Command(["info", model]), Command(["import-official", "--model", model,
                                                                        world / "model.pt.safetensors"],
                                                                       ["model.pt.safetensors"])]}


def image_readers(world: Path, toy_world: Path) -> dict[str, list[Command]]:
    """Inversion reads both; each run is one step of the toy pipeline."""
    commands = [invert_command(world, toy_world, mask="mask.png")]
    return {"face.png": commands, "mask.png": commands}


# ----------------------------------------------------------------------------- the suite

def test_every_command_succeeds_on_the_valid_files(world, toy_world):
    """The baseline: unmutated, each file is read and each command exits with 0 (so a refusal means the mutation)."""
    tables = [space_readers(world, toy_world), model_readers(world), dataset_readers(world), lora_readers(world),
              released_readers(world), image_readers(world, toy_world)]
    commands = {id(c): c for table in tables for cs in table.values() for c in cs}
    failures: list[str] = []
    check(world, list(commands.values()), "valid files", failures, must_succeed=True)
    assert len(commands) == 22 and not failures, report(failures)


def test_space_files(world, toy_world):
    assert not (failures := fuzz(world, space_readers(world, toy_world))), report(failures)


def test_model_file(world):
    assert not (failures := fuzz(world, model_readers(world))), report(failures)


def test_dataset_files(world):
    assert not (failures := fuzz(world, dataset_readers(world))), report(failures)


def test_lora_files(world):
    assert_none(fuzz(world, lora_readers(world)))


def test_released_files(world):
    assert not (failures := fuzz(world, released_readers(world))), report(failures)


def test_image_and_mask(world, toy_world):
    assert not (failures := fuzz(world, image_readers(world, toy_world))), report(failures)


# ----------------------------------------------------------------------------- hypothesis: JSON values

def json_case(work: Path, name: str, value, commands: list[Command]) -> list[str]:
    path = work / name
    original = path.read_bytes()
    failures: list[str] = []
    try:
        path.write_text(json.dumps(value))
        check(work, commands, f"{name} = {value!r}"[:200], failures)
    finally:
        path.write_bytes(original)
    return failures


def substituted(data, name: str, original) -> object:
    """A JSON value drawn by hypothesis put at one of the key paths of `original`."""
    paths = list(key_paths(original))
    path = data.draw(st.sampled_from(paths), label=f"key path in {name}")
    return replaced(original, path, data.draw(JSON_VALUES, label="value"))


@HYPOTHESIS
@given(data=st.data())
def test_space_json_values(world, toy_world, data):
    original = json.loads((world / "space" / "space.json").read_text())
    value = substituted(data, "space.json", original)
    commands = [space_commands(world, toy_world)[i] for i in (0, 1, 4)] + [invert_command(world, toy_world)]
    assert not (failures := json_case(world, "space/space.json", value, commands)), report(failures)


@HYPOTHESIS
@given(data=st.data())
def test_dataset_index_values(world, data):
    original = json.loads((world / "dataset" / "index.json").read_text())
    value = substituted(data, "index.json", original)
    commands = [Command(["info", world / "dataset"]),
                Command(["build", world / "dataset", world / "built", "--components", 2],
                        ["built", "built.build-state"])]
    assert not (failures := json_case(world, "dataset/index.json", value, commands)), report(failures)


@HYPOTHESIS
@given(data=st.data())
def test_adapter_config_values(world, data):
    original = json.loads((world / "loras" / "m0" / "unet" / "adapter_config.json").read_text())
    value = substituted(data, "adapter_config.json", original)
    (world / "empty").mkdir(exist_ok=True)  # collect into an empty folder: a refusal leaves it empty
    commands = [Command(["info", world / "loras" / "m0"]),
                Command(["collect", world / "loras", world / "empty"], restored=["empty"])]
    assert not (failures := json_case(world, "loras/m0/unet/adapter_config.json", value, commands)), report(failures)


@HYPOTHESIS
@given(data=st.data())
def test_safetensors_header_values(world, data):
    path = world / "model.safetensors"
    original = path.read_bytes()
    header, body = split_safetensors(original)
    value = substituted(data, "the header", header)
    commands = [Command(["info", path]),
                Command(["export", "--space", world / "space", "--model", path, "--out", world / "lora"], ["lora"])]
    failures: list[str] = []
    try:
        path.write_bytes(join_safetensors(value, body))
        check(world, commands, f"model header = {value!r}"[:200], failures)
    finally:
        path.write_bytes(original)
    assert not failures, report(failures)
