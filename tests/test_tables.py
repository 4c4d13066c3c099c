"""The tiny world's evaluation runs end to end, section by section (on the toy world here: the figures
themselves come from `python -m lora_w2w.tiny.tables` on the tiny world). About 60 s on one thread."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_w2w.dataset import add_models, matrix_source
from lora_w2w.errors import W2WError
from lora_w2w.storage import load_space
from lora_w2w.tiny import tables, scaling_plots
from lora_w2w.tiny.evaluator import Evaluator, EvaluatorConfig, feature_distance
from lora_w2w.tiny.synthetic import ATTRIBUTES, render, sample_identity

TOY = ["--samples", "2", "--seeds", "2", "--steps", "2", "--inversions", "1", "--inversion-steps", "2",
       "--dreambooth-steps", "1", "--dreambooth-multi-steps", "2", "--views", "2", "--class-images", "2",
       "--table1-samples", "1", "--slider-steps", "2", "--slider-latents", "2", "--scaling-models", "10", "60",
       "--scaling-components", "3", "100", "--scaling-inversions", "1", "--scaling-samples", "1"]


@pytest.fixture(scope="module")
def toy_weights(toy_space, tmp_path_factory):
    """A weights dataset of the toy space's 60 models (random LoRAs of its layout, named as its rows)."""
    space = load_space(toy_space)
    weights = torch.randn(60, space.layout.numel, generator=torch.Generator().manual_seed(0)) * 0.02  # (M, N)
    path = tmp_path_factory.mktemp("toy_weights") / "weights"
    add_models(path, matrix_source(weights, list(space.attributes.index)), space.layout)
    return path


def _args(toy_world, toy_space, toy_weights, tmp_path, *only):
    return tables.parse_args(["--base", str(toy_world / "base"), "--space", str(toy_space), "--weights",
                                str(toy_weights), "--out", str(tmp_path / "report.json"), "--work",
                                str(tmp_path / "work"), *TOY, *(["--only", *only] if only else [])])


@pytest.mark.slow
def test_every_section(toy_world, toy_space, toy_weights, tmp_path):
    report = tables.main(_args(toy_world, toy_space, toy_weights, tmp_path))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"space_id", "runs", *tables.SECTIONS}
    assert set(report["runs"]) == set(tables.SECTIONS)
    assert report["runs"]["table1"]["settings"]["slider_steps"] == 2

    sampling = report["sampling"]
    assert 0.5 <= sampling["attribute_consistency_across_seeds"] <= 1  # a majority vote agrees with itself
    assert sampling["nearest_dataset_distance_over_dataset_spacing"] > 0
    frequency = sampling["attribute_frequency"]  # by the majority of each of the 2 sampled models' images
    assert set(frequency) == set(ATTRIBUTES) and all(f["samples"] in (0, 0.5, 1) for f in frequency.values())
    assert frequency["Male"]["dataset"] == float((load_space(toy_space).attributes["Male"] > 0).mean())

    editing = report["editing"]
    assert set(editing) == {*tables.EDITED, "models_by_sex", "targets", "strength_std", "method", "components"}
    # the change rate split by how the evaluator read each model's sex: the overall rate is their weighted mean
    men, women = editing["models_by_sex"]["men"], editing["models_by_sex"]["women"]
    assert men + women == 2
    for attribute in tables.EDITED:
        split = editing[attribute]["changed_by_sex"]
        assert (split["men"] is None) == (men == 0) and (split["women"] is None) == (women == 0)
        weighted = (men * (split["men"] or 0) + women * (split["women"] or 0)) / 2
        assert abs(weighted - editing[attribute]["changed"]) < 1e-9
    # the directions the CLI edits with by default: mean differences on all (up to 1,000) components
    assert (editing["method"], editing["components"]) == ("mean_difference", 16)  # the toy space's K

    # table1: one row per attribute and method, on 1 model: changed is 0 or 1
    table1 = report["table1"]
    assert [(r["attribute"], r["method"]) for r in table1] == [(a, m) for a in tables.TABLE1
                                                              for m in tables.TABLE1_METHODS]
    for row in table1:
        assert row["changed"] in (0, 1) and 0 <= row["kept"] <= 1 and -1 <= row["identity_similarity"] <= 1
        assert 0 < row["image_distance"] <= 4  # every method changes the images
    chubby = next(r for r in table1 if (r["attribute"], r["method"]) == ("Chubby", "w2w"))
    assert chubby["paper"] == {"id_score": 0.45, "lpips": 0.36, "clip": 2.16}
    assert next(r for r in table1 if r["attribute"] == "Eyeglasses")["paper"] is None

    table2 = report["table2"]
    for name in ("w2w", "dreambooth_1", "dreambooth_multi"):
        assert -1 <= table2[name]["identity_similarity"] <= 1 and len(table2[name]["per_identity"]) == 1
    assert table2["w2w"]["paper_id_score"] == 0.64 and table2["views"] == 2
    assert table2["steps"] == {"dreambooth_1": 1, "dreambooth_multi": 2, "w2w": 2}
    # the space's real preset (the toy space records none: the paper's lr 0.1, K at most the space's), then the flags
    config = table2["config"]
    assert (config["components"], config["lr"], config["steps"]) == (16, 0.1, 2)

    timing = report["timing"]
    assert all(timing[k] > 0 for k in ("inversion_s", "dreambooth_1_s", "dreambooth_multi_s"))
    assert timing["dreambooth_1_over_inversion"] == pytest.approx(timing["dreambooth_1_s"] / timing["inversion_s"])

    # spaces of the first 10 and all 60 models: K = M - 1 up to the toy space's 16
    scaling = report["scaling_models"]
    assert [(r["models"], r["components"]) for r in scaling] == [(10, 9), (60, 16)]
    for row in scaling:
        assert 0 <= row["edit_entanglement"] <= 1 and 0.5 <= row["sampling_consistency"] <= 1
        assert -1 <= row["inversion_identity_similarity"] <= 1
        assert set(row["edited"]) <= set(tables.EDITED)
    # K 100 is more than the 60 models' 59 components: all of them
    assert [r["components"] for r in report["scaling_components"]] == [3, 59]

    pictures = scaling_plots.main(scaling_plots.parse_args(["--report", str(tmp_path / "report.json"),
                                                            "--out", str(tmp_path / "assets")]))
    assert [p.name for p in pictures] == ["tiny_scaling_models.png", "tiny_scaling_components.png"]
    assert all(p.stat().st_size > 10_000 for p in pictures)


@pytest.mark.slow
def test_one_section_updates_a_report_and_reruns_alike(toy_world, toy_space, toy_weights, tmp_path):
    out = tmp_path / "report.json"
    space_id = load_space(toy_space).id
    out.write_text(json.dumps({"space_id": space_id, "sampling": {"kept": True}, "runs": {"sampling": {}}}))
    first = tables.main(_args(toy_world, toy_space, toy_weights, tmp_path, "scaling_components"))
    assert first["sampling"] == {"kept": True} and set(first["runs"]) == {"sampling", "scaling_components"}
    again = tables.main(_args(toy_world, toy_space, toy_weights, tmp_path, "scaling_components"))
    assert again["scaling_components"] == first["scaling_components"]  # seeded
    out.write_text(json.dumps({"space_id": "another"}))
    with pytest.raises(W2WError, match="report.json: a report of space another"):
        tables.main(_args(toy_world, toy_space, toy_weights, tmp_path, "scaling_components"))


def test_plots_need_the_scaling_sections(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"scaling_models": []}))
    with pytest.raises(W2WError, match="no scaling_components section"):
        scaling_plots.main(scaling_plots.parse_args(["--report", str(tmp_path / "report.json")]))


def test_settings_are_checked():
    with pytest.raises(W2WError, match="slider_steps must be >= 1"):
        tables.Settings(slider_steps=0)
    assert tables.Settings().dreambooth_multi_steps is None
    assert tables.multi_steps(tables.Settings(views=5)) == 5 * tables.DREAMBOOTH_MULTI_STEPS_PER_VIEW


def test_table2_defaults_are_the_committed_run():
    """A plain `w2w evaluate --only table2` trains the baselines as the committed report's Table 2 did, and
    both baselines train the same number of steps."""
    committed = json.loads((Path(tables.__file__).parents[2] / "files/tiny/evaluation.json").read_text())
    defaults = tables.Settings()
    assert committed["table2"]["views"] == defaults.views
    assert committed["table2"]["steps"]["dreambooth_1"] == defaults.dreambooth_steps
    assert committed["table2"]["steps"]["dreambooth_multi"] == tables.multi_steps(defaults)
    assert tables.multi_steps(defaults) == defaults.dreambooth_steps


def test_feature_distance():
    torch.manual_seed(0)
    evaluator = Evaluator(EvaluatorConfig()).eval()
    faces = [render(sample_identity(seed), view_seed=1) for seed in (1, 2)]
    same = feature_distance(evaluator, faces, faces)
    assert np.allclose(same, 0, atol=1e-6)
    swapped = feature_distance(evaluator, faces, faces[::-1])
    assert np.all(swapped > 0.01) and np.allclose(swapped, swapped[::-1])  # symmetric, per pair


def test_change_rate_by_sex():
    changed, male = [True, False, True, True], [True, True, False, False]
    assert tables._by_sex(changed, male) == {"men": 0.5, "women": 1.0}
    assert tables._by_sex([True, False], [False, False]) == {"men": None, "women": 0.5}
