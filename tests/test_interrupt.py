"""kill -9 and concurrency: `w2w collect`, `w2w build` and `w2w invert` (with a checkpoint), killed at
seeded random moments several times, then run again, give the uninterrupted result bit for bit and
leave no temporary file, and the folder a killed first collect left is taken up; two collects into
one dataset, or two samples into one folder, at once give what one after the other gives. The
commands run in forked children of this process (the modules are loaded once), each killed with
SIGKILL. About 65 s on 2 cores shared with other jobs (load average 9)."""
import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_w2w.cli import main
from lora_w2w.dataset import WeightsDataset, add_models, matrix_source
from lora_w2w.storage import save_space

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

KILLS = 3  # kills before the run that finishes
FACE = Path(__file__).resolve().parents[1] / "inversion" / "images" / "face.png"


def start(argv, log: Path | None = None) -> int:
    """The pid of a forked child running `w2w argv`, its output written to `log` (default: dropped)."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            output = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT)
            os.dup2(output, 1)
            os.dup2(output, 2)
            sys.stdout = sys.stderr = open(output, "w", buffering=1, closefd=False)  # pytest swapped them
            code = main([str(a) for a in argv])
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
        finally:
            os._exit(code)
    return pid


def wait(pid) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run(argv) -> float:
    """Run `w2w argv` to its end in a child; its time in seconds."""
    began = time.perf_counter()
    assert wait(start(argv)) == 0, argv
    return time.perf_counter() - began


def killed_then_finished(argv, seconds: float, seed: int) -> list[int]:
    """Kill `w2w argv` with SIGKILL KILLS times, each after a seeded random part of `seconds` (the
    uninterrupted run's time), then let it finish; the exit codes of the killed runs."""
    rng = random.Random(seed)
    codes = []
    for _ in range(KILLS):
        pid = start(argv)
        time.sleep(rng.uniform(0.1, 0.9) * seconds)
        os.kill(pid, signal.SIGKILL)
        codes.append(wait(pid))
    run(argv)
    return codes


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def matrix(space, tmp_path):
    """A released-style all_weights.pt (M = 600 models of the test layout) and its space for the layout."""
    save_space(space, tmp_path / "space")
    weights = torch.randn(600, space.num_weights, generator=torch.Generator().manual_seed(0))
    torch.save(weights, tmp_path / "all_weights.pt")
    return tmp_path, weights


def test_collect_and_build_killed_at_random_give_the_uninterrupted_result(matrix):
    t, weights = matrix
    collect = ["collect", "--from-all-weights", t / "all_weights.pt", "--space", t / "space", "--shard-size", "8"]
    seconds = run(collect + [t / "reference"])
    codes = killed_then_finished(collect + [t / "data"], seconds, seed=0)  # a first collect into a new folder
    assert files(t / "data") == files(t / "reference") and temporaries(t) == []
    assert torch.equal(WeightsDataset(t / "data").read_rows(0, 600), weights)

    build = ["build", t / "reference", "--method", "randomized", "-k", "6", "--power-iterations", "12"]
    seconds = run(build + [t / "reference-space"])
    codes += killed_then_finished(build + [t / "built", "--state", t / "state"], seconds, seed=1)
    assert files(t / "built") == files(t / "reference-space")
    assert temporaries(t) == [] and not (t / "state").exists()
    assert -signal.SIGKILL in codes  # at least one run was killed midway (a run can end before its kill)


def test_invert_killed_at_random_resumes_to_the_uninterrupted_model(toy_world, toy_space, tmp_path):
    invert = ["invert", "--base", toy_world / "base", "--space", toy_space, "--image", FACE, "--preset", "ood",
              "--components", "8", "--steps", "24", "--checkpoint-every", "2", "--device", "cpu"]
    seconds = run(invert + ["--checkpoint", tmp_path / "reference.ckpt", "--out", tmp_path / "reference.safetensors"])
    codes = killed_then_finished(invert + ["--checkpoint", tmp_path / "run.ckpt", "--out", tmp_path / "m.safetensors"],
                                 seconds, seed=2)
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert temporaries(tmp_path) == [] and -signal.SIGKILL in codes


def test_two_collects_into_one_dataset_at_once_serialize(space, tmp_path):
    g = torch.Generator().manual_seed(1)
    sources = {prefix: torch.randn(200, space.num_weights, generator=g) for prefix in "abc"}
    names = {prefix: [f"{prefix}{i:03d}" for i in range(200)] for prefix in "abc"}
    add_models(tmp_path / "data", matrix_source(sources["a"], names["a"]), space.layout, shard_size=8)
    for prefix in "bc":
        torch.save(sources[prefix], tmp_path / f"{prefix}.pt")
        (tmp_path / f"{prefix}.txt").write_text("\n".join(names[prefix]))
    pids = [start(["collect", "--from-all-weights", tmp_path / f"{prefix}.pt", "--names", tmp_path / f"{prefix}.txt",
                   tmp_path / "data"]) for prefix in "cb"]  # c appends; b sorts before c and rewrites its shards
    assert [wait(pid) for pid in pids] == [0, 0]
    dataset = WeightsDataset(tmp_path / "data")
    assert list(dataset.names) == names["a"] + names["b"] + names["c"]
    assert torch.equal(dataset.read_rows(0, 600), torch.cat([sources[p] for p in "abc"]))
    assert temporaries(tmp_path) == []


def test_two_samples_into_one_folder_at_once_serialize(toy_space, tmp_path):
    """The second run, started while the first writes, waits for it: the folder ends as the second's alone."""
    sample = ["sample", "--space", toy_space]
    run(sample + ["--num", "20", "--seed", "2", "--out", tmp_path / "reference"])
    first = start(sample + ["--num", "300", "--seed", "1", "--export", "kohya", "--out", tmp_path / "both"])
    while not (tmp_path / "both" / "sample_000.safetensors").exists():
        time.sleep(0.01)
    second = start(sample + ["--num", "20", "--seed", "2", "--out", tmp_path / "both"], tmp_path / "second.log")
    assert [wait(first), wait(second)] == [0, 0]
    assert "another w2w process is writing here; waiting" in (tmp_path / "second.log").read_text()
    written = files(tmp_path / "both")
    assert {name: written[name] for name in files(tmp_path / "reference")} == files(tmp_path / "reference")
    assert len(written) == 600 and temporaries(tmp_path) == []  # the first run's other 280 models and LoRAs


def test_the_folder_a_killed_first_collect_left_is_taken_up(space, tmp_path):
    """What a first collect killed before its index.json leaves: listed-to-be shards and a partial one."""
    source = torch.randn(20, space.num_weights, generator=torch.Generator().manual_seed(3))
    names = [f"m{i:02d}" for i in range(20)]
    add_models(tmp_path / "reference", matrix_source(source, names), space.layout, shard_size=8)
    dead = start(["info", tmp_path / "reference"])
    wait(dead)  # a pid no process has now
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights-00000.safetensors").write_bytes(
        (tmp_path / "reference" / "weights-00000.safetensors").read_bytes())
    (tmp_path / "data" / f".weights-00001.safetensors.partial-{dead}").write_bytes(b"half a shard")
    add_models(tmp_path / "data", matrix_source(source, names), space.layout, shard_size=8)
    assert files(tmp_path / "data") == files(tmp_path / "reference") and temporaries(tmp_path) == []
