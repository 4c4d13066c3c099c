"""Dreambooth LoRA training: the solo script (PEFT adapter) and the many-identities trainer agree."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from lora_w2w import train_identities
from lora_w2w.cli import main as w2w
from lora_w2w.dataset import collect_folders
from lora_w2w.dreambooth import identities_loss, load_image_folder, train_one
from lora_w2w.errors import LayoutError, W2WError
from lora_w2w.formats import PEFT_CONFIG, PEFT_WEIGHTS, recorded_training
from lora_w2w.tiny import build

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_dreambooth_script", ROOT / "train_dreambooth.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _common(world, steps=4):
    return ["--pretrained_model_name_or_path", str(world / "base"), "--max_train_steps", str(steps),
            "--num_class_images", "4", "--class_inference_steps", "2", "--class_data_dir", str(world / "class"),
            "--train_batch_size", "2", "--learning_rate", "1e-2"]


@pytest.mark.slow
def test_many_identities_equal_their_solo_runs(toy_world, tmp_path):
    faces = toy_world / "faces" / "celeba_generated"
    solo = {}
    for name in ("000000", "000001"):
        args = script.parse_args(["--instance_data_dir", str(faces / name), "--output_dir", str(tmp_path / "solo" / name),
                                  *_common(toy_world)])
        solo[name] = train_one(args)
    args = train_identities.parse_args(["--instance_root", str(faces), "--output_root", str(tmp_path / "multi"),
                                        "--identities_per_batch", "2", "--limit", "2", *_common(toy_world)])
    assert train_identities.train_identities(args) == (["000000", "000001"], [])
    for name, weights in solo.items():
        assert weights.abs().max() > 1e-3  # training moved the weights
        multi, single = (load_file(tmp_path / kind / name / "unet" / PEFT_WEIGHTS) for kind in ("multi", "solo"))
        assert multi.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(multi[key], single[key], rtol=1e-3, atol=1e-4)
        assert (tmp_path / "multi" / name / "unet" / PEFT_CONFIG).read_text() == \
               (tmp_path / "solo" / name / "unet" / PEFT_CONFIG).read_text()
        recorded = [recorded_training(tmp_path / kind / name / "unet") for kind in ("multi", "solo")]
        assert recorded[0] == recorded[1] and recorded[0]["max_train_steps"] == 4 and recorded[0]["seed"] == 0
    # the two identities differ from each other
    a, b = (load_file(tmp_path / "multi" / n / "unet" / PEFT_WEIGHTS) for n in ("000000", "000001"))
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_restart_skips_finished_identities_and_shards_by_process(toy_world, tmp_path):
    faces = toy_world / "faces" / "celeba_generated"
    argv = ["--instance_root", str(faces), "--output_root", str(tmp_path), "--identities_per_batch", "2",
            *_common(toy_world, steps=1)]
    assert train_identities.train_identities(train_identities.parse_args(argv + ["--limit", "1"])) == (["000000"], [])
    before = (tmp_path / "000000" / "unet" / PEFT_WEIGHTS).stat().st_mtime_ns
    assert train_identities.train_identities(train_identities.parse_args(argv)) == (["000001", "000002"], [])
    assert (tmp_path / "000000" / "unet" / PEFT_WEIGHTS).stat().st_mtime_ns == before
    assert train_identities.train_identities(train_identities.parse_args(argv)) == ([], [])
    assert not list(tmp_path.glob("**/.*partial*"))
    shares = [train_identities.train_identities(train_identities.parse_args(
        [*argv, "--output_root", str(tmp_path / "shards"), "--shard", f"{r}/2"]))[0] for r in (0, 1)]
    assert shares == [["000000", "000002"], ["000001"]]
    with pytest.raises(SystemExit):
        train_identities.parse_args([*argv, "--shard", "2/2"])
    # identities a weights dataset holds count as finished: their folders may be deleted once collected
    collect_folders(tmp_path / "shards", tmp_path / "dataset")
    shutil.rmtree(tmp_path / "shards" / "000000")
    skip = [*argv, "--output_root", str(tmp_path / "shards"), "--skip_collected", str(tmp_path / "dataset")]
    assert train_identities.train_identities(train_identities.parse_args(skip)) == ([], [])
    assert not (tmp_path / "shards" / "000000").exists()
    with pytest.raises(LayoutError, match=r"dataset: the dataset's LoRAs are not the ones trained here \(rank 1 vs 2\)"):
        train_identities.train_identities(train_identities.parse_args(
            [*skip, "--output_root", str(tmp_path / "new"), "--lora_r", "2"]))
    # a restart with another recipe would mix two recipes in one weights dataset: refused before training
    with pytest.raises(W2WError, match=r"3 identities \(the first: 000000\) were trained with other settings: "
                                       r"max_train_steps 1 \(asked now: 2\); give another --output-root"):
        train_identities.train_identities(train_identities.parse_args(argv + ["--max_train_steps", "2"]))


def killed_in_call(n: int):
    """A stand-in for identities_loss that computes it until its n-th call, which raises KeyboardInterrupt
    (a job killed in its n-th step)."""
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return identities_loss(*args, **kwargs)
    return loss


@pytest.mark.slow
def test_a_group_killed_mid_run_resumes_from_its_checkpoint_and_ends_as_if_uninterrupted(toy_world, tmp_path):
    faces = toy_world / "faces" / "celeba_generated"

    def argv(out):
        return ["--instance_root", str(faces), "--output_root", str(out), "--identities_per_batch", "2", "--limit", "2",
                "--checkpointing_steps", "2", *_common(toy_world, steps=5)]

    assert train_identities.train_identities(train_identities.parse_args(argv(tmp_path / "whole")))[0] == ["000000",
                                                                                                         "000001"]
    # steps 1-2 checkpointed, step 3 done and lost, killed in step 4
    with mock.patch.object(train_identities, "identities_loss", side_effect=killed_in_call(4)), \
            pytest.raises(KeyboardInterrupt):
        train_identities.train_identities(train_identities.parse_args(argv(tmp_path / "killed")))
    checkpoint = tmp_path / "killed" / ".checkpoint-000000.pt"
    assert checkpoint.is_file() and not (tmp_path / "killed" / "000000").exists()
    with mock.patch.object(train_identities, "identities_loss", wraps=identities_loss) as resumed:
        train_identities.train_identities(train_identities.parse_args(argv(tmp_path / "killed")))
    assert resumed.call_count == 3 and not checkpoint.exists()  # steps 3-5 only; the group's state is gone
    for name in ("000000", "000001"):
        whole, again = (load_file(tmp_path / run / name / "unet" / PEFT_WEIGHTS) for run in ("whole", "killed"))
        assert all(torch.equal(whole[key], again[key]) for key in whole)


@pytest.mark.parametrize("other, message", [("group", "a checkpoint of other identities or settings, ignored"),
                                            ("garbage", "unreadable checkpoint ignored, the group starts over")])
def test_a_checkpoint_of_another_group_or_unreadable_is_ignored_with_a_warning(toy_world, tmp_path, other, message):
    faces = toy_world / "faces" / "celeba_generated"
    argv = ["--instance_root", str(faces), "--output_root", str(tmp_path), "--checkpointing_steps", "1",
            *_common(toy_world, steps=2)]
    checkpoint = tmp_path / ".checkpoint-000000.pt"
    if other == "group":  # the state of the group 000000 + 000001 after one step
        with mock.patch.object(train_identities, "identities_loss", side_effect=killed_in_call(2)), \
                pytest.raises(KeyboardInterrupt):
            train_identities.train_identities(train_identities.parse_args(argv + ["--identities_per_batch", "2"]))
        assert checkpoint.is_file()
    else:
        checkpoint.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=message):  # the group of 000000 alone
        assert train_identities.train_identities(train_identities.parse_args(argv + ["--limit", "1"]))[0] == ["000000"]
    assert not checkpoint.exists()


def test_running_out_of_memory_says_to_train_fewer_identities_at_once(toy_world, tmp_path, capsys):
    faces = toy_world / "faces" / "celeba_generated"
    argv = ["--instance_root", str(faces), "--output_root", str(tmp_path), "--identities_per_batch", "2",
            *_common(toy_world, steps=1)]
    with mock.patch.object(train_identities, "identities_loss", side_effect=torch.OutOfMemoryError("CUDA OOM")):
        assert train_identities.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: out of memory training 2 identities at once on cpu: pass a smaller --identities-per-batch" in err
    assert "Traceback" not in err


def test_instance_folders_are_read_forgivingly_and_refused_clearly(tmp_path):
    from PIL import Image

    folder = tmp_path / "id"
    folder.mkdir()
    Image.new("RGBA", (50, 30), (255, 0, 0, 128)).save(folder / "a.png")
    Image.new("L", (20, 40), 128).save(folder / "b.jpg")
    Image.new("P", (64, 64)).save(folder / "c.gif")
    (folder / "caption.txt").write_text("a person")
    with pytest.warns(UserWarning, match="skipped 1 non-image files"):
        images = load_image_folder(folder, 32)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(W2WError, match="d.png: not a readable image"):
        load_image_folder(folder, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(W2WError, match="empty: no images"):
        load_image_folder(tmp_path / "empty", 32)


def test_script_errors_before_training(toy_world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--instance_data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"), *_common(toy_world)]
    assert script.main(argv + ["--class_data_dir", str(tmp_path / "no_class_images_yet")]) == 2
    assert "empty: no images" in capsys.readouterr().err
    assert not (tmp_path / "no_class_images_yet").exists()  # refused before generating class images
    assert script.main(argv + ["--lora_target_modules", "to_x"]) == 2
    assert "no Linear layer named ['to_x']" in capsys.readouterr().err
    assert not (tmp_path / "out" / "unet").exists()
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "--max_train_steps" in capsys.readouterr().out


def test_a_bad_identity_folder_is_skipped_not_fatal(toy_world, tmp_path, capsys):
    faces = tmp_path / "faces"
    for name in ("000000", "000001"):
        (faces / name).mkdir(parents=True)
        for image in (toy_world / "faces" / "celeba_generated" / name).iterdir():
            (faces / name / image.name).write_bytes(image.read_bytes())
    (faces / "000000" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="identity 000000 skipped: .*broken.png: not a readable image"):
        code = train_identities.main(["--instance_root", str(faces), "--output_root", str(tmp_path / "out"),
                                      *_common(toy_world, steps=1)])
    assert code == 2 and "1 identity folders refused: 000000" in capsys.readouterr().err
    assert (tmp_path / "out" / "000001" / "unet" / PEFT_WEIGHTS).is_file()
    assert not (tmp_path / "out" / "000000").exists()


def test_w2w_train_identities_prints_its_warnings_in_one_line(toy_world, tmp_path, capsys):
    faces = tmp_path / "faces"
    (faces / "000000").mkdir(parents=True)
    for image in (toy_world / "faces" / "celeba_generated" / "000000").iterdir():
        (faces / "000000" / image.name).write_bytes(image.read_bytes())
    (faces / "000000" / "notes.txt").write_text("not an image")
    code = w2w(["train-identities", "--instance_root", str(faces), "--output_root", str(tmp_path / "out"),
                *_common(toy_world, steps=1)])
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "non-image files" in line]
    assert code == 0 and len(warned) == 1 and warned[0].startswith("w2w: warning: "), err


def test_noisy_inputs_follow_the_cached_latents_device():
    """The sampler draws on the CPU (runs agree across devices); the step's inputs go where the cached
    latents are (CUDA in practice; the meta device stands in for it here)."""
    from diffusers import DDPMScheduler

    from lora_w2w.bases import Conditioning, StableDiffusion1
    from lora_w2w.diffusion import StepSampler
    from lora_w2w.dreambooth import IdentityData, SharedData, noisy_inputs

    latents = torch.zeros(3, 4, 8, 8, device="meta")
    text = Conditioning({"encoder_hidden_states": torch.zeros(1, 7, 16, device="meta")})
    shared = SharedData(latents, latents, text, text, (0.18215, None), DDPMScheduler(), StableDiffusion1({}, {}))
    sampler = StepSampler(0, num_instance=3, num_class=3, batch_size=1, latent_shape=(4, 8, 8),
                          num_train_timesteps=1000)
    noisy, timesteps, conditioning, target = noisy_inputs(IdentityData("a", latents, latents, sampler), shared,
                                                          sampler.next())
    embeddings = conditioning.batched["encoder_hidden_states"]
    assert {t.device.type for t in (noisy, timesteps, embeddings, target)} == {"meta"}
    assert noisy.shape == target.shape == (2, 4, 8, 8) and embeddings.shape == (2, 7, 16)


def test_identity_banks_compute_as_the_plain_unet_and_put_it_back(toy_world):
    """Inside identity_banks, K identities' LoRAs and the split GEGLUs give each identity the output and
    the input gradient of the plain UNet carrying that identity's LoRA alone; afterwards (also after an
    error) every module is the original object again."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    from lora_w2w.layout import LoraLayout
    from lora_w2w.network import FusedLora

    unet = UNet2DConditionModel.from_pretrained(toy_world / "base" / "unet").requires_grad_(False)
    layout = LoraLayout.from_unet(unet)
    before = dict(unet.named_modules())
    weights = torch.randn(2, layout.numel, generator=torch.Generator().manual_seed(0)) * 0.1  # (K, N)
    size = unet.config.sample_size
    sample = torch.randn(4, unet.config.in_channels, size, size, requires_grad=True)  # identity-major, 2 each
    text = torch.randn(4, 7, unet.config.cross_attention_dim)
    with train_identities.identity_banks(unet, layout, weights):
        kinds = [type(m) for m in unet.modules()]
        assert GEGLU not in kinds and train_identities.SplitGEGLU in kinds
        batched = unet(sample, 10, text).sample
        (grad,) = torch.autograd.grad(batched.square().sum(), sample)
    for k in range(2):
        with FusedLora(unet, layout, weights[k]):
            x = sample[2 * k:2 * k + 2].detach().requires_grad_()
            solo = unet(x, 10, text[2 * k:2 * k + 2]).sample
            (solo_grad,) = torch.autograd.grad(solo.square().sum(), x)
        torch.testing.assert_close(batched[2 * k:2 * k + 2], solo, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad[2 * k:2 * k + 2], solo_grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError), train_identities.identity_banks(unet, layout, weights):
        raise RuntimeError("a failing step")
    assert dict(unet.named_modules()) == before  # the same module objects (nn.Module compares by identity)


@pytest.mark.slow
def test_train_sh_trains_a_tiny_world_identity_through_accelerate(tmp_path):
    """train.sh's tiny example, as a user runs it (accelerate launch, the committed tiny base), cut to 2 steps
    and 2 class images: a LoRA folder in the released format, trained with the tiny recipe's settings."""
    bin_dir = str(Path(sys.executable).parent)  # python and accelerate of this environment
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FACES=str(tmp_path / "faces"),
               OUT=str(tmp_path / "out"), MAX_TRAIN_STEPS="2", NUM_CLASS_IMAGES="2")
    done = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = tmp_path / "out" / "loras" / "000000" / "unet"
    assert (adapter / PEFT_WEIGHTS).is_file() and (adapter / PEFT_CONFIG).is_file()
    settings = recorded_training(adapter)
    assert settings["learning_rate"] == 3e-3 and settings["max_train_steps"] == 2
    recipe = {key: value for key, value in build.LORA_RECIPE.items()
              if key in settings and key not in ("max_train_steps", "num_class_images")}
    assert recipe and all(settings[key] == value for key, value in recipe.items()), (recipe, settings)
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2


def test_train_identities_flags_are_kebab_case_and_take_the_original_spellings(capsys):
    kebab = train_identities.parse_args(["--instance-root", "i", "--output-root", "o", "--identities-per-batch", "3",
                                         "--learning-rate", "0.5", "--lora-target-modules", "to_k", "--base", "b",
                                         "--no-with-prior-preservation"])
    original = train_identities.parse_args(["--instance_root", "i", "--output_root", "o", "--identities_per_batch",
                                            "3", "--learning_rate", "0.5", "--lora_target_modules", "to_k",
                                            "--pretrained_model_name_or_path", "b", "--no-with_prior_preservation"])
    assert vars(kebab) == vars(original) and kebab.identities_per_batch == 3 and kebab.with_prior_preservation is False
    with pytest.raises(SystemExit):
        train_identities.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--identities-per-batch" in shown and "--max-train-steps" in shown and "--no-use-lora" in shown
    assert "--identities_per_batch" not in shown and "--max_train_steps" not in shown  # one form in --help
    with pytest.raises(SystemExit):
        train_identities.parse_args(["--instance-root", "i", "--output-root", "o", "--max_train_steps", "0"])
    assert "--max-train-steps must be >= 1, got 0" in capsys.readouterr().err  # named as --help names it
    for flag, value, message in (("--learning_rate", "1e300", "--learning-rate: expected a number <= 10000, got "
                                                              "1e+300: Adam moves each parameter"),
                                 ("--adam_weight_decay", "nan", "--adam-weight-decay: expected a finite number")):
        with pytest.raises(SystemExit):  # a number torch cannot use, refused before any model loads
            train_identities.parse_args(["--instance-root", "i", "--output-root", "o", flag, value])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    shown = capsys.readouterr().out  # the original's script keeps the original's spellings
    assert "--max_train_steps" in shown and "--pretrained_model_name_or_path" in shown
    assert "--max-train-steps" not in shown


def test_an_accumulated_step_is_one_step_on_the_batches_mean_gradient():
    from lora_w2w.dreambooth import accumulated_step

    batches = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))  # 3 batches of 4 samples

    def trained(accumulate: bool) -> torch.Tensor:
        layer = torch.nn.Linear(2, 1, bias=False)
        torch.nn.init.constant_(layer.weight, 0.5)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        if accumulate:
            draws = iter(batches)
            last = accumulated_step(lambda: layer(next(draws)).square().mean(), optimizer, batches=3)
            assert torch.isclose(last, (batches[2].sum(1) * 0.5).square().mean())  # the last batch's, unscaled
        else:
            layer(batches.reshape(12, 2)).square().mean().backward()
            optimizer.step()
        return layer.weight.detach().clone()

    assert torch.allclose(trained(accumulate=True), trained(accumulate=False), atol=1e-6)
    assert not torch.equal(trained(accumulate=True), torch.full((1, 2), 0.5))


@pytest.mark.slow
def test_class_images_are_generated_before_the_shares_as_training_makes_them(toy_world, tmp_path):
    faces = toy_world / "faces" / "celeba_generated"
    argv = ["--instance-root", str(faces), "--output-root", str(tmp_path / "out"), *_common(toy_world, steps=1)]
    args = train_identities.parse_args([*argv, "--class-data-dir", str(tmp_path / "before"), "--limit", "1"])
    train_identities.generate_class_images(args)
    made = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert made == ["00000.png", "00001.png", "00002.png", "00003.png"] and not (tmp_path / "out").exists()
    train_identities.train_identities(train_identities.parse_args([*argv, "--class-data-dir", str(tmp_path / "during"),
                                                                   "--limit", "1"]))
    for name in made:  # the images training would have made itself
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "during" / name).read_bytes()
