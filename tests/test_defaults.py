"""The defaults resolve from the package, not the working directory: commands run from another folder,
and from an install that is not editable, which finds the tiny world through W2W_TINY (or says in one line
that it lacks it) and ships the demo's example images."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_w2w import defaults
from lora_w2w.storage import load_model

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, cwd: Path, pythonpath: Path = ROOT, **env) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` with `pythonpath` first (the checkout under test, not the venv's editable one)."""
    environment = {key: value for key, value in os.environ.items() if key != defaults.TINY_ENV}
    environment |= {"PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True)


def test_the_defaults_are_the_checkouts_tiny_world():
    assert Path(defaults.DEFAULT_BASE) == ROOT / "files" / "tiny" / "base"
    assert Path(defaults.DEFAULT_SPACE) == ROOT / "files" / "tiny" / "space"
    assert Path(defaults.DEFAULT_EVALUATOR).is_file() and Path(defaults.DEFAULT_WEIGHTS).is_dir()


def test_the_packaged_examples_are_inversion_images():
    """The demo's example images ship in the package; inversion/images/make_examples.py writes both copies."""
    names = sorted(path.name for path in defaults.EXAMPLES.glob("*.png"))
    assert names == ["drawing.png", "drawing_mask.png", "face.png", "face_mask.png"]
    for name in names:
        assert (defaults.EXAMPLES / name).read_bytes() == (ROOT / "inversion" / "images" / name).read_bytes(), name


def test_sample_runs_from_another_folder(tmp_path):
    done = run(["-m", "lora_w2w.cli", "sample", "--num", "1", "--out", "samples"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_model(tmp_path / "samples" / "sample_000.safetensors").coefficients.numel() > 0


@pytest.mark.slow
def test_the_demo_runs_from_another_folder(tmp_path):
    """About 20 s: every stage of the demo on the tiny world with one step each."""
    done = run(["-m", "lora_w2w.demo", "--out", "demo", "--steps", "1", "--inversion-steps", "1", "--device", "cpu"],
               tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Skipped" not in report and (tmp_path / "demo" / "inversion.png").is_file()


@pytest.mark.slow
def test_an_install_that_is_not_editable(tmp_path):
    """pip installs the package alone (its package data too); a default command says in one line that the
    tiny world is missing, and W2W_TINY points it at one. About 15 s."""
    source, target = tmp_path / "source", tmp_path / "site"  # built from a copy: nothing is written into the checkout
    shutil.copytree(ROOT / "lora_w2w", source / "lora_w2w", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "lora_w2w" / "data" / "examples" / "face.png").is_file()
    assert not (target / "files").exists()
    work = tmp_path / "work"
    work.mkdir()
    missing = run(["-m", "lora_w2w.cli", "sample", "--num", "1", "--out", "samples"], work, target)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert missing.stderr.count("\n") == 1 and f"set {defaults.TINY_ENV} to a checkout's files/tiny" in missing.stderr
    found = run(["-m", "lora_w2w.cli", "sample", "--num", "1", "--out", "samples"], work, target,
                **{defaults.TINY_ENV: str(ROOT / "files" / "tiny")})
    assert found.returncode == 0, found.stderr[-2000:]
    assert (work / "samples" / "sample_000.safetensors").is_file()
