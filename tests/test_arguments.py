"""Numbers and choices: every bad value is refused in one line with exit code 2 before any model loads,
and the library functions refuse the same values (ArgumentError). Under 5 s on 2 cores (3.5 s with
test_outputs.py)."""
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lora_w2w import pipeline, sampling
from lora_w2w.checks import SEED_MAX, check_int, check_number, check_seed, check_size, resolve_device
from lora_w2w.cli import main
from lora_w2w.errors import ArgumentError
from lora_w2w.inversion import InversionConfig
from lora_w2w.pca import BuildConfig, build_space
from lora_w2w.sampling import iter_sample_models, sample_models

BIG_SEED = str(2**63)
# (argv, what the one line says); no file these name exists, so only the check can answer first
CASES = [
    (["sample", "--seed", BIG_SEED, "--out", "o"], "--seed: expected an integer from 0 to 9223372036854775807"),
    (["generate", "--seeds", "0", BIG_SEED, "--out", "o"], "--seeds: expected an integer from 0 to"),
    (["invert", "--image", "i.png", "--seed", "-1", "--out", "o"], "--seed: expected an integer from 0 to"),
    (["build", "d", "o", "-k", "2", "--seed", BIG_SEED], "--seed: expected an integer from 0 to"),
    (["generate", "--steps", "0", "--out", "o"], "--steps: expected an integer >= 1, got 0"),
    (["generate", "--steps", "-3", "--out", "o"], "--steps: expected an integer >= 1, got -3"),
    (["generate", "--size", "33", "--out", "o"], "--size: expected a multiple of 8 pixels, got 33 (try 32 or 40)"),
    (["generate", "--size", "0", "--out", "o"], "--size: expected an integer >= 8, got 0"),
    (["generate", "--guidance", "nan", "--out", "o"], "--guidance: expected a finite number, got nan"),
    (["generate", "--guidance", "inf", "--out", "o"], "--guidance: expected a finite number"),
    (["generate", "--injection-timestep", "-5", "--out", "o"], "--injection-timestep: expected an integer >= 0"),
    (["generate", "--device", "bogus", "--out", "o"], "device 'bogus': expected auto, cpu, cuda, cuda:N or mps"),
    (["generate", "--device", "cuda:x", "--out", "o"], "expected auto, cpu, cuda, cuda:N or mps"),
    (["invert", "--image", "i.png", "--device", "meta", "--out", "o"], "expected auto, cpu, cuda, cuda:N or mps"),
    (["edit", "--model", "m", "--edit", "Bald=1", "--out", "o", "--components", "0"], "expected an integer >= 1"),
    (["directions", "-k", "-5"], "--components: expected an integer >= 1, got -5"),
    (["sample", "--num", "0", "--out", "o"], "--num: expected an integer >= 1, got 0"),
    (["sample", "--factor", "-1", "--out", "o"], "--factor: expected a number > 0, got -1"),
    (["sample", "--components", "2.5", "--out", "o"], "expected an integer, got '2.5'"),
    (["invert", "--image", "i.png", "--steps", "0", "--out", "o"], "--steps: expected an integer >= 1"),
    (["invert", "--image", "i.png", "--lr", "nan", "--out", "o"], "--lr: expected a finite number"),
    (["invert", "--image", "i.png", "--weight-decay", "-1", "--out", "o"], "--weight-decay: expected a number >= 0"),
    (["invert", "--image", "i.png", "--checkpoint-every", "0", "--out", "o"], "--checkpoint-every: expected an"),
    (["collect", "r", "o", "--shard-size", "0"], "--shard-size: expected an integer >= 1"),
    (["build", "d", "o", "-k", "0"], "--components: expected an integer >= 1, got 0"),
    (["build", "d", "o", "-k", "2", "--power-iterations", "-1"], "--power-iterations: expected an integer >= 0"),
    # numbers that overflow once converted, and unbounded work (issue 37)
    (["invert", "--image", "i.png", "--lr", "1e300", "--out", "o"],
     "--lr: expected a number <= 10000, got 1e+300: Adam moves each parameter by about the learning rate a step"),
    (["invert", "--image", "i.png", "--weight-decay", "1e39", "--out", "o"], "--weight-decay: expected a number <="),
    (["build", "d", "o", "-k", "2", "--power-iterations", "1000000000"],
     "--power-iterations: expected at most 100, got 1000000000: each is a pass over the whole dataset"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(argv[:3]) for argv, _ in CASES])
def test_a_bad_number_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert err.splitlines()[-1].startswith(f"w2w {argv[0]}: error: argument") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cuda_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ArgumentError, match="device 'cuda': (this torch is built without CUDA|no CUDA GPU is visible)"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ArgumentError, match="MPS is not available"):
            resolve_device("mps")


def test_the_checks_give_the_value_back_or_name_it():
    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(0) == 0
    with pytest.raises(ArgumentError, match="seed: expected an integer from 0 to"):
        check_seed(SEED_MAX + 1)
    with pytest.raises(ArgumentError, match="seed: expected an integer, got 1.5"):
        check_seed(1.5)
    assert check_size(512) == 512 and check_int(3, "x", 1, 3) == 3
    assert check_number("0.5", "lr", above=0.0) == 0.5
    for bad in (math.nan, math.inf, "x"):
        with pytest.raises(ArgumentError, match="lr: expected a"):
            check_number(bad, "lr")


def test_the_library_refuses_the_same_values(toy_space):
    from lora_w2w.storage import load_space

    space = load_space(toy_space)
    k = space.coefficients.shape[1]
    for kwargs, message in (({"num": 0}, "number of models: expected an integer >= 1"),
                            ({"num": 1, "seed": 2**63}, "seed: expected an integer from 0"),
                            ({"num": 1, "k": k + 1}, f"components: expected an integer from 1 to {k}"),
                            ({"num": 1, "factor": math.nan}, "factor: expected a finite number")):
        with pytest.raises(ArgumentError, match=message):
            sample_models(space, **kwargs)
    with pytest.raises(ArgumentError, match="inversion steps: expected an integer >= 1, got 0"):
        InversionConfig(steps=0)
    with pytest.raises(ArgumentError, match="inversion lr: expected a finite number"):
        InversionConfig(lr=math.inf)
    with pytest.raises(ArgumentError, match="seed: expected an integer from 0"):
        build_space(None, 2, config=BuildConfig(seed=-1))
    for memory in ("1e400", "1e999GB", 10**400, "0"):  # not OverflowError
        with pytest.raises(ArgumentError, match="memory .*: expected a size from 1 byte up to 1 PiB"):
            build_space(None, 2, config=BuildConfig(memory=memory))
    with pytest.raises(ArgumentError, match="power iterations: expected at most 100, got 101: each is a pass"):
        build_space(None, 2, config=BuildConfig(power_iterations=101))
    with pytest.raises(ArgumentError, match="inversion lr: expected a number <= 10000"):
        InversionConfig(lr=1e300)
    with pytest.raises(ArgumentError, match="factor: expected a number <= 1000"):
        sample_models(space, 1, factor=1e6)
    from lora_w2w.editing import attribute_directions

    with pytest.raises(ArgumentError, match=f"components: expected an integer from 1 to {k}, got {k + 1}"):
        attribute_directions(space, ["Male"], k + 1)


def test_sample_models_streams_and_refuses_a_list_past_memory(toy_space, monkeypatch):
    from lora_w2w.storage import load_space

    space = load_space(toy_space)
    first = [m.coefficients for m in iter_sample_models(space, 3, seed=5)]
    assert all(torch.equal(a, b.coefficients) for a, b in zip(first, sample_models(space, 3, seed=5)))
    assert next(iter_sample_models(space, 10**15, seed=5)).coefficients.equal(first[0])  # no list of 10^15
    monkeypatch.setattr(sampling, "available_memory", lambda device: 2**30)
    with pytest.raises(ArgumentError, match=r"1,000,000,000 models need about .* GB, this machine has 1.0 GB free: "
                                            r"at most [\d,]+ fit in a list"):
        sample_models(space, 10**9)


def test_huge_counts_and_sizes_are_refused_with_what_fits(toy_world, toy_space, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--space", str(toy_space), "--num", str(10**15), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "1,000,000,000,000,000 models need about" in err, err
    assert "free: at most" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / "s").glob("sample_*"))
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 2**30)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base", str(toy_world / "base"), "--size", str(2**20), "--steps", "1", "--device", "cpu",
              "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "4 images of 1048576 x 1048576 pixels need about" in err and "free: at most --size" in err, err
    fits = int(err.split("at most --size ")[1].split()[0])
    pipe = pipeline.load_base_pipeline(str(toy_world / "base"), "cpu", progress=False)
    assert fits % 8 == 0 and pipeline.generation_bytes(pipe, 4, fits, fits) <= 2**30
    assert pipeline.generation_bytes(pipe, 4, fits + 8, fits + 8) > 2**30
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base", str(toy_world / "base"), "--space", str(toy_space), "--edited", "m.safetensors",
              "--injection-timestep", "5000", "--out", str(tmp_path / "g")])
    assert exit_info.value.code == 2 and "--injection-timestep: expected an integer from 0 to 1000, got 5000" in \
        capsys.readouterr().err
    with pytest.raises(ArgumentError, match="injection timestep: expected an integer from 0 to 1000"):
        pipeline.generate_from_weights(pipe, None, None, "sks person", edited=torch.zeros(1), injection_timestep=1001)
    with pytest.raises(SystemExit) as exit_info:  # the scheduler's training timesteps bound the steps
        main(["generate", "--base", str(toy_world / "base"), "--steps", "1001", "--out", str(tmp_path / "g")])
    assert exit_info.value.code == 2 and "--steps: expected an integer from 1 to 1000, got 1001" in \
        capsys.readouterr().err
    for steps in (0, 1001):
        with pytest.raises(ArgumentError, match="steps: expected an integer from 1 to 1000"):
            pipeline.generate_from_weights(pipe, None, None, "sks person", num_inference_steps=steps)
    assert not (tmp_path / "g").exists()


def test_a_job_far_beyond_the_usual_size_says_its_time_before_the_rest(toy_world, toy_space, tmp_path, capsys,
                                                                       monkeypatch):
    """Thousands of seeds or models, here past a threshold lowered to 2: the first unit, timed, then the
    estimate of the rest in one line; the images are those of one batch."""
    from lora_w2w import estimate

    generate = ["generate", "--base", toy_world / "base", "--space", toy_space, "--seeds", "0", "1", "2", "--steps",
                "1", "--device", "cpu", "--out"]
    assert main([str(a) for a in generate + [tmp_path / "usual"]]) == 0
    assert "take about" not in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "LARGE_GENERATION", 2)
    assert main([str(a) for a in generate + [tmp_path / "large"]]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "take about" in line]
    assert len(said) == 1 and re.fullmatch(r"3 images: the first took [\d.]+ s; the other 2 take about [\d.]+ s",
                                           said[0]), said
    for seed in range(3):
        usual, large = (np.asarray(Image.open(tmp_path / run / f"seed_{seed:04d}.png"), np.int16)
                        for run in ("usual", "large"))
        assert np.abs(usual - large).max() <= 1  # one batch or two: the same images (here bit for bit)
    monkeypatch.setattr(estimate, "LARGE_SAMPLING", 2)
    assert main(["sample", "--space", str(toy_space), "--num", "3", "--out", str(tmp_path / "samples")]) == 0
    assert re.search(r"^3 models: the first took [\d.]+ s; the other 2 take about", capsys.readouterr().err, re.M)
