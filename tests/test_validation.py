"""Every file read is checked once, where it is read: each case of issue 21's "files" list ends in exit 2
with one line naming the file, the key and what was expected; images of high bit depth are scaled.
Issue 37's cases as a user hits them: strict model files (format version, duplicate keys, huge headers,
extreme or non-float coefficients), models far from their space, image bombs, strips and EXIF
orientation, FIFOs given as inputs, PEFT settings that change the scaling (checked against PEFT).
About 10 s (load average 11)."""
import json
import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_w2w.cli import main
from lora_w2w.dataset import collect_folders
from lora_w2w.errors import W2WError
from lora_w2w.formats import load_kohya, save_kohya, save_peft
from lora_w2w.images import eight_bit
from lora_w2w.inversion import check_mask, load_target
from lora_w2w.space import W2WModel
from lora_w2w.storage import SPACE_TENSORS, save_model, save_space


def run_cli(capsys, *args):
    """(exit code, stderr) of `w2w ARGS` in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def write_header(path, header, body: bytes) -> None:
    """A safetensors file laid out as the format says: u64 little-endian header length, JSON header, data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def split(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


@pytest.fixture
def saved(space, tmp_path):
    save_space(space, tmp_path / "space")
    save_model(W2WModel(torch.randn(4), space.id), tmp_path / "model.safetensors")
    return tmp_path


def export(tmp_path, capsys, model="model.safetensors"):
    return run_cli(capsys, "export", "--space", tmp_path / "space", "--model", tmp_path / model, "--out",
                   tmp_path / "lora")


# ----------------------------------------------------------------------------- safetensors headers

@pytest.mark.parametrize("change, message", [
    (lambda h: 3, "the top level is 3; expected a JSON object: tensor name -> {dtype, shape, data_offsets}"),
    (lambda h: [h], "the top level is [{"),
    (lambda h: {**h, "coefficients": {k: v for k, v in h["coefficients"].items() if k != "data_offsets"}},
     "coefficients: missing key 'data_offsets' ([begin, end], two integers >= 0)"),
    (lambda h: {**h, "coefficients": {**h["coefficients"], "dtype": "I32"}},
     "tensor 'coefficients' is I32, expected F32"),
    (lambda h: {**h, "coefficients": {**h["coefficients"], "dtype": "F16"}},
     "tensor 'coefficients' has data_offsets [0, 16] (16 bytes); its dtype F16 and shape [4] need 8 bytes"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__.format is 1; expected a string"),
    (lambda h: {**h, "__metadata__": {**h["__metadata__"], "version": "99"}},
     "w2w model format version '99'; this lora_w2w reads version 1 (a newer file needs a newer lora_w2w)"),
    (lambda h: {**h, "__metadata__": {k: v for k, v in h["__metadata__"].items() if k != "version"}},
     "w2w model without a format version; this lora_w2w reads version 1"),
    (lambda h: {**h, "notes": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}},
     "1 tensor besides 'coefficients' (first 'notes'); a w2w model holds that one tensor only"),
])
def test_a_model_header_that_is_not_what_the_format_says_is_refused(saved, capsys, change, message):
    header, body = split(saved / "model.safetensors")
    write_header(saved / "model.safetensors", change(header), body)
    for command in (["info", saved / "model.safetensors"],
                    ["edit", "--space", saved / "space", "--model", saved / "model.safetensors", "--edit", "Male=1",
                     "--out", saved / "edited.safetensors"],
                    ["export", "--space", saved / "space", "--model", saved / "model.safetensors", "--out",
                     saved / "lora"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and f"model.safetensors: {message}" in err, (command[0], err)
    assert not (saved / "lora").exists() and not (saved / "edited.safetensors").exists()


def test_space_shapes_beyond_the_file_and_overlapping_offsets_are_refused(saved, capsys):
    path = saved / "space" / SPACE_TENSORS
    header, body = split(path)
    k, n = header["components"]["shape"]
    write_header(path, {**header, "components": {**header["components"], "shape": [4 * k, n]}}, body)
    code, err = run_cli(capsys, "sample", "--space", saved / "space", "--out", saved / "s")
    assert code == 2 and "tensor 'components' has data_offsets" in err and f"shape [{4 * k}, {n}] need" in err, err
    overlapping = {**header, "std": {**header["std"], "data_offsets": header["mean"]["data_offsets"]}}
    write_header(path, overlapping, body)
    code, err = export(saved, capsys)
    assert code == 2 and "the tensors' data_offsets overlap or leave a gap" in err, err
    assert not (saved / "s").exists() and not (saved / "lora").exists()


@pytest.mark.parametrize("missing", ["mean", "components"])
def test_a_space_without_mean_or_components_is_refused(space, tmp_path, capsys, missing):
    tensors = {"mean": space.mean, "std": space.std, "components": space.components}
    del tensors[missing]
    save_space(space, tmp_path / "space")
    save_file(tensors, tmp_path / "space" / SPACE_TENSORS)
    code, err = run_cli(capsys, "sample", "--space", tmp_path / "space", "--out", tmp_path / "s")
    assert code == 2 and f"{SPACE_TENSORS}: no tensor {missing!r}; a space holds mean, std, components" in err, err


# ----------------------------------------------------------------------------- space.json

@pytest.mark.parametrize("change, message", [
    (lambda d: {k: v for k, v in d.items() if k != "layout"}, "missing key 'layout' (a LoRA layout"),
    (lambda d: {k: v for k, v in d.items() if k != "id"}, "missing key 'id' (the space id, a non-empty string)"),
    (lambda d: {k: v for k, v in d.items() if k != "num_components"}, "missing key 'num_components' (an integer"),
    (lambda d: d | {"id": 5}, "id is 5; expected the space id, a non-empty string"),
    (lambda d: d | {"version": "1"}, "version is '1'; expected an integer >= 1"),
    (lambda d: d | {"num_components": "6"}, "num_components is '6'; expected an integer >= 1"),
    (lambda d: [d], "the top level is [{"),
    (lambda d: d | {"inversion_presets": {"ood": {"lr": "fast"}}},
     "inversion_presets.ood.lr is 'fast'; expected a finite number > 0"),
    (lambda d: d | {"layout": d["layout"] | {"alpha": math.nan}}, "layout.alpha is nan; expected a finite number > 0"),
    (lambda d: d | {"num_components": 7}, "components [6, "),
])
def test_a_space_json_that_is_not_what_the_format_says_is_refused(saved, capsys, change, message):
    path = saved / "space" / "space.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    for command in (["info", saved / "space"], ["sample", "--space", saved / "space", "--out", saved / "s"],
                    ["invert", "--space", saved / "space", "--image", "none.png", "--out", saved / "m.safetensors"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and message in err, (command[0], err)
        assert "space" in err.split(": ")[1] or "space.json" in err, err


def test_nan_in_a_space_never_becomes_a_lora(space, tmp_path, capsys):
    save_model(W2WModel(torch.randn(4), space.id), tmp_path / "model.safetensors")
    space.mean[3] = math.nan
    save_space(space, tmp_path / "space")
    code, err = export(tmp_path, capsys)
    assert code == 2 and "space.safetensors: tensor 'mean' holds 1 NaN/inf values, first at index (3,)" in err, err
    space.mean[3] = 0.0
    space.components[1, 5] = math.inf
    save_space(space, tmp_path / "space")
    code, err = export(tmp_path, capsys)
    assert code == 2 and "(its components hold NaN/inf)" in err, err
    code, err = run_cli(capsys, "sample", "--space", tmp_path / "space", "--out", tmp_path / "s", "--export", "kohya")
    assert code == 2 and not (tmp_path / "lora").exists() and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- attributes.csv

def test_an_empty_attribute_table_is_named(saved, capsys):
    (saved / "space" / "attributes.csv").write_text("")
    for command in (["edit", "--space", saved / "space", "--model", saved / "model.safetensors", "--edit", "Male=1",
                     "--out", saved / "e.safetensors"], ["directions", "--space", saved / "space"],
                    ["info", saved / "space"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and "attributes.csv: not a readable CSV table (No columns to parse from file)" in err, err


# ----------------------------------------------------------------------------- adapter_config.json and kohya

@pytest.mark.parametrize("config, message", [
    ("{broken", "adapter_config.json: invalid JSON (Expecting property name"),
    ("[1, 2]", "adapter_config.json: the top level is [1, 2]; expected a JSON object (PEFT's LoraConfig)"),
    ('{"r": 1, "lora_alpha": "big"}', "adapter_config.json: lora_alpha is 'big'; expected a finite number > 0"),
    ('{"r": 0, "lora_alpha": 27}', "adapter_config.json: r is 0; expected an integer >= 1"),
])
def test_a_bad_adapter_config_is_named(layout, tmp_path, capsys, config, message):
    save_peft(layout, torch.zeros(layout.numel), tmp_path / "loras" / "alice")
    (tmp_path / "loras" / "alice" / "adapter_config.json").write_text(config)
    for command in (["info", tmp_path / "loras" / "alice"], ["collect", tmp_path / "loras", tmp_path / "data"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and message in err, err
    assert not (tmp_path / "data").exists()


def test_a_kohya_alpha_must_be_one_positive_number(layout, tmp_path):
    save_kohya(layout, torch.randn(layout.numel), tmp_path / "k.safetensors")
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "k.safetensors")
    key = next(k for k in state if k.endswith(".alpha"))
    for alpha, message in ((torch.ones(3), r"has shape \[3\]; expected one number"),
                           (torch.tensor(-1.0), "is -1.0; expected a finite number > 0")):
        save_file(state | {key: alpha}, tmp_path / "k.safetensors")
        with pytest.raises(W2WError, match=f"k.safetensors: '{key}' {message}"):
            load_kohya(layout, tmp_path / "k.safetensors")


def test_integer_lora_weights_are_refused(layout, tmp_path):
    save_kohya(layout, torch.randn(layout.numel), tmp_path / "k.safetensors")
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "k.safetensors")
    save_file({k: v.to(torch.int32) for k, v in state.items()}, tmp_path / "k.safetensors")
    with pytest.raises(W2WError, match="is I32; expected LoRA weights of one of F16, BF16, F32, F64"):
        load_kohya(layout, tmp_path / "k.safetensors")


# ----------------------------------------------------------------------------- the dataset's index.json

@pytest.fixture
def dataset(layout, tmp_path):
    for name in ("a", "b", "c"):
        save_peft(layout, torch.randn(layout.numel), tmp_path / "loras" / name)
    collect_folders(tmp_path / "loras", tmp_path / "data", shard_size=2)
    return tmp_path / "data"


@pytest.mark.parametrize("change, message", [
    (lambda i: i | {"shards": [{"rows": 2}, *i["shards"][1:]]}, "shards[0]: missing key 'file' (a plain file name"),
    (lambda i: i | {"shards": [i["shards"][0] | {"rows": "many"}, *i["shards"][1:]]},
     "shards[0].rows is 'many'; expected an integer >= 1"),
    (lambda i: i | {"names": ["a", 2, "c"]}, "names[1] is 2; expected a model name, a string"),
    (lambda i: i | {"shards": {"file": "weights-00000.safetensors"}}, "shards is {'file': "),
    (lambda i: i | {"shards": [i["shards"][0] | {"file": "/etc/passwd"}, *i["shards"][1:]]},
     "shards[0].file is '/etc/passwd'; expected a plain file name inside the dataset folder (no '/', no '..')"),
    (lambda i: i | {"shards": [i["shards"][0] | {"file": "../outside.safetensors"}, *i["shards"][1:]]},
     "shards[0].file is '../outside.safetensors'; expected a plain file name"),
    (lambda i: i | {"shards": [i["shards"][0] | {"file": ".."}, *i["shards"][1:]]}, "shards[0].file is '..'"),
])
@pytest.mark.slow
def test_a_bad_dataset_index_is_refused(dataset, tmp_path, capsys, change, message):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((dataset / "weights-00000.safetensors").read_bytes())  # a shard that would read
    index = dataset / "index.json"
    index.write_text(json.dumps(change(json.loads(index.read_text()))))
    for command in (["info", dataset], ["build", dataset, tmp_path / "space", "--components", 1],
                    ["export", "--dataset", dataset, "--dataset-model", "a", "--out", tmp_path / "lora"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and f"{index}: {message}" in err, err
    assert not (tmp_path / "space").exists() and not (tmp_path / "lora").exists()


# ----------------------------------------------------------------------------- images of high bit depth

FACE = __import__("pathlib").Path(__file__).resolve().parents[1] / "inversion" / "images" / "face.png"


def test_a_16_bit_png_and_a_float_tiff_read_as_their_8_bit_picture(tmp_path):
    """PIL writes a uint16 array as a 16-bit greyscale PNG (mode I;16) and a float32 one as a float TIFF
    (mode F); both must give the picture the 8-bit greyscale file gives, not white or black."""
    grey = np.asarray(Image.open(FACE).convert("L"), dtype=np.float64)  # (H, W) 0 .. 255
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "face8.png")
    Image.fromarray(np.round(grey * 257).astype(np.uint16)).save(tmp_path / "face16.png")
    Image.fromarray((grey / 255).astype(np.float32)).save(tmp_path / "face.tif")
    assert Image.open(tmp_path / "face16.png").mode == "I;16" and Image.open(tmp_path / "face.tif").mode == "F"
    expected, _ = load_target(tmp_path / "face8.png", None, 32, 8)  # (1, 3, R, R)
    for name in ("face16.png", "face.tif"):
        target, _ = load_target(tmp_path / name, None, 32, 8)
        assert torch.allclose(target, expected, atol=1e-6), name
    assert float(expected.std()) > 0.2  # a picture, not one colour
    Image.fromarray((grey / 255 * 2).astype(np.float32)).save(tmp_path / "bright.tif")
    with pytest.raises(W2WError, match=r"bright.tif: a F image with values 0 .. 1.8\d*; expected 0 .. 1 \(black .. white\)"):
        load_target(tmp_path / "bright.tif", None, 32, 8)


def test_a_16_bit_mask_is_read_as_its_8_bit_mask(tmp_path):
    binary = np.zeros((16, 16), np.uint16)
    binary[4:12, 4:12] = 65535
    Image.fromarray(binary).save(tmp_path / "mask16.png")
    mask = Image.open(tmp_path / "mask16.png")
    assert mask.mode == "I;16"
    assert np.array_equal(check_mask(mask, (16, 16)), (binary // 257).astype(np.uint8))
    assert eight_bit(Image.new("RGB", (2, 2))).mode == "RGB"  # 8-bit images pass as they are


# ----------------------------------------------------------------------------- issue 37: strict model files

def test_a_model_file_with_duplicate_keys_or_a_huge_header_is_refused_before_it_costs(saved, capsys):
    path = saved / "model.safetensors"
    header, body = split(path)
    entry = json.dumps(header["coefficients"])
    text = (f'{{"__metadata__": {json.dumps(header["__metadata__"])}, "coefficients": {entry}, '
            f'"coefficients": {entry}}}').encode()  # json.loads would keep the second silently
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    code, err = run_cli(capsys, "info", path)
    assert code == 2 and "not a valid safetensors file (the key 'coefficients' comes twice in one object)" in err, err
    # thousands of empty tensors (the audit's had 300,000 in 19 MB): refused by the header's length alone
    empty = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)}
    write_header(path, {**header, **empty}, body)
    for command in (["edit", "--space", saved / "space", "--model", path, "--edit", "Male=1", "--out",
                     saved / "e.safetensors"], ["info", path]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1, err
        assert "a safetensors header of" in err and "a w2w model has at most 1,048,576" in err, err
    coefficients = torch.zeros(4)
    coefficients[2] = 1e38  # finite in float32; generation would write black images
    write_header(path, header, coefficients.numpy().tobytes())
    code, err = run_cli(capsys, "info", path)
    assert code == 2 and "model coefficients reach |c| = 1e+38; expected at most 1e+07" in err, err


@pytest.mark.parametrize("dtype, accepted", [(torch.complex64, False), (torch.bool, False), (torch.int64, False),
                                             (torch.bfloat16, True), (torch.float64, True)])
def test_a_released_model_pt_holds_real_floating_point_numbers(tmp_path, capsys, dtype, accepted):
    """w2wmodel.pt as the original saves it, torch.save of the (1, K) coefficients, in another dtype."""
    torch.save(torch.ones(1, 4).to(dtype), tmp_path / "w2wmodel.pt")
    code, err = run_cli(capsys, "import-official", "--model", tmp_path / "w2wmodel.pt", tmp_path / "m.safetensors")
    if accepted:
        assert code == 0 and (tmp_path / "m.safetensors").is_file(), err
    else:
        name = str(dtype).removeprefix("torch.")
        assert code == 2 and f"model coefficients of dtype {name}; expected real floating point numbers" in err, err


def test_import_official_model_honours_trust_pickle(tmp_path, capsys):
    import datetime

    coefficients = torch.randn(1, 4)
    coefficients.note = datetime.date(2024, 1, 1)  # an attribute torch's weights-only unpickler refuses
    torch.save(coefficients, tmp_path / "w2wmodel.pt")
    code, err = run_cli(capsys, "import-official", "--model", tmp_path / "w2wmodel.pt", tmp_path / "m.safetensors")
    assert code == 2 and "needs unpickling, which can run arbitrary code; pass --trust-pickle" in err, err
    code, err = run_cli(capsys, "import-official", "--model", tmp_path / "w2wmodel.pt", tmp_path / "m.safetensors",
                        "--trust-pickle")
    assert code == 0 and (tmp_path / "m.safetensors").is_file(), err


def test_a_model_far_from_the_dataset_is_refused_where_it_is_used(saved, space, capsys):
    typical = space.typical_norm(4)
    save_model(W2WModel(torch.tensor([1e4 * typical, 0.0, 0.0, 0.0]), space.id), saved / "far.safetensors")
    for command in (["edit", "--space", saved / "space", "--model", saved / "far.safetensors", "--edit", "Male=1",
                     "--out", saved / "e.safetensors"],
                    ["export", "--space", saved / "space", "--model", saved / "far.safetensors", "--out",
                     saved / "lora"]):
        code, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1, err
        assert "times the typical norm of the space's dataset models" in err and "at most 1000 times" in err, err
    assert not (saved / "e.safetensors").exists() and not (saved / "lora").exists()
    for strength, message in (("1e6", "expected a number <= 1000, got 1e+06: an edit moves the model that many"),
                              ("nan", "expected a finite number")):
        code, err = run_cli(capsys, "edit", "--space", saved / "space", "--model", saved / "model.safetensors",
                            "--edit", f"Male={strength}", "--out", saved / "e.safetensors")
        assert code == 2 and f"strength of Male: {message}" in err, err


# ----------------------------------------------------------------------------- issue 37: directions, released files

def test_directions_without_attributes_or_without_a_pm1_column_is_one_line(saved, capsys):
    code, err = run_cli(capsys, "directions", "--space", saved / "space", "-k", 2)
    assert code == 0, err
    (saved / "space" / "attributes.csv").write_text("name,Age,Hair\n" + "".join(f"{i:06d},{20 + i},brown\n"
                                                                             for i in range(12)))
    code, err = run_cli(capsys, "directions", "--space", saved / "space", "-k", 2)
    assert code == 2 and err.count("\n") == 1, err
    assert "the attribute table has no ±1 column with both values among the dataset models (its columns: Age, Hair)" \
           in err, err
    (saved / "space" / "attributes.csv").unlink()
    code, err = run_cli(capsys, "directions", "--space", saved / "space")
    assert code == 2 and "the space has no attribute table (attributes.csv): there are no attributes to list" in err


def test_released_tensors_that_are_not_real_float_tensors_are_named(tmp_path):
    from lora_w2w.official import released_tensor

    torch.save({"mean": torch.zeros(3)}, tmp_path / "mean.pt")  # a pickled dict, where a tensor belongs
    with pytest.raises(W2WError, match=r"mean.pt: expected a tensor \(N,\), got dict"):
        released_tensor(tmp_path / "mean.pt", "(N,)")
    torch.save(torch.zeros(3, dtype=torch.complex64), tmp_path / "mean.pt")
    with pytest.raises(W2WError, match=r"mean.pt: a tensor of complex64; expected \(N,\) real floating point"):
        released_tensor(tmp_path / "mean.pt", "(N,)")
    torch.save(torch.zeros(3, dtype=torch.bfloat16), tmp_path / "mean.pt")
    assert released_tensor(tmp_path / "mean.pt", "(N,)").dtype == torch.bfloat16


# ----------------------------------------------------------------------------- issue 37: images and special files

def png_claiming(path, width: int, height: int, bits: int = 8) -> None:
    """A PNG of a few bytes whose IHDR claims width x height (RGB at 8 bits, greyscale at 16), as PIL's
    PngImagePlugin reads it: signature, IHDR (width, height, bit depth, colour type ...), IDAT, IEND."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bits, 2 if bits == 8 else 0, 0, 0, 0)  # colour: RGB or grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_image_bombs_strips_and_special_files_are_one_line_before_any_decoding(toy_world, toy_space, tmp_path,
                                                                               capsys):
    import os
    import signal

    from lora_w2w.dreambooth import load_image_folder

    png_claiming(tmp_path / "bomb.png", 30_000, 30_000)
    png_claiming(tmp_path / "bomb16.png", 65_535, 65_535, bits=16)
    png_claiming(tmp_path / "large.png", 12_000, 12_000)  # between PIL's warning and its error
    png_claiming(tmp_path / "strip.png", 1, 400_000)
    os.mkfifo(tmp_path / "fifo.png")  # a read of it would block forever
    cases = {"bomb.png": "bomb.png: the image claims 900,000,000 pixels; expected at most 134,217,728",
             "bomb16.png": "bomb16.png: the image claims 4,294,836,225 pixels",
             "large.png": "large.png: an image of 12000 x 12000 = 144,000,000 pixels; expected at most",
             "strip.png": "strip.png: an image of 1 x 400000 pixels; expected sides within 20:1",
             "fifo.png": "fifo.png: is a FIFO (named pipe), not a regular file; expected an input file or folder"}
    signal.alarm(60)  # a hang fails the test instead of the CI run
    try:
        for name, message in cases.items():
            for flag in ("--image", "--mask"):
                image = tmp_path / name if flag == "--image" else FACE
                mask = ["--mask", tmp_path / name] if flag == "--mask" else []
                code, err = run_cli(capsys, "invert", "--image", image, *mask, "--space", toy_space, "--base",
                                    toy_world / "base", "--device", "cpu", "--steps", 1, "--out", tmp_path / "m")
                assert code == 2 and err.count("\n") == 1 and message in err, (flag, err)
            (tmp_path / "person").mkdir()
            os.rename(tmp_path / name, tmp_path / "person" / name)  # an instance folder of the trainers
            expected = "person: no images" if name == "fifo.png" else message.replace("(", r"\(").replace(")", r"\)")
            with pytest.raises(W2WError, match=expected):  # a FIFO there is passed over, as folders are
                load_image_folder(tmp_path / "person", 32)
            os.rename(tmp_path / "person" / name, tmp_path / name)
            (tmp_path / "person").rmdir()
    finally:
        signal.alarm(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)  # nothing written


def test_a_phone_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    """A portrait photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to show), as
    phones save them: read upright, dlib finds the astronaut's face, as in the upright photo."""
    from skimage.data import astronaut

    from lora_w2w.faces import find_face
    from lora_w2w.images import read_image

    upright = Image.fromarray(astronaut())                                  # 512 x 512, one face
    stored = upright.transpose(Image.Transpose.ROTATE_90)                   # sideways, as the sensor saw it
    exif = stored.getexif()
    exif[0x0112] = 6                                                        # Orientation: rotate 90 CW to show
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    picture = read_image(tmp_path / "phone.jpg")
    assert np.abs(np.asarray(picture, np.float64) - np.asarray(upright, np.float64)).mean() < 4  # JPEG noise
    found, expected = find_face(picture, "phone.jpg"), find_face(upright, "upright")
    assert np.abs(np.subtract(found.box, expected.box)).max() <= 2  # (left, top, right, bottom)


def test_fifos_given_as_any_input_are_refused_before_they_are_opened(saved, capsys):
    import os
    import signal

    os.mkfifo(saved / "fifo")
    fifo = saved / "fifo"
    (saved / "with_fifo").mkdir()
    os.mkfifo(saved / "with_fifo" / "space.json")  # a space folder whose description is a FIFO
    commands = [["edit", "--space", saved / "space", "--model", fifo, "--edit", "Male=1", "--out", saved / "e"],
                ["info", fifo], ["sample", "--space", saved / "with_fifo", "--out", saved / "s"],
                ["collect", "--from-all-weights", fifo, saved / "d"],
                ["project", fifo, "--space", saved / "space", "--out", saved / "p.safetensors"],
                ["build", saved / "space", saved / "built", "-k", 1, "--attributes", fifo]]
    signal.alarm(60)  # a hang fails the test instead of the CI run
    try:
        for command in commands:
            code, err = run_cli(capsys, *command)
            assert code == 2 and err.count("\n") == 1 and "is a FIFO (named pipe), not a regular file" in err, \
                (command[0], err)
    finally:
        signal.alarm(0)


# ----------------------------------------------------------------------------- issue 37: PEFT settings of the scaling

def test_peft_settings_that_change_the_scaling_are_applied_as_peft_applies_them(unet, tmp_path, capsys):
    """adapter_config.json with use_rslora (scaling alpha / sqrt(r)) and an alpha_pattern: the weights read
    give, layer by layer, the delta W = scaling * B @ A that PEFT itself loads from the folder."""
    from peft import PeftModel

    from conftest import make_unet
    from lora_w2w.formats import load_peft
    from lora_w2w.layout import LoraLayout

    layout = LoraLayout.from_unet(unet, rank=4, alpha=8.0)
    save_peft(layout, torch.randn(layout.numel, generator=torch.Generator().manual_seed(0)), tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"use_rslora": True, "alpha_pattern": {"attn2.to_v": 3.0}}))
    peft_unet = PeftModel.from_pretrained(make_unet(), str(tmp_path / "lora")).base_model.model
    ours = layout.split(load_peft(layout, tmp_path / "lora"))
    scalings = set()
    for name, (lora_a, lora_b) in ours.items():
        module = peft_unet.get_submodule(name)
        scaling = module.scaling["default"]
        scalings.add(scaling)
        expected = scaling * module.lora_B["default"].weight @ module.lora_A["default"].weight  # (out, in)
        torch.testing.assert_close(layout.scaling * lora_b @ lora_a, expected, rtol=1e-5, atol=1e-6)
    assert scalings == {8.0 / 2, 3.0 / 2}  # alpha / sqrt(r), the pattern's alpha / sqrt(r)
    for change, message in ((config | {"rank_pattern": {"to_q": 2}}, "LoRA rank 2 for down_blocks"),
                            (config | {"target_modules": ["to_k", "to_v"]}, "target_modules ['to_k', 'to_v'] leaves "
                                                                             "out down_blocks"),
                            (config | {"alpha_pattern": {"(": 2.0}}, "a key of rank_pattern or alpha_pattern is "
                                                                     "not a regular expression")):
        config_file.write_text(json.dumps(change))
        for command in (["info", tmp_path / "lora"], ["collect", tmp_path, tmp_path / "data"]):
            code, err = run_cli(capsys, *command)
            assert code == 2 and err.count("\n") == 1 and message in err, (command[0], err)
