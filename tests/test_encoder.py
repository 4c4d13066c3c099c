"""The encoder (instant inversion) on a toy: images whose colour sets their model's coefficients, so that a
held-out fit must beat predicting the mean; `w2w train-encoder` and `w2w invert --encoder` with their bad
input; `--steps 0` returns exactly the encoder's prediction; a refinement starts from it; a killed training
resumes to the uninterrupted result; a space names its default encoder without changing its id."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_space
from PIL import Image

from lora_w2w.cli import main as w2w
from lora_w2w.encoder import EncoderConfig, fit_scores, split_models, train_encoder
from lora_w2w.encoder_files import (default_encoder, fit_path, image_features, image_sources, load_encoder,
                                    model_images, name_encoder)
from lora_w2w.errors import SpaceError, W2WError
from lora_w2w.inversion import InversionConfig, invert
from lora_w2w.layout import LoraLayout
from lora_w2w.pipeline import load_base_pipeline
from lora_w2w.storage import load_model, load_space, read_space_description, save_space

ROOT = Path(__file__).resolve().parents[1]
M, K = 24, 8
CONFIG = EncoderConfig(components=K, image_size=4, ridge=0.01, held_out=0.25)
FLAGS = ["--components", K, "--image-size", 4, "--ridge", 0.01, "--held-out", 0.25]


@pytest.fixture(scope="module")
def pipe(toy_world):
    """The toy pipeline (one thread: conftest's)."""
    return load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def world(pipe, tmp_path_factory):
    """A space of the toy pipeline's layout whose M models' coefficients are a linear function of a colour, and
    ROOT/<model name>/<k>.png: two noisy 20 px images of that colour per model."""
    root = tmp_path_factory.mktemp("encoder_world")
    space = make_space(LoraLayout.from_unet(pipe.unet), k=K, m=M, seed=5)
    space.std *= 20
    g = torch.Generator().manual_seed(0)
    colours = 0.15 + 0.7 * torch.rand(M, 3, generator=g)                                      # (M, 3)
    space.coefficients = 4 * (colours - 0.5) @ torch.randn(3, K, generator=g)                 # (M, K)
    for name, colour in zip(space.attributes.index, colours):
        (root / "images" / name).mkdir(parents=True)
        for k in range(2):
            noise = torch.randn(20, 20, 3, generator=g) * 0.04
            pixels = ((colour + noise).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / name / f"{k}.png")
    return save_space(space, root / "space"), root / "images"


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """An encoder of the world's space trained by `w2w train-encoder`, and the command's stdout."""
    space, images = world
    out = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    code, stdout, err = run(["train-encoder", "--space", space, "--images", images, "--out", out, *FLAGS])
    assert code == 0, err
    return out, stdout


def run(args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `w2w ARGS` in a subprocess-free way: main() with captured streams."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = w2w([str(a) for a in args])
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- training

def test_training_fits_held_out_models_better_than_the_mean(world, trained):
    space_dir, _ = world
    out, stdout = trained
    space, encoder = load_space(space_dir), load_encoder(out, load_space(space_dir))
    fit = json.loads(fit_path(out).read_text())
    assert fit_path(out).name == "encoder.fit.json" and not (out.parent / "encoder.train-state").exists()
    assert (fit["models"], fit["images"], fit["components"]) == (6, 12, K)
    assert fit["r2"] > 0.5 and fit["cosine"] > 0.7  # R^2 0: no better than the training models' mean
    assert fit["r2_mean_of_images"] > 0.5
    assert encoder.fit == {k: v for k, v in fit.items() if k not in ("encoder", "space_id")}
    assert (encoder.space_id, encoder.components, encoder.config.features) == (space.id, K, "pixels")
    assert f"held-out fit (6 models, 12 images): R^2 {fit['r2']:.3f}" in stdout
    # predict: the mean of the images' regressed coefficients, moved `gain` times as far from the coefficients' mean
    assert fit["gain"] > 1 and float(encoder.gain) == pytest.approx(fit["gain"])
    images = [Image.open(world[1] / "000002" / f"{k}.png") for k in range(2)]
    raw = encoder.coefficients(encoder.extract(images)).mean(0)
    expected = encoder.coefficient_mean + encoder.gain * (raw - encoder.coefficient_mean)
    torch.testing.assert_close(encoder.predict(images).coefficients, expected)
    code, info, _ = run(["info", out])
    assert code == 0 and f"w2w encoder {out}" in info and f"space id     {space.id}" in info


def test_fit_scores_are_r2_and_cosine():
    true = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    mean = torch.zeros(2)
    assert fit_scores(true, true, mean) == {"r2": 1.0, "cosine": 1.0}
    assert fit_scores(torch.zeros(2, 2) + 1e-9, true, mean)["r2"] == pytest.approx(0.0)
    assert fit_scores(-true, true, mean) == {"r2": -3.0, "cosine": -1.0}


def test_the_split_is_seeded_and_the_config_checked():
    train, held = split_models(1000, 0.1, seed=0)
    assert len(held) == 100 and sorted(torch.cat([train, held]).tolist()) == list(range(1000))
    assert torch.equal(held, split_models(1000, 0.1, seed=0)[1])
    assert not torch.equal(held, split_models(1000, 0.1, seed=1)[1])
    with pytest.raises(SpaceError, match="an encoder needs at least 3"):
        split_models(2, 0.1, seed=0)
    with pytest.raises(W2WError, match="image_size 64: 3 S\\^2 = 12288 features, expected at most 8192"):
        EncoderConfig(image_size=64)
    with pytest.raises(W2WError, match="encoder features 'facenet': expected one of pixels, dlib"):
        EncoderConfig(features="facenet")


def test_a_killed_training_resumes_to_the_uninterrupted_result(world, tmp_path):
    space_dir, root = world
    space = load_space(space_dir)
    images = model_images(root, space)
    features_of, sources = image_features(images, CONFIG), image_sources(images)
    whole = train_encoder(space, features_of, CONFIG, progress=False)

    def dies_at_model_17(m):
        if m == 17:
            raise KeyboardInterrupt
        return features_of(m)

    read = []
    with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint of models 0-9
        train_encoder(space, dies_at_model_17, CONFIG, checkpoint=tmp_path / "run.ckpt", progress=False,
                      sources=sources, checkpoint_every=10)
    resumed = train_encoder(space, lambda m: read.append(m) or features_of(m), CONFIG,
                            checkpoint=tmp_path / "run.ckpt", progress=False, sources=sources, checkpoint_every=10)
    assert read == list(range(10, M))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.fit == whole.fit
    other = EncoderConfig(**{**CONFIG.__dict__, "ridge": 0.02})
    with pytest.raises(W2WError, match="run.ckpt: a checkpoint of another encoder run \\(config"):
        train_encoder(space, features_of, other, checkpoint=tmp_path / "run.ckpt", progress=False, sources=sources)


# ----------------------------------------------------------------------------- inversion from the encoder

def test_steps_0_return_exactly_the_encoders_prediction(world, trained, toy_world, tmp_path):
    space_dir, images = world
    encoder = load_encoder(trained[0])
    photos = [images / "000003" / "0.png", images / "000004" / "1.png"]
    for given in (photos[:1], photos):
        out = tmp_path / f"{len(given)}.safetensors"
        code, stdout, err = run(["invert", *[x for p in given for x in ("--image", p)], "--encoder", trained[0],
                                 "--steps", 0, "--space", space_dir, "--base", toy_world / "base", "--out", out])
        assert code == 0, err
        expected = encoder.predict([Image.open(p) for p in given])  # several photos: the mean of their predictions
        assert torch.equal(load_model(out).coefficients, expected.coefficients)
        assert "times: reading the space" in stdout and "encoder" in stdout and "loading the base" not in stdout
    single = [encoder.predict(Image.open(p)).coefficients for p in photos]
    torch.testing.assert_close(expected.coefficients, torch.stack(single).mean(0))


def test_the_invert_script_starts_from_an_encoder_too(world, trained, toy_world, tmp_path):
    """inversion/invert.py (the original's flags) takes --encoder; --epochs 0 writes the prediction alone."""
    spec = importlib.util.spec_from_file_location("invert_script", ROOT / "inversion" / "invert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    space_dir, images = world
    photo = images / "000003" / "0.png"
    script.main(script.parse_args(["--space", str(space_dir), "--base", str(toy_world / "base"), "--image", str(photo),
                                   "--encoder", str(trained[0]), "--epochs", "0", "--save_name", str(tmp_path)]))
    expected = load_encoder(trained[0]).predict([Image.open(photo)])
    assert torch.equal(load_model(tmp_path / "w2wmodel.safetensors").coefficients, expected.coefficients)
    with pytest.raises(W2WError):  # nothing to invert: no steps, no encoder
        script.main(script.parse_args(["--space", str(space_dir), "--base", str(toy_world / "base"), "--image",
                                       str(photo), "--epochs", "0", "--save_name", str(tmp_path / "zero")]))
    assert not (tmp_path / "zero").exists()


def test_a_refinement_starts_from_the_init(world, trained, pipe, tmp_path):
    """Adam's first step moves every coefficient by at most lr: one step from the init stays within lr of it."""
    space = load_space(world[0])
    encoder = load_encoder(trained[0], space)
    image = Image.open(world[1] / "000001" / "0.png")
    init = encoder.predict(image)
    target = torch.from_numpy(np.asarray(image.resize((32, 32)), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    config = InversionConfig(components=K, lr=0.05, weight_decay=0.0, steps=1)
    refined = invert(pipe, space, target, None, config, progress=False, init=init).coefficients
    assert 0 < (refined - init.coefficients).abs().max() <= 0.05 + 1e-5
    alone = invert(pipe, space, target, None, InversionConfig(components=K, steps=0), init=init)
    assert torch.equal(alone.coefficients, init.coefficients)
    with pytest.raises(W2WError, match="0 inversion steps from zero"):
        invert(pipe, space, target, None, InversionConfig(components=K, steps=0))
    # a checkpoint of a run from zero does not resume a run from the encoder
    invert(pipe, space, target, None, config, progress=False, checkpoint=tmp_path / "run.ckpt")
    with pytest.raises(W2WError, match="a checkpoint of another run \\(init"):
        invert(pipe, space, target, None, config, progress=False, checkpoint=tmp_path / "run.ckpt", init=init)


def test_a_space_names_its_default_encoder_without_changing_its_id(world, trained, toy_world, tmp_path):
    space_dir = shutil.copytree(world[0], tmp_path / "space")
    before = read_space_description(space_dir)
    assert default_encoder(space_dir) is None
    code, _, err = run(["invert", "--image", world[1] / "000001" / "0.png", "--init", "encoder", "--steps", 0,
                        "--space", space_dir, "--base", toy_world / "base", "--out", tmp_path / "m.safetensors"])
    assert code == 2 and "names no default encoder: pass an encoder file (--encoder PATH" in err and len(err.splitlines()) == 1
    name_encoder(space_dir, trained[0])
    after = read_space_description(space_dir)
    assert after == before | {"encoder": os.path.relpath(trained[0].resolve(), space_dir.resolve())}
    assert list(after)[:-1] == list(before)  # every other key as it was, in its place
    assert default_encoder(space_dir).resolve() == trained[0].resolve()
    assert load_space(space_dir).id == before["id"]
    code, _, err = run(["invert", "--image", world[1] / "000001" / "0.png", "--init", "encoder", "--steps", 0,
                        "--space", space_dir, "--base", toy_world / "base", "--out", tmp_path / "m.safetensors"])
    assert code == 0, err
    assert torch.equal(load_model(tmp_path / "m.safetensors").coefficients,
                       load_encoder(trained[0]).predict(Image.open(world[1] / "000001" / "0.png")).coefficients)


# ----------------------------------------------------------------------------- bad input: one line, nothing written

def test_an_encoder_of_another_space_is_refused(world, trained, toy_world, pipe, tmp_path):
    other = make_space(LoraLayout.from_unet(pipe.unet), k=K, m=M, seed=9)
    with pytest.raises(SpaceError, match=f"encoder.safetensors belongs to space {load_space(world[0]).id}, not to this "
                                         f"space \\({other.id}\\)"):
        load_encoder(trained[0], other)
    other_dir = save_space(other, tmp_path / "other")
    out = tmp_path / "m.safetensors"
    code, _, err = run(["invert", "--image", world[1] / "000001" / "0.png", "--encoder", trained[0], "--steps", 0,
                        "--space", other_dir, "--base", toy_world / "base", "--out", out])
    assert code == 2 and "belongs to space" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_folders_that_do_not_fit_the_models_are_refused_naming_the_first(world, tmp_path):
    space_dir, images = world
    root = shutil.copytree(images, tmp_path / "images")
    out = tmp_path / "encoder.safetensors"
    shutil.rmtree(root / "000023")
    code, _, err = run(["train-encoder", "--space", space_dir, "--images", root, "--out", out])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "23 folders for the 24 models of the space (the first model without a folder: 000023)" in err
    (root / "000005").rename(root / "000005b")
    code, _, err = run(["train-encoder", "--space", space_dir, "--images", root, "--out", out])
    assert code == 2 and "folder 6 is 000005b, the space's model 6 is 000005" in err, err
    shutil.copytree(root / "000004", root / "000023")
    (root / "000005b").rename(root / "000005")
    shutil.copytree(root / "000004", root / "000024")
    code, _, err = run(["train-encoder", "--space", space_dir, "--images", root, "--out", out])
    assert code == 2 and "25 folders for the 24 models of the space (the first without a model: 000024)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_corrupt_or_foreign_encoder_file_is_one_line(tmp_path, world):
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(W2WError, match="bad.safetensors: not a valid safetensors file"):
        load_encoder(tmp_path / "bad.safetensors")
    model = tmp_path / "model.safetensors"
    run(["sample", "--space", world[0], "--num", 1, "--out", tmp_path / "samples"])
    shutil.copy(tmp_path / "samples" / "sample_000.safetensors", model)
    with pytest.raises(W2WError, match="not a w2w encoder \\(format 'w2w-model'"):
        load_encoder(model)


def test_the_tiny_world_ships_its_encoder():
    space_dir = ROOT / "files" / "tiny" / "space"
    path = default_encoder(space_dir)
    assert path is not None and path.resolve() == (ROOT / "files" / "tiny" / "encoder.safetensors").resolve()
    assert path.stat().st_size < 4 * 2**20
    encoder = load_encoder(path, load_space(space_dir))
    fit = json.loads(fit_path(path).read_text())
    assert encoder.fit == {k: v for k, v in fit.items() if k not in ("encoder", "space_id")}
    assert fit["r2"] > 0 and fit["cosine"] > 0 and fit["models"] == 100


def test_the_workbench_loads_an_encoder_once_and_inverts_from_it_without_a_pipeline(world, trained, toy_world):
    from lora_w2w.workbench import Workbench

    bench = Workbench(toy_world / "base", world[0], "cpu", progress=False)
    encoder = bench.encoder(trained[0])
    assert bench.encoder(trained[0]) is encoder
    config = bench.inversion_config("real", steps=0, components=K)
    model, photos = bench.invert(world[1] / "000001" / "0.png", config=config, encoder=encoder, times=(times := {}))
    assert torch.equal(model.coefficients, encoder.predict([photos[0].picture]).coefficients)
    assert set(times) == {"reading the images", "encoder"} and not bench._pipes  # 0 steps: no pipeline loaded
    with pytest.raises(W2WError, match="names no default encoder"):
        bench.encoder()
