"""The object layer (Space.from_pretrained, space.sample, model.edit/save/save_lora/generate/load_into), the
friendly attribute names, the lazy top-level exports and `w2w --version`."""
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_space

import lora_w2w
from lora_w2w import Space, W2WModel, load_base_pipeline
from lora_w2w.cli import main
from lora_w2w.editing import (apply_edits, attribute_directions, attribute_names, default_debias, direction_report,
                              resolve_attribute)
from lora_w2w.errors import SpaceError
from lora_w2w.formats import load_lora
from lora_w2w.layout import LoraLayer, LoraLayout
from lora_w2w.pipeline import TEXT_ENCODER_NOTICE
from lora_w2w.storage import save_space

ROOT = Path(__file__).resolve().parents[1]


def test_space_and_model_objects(space, tmp_path):
    save_space(space, tmp_path / "space")
    space = Space.from_pretrained(tmp_path / "space")
    assert repr(space) == (f"Space(id={space.id!r}, N={space.num_weights:,}, K=6, M=12, base_model='tiny-test', "
                           f"prompt='sks person', attributes=2)")
    model = space.sample(seed=3)
    assert repr(model) == f"W2WModel(space={space.id}, K=6, made_by='sample seed 3')"
    assert torch.equal(model.coefficients, space.sample(seed=3).coefficients) and model.space is space
    edited = model.edit({"Male": 2.0})  # the default debias: the space has neither of Male's others
    assert edited.made_by == "sample seed 3; edit Male +2" and edited.space is space
    edited.save(tmp_path / "edited.safetensors")
    loaded = W2WModel.load(tmp_path / "edited.safetensors")
    with pytest.raises(SpaceError, match="the model knows no space: pass space=SPACE once"):
        loaded.save_lora(tmp_path / "lora")
    loaded.save_lora(tmp_path / "lora", space=space)  # given once, kept
    kohya = loaded.save_lora(tmp_path / "lora.safetensors", format="kohya")
    for lora in (tmp_path / "lora", kohya):
        torch.testing.assert_close(load_lora(space.layout, lora), edited.weights(space))
    assert W2WModel.load(tmp_path / "edited.safetensors", space).space is space


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_model_loads_into_a_diffusers_pipeline_as_it_generates_and_quietly(toy_world, toy_space):
    pipe = load_base_pipeline(str(toy_world / "base"), "cpu", progress=False)
    model = Space.from_pretrained(toy_space).sample(seed=1)
    fused, = model.generate(pipe, seeds=[0], num_inference_steps=2)
    logger, records = logging.getLogger("diffusers.loaders.lora_base"), Records()  # diffusers' own handler
    logger.addHandler(records)
    try:
        model.load_into(pipe, adapter_name="identity")
        loaded = pipe("sks person", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert not records.messages
        logger.warning(f"{TEXT_ENCODER_NOTICE} found")  # silenced in load_into only
        assert records.messages == [f"{TEXT_ENCODER_NOTICE} found"]
    finally:
        logger.removeHandler(records)
    assert np.abs(np.asarray(loaded, float) - np.asarray(fused, float)).mean() < 1.0  # of 255
    pipe.unload_lora_weights()
    face = model.space.invert(pipe, ROOT / "inversion" / "images" / "face.png", preset="ood", steps=1, seed=2)
    assert face.space is model.space and face.made_by.startswith("invert 1 image (preset ood, 1 steps")


def test_friendly_names_fold_the_sign_in():
    layout = LoraLayout((LoraLayer("a.to_q", 5, 4), LoraLayer("a.to_v", 3, 4)))
    space = make_space(layout, k=8, m=400, seed=3)
    c = space.coefficients  # (M, K)
    space.attributes = pd.DataFrame({"No_Beard": np.where(c[:, 0] > 0.3, 1, -1), "Young": np.where(c[:, 1] > 0, 1, -1),
                                     "Score": np.linspace(0, 1, 400)}, index=[f"{i:06d}" for i in range(400)])
    assert attribute_names(space) == ["Beard", "Age"] and default_debias(space) == ["Age"]
    assert resolve_attribute("Beard") == ("No_Beard", -1.0) and resolve_attribute("Young") == ("Young", 1.0)
    directions = attribute_directions(space, ["Beard", "Age"])
    assert set(directions) == {"No_Beard", "Young"}
    model = W2WModel(torch.zeros(8), space.id)
    beard = apply_edits(model, {"Beard": 2.0}, directions)
    torch.testing.assert_close(beard.coefficients, apply_edits(model, {"No_Beard": -2.0}, directions).coefficients)
    assert beard.provenance[-1]["strengths"] == {"Beard": 2.0}
    assert apply_edits(model, {"No_Beard": -2.0}, directions).provenance == beard.provenance
    with pytest.raises(SpaceError, match="'Beard' and 'No_Beard' name one direction"):
        apply_edits(model, {"Beard": 1.0, "No_Beard": 1.0}, directions)
    with pytest.raises(SpaceError, match="no attribute 'Wings'; the space has: Beard, Age"):
        attribute_directions(space, ["Wings"])
    report = direction_report(space)
    share = float((space.attributes["No_Beard"] == -1).mean())
    assert list(report.index) == ["Beard", "Age"] and report.loc["Beard", "positives"] == pytest.approx(share)


def test_top_level_exports_load_on_first_use():
    code = ("import sys, lora_w2w; assert 'torch' not in sys.modules, 'eager'; "
            "from lora_w2w import Space, Workbench, image_grid; print(Space.__module__, Workbench.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.split() == ["lora_w2w.space", "lora_w2w.workbench"], done.stderr
    assert set(lora_w2w.__all__) <= set(dir(lora_w2w))
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        lora_w2w.Nothing


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"w2w (lora_w2w) {version}\n"
