"""kill -9, Ctrl-C and concurrency: `w2w collect`, `w2w build` and `w2w invert` (with a checkpoint), killed at
seeded random moments several times, then run again, give the uninterrupted result bit for bit and
leave no temporary file, and the folder a killed first collect left is taken up; two collects into
one dataset, or two samples into one folder, at once give what one after the other gives. Ctrl-C
(SIGINT) at seeded moments of `w2w build`, `w2w train-identities`, inversion/invert.py and
train_dreambooth.py prints one line and exits with 130, and a rerun ends as an uninterrupted run. The
commands run in forked children of this process (the modules are loaded once), each killed with
SIGKILL or interrupted with SIGINT. About 65 s on 2 cores shared with other jobs (load average 9), and
the Ctrl-C tests about 40 s more (load average 8; one of them starts `w2w` as a process of its own)."""
import hashlib
import os
import random
import runpy
import signal
import subprocess
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
ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "inversion" / "images" / "face.png"


def start(argv, log: Path | None = None, script: Path | None = None) -> int:
    """The pid of a forked child running `w2w argv` (or the `script` with argv, as `python script argv`
    does), its output written to `log` (default: dropped)."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            output = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT)
            os.dup2(output, 1)
            os.dup2(output, 2)
            sys.stdout = sys.stderr = open(output, "w", buffering=1, closefd=False)  # pytest swapped them
            if script is None:
                code = main([str(a) for a in argv])
            else:
                sys.argv = [str(script), *map(str, argv)]
                runpy.run_path(str(script), run_name="__main__")
                code = 0
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
        finally:
            os._exit(code)
    return pid


def wait(pid) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run(argv, script: Path | None = None) -> float:
    """Run `w2w argv` (or `script`) to its end in a child; its time in seconds."""
    began = time.perf_counter()
    assert wait(start(argv, script=script)) == 0, argv
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


def interrupted_then_finished(argv, seconds: float, seed: int, logs: Path, times: int = KILLS,
                              script: Path | None = None) -> list[int]:
    """Press Ctrl-C (SIGINT) in `w2w argv` (or `script`) `times` times, each after a seeded random part of
    `seconds`, then let it finish; the exit codes of the interrupted runs, each checked to end, when it is
    130, in the one line `PROGRAM: interrupted` and no traceback."""
    rng = random.Random(seed)
    codes = []
    for i in range(times):
        log = logs / f"interrupted-{seed}-{i}.log"
        pid = start(argv, log, script)
        time.sleep(rng.uniform(0.1, 0.9) * seconds)
        os.kill(pid, signal.SIGINT)
        codes.append(wait(pid))
        err = log.read_text()
        assert codes[-1] in (0, 130) and "Traceback" not in err, err  # 0: it finished before the signal
        assert codes[-1] == 0 or err.splitlines()[-1].endswith(": interrupted"), err
    run(argv, script)
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


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
def test_ctrl_c_in_any_phase_of_build_is_one_line_and_the_build_resumes(matrix):
    """SIGINT at seeded moments of `w2w build` (reading, power iterations, the last pass, writing): each
    interrupted run prints `w2w: interrupted` and exits 130, and the last run ends as an uninterrupted one."""
    t, _ = matrix
    (t / "logs").mkdir()
    run(["collect", "--from-all-weights", t / "all_weights.pt", "--space", t / "space", "--shard-size", "64",
         t / "data"])
    build = ["build", t / "data", "--method", "randomized", "-k", "6", "--power-iterations", "12"]
    seconds = run(build + [t / "reference"])
    codes = interrupted_then_finished(build + [t / "built", "--state", t / "state"], seconds, seed=3, logs=t / "logs")
    assert files(t / "built") == files(t / "reference")
    assert temporaries(t) == [] and not (t / "state").exists() and 130 in codes


@pytest.mark.slow
def test_ctrl_c_in_the_scripts_and_train_identities_is_one_line_and_a_rerun_ends_as_uninterrupted(toy_world, toy_space,
                                                                                                 tmp_path):
    (tmp_path / "logs").mkdir()
    invert = ROOT / "inversion" / "invert.py"  # a rerun goes on from the last checkpoint
    argv = ["--space", toy_space, "--base", toy_world / "base", "--image", FACE, "--preset", "ood", "--dim", "8",
            "--epochs", "24", "--checkpoint_every", "4", "--device", "cpu", "--save_name"]
    seconds = run(argv + [tmp_path / "inverted-reference", "--checkpoint", tmp_path / "reference.ckpt"], invert)
    codes = interrupted_then_finished(argv + [tmp_path / "inverted", "--checkpoint", tmp_path / "inverted.ckpt"],
                                      seconds, 4, tmp_path / "logs", 2, invert)
    assert files(tmp_path / "inverted") == files(tmp_path / "inverted-reference")
    training = ["--pretrained_model_name_or_path", toy_world / "base", "--max_train_steps", "6", "--num_class_images",
                "4", "--class_inference_steps", "2", "--class_data_dir", toy_world / "class", "--train_batch_size", "2",
                "--learning_rate", "1e-2"]
    train = ["train-identities", "--instance_root", toy_world / "faces" / "celeba_generated", "--limit", "2",
             "--identities_per_batch", "2", "--checkpointing_steps", "2", *training, "--output_root"]
    seconds = run(train + [tmp_path / "trained-reference"])  # a rerun goes on from the last checkpoint
    codes += interrupted_then_finished(train + [tmp_path / "trained"], seconds, 5, tmp_path / "logs", 2)
    for name in ("000000", "000001"):
        assert files(tmp_path / "trained" / name) == files(tmp_path / "trained-reference" / name)
    dreambooth = ROOT / "train_dreambooth.py"  # the adapter is written whole at the end, or not at all
    argv = ["--instance_data_dir", toy_world / "faces" / "celeba_generated" / "000000", *training, "--output_dir"]
    seconds = run(argv + [tmp_path / "solo-reference"], dreambooth)
    codes += interrupted_then_finished(argv + [tmp_path / "solo"], seconds, 6, tmp_path / "logs", 2, dreambooth)
    assert files(tmp_path / "solo" / "unet") == files(tmp_path / "solo-reference" / "unet")
    assert temporaries(tmp_path) == [] and codes.count(130) >= 3, codes


@pytest.mark.slow
def test_ctrl_c_while_w2w_shuts_down_is_no_traceback(toy_space):
    """The `w2w` command (a process of its own) has printed its answer and is finishing: a Ctrl-C then, or
    in the second the interpreter takes to unload torch, ends it in one line or not at all, where it used
    to print a traceback from a library's clean-up or be killed by the signal (exit -2) without a word."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "lora_w2w.cli", "info", str(toy_space)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("w2w space")
    time.sleep(0.3)  # its last lines printed, the interpreter unloading
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()
    assert process.returncode in (0, 130) and "Traceback" not in err, (process.returncode, err)
    assert process.returncode == 0 or err == "w2w: interrupted\n", err
