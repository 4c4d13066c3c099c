"""The tiny world's evaluator (the committed files/tiny/evaluator.safetensors): held-out attribute
accuracy, identity similarity, face confidence, inputs it accepts, and a toy run of its trainer."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lora_w2w.errors import FileFormatError
from lora_w2w.tiny import evaluator as ev
from lora_w2w.tiny.evaluator import (LABELS, Evaluator, attribute_agreement, identity_embedding,
                                     identity_similarity)
from lora_w2w.tiny.synthetic import ATTRIBUTES, TRAITS, attribute_row, dataset_view_seed, render, sample_identity

ARTIFACT = Path(__file__).resolve().parents[1] / ev.DEFAULT_PATH
READABLE_TRAITS = {"skin_tone": 0.06, "face_width": 0.09, "eye_spacing": 0.09, "nose_length": 0.11,
                   "hair_length": 0.11, "clothes_hue": 0.02}  # largest MAE allowed (measured + margin)
TEST_FIRST_SEED = 22_000_000  # apart from the training (20,000,000+) and validation (21,000,000+) seeds


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    torch.set_num_threads(2)
    return Evaluator.load(ARTIFACT)


@pytest.fixture(scope="module")
def fresh():
    """300 renders of new identities (one view each): images, labels (B, 14), traits (B, T)."""
    seeds = np.arange(TEST_FIRST_SEED, TEST_FIRST_SEED + 300)
    return ev.render_faces(seeds, [dataset_view_seed(int(s), 0) for s in seeds])


def test_artifact_is_small():
    assert ARTIFACT.stat().st_size < 2 * 2**20, ARTIFACT.stat().st_size
    report = json.loads(ARTIFACT.with_suffix(".json").read_text())
    assert report["format"] == ev.FORMAT and report["training"]["parameters"] < 500_000


def test_heldout_attribute_accuracy(evaluator, fresh):
    images, labels, traits = fresh
    pred = evaluator.predict(images)
    accuracy = ((pred.attributes.to_numpy() > 0) == (labels > 0.5)).mean(0)  # (A,)
    low = {a: round(float(v), 3) for a, v in zip(LABELS, accuracy) if v < 0.95}
    assert not low, f"attributes below 95% on 300 fresh renders: {low}"
    error = np.abs(pred.traits - traits)  # (B, T)
    hue = TRAITS.index("clothes_hue")
    error[:, hue] = np.minimum(error[:, hue], 1 - error[:, hue])  # a hue circle
    mae = dict(zip(TRAITS, error.mean(0).round(3)))  # chance is ~0.25
    high = {t: mae[t] for t, bound in READABLE_TRAITS.items() if mae[t] > bound}
    assert not high, f"trait MAE above {READABLE_TRAITS}: {mae}"


def test_identity_similarity_separates_people(evaluator):
    people, views = 30, 3
    images = [render(sample_identity(s), dataset_view_seed(s, k))
              for s in range(TEST_FIRST_SEED, TEST_FIRST_SEED + people) for k in range(views)]
    pred = evaluator.predict(images)
    assert identity_embedding(pred).shape == (people * views, len(TRAITS) + 1 + len(ATTRIBUTES))
    first, second = pred.select(slice(0, None, views)), pred.select(slice(1, None, views))
    same = identity_similarity(first, second)  # (people,) the same person in two views
    different = identity_similarity(first, second.select(np.roll(np.arange(people), 1)))  # (people,)
    assert same.mean() > 0.8 and same.mean() - different.mean() > 0.5, (same.mean(), different.mean())
    assert (same > different).mean() > 0.9
    one = identity_similarity(first, first.select([0]))
    assert one.shape == (people,) and one[0] == pytest.approx(1.0)


def test_attribute_agreement_takes_dicts_and_rows(evaluator):
    person = sample_identity(TEST_FIRST_SEED + 7)
    pred = evaluator.predict([render(person, k) for k in range(3)])
    assert attribute_agreement(pred, person.attributes) > 0.9
    row = pd.Series(attribute_row(person))
    assert attribute_agreement(pred, row) == attribute_agreement(pred, person.attributes)
    flipped = {a: not v for a, v in person.attributes.items()}
    assert attribute_agreement(pred, flipped) < 0.1
    assert attribute_agreement(pred, person.attributes, ["Male"]) in (0.0, 1 / 3, 2 / 3, 1.0)


def test_face_confidence(evaluator):
    rng = np.random.default_rng(0)
    on_faces = evaluator.predict([render(sample_identity(TEST_FIRST_SEED + s), s) for s in range(40)])
    on_noise = evaluator.predict(torch.rand(20, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    on_others = evaluator.predict([ev.non_face(rng) for _ in range(40)])
    assert on_faces.face_confidence.min() > 0.5, on_faces.face_confidence.min()
    assert on_noise.face_confidence.max() < 0.5, on_noise.face_confidence.max()
    assert (on_others.face_confidence < 0.5).mean() > 0.9


def test_predict_accepts_sizes_modes_and_tensors(evaluator):
    person = sample_identity(TEST_FIRST_SEED + 3)
    big = render(person, 1, size=128)
    inputs = [big, big.convert("RGBA"), render(person, 1, size=48).convert("L"), render(person, 1)]
    pred = evaluator.predict(inputs)
    assert list(pred.attributes.columns) == list(LABELS) == list(ATTRIBUTES) + ["Smiling"]
    assert pred.attributes.shape == pred.probabilities.shape == (4, len(LABELS))
    assert pred.attributes.isin([1, -1]).all().all()
    assert pred.traits.shape == (4, len(TRAITS)) and pred.face_confidence.shape == (4,)
    assert ((pred.traits >= 0) & (pred.traits <= 1)).all()
    rgb = pred.attributes.drop(index=2)  # the grey one may lose colour attributes
    assert (rgb == rgb.iloc[0]).all().all(), pred.attributes
    tensor = torch.from_numpy(np.array(big)).permute(2, 0, 1).float() / 255  # (3, 128, 128)
    from_tensor = evaluator.predict(tensor[None].repeat(2, 1, 1, 1))
    np.testing.assert_allclose(from_tensor.probabilities.iloc[0], pred.probabilities.iloc[0], atol=0.1)
    assert len(evaluator.predict(big).attributes) == 1


def test_load_errors(tmp_path):
    with pytest.raises(FileFormatError, match="no evaluator"):
        Evaluator.load(tmp_path / "missing.safetensors")


def test_toy_training_run(tmp_path, capsys):
    from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline, save_pipeline

    config = TinyPipelineConfig(text_hidden=32, text_layers=1, text_heads=2, vae_channels=(32, 32, 32),
                                unet_channels=(32, 32, 32))
    save_pipeline(build_pipeline(config, seed=0), tmp_path / "base")  # random weights
    out = tmp_path / "toy.safetensors"
    argv = ["--out", str(out), "--steps", "3", "--batch-size", "8", "--stem-channels", "4",
            "--stage-channels", "8", "8", "--val-identities", "3", "--val-views", "2",
            "--vae", str(tmp_path / "base"), "--vae-fraction", "0.5", "--samples", "2", "--sample-steps", "2",
            "--quiet"]
    report = ev.main(ev.parse_args(argv))
    metrics = report["metrics"]
    assert set(metrics) >= {"clean", "blur_noise", "vae", "samples"}
    assert set(metrics["vae"]["accuracy"]) == set(LABELS)
    assert set(metrics["samples"]["attribute_frequency"]) == set(LABELS)
    assert json.loads(out.with_suffix(".json").read_text())["training"]["args"]["steps"] == 3
    toy = Evaluator.load(out)
    assert toy.config.stage_channels == (8, 8)
    assert toy.predict([render(sample_identity(0), 0)]).traits.shape == (1, len(TRAITS))
    again = tmp_path / "again.safetensors"
    ev.main(ev.parse_args([*argv[2:], "--out", str(again), "--samples", "0"]))
    state, same = toy.state_dict(), Evaluator.load(again).state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state), "training is not deterministic"
    assert "wrote" in capsys.readouterr().out


def test_command_line_errors(tmp_path, capsys):
    for argv in (["--steps", "0"], ["--non-face-fraction", "1.5"],
                 ["--evaluate-only", "--out", str(tmp_path / "none.safetensors")]):
        with pytest.raises(SystemExit) as exit_info:
            ev.parse_args(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "--non-face-fraction" in err and "--evaluate-only" in err
