"""The w2w CLI: info and export, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest
import torch

from lora_w2w.cli import main
from lora_w2w.dataset import collect_folders
from lora_w2w.formats import load_kohya, load_peft, save_kohya, save_peft
from lora_w2w.layout import LoraLayout
from lora_w2w.space import W2WModel
from lora_w2w.storage import save_model, save_space


@pytest.fixture
def saved(space, tmp_path):
    save_space(space, tmp_path / "space")
    model = W2WModel(torch.randn(4), space.id)
    save_model(model, tmp_path / "model.safetensors")
    return tmp_path, space, model


def test_export_peft_and_kohya(saved):
    tmp_path, space, model = saved
    expected = space.unproject(model.coefficients)
    for fmt, out, load in (("peft", "lora", load_peft), ("kohya", "lora.safetensors", load_kohya)):
        assert main(["export", "--space", str(tmp_path / "space"), "--model", str(tmp_path / "model.safetensors"),
                     "--format", fmt, "--out", str(tmp_path / out)]) == 0
        torch.testing.assert_close(load(space.layout, tmp_path / out), expected)


def test_info_describes_each_kind(saved, capsys):
    tmp_path, space, model = saved
    save_peft(space.layout, torch.zeros(space.num_weights), tmp_path / "peft")
    save_kohya(space.layout, torch.zeros(space.num_weights), tmp_path / "k.safetensors")
    rank2 = LoraLayout(space.layout.layers, 2, 54.0, space.layout.target_modules)  # alpha from adapter_config.json
    save_peft(rank2, torch.zeros(rank2.numel), tmp_path / "rank2" / "unet", "tiny-test")
    save_peft(space.layout, torch.zeros(space.num_weights), tmp_path / "loras" / "alice")
    collect_folders(tmp_path / "loras", tmp_path / "dataset", dtype="float16", base_model="tiny-test")
    expectations = {
        "dataset": ["w2w weights dataset", "base model   tiny-test", f"N            {space.num_weights:,}",
                    "M            1 model (alice .. alice)", "shards       1 of up to 1,024 models, float16"],
        "space": [f"id           {space.id}", "K            6 components", "M            12 dataset models",
                  f"N            {space.num_weights:,}", "attributes   2: Male, Bald", "base model   tiny-test"],
        "model.safetensors": ["w2w model", "K            4 coefficients", f"space id     {space.id}"],
        "peft": ["PEFT/diffusers LoRA", f"LoRA layers  {len(space.layout)} (to_q, to_v), rank 1, alpha 27"],
        "peft/pytorch_lora_weights.safetensors": ["PEFT/diffusers LoRA", f"N            {space.num_weights:,}"],
        "rank2": ["PEFT/diffusers LoRA", "rank 2, alpha 54", f"N            {rank2.numel:,}", "base model   tiny-test"],
        "k.safetensors": ["kohya LoRA", f"LoRA layers  {len(space.layout)}, rank 1, alpha 27"],
    }
    for name, lines in expectations.items():
        assert main(["info", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        for line in lines:
            assert line in out, (name, line, out)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lora_w2w.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing(saved, capsys):
    tmp_path, space, model = saved
    save_model(W2WModel(torch.randn(9), space.id), tmp_path / "big.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x01" * 40)
    cases = [
        (["info", tmp_path / "nothing"], "no such file or folder"),
        (["export", "--space", tmp_path / "space", "--model", tmp_path / "big.safetensors", "--out", tmp_path / "o"],
         "9 components asked for, the space"),
        (["export", "--space", tmp_path / "space", "--model", tmp_path / "corrupt.safetensors", "--out", tmp_path / "o"],
         "corrupt.safetensors: not a valid safetensors file"),
        (["export", "--space", tmp_path, "--model", tmp_path / "model.safetensors", "--out", tmp_path / "o"],
         "not a w2w space"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o").exists()
    result = _run(*cases[1][0])  # as a process: one line on stderr, no traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and cases[1][1] in result.stderr


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("info", "export", "import-official", "sample", "edit", "directions", "generate", "invert",
                    "score", "collect", "build", "train-identities"):
        assert command in out, command
    with pytest.raises(SystemExit):
        main(["import-official", "--help"])
    assert "--trust-pickle" in capsys.readouterr().out


def test_sample_edit_generate_directions(toy_world, toy_space, tmp_path, capsys):
    from lora_w2w.storage import load_model

    assert main(["sample", "--space", str(toy_space), "--num", "2", "--seed", "1", "--out", str(tmp_path / "s"),
                 "--export", "kohya"]) == 0
    assert (tmp_path / "s" / "sample_001_lora.safetensors").is_file()
    assert main(["edit", "--space", str(toy_space), "--model", str(tmp_path / "s" / "sample_000.safetensors"),
                 "--edit", "Eyeglasses=2", "--edit", "Age=1", "--debias", "Male", "--out",
                 str(tmp_path / "edited.safetensors")]) == 0
    assert "Eyeglasses: +2 std" in capsys.readouterr().out
    before, after = (load_model(tmp_path / p) for p in ("s/sample_000.safetensors", "edited.safetensors"))
    assert not torch.equal(before.coefficients, after.coefficients) and after.space_id == before.space_id
    assert after.made_by == "sample seed 1; edit Age +1, Eyeglasses +2 (debias Male)"
    assert main(["generate", "--base", str(toy_world / "base"), "--space", str(toy_space), "--model",
                 str(tmp_path / "edited.safetensors"), "--seeds", "0", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "g")]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["grid.png", "seed_0000.png", "seed_0001.png"]
    assert main(["directions", "--space", str(toy_space)]) == 0
    assert "balanced_accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--space", str(toy_space), "--model", str(tmp_path / "edited.safetensors"),
              "--edit", "Wings=1", "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    assert "no attribute 'Wings'; the space has: Male, Age, Eyeglasses, Beard, " in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("first", ["lora_w2w", None])
def test_the_no_torchvision_notice_of_transformers_is_silenced(first):
    """Loading diffusers' pipeline module makes transformers say twice that it falls back to PIL image
    processors (this project installs no torchvision on purpose); importing lora_w2w first drops just that."""
    code = f"import {first}\n" if first else ""
    done = subprocess.run([sys.executable, "-c", code + "from diffusers import StableDiffusionPipeline"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("requires torchvision (not installed)" in done.stderr) == (first is None), done.stderr[-2000:]


def test_generate_prompts_with_the_space_s_prompt_by_default(toy_world, toy_space, tmp_path, monkeypatch):
    """Without --prompt, w2w generate uses the space's trigger prompt, with a model or the base model alone;
    the base model with a --prompt needs no space."""
    import dataclasses

    from PIL import Image

    from lora_w2w import pipeline
    from lora_w2w.storage import load_space

    space = dataclasses.replace(load_space(toy_space), prompt="a photo of sks person")
    save_space(space, tmp_path / "space")
    save_model(W2WModel(torch.ones(3), space.id), tmp_path / "model.safetensors")
    calls = []

    def record(pipe, layout, weights, prompt, *, seeds, **settings):
        calls.append((weights is not None, prompt))
        return [Image.new("RGB", (8, 8))] * len(seeds)

    monkeypatch.setattr(pipeline, "generate_from_weights", record)
    common = ["--base", str(toy_world / "base"), "--device", "cpu", "--seeds", "0"]
    model = str(tmp_path / "model.safetensors")
    assert main(["generate", *common, "--space", str(tmp_path / "space"), "--model", model,
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", *common, "--space", str(tmp_path / "space"), "--out", str(tmp_path / "b")]) == 0
    assert main(["generate", *common, "--space", str(tmp_path / "none"), "--prompt", "a dog",
                 "--out", str(tmp_path / "c")]) == 0
    assert calls == [(True, "a photo of sks person"), (False, "a photo of sks person"), (False, "a dog")]
