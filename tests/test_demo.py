"""`make demo` runs every stage and writes the report (here on the toy world, with few steps)."""
import json

import pytest

from PIL import Image

from lora_w2w import demo
from lora_w2w.storage import load_space


@pytest.mark.slow
def test_demo_writes_every_stage_and_the_report(toy_world, toy_space, tmp_path, capsys):
    out = tmp_path / "demo"
    scores = {"w2w": {"identity_similarity": 0.5, "attribute_agreement": 0.9},
              "dreambooth_1": {"identity_similarity": 0.6, "attribute_agreement": 0.8},
              "dreambooth_multi": {"identity_similarity": 0.7, "attribute_agreement": 0.95}}
    evaluation = tmp_path / "evaluation.json"  # w2w evaluate's report of the same space
    edits = {a: {"changed": 0.25, "others_kept": 0.95, "identity_similarity": 0.7}
             for a in ("Eyeglasses", "Bald", "No_Beard", "Blond_Hair")} | {"models_by_sex": {"men": 12, "women": 20}}
    evaluation.write_text(json.dumps({"space_id": load_space(toy_space).id, "table2": scores, "editing": edits}))
    assert demo.main(["--out", str(out), "--base", str(toy_world / "base"), "--space", str(toy_space),
                      "--device", "cpu", "--steps", "2", "--inversion-steps", "2", "--evaluation", str(evaluation),
                      "--assets", str(tmp_path / "assets")]) == 0
    shown = capsys.readouterr()
    assert "inversion and export ..." in shown.out  # each stage says it starts, then shows its bars
    assert "denoising:" in shown.err and "inversion:" in shown.err and "editing: models" in shown.err
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["synthetic identities", "base model", "sampling", "editing", "inversion and export",
                            "evaluation", "teaser"]
    assert not any("skipped" in stage for stage in report.values())
    for picture in ("faces.png", "base_samples.png", "sampling.png", "editing.png", "inversion.png", "teaser.png"):
        assert (out / picture).stat().st_size > 1000, picture
        assert (tmp_path / "assets" / f"tiny_{picture}").read_bytes() == (out / picture).read_bytes()  # make assets
    # the teaser: three panels of four images each, TEASER_SIZE px, under two lines of labels
    width, height = Image.open(out / "teaser.png").size
    assert width == 3 * 4 * demo.TEASER_SIZE and demo.TEASER_SIZE < height < demo.TEASER_SIZE + 60
    assert (out / "loras" / "inverted_face" / "adapter_model.safetensors").is_file()
    assert (out / "loras" / "inverted_drawing_kohya.safetensors").is_file()
    markdown = (out / "report.md").read_text()
    assert "| a sampled identity keeps its attributes across seeds |" in markdown
    assert "target met" in markdown
    said = next(line for line in markdown.splitlines() if line.startswith('"Target met" says'))
    assert f"this run edits 4 sampled models, so one model moves an editing row by 25% and its rows may differ from " \
           f"the 32-model rows quoted from {evaluation}" in said
    assert markdown.index(said) < markdown.index("| claim | paper | tiny world | target met |")
    assert "| editing Beard (this run, 4 models)" in markdown  # friendly names: No_Beard's edit adds a beard
    # the demo's own 4 models, then w2w evaluate's 32 from its report
    assert "| editing Eyeglasses (this run, 4 models): changed" in markdown
    quoted = next(line for line in markdown.splitlines() if line.startswith("| editing Bald (from"))
    assert f"(from {evaluation}, 32 models)" in quoted and "| 25% / 95% / 0.70 | **no** (>= 80% / >= 90%) |" in quoted
    inversion = next(line for line in markdown.splitlines() if line.startswith("| inversion of one image"))
    assert "0.50 / 0.60 / 0.70" in inversion and "**no** (w2w > 1-image Dreambooth)" in inversion
    assert "| ID score 0.64 / 0.43 / 0.69 (Table 2) |" in inversion  # the paper's, from tables.PAPER
    assert "90% / 80% / 95%" in markdown


def test_demo_says_which_stages_wait_for_the_tiny_world(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--base", "files/missing_base", "--space", str(tmp_path / "none")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "skipped" not in report["synthetic identities"]
    assert all("make tiny-world" in report[s]["skipped"] for s in list(report)[1:])
