"""The tiny Stable Diffusion pipeline: its CLIP tokenizer, SD1.5's architecture at 16 x 16 latents,
saving and offline loading as a diffusers folder, CPU speed, and the base training run (--toy)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from lora_w2w.tiny import synthetic
from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline, build_tokenizer, load_pipeline, save_pipeline
from lora_w2w.tiny.train_base import main, parse_args


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(synthetic.CAPTION_WORDS, tmp_path_factory.mktemp("tokenizer"), max_length=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """The default-sized pipeline, randomly initialised, saved and reloaded."""
    path = tmp_path_factory.mktemp("pipe") / "base"
    save_pipeline(build_pipeline(TinyPipelineConfig(), seed=0, tokenizer=tokenizer), path)
    return path, load_pipeline(path)


def tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_words_are_single_tokens(tokenizer):
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokens(tokenizer, "a photo of sks person") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "person</w>"]
    for word in synthetic.CAPTION_WORDS:
        assert len(tokens(tokenizer, word)) == 1, (word, tokens(tokenizer, word))


def test_tokenizer_unknown_words_split_into_characters(tokenizer):
    pieces = tokens(tokenizer, "Zebra, OK")
    assert len(pieces) > 3 and tokenizer.unk_token not in pieces, pieces
    ids = tokenizer("zebra").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra"


def test_tokenizer_pads_to_max_length_and_fits_every_caption(tokenizer):
    batch = tokenizer(["sks person", ""], padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 32)
    assert batch.input_ids[0, :4].tolist() == [tokenizer.bos_token_id, *tokenizer("sks person",
                                               add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert (batch.input_ids[0, 4:] == tokenizer.pad_token_id).all()
    longest = max(len(tokenizer(synthetic.caption(synthetic.sample_identity(s), smiling=True)).input_ids) for s in range(500))
    assert longest <= tokenizer.model_max_length, longest


# -----------------------------------------------------------------------------
# architecture, saving, loading, speed


@pytest.mark.slow
def test_unet_has_sd15_lora_targets_at_16x16(saved):
    unet, text_encoder = saved[1].unet, saved[1].text_encoder
    side = {}  # Transformer2DModel name -> side of the latent grid it attends over

    def record(name):
        return lambda module, args: side.__setitem__(name, args[0].shape[-1])

    transformers = {n: m for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"}
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in transformers.items()]
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 32, text_encoder.config.hidden_size))
    for hook in hooks:
        hook.remove()
    at_16 = sorted(n for n, s in side.items() if s == 16)
    assert sorted(set(side.values())) == [4, 8, 16], side  # mid block at 4 x 4
    assert at_16[0].startswith("down_blocks.0.") and at_16[-1].startswith(f"up_blocks.{len(unet.up_blocks) - 1}.")
    for name in at_16:
        block = transformers[name].transformer_blocks[0]
        for attn in (block.attn1, block.attn2):
            assert isinstance(attn.to_q, torch.nn.Linear) and isinstance(attn.to_v, torch.nn.Linear)
        assert block.attn2.to_v.in_features == text_encoder.config.hidden_size  # cross-attention on the text


def test_saved_pipeline_loads_offline_like_sd15(saved):
    path, pipe = saved
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (path / "tokenizer" / name).is_file(), name
    assert tokens(pipe.tokenizer, "sks") == ["sks</w>"]
    again = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    torch.testing.assert_close(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
    megabytes = sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20
    assert megabytes < 15, megabytes


def test_pipeline_generates_64px_fast(saved):
    pipe = saved[1]
    stamps = []

    def on_step(pipe, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: timings of a shared machine are not inflated by thread contention
    try:
        image = pipe("a photo of sks person", num_inference_steps=6, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images[0]
    finally:
        torch.set_num_threads(threads)
    assert image.size == (64, 64) and image.mode == "RGB"
    step_seconds = float(np.min(np.diff(stamps)))  # the step's cost, without other processes' share
    assert step_seconds < 0.3, f"{step_seconds:.3f} s per denoising step (classifier-free guidance, batch 2)"


# -----------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    argv = ["--out", str(root / "base"), "--work-dir", str(root / "work"), "--toy", "--threads", "1", "--no-progress"]
    return argv, main(parse_args(argv))


@pytest.mark.slow
def test_toy_training_decreases_losses_and_writes_a_loadable_folder(toy_run):
    argv, report = toy_run
    out = parse_args(argv).out
    vae_loss, mse = report["vae"]["loss"], report["unet"]["epsilon_mse"]
    assert len(vae_loss) >= 3 and vae_loss[-1] < 0.9 * vae_loss[0], vae_loss
    assert len(mse) >= 3 and mse[-1] < mse[0], mse
    pipe = load_pipeline(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert json.loads((Path(out) / "training.json").read_text())["images"] == 8 * 2  # identities x views
    assert (Path(out) / "samples.png").is_file() and (Path(out) / "reconstructions.png").is_file()
    image = pipe("a photo of a young man with glasses", num_inference_steps=2).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_toy_training_resumes_from_its_checkpoints(toy_run):
    argv, report = toy_run
    first = load_pipeline(parse_args(argv).out).unet.state_dict()
    again = main(parse_args(argv))  # checkpoints are complete: no step is trained again
    assert again["unet"]["epsilon_mse"] == report["unet"]["epsilon_mse"]
    for name, tensor in load_pipeline(parse_args(argv).out).unet.state_dict().items():
        torch.testing.assert_close(tensor, first[name], msg=name)
    steps = report["unet"]["steps"] + 10
    longer = main(parse_args([*argv, "--unet-steps", str(steps)]))  # a resumed run may be lengthened
    assert longer["unet"]["steps"] == steps
    assert longer["unet"]["epsilon_mse"][: len(report["unet"]["epsilon_mse"])] == report["unet"]["epsilon_mse"]


@pytest.mark.parametrize("flags", [["--caption-dropout", "1.5"], ["--unet-steps", "0"],
                                   ["--vae-full-steps", "99", "--vae-steps", "10"]])
def test_bad_flags_are_rejected(flags):
    with pytest.raises(SystemExit):
        parse_args(["--out", "unused", *flags])


@pytest.mark.slow
def test_committed_base_loads_offline_and_generates_faces_fast():
    """files/tiny/base loads like realistic-vision would, and its samples are faces the evaluator reads."""
    import time
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from lora_w2w.tiny.evaluator import Evaluator

    root = Path(__file__).resolve().parents[1] / "files" / "tiny"
    pipe = StableDiffusionPipeline.from_pretrained(root / "base", local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    images = pipe(["a photo of a young woman with blond hair and glasses"] * 4, num_inference_steps=10,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    assert (time.perf_counter() - start) / 10 < 1.0  # seconds per denoising step, batch 4 with guidance
    pred = Evaluator.load(root / "evaluator.safetensors").predict(images)
    assert (pred.face_confidence > 0.5).all()
    assert (pred.attributes["Blond_Hair"] > 0).mean() >= 0.75 and (pred.attributes["Eyeglasses"] > 0).mean() >= 0.75
