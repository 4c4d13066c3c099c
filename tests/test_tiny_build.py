"""`make tiny-world` (lora_w2w.tiny.build) at toy size: the base and evaluator stages are skipped because
their outputs exist, the LoRA and space stages run for real on the toy pipeline, and a rerun skips or
resumes everything."""
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from lora_w2w.dataset import WeightsDataset
from lora_w2w.errors import W2WError
from lora_w2w.pca import build_space
from lora_w2w.storage import load_space
from lora_w2w.tiny import build

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

TINY_SPACE = Path(__file__).resolve().parents[1] / "files" / "tiny" / "space"


@pytest.fixture
def toy_recipe(monkeypatch):
    for key, value in {"max_train_steps": 2, "num_class_images": 2, "class_inference_steps": 2}.items():
        monkeypatch.setitem(build.LORA_RECIPE, key, value)


def test_recipe_flags_are_the_training_flags():
    from lora_w2w import train_identities
    from lora_w2w.dreambooth import DreamboothConfig
    from lora_w2w.flags import config_argv

    recipe = config_argv(DreamboothConfig(**build.LORA_RECIPE), kebab=False)
    args = train_identities.parse_args(["--instance_root", "i", "--output_root", "o", *recipe])
    for key, value in build.LORA_RECIPE.items():
        assert getattr(args, key) == value


def test_build_trains_collects_and_builds_the_space(toy_world, toy_recipe, tmp_path, capsys):
    out, work = tmp_path / "files", tmp_path / "work"
    shutil.copytree(toy_world / "base", out / "base")
    (out / "evaluator.safetensors").write_bytes(b"exists, so the stage is skipped")
    args = build.parse_args(["--out", str(out), "--work", str(work), "--identities", "3", "--components", "1",
                             "--identities_per_batch", "2", "--processes", "2",
                             "--plot", str(tmp_path / "variance.png")])
    assert build.main(args) == 0
    for r in (0, 1):  # two processes, each over its share
        assert f"trained {2 - r} identities" in (work / f"train_{r}.log").read_text()
    space = load_space(out / "space")
    assert list(space.attributes.index) == ["000000", "000001", "000002"]
    assert space.num_components == 1 and space.coefficients.shape == (3, 1)  # the first of M - 1 = 2
    weights = WeightsDataset(out / "weights")  # the weights dataset, committed with the space, in float16
    assert weights.dtype_name == "float16" and weights.names == ("000000", "000001", "000002")
    full = build_space(weights, 2)  # all of the variance
    assert torch.allclose(full.explained_variance_ratio().sum(), torch.tensor(1.0), atol=1e-3)
    assert torch.allclose(space.explained_variance_ratio(), full.explained_variance_ratio()[:1], rtol=1e-4)
    assert (tmp_path / "variance.png").read_bytes()[:4] == b"\x89PNG"
    assert space.base_model == str(out / "base")
    assert space.inversion_presets == build.INVERSION_PRESETS == load_space(TINY_SPACE).inversion_presets
    truth = pd.read_csv(work / "faces" / "attributes.csv", index_col=0, dtype={"name": str})
    assert (space.attributes["Male"].to_numpy() == truth.loc[list(space.attributes.index), "Male"].to_numpy()).all()
    for name in list(space.attributes.index):
        assert (work / "loras" / name / "unet" / "adapter_model.safetensors").exists()

    capsys.readouterr()
    args.processes = 1
    assert build.main(args) == 0  # a rerun: everything exists
    log = capsys.readouterr().out
    assert "base model: " in log and "space: " in log and log.count("skipped") == 4
    assert "identity LoRAs: all 3 in" in log and "added 0 models" in log

    # a fresh checkout: no work folder, the space rebuilt from the committed weights alone, as before
    before = load_space(out / "space")
    shutil.rmtree(work)
    shutil.rmtree(out / "space")
    assert build.main(args) == 0
    assert "weights: nothing trained" in capsys.readouterr().out
    after = load_space(out / "space")
    assert torch.equal(after.components, before.components) and after.attributes.equals(before.attributes)

    # identities missing from weights/ are trained (only they), and a space of other identities is refused
    args.identities = 4
    shutil.rmtree(out / "space")
    assert build.main(args) == 0
    trained = [p.name for p in (work / "loras").iterdir() if not p.name.startswith(".")]  # not .locks
    assert WeightsDataset(out / "weights").names[-1] == "000003" and trained == ["000003"]
    with pytest.raises(W2WError, match="holds 4 identities, the space is of 3"):
        build.stage_space(out, work, 3, 1, tmp_path / "variance.png")


def test_a_sigterm_stops_the_training_processes_too(tmp_path):
    """`kill BUILD` (SIGTERM, as a job scheduler sends) must not leave the training shares running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    share = "import os, sys, time; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from lora_w2w.tiny.build import train_in_processes; "
        f"train_in_processes([sys.executable, '-c', {share!r}, {str(tmp_path)!r}], 2, Path({str(tmp_path)!r}), 2, "
        f"Path({str(tmp_path / 'logs')!r}))")])
    deadline = time.monotonic() + 60
    while len([p for p in tmp_path.iterdir() if p.name.isdigit()]) < 2:
        assert time.monotonic() < deadline and parent.poll() is None, "the shares did not start"
        time.sleep(0.1)
    shares = [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()]
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in shares:  # reaped by the parent: gone, not even zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
