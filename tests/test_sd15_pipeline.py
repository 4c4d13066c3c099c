"""The whole command line on Stable Diffusion 1.5's own architecture, the one place where its shapes (768-wide
cross-attention, 64 LoRA layers, N = 99,648) meet the real pipeline code: a random-weight pipeline of SD1.5's
shapes saved as a diffusers folder, and the released files of its layout imported with `w2w import-official`.
Every command runs at 64 px (the UNet's sample_size is 8 latents; the architecture is SD1.5's) with 2 steps.

The file takes 47 s of CPU time (user + sys) and peaks at 6.7 GB of RSS (a float32 pipeline loaded from its float16
folder); 2 min 50 s of wall time on a 2-core machine shared at load average 13. `w2w evaluate --faces` (a Dreambooth
LoRA trained on SD1.5's UNet) with the fixture alone: 2 min 41 s of CPU, 6 min of wall time at load average 6-8.
"""
import importlib.util
import json
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import write_released_files
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from lora_w2w.cli import main as w2w
from lora_w2w.formats import load_kohya, load_peft
from lora_w2w.layout import sd15_layout
from lora_w2w.storage import load_model, load_space
from lora_w2w.tiny.base_model import build_tokenizer, save_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "inversion" / "images" / "face.png"
LATENT_SIZE = 8  # the UNet's sample_size: 64 px images through SD1.5's 8x VAE
STEPS = 2
K, M = 8, 20
WORDS = ("a", "photo", "of", "sks", "person")  # the tokenizer's vocabulary: the prompts used here
# CLIP ViT-L/14's text transformer, as in SD1.5's text_encoder/config.json
TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
# SD1.5's vae/config.json and scheduler/scheduler_config.json
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def build_sd15_pipeline(tokenizer_dir: Path) -> StableDiffusionPipeline:
    """A random-weight StableDiffusionPipeline of SD1.5's architecture, in float16 (half the disk; the loaders
    cast to float32 on the CPU)."""
    tokenizer = build_tokenizer(WORDS, tokenizer_dir, max_length=TEXT_ENCODER["max_position_embeddings"])
    unet_config = json.loads(files("lora_w2w").joinpath("data/sd15_unet_config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**unet_config, "sample_size": LATENT_SIZE})
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(torch.float16)


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    """(root, the released tensors): root/base the pipeline folder, root/released the released files of
    SD1.5's layout (K = 8, M = 20), root/official the space `w2w import-official` made of them."""
    root = tmp_path_factory.mktemp("sd15")
    save_pipeline(build_sd15_pipeline(root / "tokenizer"), root / "base")
    (root / "released").mkdir()
    released = write_released_files(root / "released", sd15_layout(), K, M)
    assert w2w(["import-official", str(root / "released"), str(root / "official"), "--trust-pickle"]) == 0
    yield root, released
    shutil.rmtree(root)  # 2 GB: not kept among pytest's last temporary folders


def run(*args) -> None:
    assert w2w([str(a) for a in args]) == 0


def test_the_pipeline_has_sd15s_shapes(sd15):
    root, _ = sd15
    unet = json.loads((root / "base" / "unet" / "config.json").read_text())
    assert (unet["cross_attention_dim"], unet["block_out_channels"]) == (768, [320, 640, 1280, 1280])
    space = load_space(root / "official")
    assert (len(space.layout), space.num_weights, space.layout) == (64, 99_648, sd15_layout())


def test_edit_generate_and_export(sd15, tmp_path, capsys):
    root, released = sd15
    base, space_dir, model = root / "base", root / "official", root / "released" / "w2wmodel.pt"
    run("edit", "--space", space_dir, "--model", model, "--edit", "Male=2", "--out", tmp_path / "edited.safetensors")
    run("generate", "--base", base, "--space", space_dir, "--model", model, "--edited", tmp_path / "edited.safetensors",
        "--injection-timestep", 700, "--seeds", 0, 1, "--steps", STEPS, "--device", "cpu", "--out", tmp_path / "gen")
    for name in ("seed_0000.png", "seed_0001.png"):
        assert Image.open(tmp_path / "gen" / name).size == (64, 64)
    run("export", "--space", space_dir, "--model", tmp_path / "edited.safetensors", "--format", "peft",
        "--out", tmp_path / "edited_lora")
    space = load_space(space_dir)
    edited = load_model(tmp_path / "edited.safetensors")
    torch.testing.assert_close(load_peft(space.layout, tmp_path / "edited_lora"), edited.weights(space))
    assert not torch.equal(edited.coefficients, released["w2wmodel"][0])


def test_invert_exports_kohya_and_project_takes_it_back(sd15, tmp_path, capsys):
    root, _ = sd15
    space_dir, out = root / "official", tmp_path / "face.safetensors"
    run("invert", "--base", root / "base", "--space", space_dir, "--image", FACE, "--steps", STEPS, "--device", "cpu",
        "--out", out, "--export", "kohya")
    space, model = load_space(space_dir), load_model(out)
    assert model.space_id == space.id and model.coefficients.shape == (K,)
    assert float(model.coefficients.abs().max()) > 0.05  # the two Adam steps (lr 0.1) moved it from zero
    torch.testing.assert_close(load_kohya(space.layout, tmp_path / "face_lora.safetensors"), model.weights(space))
    capsys.readouterr()
    run("project", tmp_path / "face_lora.safetensors", "--space", space_dir, "--out", tmp_path / "back.safetensors")
    assert "standardized residual |z - cV| / |z| = 0.0000" in capsys.readouterr().out
    back = load_model(tmp_path / "back.safetensors").coefficients
    assert float((back - model.coefficients).norm() / model.coefficients.norm()) < 1e-3


def test_invert_script_reads_the_released_files_as_they_are(sd15, tmp_path):
    """inversion/invert.py with --dim_path: the released weight_dimensions.pt converted on the fly into the
    space `w2w import-official` made (the same id)."""
    root, _ = sd15
    spec = importlib.util.spec_from_file_location("invert_script", ROOT / "inversion" / "invert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    released = root / "released"
    script.main(script.parse_args([
        "--base", str(root / "base"), "--mean_path", str(released / "mean.pt"), "--std_path", str(released / "std.pt"),
        "--v_path", str(released / "V.pt"), "--dim_path", str(released / "weight_dimensions.pt"), "--image", str(FACE),
        "--epochs", str(STEPS), "--device", "cpu", "--diffusers_format", "--save_name", str(tmp_path / "out")]))
    space = load_space(root / "official")
    model = load_model(tmp_path / "out" / "w2wmodel.safetensors")
    assert model.space_id == space.id and model.coefficients.shape == (K,)
    torch.testing.assert_close(load_peft(space.layout, tmp_path / "out" / "unet"), model.weights(space))


def test_evaluate_runs_table2_on_a_photograph(sd15, astronaut, tmp_path):
    """`w2w evaluate --faces`: the astronaut aligned and inverted, a 1-image Dreambooth-LoRA trained on her, each
    model's images of a prompt scored by dlib (random weights: the scores mean nothing; the path runs and the
    report is complete)."""
    root, _ = sd15
    (tmp_path / "faces").mkdir()
    astronaut.save(tmp_path / "faces" / "astronaut.png")
    prompts = ["a photo of sks person"]  # one: each prompt costs a generation per model on SD1.5's UNet
    run("evaluate", "--base", root / "base", "--space", root / "official", "--faces", tmp_path / "faces",
        "--prompts", *prompts, "--steps", STEPS, "--seeds", 1, "--inversion-steps", STEPS, "--dreambooth-steps", STEPS,
        "--class-images", 1, "--out", tmp_path / "report.json", "--work", tmp_path / "work")
    report = json.loads((tmp_path / "report.json").read_text())
    table2 = report["table2"]
    assert report["space_id"] == load_space(root / "official").id and report["runs"]["table2"]["wall_s"] > 0
    assert set(table2) >= {"w2w", "dreambooth_1", "photographs", "prompts", "identities", "steps", "config"}
    assert "dreambooth_multi" not in table2  # one photograph of the person: no multi-image baseline
    assert table2["photographs"] == {"astronaut": [str(tmp_path / "faces" / "astronaut.png")]}
    assert table2["steps"] == {"w2w": STEPS, "dreambooth_1": STEPS} and table2["embedder"] == "dlib"
    for name in ("w2w", "dreambooth_1"):
        row = table2[name]
        assert row["images"] == len(prompts) and 0 <= row["no_face"] <= len(prompts)
        assert list(row["per_prompt"]) == prompts and len(row["per_identity"]) == 1
        assert row["paper_id_score"] in (0.64, 0.43)
        similarity = row["identity_similarity"]
        assert similarity is None if row["no_face"] == len(prompts) else -1 <= similarity <= 1
