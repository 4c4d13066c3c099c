import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_w2w.errors import FileFormatError, LayoutError, PickleRefusedError
from lora_w2w.dataset import WeightsDataset
from lora_w2w.formats import (DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, SD_NAMING, load_kohya, load_lora,
                              load_peft, save_kohya, save_lora, save_peft)


def test_peft_round_trip_is_exact_and_has_the_released_layout(layout, tmp_path):
    weights = torch.randn(layout.numel)
    save_peft(layout, weights, tmp_path / "lora")
    assert torch.equal(load_peft(layout, tmp_path / "lora"), weights)
    state = load_file(tmp_path / "lora" / PEFT_WEIGHTS)
    assert list(state) == sorted(state) == layout.peft_keys()
    config = json.loads((tmp_path / "lora" / PEFT_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 1, 27.0)
    assert config["target_modules"] == ["to_q", "to_v"]
    assert all(key.startswith("unet.") for key in load_file(tmp_path / "lora" / DIFFUSERS_WEIGHTS))


def test_kohya_round_trip_is_exact(layout, tmp_path):
    weights = torch.randn(layout.numel)
    path = save_kohya(layout, weights, tmp_path / "lora.safetensors")
    assert torch.equal(load_kohya(layout, path), weights)
    assert torch.equal(load_lora(layout, path), weights)  # recognised by its keys
    state = load_file(path)
    key = SD_NAMING.kohya_name(layout.layers[0].name)
    assert key == "lora_unet_" + layout.layers[0].name.replace(".", "_")
    assert float(state[f"{key}.alpha"]) == 27.0 and state[f"{key}.lora_down.weight"].shape[0] == 1


def test_another_alpha_is_rescaled_into_the_layouts_scaling(layout, tmp_path):
    weights = torch.randn(layout.numel)
    path = save_kohya(layout, weights, tmp_path / "lora.safetensors")
    state = load_file(path)
    for key in [k for k in state if k.endswith(".alpha")]:
        state[key] = torch.tensor(54.0)  # twice the scaling: the same LoRA has lora_B twice as large
    save_file(state, tmp_path / "alpha54.safetensors")
    rescaled = load_kohya(layout, tmp_path / "alpha54.safetensors")
    for name, (lora_a, lora_b) in layout.split(rescaled).items():
        original_a, original_b = layout.split(weights)[name]
        assert torch.equal(lora_a, original_a)
        torch.testing.assert_close(lora_b, 2 * original_b)


def test_trained_adapter_folder_layout_is_read(layout, tmp_path):
    """train_dreambooth.py writes <output_dir>/unet/adapter_model.safetensors: the parent folder is accepted."""
    weights = torch.randn(layout.numel)
    save_peft(layout, weights, tmp_path / "run" / "unet")
    assert torch.equal(load_peft(layout, tmp_path / "run"), weights)


def test_bad_files_are_named(layout, tmp_path):
    with pytest.raises(FileFormatError, match="no adapter_model.safetensors"):
        load_peft(layout, tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(FileFormatError, match="bad.safetensors"):
        load_lora(layout, tmp_path / "bad.safetensors")
    with pytest.raises(LayoutError, match="do not fit the layout"):
        save_peft(layout, torch.zeros(layout.numel - 1), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileFormatError, match="unknown LoRA format 'ckpt'"):
        save_lora(layout, torch.zeros(layout.numel), tmp_path / "y", "ckpt")
    state = load_file(save_kohya(layout, torch.zeros(layout.numel), tmp_path / "k.safetensors"))
    state["lora_unet_conv_in.lora_down.weight"] = torch.zeros(1, 4)
    save_file(state, tmp_path / "k2.safetensors")
    with pytest.raises(LayoutError, match="names no LoRA layer"):
        load_kohya(layout, tmp_path / "k2.safetensors")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    from lora_w2w.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # the CLI's one-line error; any other exception fails the test
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_adapter_model_bin_is_read_only_with_trust_pickle(layout, tmp_path, capsys):
    weights = torch.randn(layout.numel)
    save_peft(layout, weights, tmp_path / "new")
    (tmp_path / "loras" / "old" / "unet").mkdir(parents=True)
    # older PEFT's save_pretrained: torch.save(output_state_dict, os.path.join(output_dir, WEIGHTS_NAME)),
    # WEIGHTS_NAME = "adapter_model.bin"
    torch.save(load_file(tmp_path / "new" / PEFT_WEIGHTS), tmp_path / "loras" / "old" / "unet" / "adapter_model.bin")
    (tmp_path / "loras" / "old" / "unet" / PEFT_CONFIG).write_text((tmp_path / "new" / PEFT_CONFIG).read_text())
    old = tmp_path / "loras" / "old"
    with pytest.raises(PickleRefusedError, match=r"unet/adapter_model.bin is a pickle .* pass --trust-pickle"):
        load_peft(layout, old)
    assert torch.equal(load_peft(layout, old, trust_pickle=True), weights)
    assert torch.equal(load_lora(layout, old, trust_pickle=True), weights)
    for command in (["info", old], ["collect", tmp_path / "loras", tmp_path / "dataset"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "adapter_model.bin is a pickle" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "dataset").exists()
    code, out, _ = run_cli(capsys, "info", old, "--trust-pickle")
    assert code == 0 and f"PEFT/diffusers LoRA {old / 'unet' / 'adapter_model.bin'}" in out
    assert f"LoRA layers  {len(layout)} (to_q, to_v), rank 1, alpha 27" in out
    assert run_cli(capsys, "collect", tmp_path / "loras", tmp_path / "dataset", "--trust-pickle")[0] == 0
    assert torch.equal(WeightsDataset(tmp_path / "dataset")["old"], weights)
