import pytest
"""train.sh and inversion/run_inversion.sh run from a shell where the project's .venv is not activated:
they put the .venv beside them first on PATH. Here the .venv is a stand-in whose `python` runs this
environment's interpreter and logs each call, and whose `accelerate` only logs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

ROOT = Path(__file__).resolve().parents[1]
BARE_PATH = "/usr/bin:/bin"  # a shell without the venv: no `python` with pandas, no `accelerate`


def stand_in_venv(root: Path, run_python: bool) -> Path:
    """root/.venv/bin/{python,accelerate} that append their arguments to root/calls.log."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = root / "calls.log"
    python = f'exec "{sys.executable}" "$@"' if run_python else "exit 0"
    for name, body in (("python", python), ("accelerate", "exit 0")):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return log


def test_train_sh_help_needs_no_python():
    done = subprocess.run(["bash", "train.sh", "--help"], cwd=ROOT, env=dict(os.environ, PATH=BARE_PATH),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bash train.sh sd15 IMAGES OUT" in done.stdout and "#" not in done.stdout


def test_train_sh_uses_the_venv_beside_it_without_activation(tmp_path):
    """The faces step runs for real (it imports pandas, which the system python lacks), then accelerate
    launches the tiny recipe."""
    shutil.copy(ROOT / "train.sh", tmp_path / "train.sh")
    log = stand_in_venv(tmp_path, run_python=True)
    env = dict(os.environ, PATH=BARE_PATH, FACES=str(tmp_path / "faces"), OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(tmp_path / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No module named" not in done.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("python -m lora_w2w.tiny.synthetic") and calls[1].startswith("accelerate launch")
    assert "--pretrained_model_name_or_path files/tiny/base" in calls[1]
    assert (tmp_path / "faces" / "celeba_generated" / "000000").is_dir()


def test_run_inversion_sh_uses_the_venv_of_its_checkout(tmp_path):
    (tmp_path / "inversion").mkdir()
    shutil.copy(ROOT / "inversion" / "run_inversion.sh", tmp_path / "inversion" / "run_inversion.sh")
    log = stand_in_venv(tmp_path, run_python=False)
    env = {k: v for k, v in os.environ.items() if k != "PY"} | {"PATH": BARE_PATH}
    done = subprocess.run(["bash", str(tmp_path / "inversion" / "run_inversion.sh")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["python", "inversion/invert.py"]] * 2
    assert "--image inversion/images/face.png" in calls[0] and "--image inversion/images/drawing.png" in calls[1]
