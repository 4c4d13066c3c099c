"""Inversion on the toy world: the loss goes down, gradients reach only the coefficients, the image and
prompt are encoded once, masks are checked and respected, a resumed run ends where an uninterrupted
one does, and the CLI and inversion/invert.py report bad input in one line."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import make_space, write_weight_dimensions
from diffusers import DDPMScheduler
from PIL import Image

from lora_w2w.cli import main as w2w
from lora_w2w.diffusion import StepSampler, image_sizes
from lora_w2w.errors import SpaceError, W2WError
from lora_w2w.formats import load_peft
from lora_w2w.inversion import (FAR_FROM_DATASET, InversionConfig, differentiable_unet, encode_target, invert,
                                inversion_loss, load_target, masked_mse, norm_over_dataset, preset)
from lora_w2w.layout import LoraLayout
from lora_w2w.network import DeltaLinear
from lora_w2w.pipeline import load_base_pipeline
from lora_w2w.space import Space
from lora_w2w.storage import load_model, load_space, save_space

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "inversion" / "images" / "face.png"
FACE_MASK = ROOT / "inversion" / "images" / "face_mask.png"
K = 8
TOY = InversionConfig(components=K, lr=1.0, weight_decay=0.0, steps=4, checkpoint_every=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a few shared cores these toy models spend more time in thread hand-offs than computing with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(toy_world):
    return load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def toy_space(pipe):
    """A random space whose std is large enough for K = 8 components to move the toy UNet visibly."""
    space = make_space(LoraLayout.from_unet(pipe.unet), k=K)
    return Space(space.mean, 10 * space.std, space.components, space.layout, prompt=space.prompt)


@pytest.fixture(scope="module")
def target(pipe):
    return load_target(FACE, FACE_MASK, *image_sizes(pipe))


def mean_loss(pipe, space, image, coefficients, mask=None, draws=16):
    """The loss of a model averaged over fixed draws (seed 123), without gradients."""
    cached = encode_target(pipe, image, mask, space.prompt)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sampler = StepSampler(123, num_instance=1, num_class=0, batch_size=1,
                          latent_shape=tuple(cached.latent_mean.shape[1:]), num_train_timesteps=1000)
    basis = (space.mean, space.std, space.components[:len(coefficients)])
    with torch.no_grad(), differentiable_unet(pipe.unet, space.layout) as lora_unet:
        return sum(inversion_loss(lora_unet, basis, coefficients, cached, scheduler, sampler.next()).item()
                   for _ in range(draws)) / draws


# ----------------------------------------------------------------------------- optimisation

def test_loss_goes_down_and_the_unet_is_left_as_it_was(pipe, toy_space, target):
    image, _ = target
    sample = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 24, 32))
    with torch.no_grad():
        before = pipe.unet(*sample).sample
    model = invert(pipe, toy_space, image, None, preset("ood", components=K, steps=10), progress=False)
    assert model.coefficients.shape == (K,) and model.space_id == toy_space.id
    start = mean_loss(pipe, toy_space, image, torch.zeros(K), draws=8)
    end = mean_loss(pipe, toy_space, image, model.coefficients, draws=8)
    assert end < 0.97 * start, (start, end)
    with torch.no_grad():
        assert torch.equal(pipe.unet(*sample).sample, before)  # the original layers back, the weights untouched
    assert not any(isinstance(m, DeltaLinear) for m in pipe.unet.modules())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # flags as loaded


def test_only_the_coefficients_get_gradients(pipe, toy_space, target):
    image, mask = target
    cached = encode_target(pipe, image, mask, toy_space.prompt)
    coefficients = torch.zeros(K, requires_grad=True)
    batch = StepSampler(0, num_instance=1, num_class=0, batch_size=1, latent_shape=(4, 8, 8),
                        num_train_timesteps=1000).next()
    with differentiable_unet(pipe.unet, toy_space.layout) as lora_unet:
        basis = (toy_space.mean, toy_space.std, toy_space.components)
        inversion_loss(lora_unet, basis, coefficients, cached, DDPMScheduler(), batch).backward()
        assert all(p.grad is None for p in pipe.unet.parameters())
    assert coefficients.grad is not None and coefficients.grad.abs().sum() > 0


def test_a_bfloat16_unet_inverts_with_float32_coefficients(toy_world, toy_space, target):
    """As on CUDA, where the UNet runs in bfloat16: the LoRA weights follow the UNet's dtype, the
    coefficients and their Adam state stay float32."""
    image, mask = target
    pipe = load_base_pipeline(str(toy_world / "base"), device="cpu", dtype=torch.bfloat16, progress=False)
    model = invert(pipe, toy_space, image, mask, TOY, progress=False)
    assert model.coefficients.dtype == torch.float32
    assert torch.isfinite(model.coefficients).all() and model.coefficients.abs().sum() > 0
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in pipe.unet.parameters())


def test_image_and_prompt_are_encoded_once(pipe, toy_space, target):
    image, mask = target
    with mock.patch.object(pipe.vae, "encode", wraps=pipe.vae.encode) as encode, \
         mock.patch.object(pipe.text_encoder, "forward", wraps=pipe.text_encoder.forward) as text, \
         mock.patch.object(pipe.unet, "forward", wraps=pipe.unet.forward) as unet:
        invert(pipe, toy_space, image, mask, TOY, progress=False)
    assert (encode.call_count, text.call_count, unet.call_count) == (1, 1, TOY.steps)


def test_k_larger_than_the_space_is_refused_naming_both(pipe, toy_space, target):
    with pytest.raises(SpaceError, match=f"9 components asked for, the space has K = {K}"):
        invert(pipe, toy_space, target[0], None, preset("ood", components=9), progress=False)


def test_a_preset_fits_the_space_and_the_flags_win(toy_space):
    """The paper's settings, K at most the space's, what the space records for the preset, then the flags."""
    assert preset("ood") == InversionConfig(components=1000, lr=1.0, weight_decay=0.0, steps=800)
    fitted = dataclasses.replace(toy_space, inversion_presets={"ood": {"lr": 0.1, "steps": 300}})
    assert preset("ood", fitted) == InversionConfig(components=K, lr=0.1, weight_decay=0.0, steps=300)
    assert preset("real", fitted) == InversionConfig(components=K, lr=0.1, weight_decay=1e-10, steps=400)
    assert preset("ood", fitted, lr=0.5, components=4).lr == 0.5 and preset("ood", fitted, components=4).components == 4
    with pytest.raises(SpaceError, match="inversion preset 'ood' has unknown settings learning_rate"):
        preset("ood", dataclasses.replace(toy_space, inversion_presets={"ood": {"learning_rate": 0.1}}))


def test_the_tiny_space_records_the_learning_rates_its_inversions_need():
    tiny = load_space(ROOT / "files" / "tiny" / "space")
    assert preset("ood", tiny) == InversionConfig(components=tiny.num_components, lr=0.1, weight_decay=0.0, steps=800)
    assert preset("real", tiny) == InversionConfig(components=tiny.num_components, lr=0.3, weight_decay=1e-10, steps=400)


def test_the_tiny_space_records_its_learning_rates_once_and_the_help_texts_point_at_them(tmp_path, capsys):
    """The lrs live in tiny/build.py's INVERSION_PRESETS, written into the space; `w2w info` lists them,
    and neither `w2w invert --help`, invert.py's help nor run_inversion.sh repeats them."""
    from lora_w2w.tiny.build import INVERSION_PRESETS

    tiny = load_space(ROOT / "files" / "tiny" / "space")
    assert tiny.inversion_presets == INVERSION_PRESETS
    real_lr = f"{INVERSION_PRESETS['real']['lr']:g}"  # not the paper's lr of either preset
    assert w2w(["info", str(ROOT / "files" / "tiny" / "space")]) == 0
    assert "inversion    real: lr 0.3; ood: lr 0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        w2w(["invert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a space may record its own settings for a preset, which replace the paper's (`w2w info SPACE` lists " \
           "them)" in help_text and real_lr not in help_text
    with pytest.raises(SystemExit):
        load_invert_script().parse_args(["--help"])
    script_help = " ".join(capsys.readouterr().out.split())
    assert "Adam learning rate (default: the preset's as the space records it, else the paper's: real 0.1, ood 1)" \
        in script_help and real_lr not in script_help
    # run_inversion.sh with a python that records its arguments: no --lr, each run names its preset
    calls = tmp_path / "calls.txt"
    (tmp_path / "py").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (tmp_path / "py").chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "inversion" / "run_inversion.sh")], capture_output=True, text=True,
                          env=dict(os.environ, PY=str(tmp_path / "py"), OUT=str(tmp_path / "out")))
    assert done.returncode == 0, done.stderr
    face, drawing = calls.read_text().splitlines()
    assert "--preset real" in face and "--preset ood" in drawing
    assert not any(flag in face + drawing for flag in ("--lr", "--epochs", "--weight_decay", "--dim"))


@pytest.mark.parametrize("dataset_scale, warned", [(1e-3, True), (1e3, False)])
def test_a_model_far_outside_the_dataset_draws_a_warning(pipe, toy_space, target, dataset_scale, warned):
    """Norm over the largest dataset model's: a toy space whose dataset models sit near 0 makes any
    inversion at lr 1 look diverged, one whose models are huge none."""
    dataset = torch.randn(20, K, generator=torch.Generator().manual_seed(0)) * dataset_scale
    space = dataclasses.replace(toy_space, coefficients=dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = invert(pipe, space, target[0], None, TOY, progress=False)
    ours = [str(w.message) for w in caught if "far outside the space's dataset" in str(w.message)]
    far = norm_over_dataset(space, model.coefficients)
    assert far == pytest.approx(float(model.coefficients.norm() / dataset.norm(dim=1).max()))
    assert (far > FAR_FROM_DATASET) == warned and len(ours) == int(warned), (far, ours)
    if warned:
        assert f"{far:.1f}x the largest dataset model's" in ours[0] and "try 0.1" in ours[0]


# ----------------------------------------------------------------------------- masks

def test_masks_are_cropped_like_the_image_and_pooled_to_the_latent_grid(tmp_path):
    half = np.zeros((40, 60), np.uint8)
    half[:, :30] = 255  # left half of a 60 x 40 image; the centre crop keeps x 10..50
    image = Image.new("RGB", (60, 40), "gray")
    _, mask = load_target(image, Image.fromarray(half), 32, 8)
    assert mask.shape == (1, 1, 8, 8)
    torch.testing.assert_close(mask[0, 0, :, :4], torch.ones(8, 4), atol=0.02, rtol=0)  # bicubic resizing
    torch.testing.assert_close(mask[0, 0, :, 4:], torch.zeros(8, 4), atol=0.02, rtol=0)
    _, scaled = load_target(image, Image.fromarray(half).resize((120, 80), Image.LANCZOS), 32, 8)  # soft edges
    torch.testing.assert_close(scaled, mask, atol=0.05, rtol=0)


@pytest.mark.parametrize("mask, message", [
    (Image.fromarray(np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)), "not a binary mask: 87% of"),
    (Image.new("L", (64, 32), 255), "the mask is 64x32 but the image is 64x64"),
    (Image.new("L", (64, 64), 0), "black everywhere"),
    (Image.new("RGB", (64, 64), (255, 0, 0)), "not a binary mask"),  # red is grey in L
])
def test_bad_masks_are_refused_with_a_clear_message(mask, message):
    with pytest.raises(W2WError, match=message):
        load_target(Image.new("RGB", (64, 64)), mask, 32, 8)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(W2WError, match="bad.png: not a readable image"):
        load_target(tmp_path / "bad.png", None, 32, 8)
    with pytest.raises(W2WError, match="missing.png: no such mask file"):
        load_target(FACE, tmp_path / "missing.png", 32, 8)


def test_the_loss_ignores_everything_outside_the_mask(pipe, toy_space, target):
    image, _ = target
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    outside = (1 - mask).bool().expand(1, 4, 8, 8)
    prediction, noise = torch.randn(2, 1, 4, 8, 8)
    assert masked_mse(prediction, noise, mask) == masked_mse(prediction + 5 * outside, noise, mask)

    def garble_outside(module, args, output):  # the UNet's prediction outside the mask becomes noise
        output.sample = output.sample + 10 * torch.randn_like(output.sample) * outside
        return output

    coefficients = torch.randn(K)
    clean = mean_loss(pipe, toy_space, image, coefficients, mask, draws=2)
    hook = pipe.unet.register_forward_hook(garble_outside)
    try:
        garbled = mean_loss(pipe, toy_space, image, coefficients, mask, draws=2)
    finally:
        hook.remove()
    assert garbled == pytest.approx(clean, rel=1e-6)
    assert mean_loss(pipe, toy_space, image, coefficients, None, draws=2) != pytest.approx(clean, rel=1e-3)


# ----------------------------------------------------------------------------- checkpoints

def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(pipe, toy_space, target, tmp_path):
    image, mask = target
    config = InversionConfig(components=K, lr=1.0, weight_decay=0.0, steps=6, checkpoint_every=2)
    uninterrupted = invert(pipe, toy_space, image, mask, config, seed=3, progress=False)

    calls = {"n": 0}

    def interrupt_at_step_5(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    hook = pipe.unet.register_forward_pre_hook(interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        invert(pipe, toy_space, image, mask, config, seed=3, progress=False, checkpoint=tmp_path / "run.ckpt")
    hook.remove()
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["step"] == 4
    resumed = invert(pipe, toy_space, image, mask, config, seed=3, progress=False, checkpoint=tmp_path / "run.ckpt")
    assert torch.equal(resumed.coefficients, uninterrupted.coefficients)
    assert not any(isinstance(m, DeltaLinear) for m in pipe.unet.modules())  # the interrupted run cleaned up too

    with pytest.raises(W2WError, match="a checkpoint of another run \\(lr 1.0 there, 0.5 here\\)"):
        invert(pipe, toy_space, image, mask, InversionConfig(components=K, lr=0.5, steps=6), seed=3,
               progress=False, checkpoint=tmp_path / "run.ckpt")


# ----------------------------------------------------------------------------- command lines

@pytest.fixture(scope="module")
def space_dir(toy_space, tmp_path_factory):
    return save_space(toy_space, tmp_path_factory.mktemp("inversion") / "space")


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `w2w ARGS` run in this process."""
    try:
        code = w2w([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_inverts_and_exports(toy_world, space_dir, toy_space, tmp_path, capsys):
    code, out, err = run_cli(capsys, "invert", "--image", FACE, "--mask", FACE_MASK, "--preset", "ood", "--components",
                             K, "--steps", 2, "--space", space_dir, "--base", toy_world / "base", "--device", "cpu",
                             "--out", tmp_path / "face.safetensors", "--export", "peft")
    assert code == 0, err
    model = load_model(tmp_path / "face.safetensors")
    assert model.coefficients.shape == (K,) and model.space_id == toy_space.id
    torch.testing.assert_close(load_peft(toy_space.layout, tmp_path / "face_lora"), model.weights(toy_space))


def test_cli_warns_in_one_line_when_the_model_ends_far_outside_the_dataset(toy_world, toy_space, tmp_path, capsys):
    near_zero = dataclasses.replace(toy_space, coefficients=1e-3 * torch.ones(4, K))
    code, out, err = run_cli(capsys, "invert", "--image", FACE, "--preset", "ood", "--steps", 2, "--components", K,
                             "--space", save_space(near_zero, tmp_path / "space"), "--base", toy_world / "base",
                             "--device", "cpu", "--out", tmp_path / "face.safetensors")
    assert code == 0 and (tmp_path / "face.safetensors").is_file(), err
    warned = [line for line in err.splitlines() if "far outside" in line]
    assert len(warned) == 1 and warned[0].startswith("w2w: warning: the inverted model lies far outside"), err


def test_cli_fits_the_preset_to_a_smaller_space(toy_world, space_dir, tmp_path, capsys):
    """The real preset's K 10,000 on a space of K = 8: all 8, said on stdout."""
    code, out, err = run_cli(capsys, "invert", "--image", FACE, "--steps", 1, "--space", space_dir,
                             "--base", toy_world / "base", "--device", "cpu", "--out", tmp_path / "face.safetensors")
    assert code == 0, err
    assert f"inverting 1 image with K {K}, lr 0.1, weight decay 1e-10, 1 steps" in out
    assert load_model(tmp_path / "face.safetensors").coefficients.shape == (K,)


@pytest.mark.parametrize("change, message", [
    ({"--image": "bad.png"}, "bad.png: not a readable image"),
    ({"--components": "9"}, "--components 9: the space"),
    ({"--steps": "0"}, "--steps: expected an integer >= 1, got 0"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(toy_world, space_dir, tmp_path, capsys, change, message):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    flags = {"--image": FACE, "--components": K, "--steps": 1, "--space": space_dir, "--base": toy_world / "base",
             "--device": "cpu", "--out": tmp_path / "out.safetensors"}
    flags.update({k: tmp_path / v if k == "--image" else v for k, v in change.items()})
    code, _, err = run_cli(capsys, "invert", *[x for item in flags.items() for x in item])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.png"]


def load_invert_script():
    spec = importlib.util.spec_from_file_location("invert_script", ROOT / "inversion" / "invert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_invert_script_help_and_tiny_run(toy_world, space_dir, toy_space, tmp_path, capsys):
    script = load_invert_script()
    with pytest.raises(SystemExit) as exit:
        script.parse_args(["--help"])
    assert exit.value.code == 0 and "--mean_path" in capsys.readouterr().out
    folder = tmp_path / "images" / "real"  # the original's ImageFolder layout
    folder.mkdir(parents=True)
    Image.open(FACE).save(folder / "a.jpg")
    script.main(script.parse_args(["--space", str(space_dir), "--base", str(toy_world / "base"), "--imfolder",
                                   str(tmp_path / "images"), "--mask_path", str(FACE_MASK), "--epochs", "2",
                                   "--dim", str(K), "--lr", "1", "--device", "cpu", "--diffusers_format",
                                   "--save_name", str(tmp_path / "out")]))
    model = load_model(tmp_path / "out" / "w2wmodel.safetensors")
    assert model.coefficients.shape == (K,) and model.space_id == toy_space.id
    torch.testing.assert_close(load_peft(toy_space.layout, tmp_path / "out" / "unet"), model.weights(toy_space))


def test_invert_script_reads_the_released_files(toy_world, toy_space, tmp_path):
    """--mean_path --std_path --v_path --dim_path: converted on the fly into the same space (same id)."""
    script = load_invert_script()
    torch.save(toy_space.mean, tmp_path / "mean.pt")
    torch.save(toy_space.std, tmp_path / "std.pt")
    torch.save(toy_space.components.T.contiguous(), tmp_path / "V.pt")  # (N, K) as released
    write_weight_dimensions(toy_space.layout, tmp_path / "weight_dimensions.pt")  # [t.flatten().shape, t.shape]
    files = ["--mean_path", tmp_path / "mean.pt", "--std_path", tmp_path / "std.pt", "--v_path", tmp_path / "V.pt",
             "--dim_path", tmp_path / "weight_dimensions.pt"]
    script.main(script.parse_args([*map(str, files), "--base", str(toy_world / "base"), "--image", str(FACE), "--epochs", "1",
                                   "--device", "cpu", "--save_name", str(tmp_path / "out")]))
    model = load_model(tmp_path / "out" / "w2wmodel.safetensors")  # without --dim: all K = 8 of the space
    assert model.space_id == toy_space.id and model.coefficients.shape == (K,)


@pytest.mark.slow
def test_run_inversion_sh_inverts_both_examples_on_the_tiny_world(tmp_path):
    """The script's flags work against the shipped tiny space (one step each here)."""
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), REAL_EPOCHS="1", OOD_EPOCHS="1")
    done = subprocess.run(["bash", str(ROOT / "inversion" / "run_inversion.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    tiny = load_space(ROOT / "files" / "tiny" / "space")
    for name in ("face", "drawing"):
        model = load_model(tmp_path / name / "w2wmodel.safetensors")
        assert model.space_id == tiny.id and model.coefficients.shape == (tiny.num_components,)
        assert (tmp_path / name / "unet" / "adapter_model.safetensors").is_file()
