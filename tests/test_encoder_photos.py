"""The encoder for Stable Diffusion 1.5: `w2w train-encoder --features dlib` on a released-format space (the
SD1.5 layout, imported by `import_official`) with real photographs standing in for the identity folders of
celeba_generated: features cached per folder and extracted in parallel processes, a resumed extraction
reads no image again, a folder without a face is one line naming it, and `w2w invert --encoder --steps 0`
on that space returns the encoder's prediction."""
import os
from pathlib import Path

import pytest
import torch
from conftest import write_released_files
from PIL import Image, ImageOps
from safetensors.torch import load_file
from test_encoder import run

from lora_w2w import encoder as encoder_module
from lora_w2w.encoder import EncoderConfig, Features
from lora_w2w.encoder_files import extract_features, load_encoder, model_images
from lora_w2w.inversion import read_photos
from lora_w2w.layout import sd15_layout
from lora_w2w.official import import_official
from lora_w2w.storage import load_model, load_space

K, M = 8, 4
CONFIG = EncoderConfig(features="dlib", components=K, held_out=0.25)
FLAGS = ["--features", "dlib", "--components", K, "--held-out", 0.25]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A space imported from released files of the SD1.5 layout with K = 8 and M = 4 models."""
    src = tmp_path_factory.mktemp("released")
    write_released_files(src, sd15_layout(), K, M)
    path = tmp_path_factory.mktemp("official") / "space"
    import_official(src, path, trust_pickle=True)
    return path


@pytest.fixture(scope="module")
def photos(astronaut, grace_hopper, tmp_path_factory):
    """celeba_generated's layout (a folder per model, named by its number) with the two photographed people, and
    in folder 2 a grey picture without a face beside a photograph."""
    root = tmp_path_factory.mktemp("celeba_generated")
    folders = {"0": [astronaut, ImageOps.mirror(astronaut)], "1": [grace_hopper, ImageOps.mirror(grace_hopper)],
               "2": [astronaut.resize((384, 384)), Image.new("RGB", (256, 256), "grey")],
               "3": [grace_hopper.crop((50, 0, 462, 500))]}
    for name, pictures in folders.items():
        (root / name).mkdir()
        for i, picture in enumerate(pictures):
            picture.save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_features_are_cached_per_folder_and_a_rerun_reads_no_image(official, photos, tmp_path, monkeypatch):
    calls, dlib = [], encoder_module.FEATURES["dlib"]

    def counted(images, config):
        calls.append(len(images))
        return dlib.extract(images, config)

    monkeypatch.setitem(encoder_module.FEATURES, "dlib", Features(dlib.description, counted, dlib.width))
    images = model_images(photos, load_space(official))
    features = extract_features(images, CONFIG, tmp_path / "cache", progress=False)
    assert calls == [2, 2, 2, 1]
    rows = [features(m) for m in range(M)]
    assert [len(r) for r in rows] == [2, 2, 1, 1]  # folder 2's grey picture has no face: left out
    assert all(r.shape[1] == 128 and torch.isfinite(r).all() for r in rows)
    # dlib calls a person's mirrored photograph the same person (descriptor distance < 0.6), the other not
    assert (rows[0][0] - rows[0][1]).norm() < 0.6 < (rows[0][0] - rows[1][0]).norm()
    again = extract_features(images, CONFIG, tmp_path / "cache", progress=False)
    assert calls == [2, 2, 2, 1] and all(torch.equal(again(m), rows[m]) for m in range(M))
    other = extract_features(images, EncoderConfig(features="pixels", components=K, image_size=4), tmp_path / "cache",
                             progress=False)  # other features: extracted again, not read from the cache
    assert other(0).shape == (2, 48)


@pytest.mark.slow
def test_train_encoder_on_a_released_space_in_parallel_and_invert_from_it(official, photos, tmp_path):
    out, cache = tmp_path / "encoder.safetensors", tmp_path / "features"
    code, stdout, err = run(["train-encoder", "--space", official, "--images", photos, "--out", out, *FLAGS,
                             "--workers", 2, "--features-cache", cache])
    assert code == 0, err
    assert "left out 1 image(s) in which dlib finds no face, in 1 folder(s) (the first: 2, 1 image(s))" in stdout
    space = load_space(official)
    encoder = load_encoder(out, space)
    assert (encoder.config.features, encoder.components, encoder.space_id) == ("dlib", K, space.id)
    serial = extract_features(model_images(photos, space), CONFIG, tmp_path / "serial", progress=False)
    cached = sorted(cache.iterdir())
    assert len(cached) == M and all(torch.equal(load_file(f)["features"], serial(m)) for m, f in enumerate(cached))
    image = photos / "0" / "0.png"
    code, _, err = run(["invert", "--image", image, "--encoder", out, "--steps", 0, "--space", official,
                        "--out", tmp_path / "m.safetensors"])
    assert code == 0, err
    model = load_model(tmp_path / "m.safetensors")
    [photo] = read_photos([image])
    assert torch.equal(model.coefficients, encoder.predict(photo.picture).coefficients)


def test_a_folder_without_a_face_is_one_line_naming_it(official, photos, tmp_path, astronaut):
    from skimage import data

    root = tmp_path / "celeba_generated"
    for name in "012":
        (root / name).mkdir(parents=True)
        astronaut.save(root / name / "0.png")
    (root / "3").mkdir()
    Image.fromarray(data.camera()).save(root / "3" / "0.png")  # the cameraman's face is turned: dlib's HOG misses it
    Image.new("RGB", (64, 64), "grey").save(root / "3" / "1.png")
    out = tmp_path / "encoder.safetensors"
    code, stdout, err = run(["train-encoder", "--space", official, "--images", root, "--out", out, *FLAGS])
    [line] = [line for line in err.splitlines() if "error" in line]  # the rest: the extraction's progress bar
    assert code == 2 and line.startswith(f"w2w: error: {root / '3'}: dlib finds no face in any of its images")
    assert not out.exists() and not (tmp_path / "encoder.fit.json").exists()
    assert not any(name.startswith("encoder") and name != "encoder.features" for name in os.listdir(tmp_path))
    assert Path(tmp_path / "encoder.features").is_dir()  # the faces found are kept for the run after the fix
