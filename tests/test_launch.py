"""Training in several processes: the README's launch commands split the identities, runs sharing an output
root never train one identity twice, a worker outlives no launcher, and the warnings and errors of launching."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_w2w import train_identities
from lora_w2w.cli import main as w2w
from lora_w2w.formats import PEFT_WEIGHTS
from lora_w2w.launch import LauncherWatch, uses_cpu_backend, world_warning

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # torchrun of this environment


@pytest.fixture(scope="module")
def six_identities(toy_world, tmp_path_factory):
    """The toy pipeline's flags and 6 identities of 2 faces each."""
    from lora_w2w.tiny.synthetic import write_dataset

    root = tmp_path_factory.mktemp("six")
    write_dataset(root / "faces", 6, first_seed=0, images_per_identity=2, size=32, progress=False)
    return ["--base", str(toy_world / "base"), "--instance-root", str(root / "faces" / "celeba_generated"),
            "--max-train-steps", "2", "--num-class-images", "2", "--class-inference-steps", "2",
            "--class-data-dir", str(root / "class"), "--train-batch-size", "1", "--learning-rate", "1e-2"]


def trained_counts(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^trained (\d+) identities", output, flags=re.MULTILINE)]


def adapters(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.parent.name: load_file(p) for p in sorted(root.glob(f"*/unet/{PEFT_WEIGHTS}"))}


@pytest.mark.slow
def test_torchrun_on_a_cpu_splits_six_identities_3_3_and_equals_one_process(six_identities, tmp_path):
    """The README's CPU command: `torchrun --standalone --nproc_per_node 2 -m lora_w2w.train_identities`."""
    argv = [*six_identities, "--identities-per-batch", "3"]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lora_w2w.train_identities",
               *argv, "--output-root", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trained_counts(done.stdout) == [3, 3], done.stdout  # groups (0, 2, 4) and (1, 3, 5), not 6 each
    assert "world of 1" not in done.stderr
    train_identities.train_identities(train_identities.parse_args([*argv, "--output-root", str(tmp_path / "one")]))
    two, one = adapters(tmp_path / "two"), adapters(tmp_path / "one")
    assert list(two) == list(one) == [f"{i:06d}" for i in range(6)]
    for name in one:  # bit for bit, although the groups differ: (0, 1, 2) and (3, 4, 5) in one process
        assert all(torch.equal(two[name][key], one[name][key]) for key in one[name]), name


RUN_WHEN_TOLD = """import sys, time
from pathlib import Path
from lora_w2w import train_identities
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
sys.exit(train_identities.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_two_runs_into_one_output_root_train_each_identity_once(six_identities, tmp_path):
    """Both runs start together (each waits, imported, for the go), so both list all 6 identities as to do:
    without the locks each would train all of them."""
    argv = [*six_identities, "--identities-per-batch", "2", "--output-root", str(tmp_path / "root")]
    go = tmp_path / "go"
    runs = [subprocess.Popen([sys.executable, "-c", RUN_WHEN_TOLD, str(tmp_path / f"ready{i}"), str(go), *argv],
                             cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    counts = [count for out, _ in outputs for count in trained_counts(out)]
    assert len(counts) == 2 and sum(counts) == 6, outputs
    assert list(adapters(tmp_path / "root")) == [f"{i:06d}" for i in range(6)]


WATCHED = """import sys, time
from lora_w2w.launch import LauncherWatch
watch = LauncherWatch()
print("watching" if watch.pid else "unwatched", flush=True)
for _ in range(600 if watch.pid else 0):
    if watch.gone:
        print("gone", watch.pid, flush=True)
        break
    time.sleep(0.05)
"""
LAUNCHER = """import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1]])
time.sleep(600)
"""


@pytest.mark.parametrize("launched", [True, False])
def test_a_launched_process_sees_its_launcher_die(launched):
    """A stand-in launcher (torchrun sets TORCHELASTIC_RUN_ID in its workers) killed with SIGKILL: its worker
    notices; a process started without a launcher has none to watch."""
    env = {key: value for key, value in os.environ.items() if key not in ("TORCHELASTIC_RUN_ID",
                                                                          "ACCELERATE_MIXED_PRECISION")}
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert launcher.stdout.readline().strip() == ("watching" if launched else "unwatched")
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    if launched:
        assert launcher.stdout.readline().split() == ["gone", str(launcher.pid)]
    launcher.stdout.close()


def test_accelerate_worlds_that_do_not_split_are_warned_about():
    # what `accelerate launch --cpu --num_processes 2` gives its one process (accelerate/utils/launch.py,
    # prepare_simple_launcher_cmd_env: `current_env["MASTER_ADDR"] = ...` when `num_processes > 1`,
    # `current_env["ACCELERATE_MIXED_PRECISION"] = str(mixed_precision)`)
    simple = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29500"}
    assert "without --multi_gpu starts one process" in world_warning(1, simple)
    assert world_warning(1, {k: v for k, v in simple.items() if k != "MASTER_ADDR"}) is None  # --num_processes 1
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert "the launcher started 2 processes but accelerate gave this one a world of 1" in world_warning(1, torchrun)
    assert world_warning(2, torchrun) is None and world_warning(1, {}) is None
    assert uses_cpu_backend(torchrun, cuda=False) and not uses_cpu_backend(torchrun, cuda=True)
    assert not uses_cpu_backend({}, cuda=False)
    assert LauncherWatch({}).pid is None and LauncherWatch(torchrun).pid == os.getppid()


def test_a_shard_beyond_the_count_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        w2w(["train-identities", "--instance-root", "i", "--output-root", "o", "--shard", "3/2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2
    assert lines == ["w2w train-identities: error: --shard must be R/P with 0 <= R < P, such as 0/4; got '3/2'"]
