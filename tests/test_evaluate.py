"""The tiny world's evaluation of sampling, editing and inversion runs end to end (on the toy world
here: the figures themselves come from `python -m lora_w2w.tiny.evaluate` on the tiny world)."""
import json

from lora_w2w.storage import load_space
from lora_w2w.tiny import evaluate
from lora_w2w.tiny.faces import ATTRIBUTES


def test_evaluation_report(toy_world, toy_space, tmp_path):
    args = evaluate.parse_args(["--base", str(toy_world / "base"), "--space", str(toy_space),
                                "--out", str(tmp_path / "report.json"), "--work", str(tmp_path / "work"),
                                "--samples", "2", "--seeds", "2", "--steps", "2", "--inversions", "1",
                                "--inversion-steps", "2", "--dreambooth-steps", "1"])
    report = evaluate.main(args)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    sampling = report["sampling"]
    assert 0.5 <= sampling["attribute_consistency_across_seeds"] <= 1  # a majority vote agrees with itself
    assert sampling["nearest_dataset_distance_over_dataset_spacing"] > 0
    frequency = sampling["attribute_frequency"]  # by the majority of each of the 2 sampled models' images
    assert set(frequency) == set(ATTRIBUTES) and all(f["samples"] in (0, 0.5, 1) for f in frequency.values())
    assert frequency["Male"]["dataset"] == float((load_space(toy_space).attributes["Male"] > 0).mean())
    editing = report["editing"]
    assert set(editing) == {"Eyeglasses", "Bald", "No_Beard", "Blond_Hair", "models_by_sex", "targets",
                            "strength_std", "method", "components"}
    # the change rate split by how the evaluator read each model's sex: the overall rate is their weighted mean
    men, women = editing["models_by_sex"]["men"], editing["models_by_sex"]["women"]
    assert men + women == 2
    for attribute in evaluate.EDITED:
        split = editing[attribute]["changed_by_sex"]
        assert (split["men"] is None) == (men == 0) and (split["women"] is None) == (women == 0)
        weighted = (men * (split["men"] or 0) + women * (split["women"] or 0)) / 2
        assert abs(weighted - editing[attribute]["changed"]) < 1e-9
    # the directions the CLI edits with by default: mean differences on all (up to 1,000) components
    assert report["editing"]["method"] == "mean_difference"
    assert report["editing"]["components"] == 16  # the toy space's K
    assert all(0 <= report["editing"][a]["changed"] <= 1 for a in evaluate.EDITED)
    methods = ["w2w, 1 image", "Dreambooth-LoRA, 1 image", "Dreambooth-LoRA, many images"]
    assert all(-1 <= report["inversion"][m]["identity_similarity"] <= 1 for m in methods)
    assert report["inversion"]["paper_id_score"]["w2w, 1 image"] == 0.64
    # the space's real preset (the toy space records none: the paper's lr 0.1, K at most the space's), then the flags
    config = report["inversion"]["config"]
    assert (config["components"], config["lr"], config["steps"]) == (16, 0.1, 2)


def test_change_rate_by_sex():
    changed, male = [True, False, True, True], [True, True, False, False]
    assert evaluate._by_sex(changed, male) == {"men": 0.5, "women": 1.0}
    assert evaluate._by_sex([True, False], [False, False]) == {"men": None, "women": 0.5}
