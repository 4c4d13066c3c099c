"""`make demo` runs every stage and writes the report (here on the toy world, with few steps)."""
import json

from lora_w2w import demo


def test_demo_writes_every_stage_and_the_report(toy_world, toy_space, tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--base", str(toy_world / "base"), "--space", str(toy_space),
                      "--device", "cpu", "--steps", "2", "--inversion-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["synthetic identities", "base model", "sampling", "editing", "inversion and export",
                            "evaluation"]
    assert not any("skipped" in stage for stage in report.values())
    for picture in ("faces.png", "base_samples.png", "sampling.png", "editing.png", "inversion.png"):
        assert (out / picture).stat().st_size > 1000, picture
    assert (out / "loras" / "inverted_face" / "adapter_model.safetensors").is_file()
    assert (out / "loras" / "inverted_drawing_kohya.safetensors").is_file()
    markdown = (out / "report.md").read_text()
    assert "| a sampled identity keeps its attributes across seeds |" in markdown
    assert "editing Eyeglasses" in markdown and "target met" in markdown


def test_demo_says_which_stages_wait_for_the_tiny_world(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--base", "files/missing_base", "--space", str(tmp_path / "none")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "skipped" not in report["synthetic identities"]
    assert all("make tiny-world" in report[s]["skipped"] for s in list(report)[1:])
