"""Every file read is checked once, where it is read: each case of issue 21's "files" list ends in exit 2
with one line naming the file, the key and what was expected; images of high bit depth are scaled.
About 15 s."""
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
