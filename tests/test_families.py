"""Base families (`lora_w2w.bases`): Stable Diffusion 2 with v-prediction, Stable Diffusion XL and FLUX.1 end to
end on random-weight pipelines built here (no download), the way diffusers' own pipeline tests build their
dummy components; the full-size layouts of SD1.5, SDXL and FLUX.1-dev from the configs w2w ships; the families
chosen from the pipelines' classes and configs, and what a pipeline of no known family or a space of
another family gets.

Each end-to-end test takes 2-6 s on 2 cores shared at load average 4.6 (SD2 1.7 s, SDXL 2.5 s, FLUX 5.6 s; the
file 20 s), 17-21 s at load average 9-10 (the file 70 s).
"""
import importlib.util
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from diffusers.loaders.lora_conversion_utils import (_convert_kohya_flux_lora_to_diffusers,
                                                     _convert_non_diffusers_lora_to_diffusers,
                                                     _maybe_map_sgm_blocks_to_diffusers)
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lora_w2w.bases import (Flux, StableDiffusion1, StableDiffusion2, StableDiffusionXL, family_of, family_of_base,
                            sgm_module)
from lora_w2w.cli import main as w2w
from lora_w2w.errors import FamilyError, LayoutError
from lora_w2w.layout import REFERENCE_NETWORKS, reference_layout, reference_network
from lora_w2w.pipeline import generate, load_base_pipeline
from lora_w2w.storage import load_model, load_space
from lora_w2w.tiny.base_model import build_t5_tokenizer, build_tokenizer, save_pipeline
from lora_w2w.tiny.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_dreambooth_script", ROOT / "train_dreambooth.py")
train_dreambooth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_dreambooth)
FACE = ROOT / "inversion" / "images" / "face.png"
WORDS = ("a", "photo", "of", "sks", "person")  # the tokenizer's vocabulary: the prompts used here
MAX_TOKENS = 16  # the text encoders' positions (77 in the real ones; fewer are faster and change nothing here)
STEPS = 2


def tiny_text_config(tokenizer) -> CLIPTextConfig:
    """diffusers' dummy CLIP text encoder (below), over the local tokenizer's vocabulary."""
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                          pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_act="gelu",
                          projection_dim=32, max_position_embeddings=MAX_TOKENS)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128)


def sd2_pipeline(tokenizer_dir: Path) -> StableDiffusionPipeline:
    """A random-weight Stable Diffusion 2 pipeline with a v-prediction scheduler (as SD2's 768 px models), built
    as diffusers' tests/pipelines/stable_diffusion_2/test_stable_diffusion.py get_dummy_components builds its
    components (`UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, ...,
    cross_attention_dim=32, # SD2-specific config below attention_head_dim=(2, 4), use_linear_projection=True)`,
    a DDIMScheduler, `AutoencoderKL(block_out_channels=[32, 64], ...)`, `CLIPTextConfig(..., hidden_size=32,
    ..., hidden_act="gelu", projection_dim=512)`), with a tokenizer built here instead of the downloaded
    hf-internal-testing/tiny-random-clip, 16 latents a side (32 px images) instead of 32 and SD2's steps_offset."""
    tokenizer = build_tokenizer(WORDS, tokenizer_dir, max_length=MAX_TOKENS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    vae = tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def sdxl_pipeline(tokenizer_dir: Path) -> StableDiffusionXLPipeline:
    """A random-weight Stable Diffusion XL pipeline built as diffusers' tests/pipelines/stable_diffusion_xl/
    test_stable_diffusion_xl.py get_dummy_components builds its components (`UNet2DConditionModel(
    block_out_channels=(2, 4), layers_per_block=2, sample_size=32, ..., attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, # 6 * 8 + 32
    cross_attention_dim=64, norm_num_groups=1)`, an EulerDiscreteScheduler, `text_encoder =
    CLIPTextModel(text_encoder_config)`, `text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config)`),
    with tokenizers built here instead of the downloaded hf-internal-testing/tiny-random-clip and 16 latents a
    side (32 px images) instead of 32."""
    tokenizer = build_tokenizer(WORDS, tokenizer_dir, max_length=MAX_TOKENS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    vae = tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer))
    return StableDiffusionXLPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                     tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                     image_encoder=None, feature_extractor=None)


def flux_pipeline(tokenizer_dir: Path) -> FluxPipeline:
    """A random-weight FLUX.1 pipeline built as diffusers' tests/pipelines/flux/test_pipeline_flux.py
    get_dummy_components builds its components (`FluxTransformer2DModel(patch_size=1, in_channels=4,
    num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])`, `text_encoder =
    CLIPTextModel(clip_text_encoder_config)` with `hidden_size=32, ..., projection_dim=32`, `text_encoder_2 =
    T5EncoderModel(config)`, `AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
    layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5035)`, `FlowMatchEulerDiscreteScheduler()`), with one double and one
    single block, tokenizers built here (CLIP's BPE, T5's Unigram: `build_t5_tokenizer`) instead of the downloaded
    hf-internal-testing ones, a T5 encoder 32 wide made from its config here (not hf-internal-testing/
    tiny-random-t5's, downloaded), and FLUX.1-dev's guidance embedding and scheduler config (dynamic shifting),
    so that the guidance-distilled path runs."""
    tokenizer = build_tokenizer(WORDS, tokenizer_dir, max_length=MAX_TOKENS)
    tokenizer_2 = build_t5_tokenizer(WORDS)  # T5's kind of tokenizer, made here
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                        image_encoder=None, feature_extractor=None)


BUILDERS = {"sd2": sd2_pipeline, "sdxl": sdxl_pipeline, "flux": flux_pipeline}
KOHYA_VERSIONS = {"sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}  # ss_base_model_version
# modelspec.architecture as kohya's library/sai_model_spec.py names them (ARCH_SD_V2_768_V, ARCH_SD_XL_V1_BASE,
# ARCH_FLUX_1_UNKNOWN) + "/lora"
ARCHITECTURES = {"sd2": "stable-diffusion-v2-768-v/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
                 "flux": "flux-1/lora"}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def world(request, tmp_path_factory):
    """(family name, root): root/base the pipeline folder, root/faces 3 identities of 2 faces each, and
    root/attributes.csv a Male column for them."""
    root = tmp_path_factory.mktemp(request.param)
    save_pipeline(BUILDERS[request.param](root / "tokenizer"), root / "base")
    write_dataset(root / "faces", 3, images_per_identity=2, size=32, progress=False)
    pd.DataFrame({"name": ["000000", "000001", "000002"], "Male": [1, -1, 1]}).to_csv(root / "attributes.csv",
                                                                                        index=False)
    return request.param, root


def run(*args) -> None:
    assert w2w([str(a) for a in args]) == 0


def images_array(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_every_job_runs_on_the_family_and_exports_load_in_its_own_pipeline(world, tmp_path):
    """train-identities (3 identities), collect, build, sample, edit, invert, generate and export on a tiny SD2-v
    or SDXL pipeline; the exported LoRA, PEFT or kohya, loaded with the pipeline's own load_lora_weights
    draws the images of the w2w model fused by `generate`."""
    name, root = world
    base, loras, faces = root / "base", tmp_path / "loras", root / "faces" / "celeba_generated"
    run("train-identities", "--base", base, "--instance-root", faces, "--output-root", loras, "--max-train-steps",
        STEPS, "--num-class-images", 2, "--class-inference-steps", STEPS, "--identities-per-batch", 2)
    run("collect", loras, tmp_path / "data")
    run("build", tmp_path / "data", tmp_path / "space", "--components", 2, "--attributes", root / "attributes.csv")
    space_dir = tmp_path / "space"
    space = load_space(space_dir)
    family = family_of_base(str(base))
    assert (family.name, space.num_models, space.num_components) == (name, 3, 2)
    assert space.layout == layout_of_base(base)
    run("sample", "--space", space_dir, "--num", 1, "--out", tmp_path / "samples")
    model_file = tmp_path / "samples" / "sample_000.safetensors"
    run("edit", "--space", space_dir, "--model", model_file, "--edit", "Male=2",
        "--out", tmp_path / "edited.safetensors")
    edited = load_model(tmp_path / "edited.safetensors")
    assert not torch.equal(edited.coefficients, load_model(model_file).coefficients)
    run("invert", "--base", base, "--space", space_dir, "--image", FACE, "--steps", STEPS, "--device", "cpu",
        "--out", tmp_path / "face.safetensors")
    assert load_model(tmp_path / "face.safetensors").coefficients.abs().sum() > 0
    run("generate", "--base", base, "--space", space_dir, "--model", tmp_path / "edited.safetensors", "--seeds", 0,
        "--steps", STEPS, "--device", "cpu", "--out", tmp_path / "generated")
    assert (tmp_path / "generated" / "seed_0000.png").is_file()
    for fmt, out in (("peft", tmp_path / "peft"), ("kohya", tmp_path / "kohya.safetensors")):
        run("export", "--base", base, "--space", space_dir, "--model", model_file, "--format", fmt, "--out", out)
    with safe_open(tmp_path / "kohya.safetensors", "pt") as kohya:
        assert kohya.metadata()["ss_base_model_version"] == KOHYA_VERSIONS[name]
        assert kohya.metadata()["modelspec.architecture"] == ARCHITECTURES[name]
        assert any(key.startswith("lora_unet_input_blocks_") for key in kohya.keys()) == (name == "sdxl")
        assert all(key.startswith("lora_transformer_") for key in kohya.keys()) == (name == "flux")
    for fmt, out in (("peft", "peft"), ("kohya", "kohya.safetensors")):  # the kohya file read under the family's names
        run("project", tmp_path / out, "--base", base, "--space", space_dir,
            "--out", tmp_path / f"from_{fmt}.safetensors")
    assert torch.equal(*(load_model(tmp_path / f"from_{fmt}.safetensors").coefficients for fmt in ("peft", "kohya")))

    pipe = load_base_pipeline(str(base), "cpu", progress=False)
    model = load_model(model_file)
    resolution, _ = family.image_sizes(pipe)  # the size w2w draws (FluxPipeline's own default is 128 px)
    settings = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=resolution, width=resolution)
    fused = images_array(generate(pipe, space, model, seeds=[0], **settings))
    assert not np.array_equal(fused, images_array(generate(pipe, space, None, "sks person", seeds=[0], **settings)))
    for out in (tmp_path / "peft", tmp_path / "kohya.safetensors"):
        pipe.load_lora_weights(str(out))
        loaded = pipe(["sks person"], generator=[torch.Generator().manual_seed(0)], **settings).images
        pipe.unload_lora_weights()
        assert np.abs(images_array(loaded) - fused).max() <= 1, out  # float rounding of W + BA against Wx + BAx
    check_the_app(space_dir, base, resolution, family)


def check_the_app(space_dir: Path, base: Path, resolution: int, family) -> None:
    """The app's actions on the family's base: its images at the family's size and guidance, an inversion, a
    kohya file in the family's names."""
    from lora_w2w.app import Actions, AppConfig

    actions = Actions(AppConfig(space=str(space_dir), base=str(base), device="cpu", seeds=(0,), steps=STEPS))
    model = actions.sample(0)
    image, = actions.images(model)
    assert image.size == (resolution, resolution)
    assert f"CFG scale: {family.guidance}" in image.info["parameters"]  # the family's default guidance
    inverted, _ = actions.invert(Image.open(FACE), None, "ood", 1)  # fitted at the family's size
    assert inverted.coefficients.abs().sum() > 0
    with safe_open(actions.export(model, "kohya"), "pt") as kohya:
        assert kohya.metadata()["ss_base_model_version"] == KOHYA_VERSIONS[family.name]


def layout_of_base(base: Path):
    """The layout of the base folder's UNet, built on the meta device from its config."""
    from lora_w2w.layout import LoraLayout

    return LoraLayout.from_unet(family_of_base(str(base)).meta_network())


@pytest.mark.slow
def test_train_identities_equals_train_dreambooth_on_the_family(world, tmp_path):
    """An identity trained among others by train-identities has the weights train_dreambooth.py gives it alone:
    the family's conditioning goes with each identity's samples."""
    from lora_w2w.formats import load_peft

    _, root = world
    faces = root / "faces" / "celeba_generated"
    flags = ["--pretrained_model_name_or_path", root / "base", "--max_train_steps", STEPS, "--num_class_images", 2,
             "--class_inference_steps", STEPS, "--class_data_dir", tmp_path / "class_images", "--learning_rate", 1e-2]
    run("train-identities", "--instance_root", faces, "--output_root", tmp_path / "many", "--identities_per_batch", 3,
        *flags)
    assert train_dreambooth.main([str(a) for a in ["--instance_data_dir", faces / "000001", "--output_dir",
                                                   tmp_path / "solo", *flags]]) == 0
    layout = layout_of_base(root / "base")
    many, solo = (load_peft(layout, tmp_path / folder / "unet") for folder in ("many/000001", "solo"))
    assert solo.abs().max() > 1e-3  # training moved the weights
    torch.testing.assert_close(many, solo, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- what each family says

def test_sd2_is_told_from_sd1_by_its_unet_and_takes_its_target_from_the_scheduler(tmp_path):
    pipe = sd2_pipeline(tmp_path / "tokenizer")
    family = family_of(pipe)
    assert isinstance(family, StableDiffusion2) and family.name == "sd2"
    assert family.lora_naming().kohya_metadata == {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
    scheduler = family.training_scheduler(pipe)
    assert scheduler.config.prediction_type == "v_prediction"
    from lora_w2w.diffusion import StepSampler

    batch = StepSampler(0, num_instance=1, num_class=0, batch_size=2, latent_shape=(4, 2, 2),
                        num_train_timesteps=1000).next()
    mean, std = torch.randn(1, 4, 2, 2), torch.rand(1, 4, 2, 2)
    noisy, timesteps, target = family.noisy_latents(mean[batch.instance], std[batch.instance], batch, (0.5, None),
                                                    scheduler)
    latents = (mean[batch.instance] + std[batch.instance] * batch.latent_noise) * 0.5
    assert torch.equal(target, scheduler.get_velocity(latents, batch.noise, batch.timesteps))  # v, not the noise
    sd1 = family_of(StableDiffusionPipeline(**{**pipe.components, "unet": UNet2DConditionModel.from_config(
        {**pipe.unet.config, "use_linear_projection": False})}))
    assert isinstance(sd1, StableDiffusion1) and not isinstance(sd1, StableDiffusion2)


def test_latents_are_the_vaes_shifted_and_scaled_as_its_config_says():
    """x_0 = (z - shift) * scaling with the VAE config's factors: SD's have no shift, FLUX.1's VAE has one."""
    from lora_w2w.diffusion import StepSampler, latent_factors, noisy_latents

    assert latent_factors(tiny_vae()) == (0.18215, None)
    flux_like = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4, scaling_factor=0.3611,
                              shift_factor=0.1159)
    scaling, shift = latent_factors(flux_like)
    assert (scaling, shift) == (0.3611, 0.1159)
    batch = StepSampler(0, num_instance=1, num_class=0, batch_size=2, latent_shape=(4, 2, 2),
                        num_train_timesteps=1000).next()
    mean, std, scheduler = torch.randn(2, 4, 2, 2), torch.rand(2, 4, 2, 2), DDPMScheduler()
    noisy, _, _ = noisy_latents(mean, std, batch, scaling_factor=scaling, scheduler=scheduler, shift_factor=shift)
    latents = (mean + std * batch.latent_noise - shift) * scaling
    assert torch.equal(noisy, scheduler.add_noise(latents, batch.noise, batch.timesteps))


def test_sdxl_conditioning_is_what_its_pipeline_gives_the_unet(tmp_path):
    """Two encoders' hidden states, the pooled embedding and add_time_ids (R, R, 0, 0, R, R): the UNet call
    of the pipeline itself (no guidance, so one conditioning) gets the same."""
    pipe = sdxl_pipeline(tmp_path / "tokenizer")
    family = family_of(pipe)
    assert isinstance(family, StableDiffusionXL)
    resolution, latent_size = family.image_sizes(pipe)
    assert (resolution, latent_size) == (32, 16)
    conditioning = family.encode_prompt(pipe, "sks person", resolution)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    pipe("sks person", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    (call,) = calls
    assert torch.equal(call["encoder_hidden_states"], conditioning.batched["encoder_hidden_states"])
    assert call["encoder_hidden_states"].shape == (1, MAX_TOKENS, 64)  # 32 + 32 wide
    for name in ("text_embeds", "time_ids"):
        assert torch.equal(call["added_cond_kwargs"][name], conditioning.batched[name]), name
    assert conditioning.batched["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


def test_sdxl_kohya_names_are_kohyas_and_diffusers_maps_them_back():
    """SDXL's kohya-style keys name Stability's UNet modules, as kohya sd-scripts' sdxl_original_unet.py builds
    them (input_blocks[i] = [ResnetBlock2D, Transformer2DModel], so `lora_unet_input_blocks_4_1_...`) and as
    ComfyUI's comfy/lora.py model_lora_keys_unet reads them (`key_lora = k[len("diffusion_model."):
    -len(".weight")].replace(".", "_")`, `key_map["lora_unet_{}".format(key_lora)] = k`); diffusers' SDXL loader
    (lora_state_dict's _maybe_map_sgm_blocks_to_diffusers and _convert_non_diffusers_lora_to_diffusers, then
    convert_unet_state_dict_to_peft) takes every layer of the full-size SDXL UNet back to its own name."""
    layout = reference_layout("sdxl")
    naming = StableDiffusionXL(reference_network("sdxl").config, {}).lora_naming()
    names = {layer.name: naming.kohya_name(layer.name) for layer in layout.layers}
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert names["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v"] == \
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v"
    assert names["mid_block.attentions.0.transformer_blocks.3.attn1.to_v"] == \
        "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_v"
    assert names["up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q"] == \
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_q"
    assert names["up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"] == \
        "lora_unet_output_blocks_3_1_transformer_blocks_1_attn1_to_q"
    state = {f"{kohya}.{part}.weight": torch.zeros(1, 1)
             for kohya in names.values() for part in ("lora_down", "lora_up")}
    diffusers_state, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(state, reference_network("sdxl").config))
    peft = convert_unet_state_dict_to_peft({key.removeprefix("unet."): t for key, t in diffusers_state.items()})
    assert sorted(peft) == sorted(f"{name}.{part}.weight" for name in names for part in ("lora_A", "lora_B"))
    with pytest.raises(LayoutError, match="attention blocks"):
        sgm_module("down_blocks.1.resnets.0.conv1", 2)


def test_flux_conditioning_prediction_and_schedule_are_its_pipelines(tmp_path):
    """T5's hidden states, CLIP's pooled embedding, the text ids and the guidance that FluxPipeline's own
    transformer call gets (no true guidance, so one call a step, at the training guidance); the family's
    `predict` on the unpacked latents gives that call's output, unpacked; its first timestep is the pipeline's."""
    pipe = flux_pipeline(tmp_path / "tokenizer")
    family = family_of(pipe)
    assert isinstance(family, Flux) and family.lora_naming().network == "transformer"
    resolution, latent_size = family.image_sizes(pipe)
    assert (resolution, latent_size) == (32, 32)  # the VAE's sample_size, its scale 1
    conditioning = family.encode_prompt(pipe, "sks person", resolution)
    calls, outputs, schedules = [], [], []

    def record(module, args, kwargs, output) -> None:
        calls.append(kwargs)
        outputs.append(output[0])

    pipe.transformer.register_forward_hook(record, with_kwargs=True)

    def schedule(pipeline, step, timestep, callback_kwargs):
        schedules.append(pipeline.scheduler.timesteps.clone())
        return callback_kwargs

    pipe("sks person", num_inference_steps=2, guidance_scale=family.training_guidance, height=resolution,
         width=resolution, output_type="latent", callback_on_step_end=schedule)
    call = calls[0]
    for name in ("encoder_hidden_states", "pooled_projections", "guidance"):
        assert torch.equal(call[name], conditioning.batched[name]), name
    assert call["encoder_hidden_states"].shape == (1, family.text_tokens, 32)
    assert torch.equal(call["txt_ids"], conditioning.shared["txt_ids"])
    packed = call["hidden_states"].shape[-1]  # (1, h w / 4, 4 C)
    latents = FluxPipeline._unpack_latents(call["hidden_states"], latent_size, latent_size, 1)  # (1, C, h, w)
    timesteps = call["timestep"] * 1000
    prediction = family.predict(pipe.transformer, latents, timesteps, conditioning)
    assert prediction.shape == (1, packed // 4, latent_size, latent_size)
    torch.testing.assert_close(prediction, FluxPipeline._unpack_latents(outputs[0], latent_size, latent_size, 1))
    assert family.first_timestep(pipe, 2, resolution, resolution) == int(schedules[0][0])


def test_flux_generates_with_its_own_guidance_and_dtype(tmp_path):
    """No guidance given: FLUX's 3.5 reaches the transformer (Stable Diffusion's default, 7.5, would be twice
    FLUX.1-dev's); a negative prompt turns on the pipeline's true guidance at that scale; on CUDA FLUX generates
    in bfloat16, the UNet families in float16."""
    from lora_w2w.pipeline import generate_from_weights
    from lora_w2w.workbench import job_dtype

    pipe = flux_pipeline(tmp_path / "tokenizer")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    generate_from_weights(pipe, None, None, "sks person", num_inference_steps=1)
    assert calls[0]["guidance"].tolist() == [Flux.guidance] and len(calls) == 1
    calls.clear()
    generate_from_weights(pipe, None, None, "sks person", negative_prompt="photo", num_inference_steps=1)
    assert len(calls) == 2  # the prompt's and the negative prompt's calls: true classifier-free guidance
    assert job_dtype("generate", "cuda", family_of(pipe)) == torch.bfloat16
    assert job_dtype("generate", "cuda", StableDiffusionXL({}, {})) == job_dtype("generate", "cuda") == torch.float16


def test_flux_trains_on_the_flow_matching_velocity():
    """x_t = (1 - sigma) x_0 + sigma eps and the target eps - x_0, with x_0 the VAE's shifted and scaled latent and
    (t, sigma) the scheduler's training pair at the draw's index, as diffusers' train_dreambooth_lora_flux.py
    (`noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise`, `target = noise - model_input`)."""
    from lora_w2w.diffusion import StepSampler

    family = Flux({"guidance_embeds": True}, {})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    batch = StepSampler(0, num_instance=1, num_class=0, batch_size=3, latent_shape=(4, 2, 2),
                        num_train_timesteps=1000).next()
    mean, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    noisy, timesteps, target = family.noisy_latents(mean, std, batch, (1.5, 0.1), scheduler)
    latents = (mean + std * batch.latent_noise - 0.1) * 1.5
    sigmas = scheduler.sigmas[batch.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * batch.noise)
    torch.testing.assert_close(target, batch.noise - latents)
    assert torch.equal(timesteps, scheduler.timesteps[batch.timesteps])
    torch.testing.assert_close(timesteps / 1000, sigmas.flatten())


def test_flux_kohya_names_are_comfyuis_and_diffusers_maps_them_back():
    """FLUX's kohya-style keys are `lora_transformer_` + diffusers' module name, as ComfyUI's comfy/lora.py
    model_lora_keys_unet reads them (`key_map["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))]
    = to #onetrainer`, k from comfy.utils.flux_to_diffusers: `"{}to_q.{}".format(k, end)` with k =
    "transformer_blocks.{}.attn." for the double blocks and "single_transformer_blocks.{}.attn." for the single
    ones, `to_v` likewise); diffusers' FLUX loader (lora_state_dict's _convert_kohya_flux_lora_to_diffusers)
    takes every layer of the full-size FLUX.1-dev transformer back to its own name."""
    layout = reference_layout("flux")
    naming = Flux(reference_network("flux").config, {}).lora_naming()
    comfy = {f"{block}.{i}.attn.{projection}" for block, count in (("transformer_blocks", 19),
                                                                   ("single_transformer_blocks", 38))
             for i in range(count) for projection in ("to_q", "to_v")}
    assert {layer.name for layer in layout.layers} == comfy
    names = {layer.name: naming.kohya_name(layer.name) for layer in layout.layers}
    assert names["single_transformer_blocks.37.attn.to_v"] == "lora_transformer_single_transformer_blocks_37_attn_to_v"
    assert all(kohya == "lora_transformer_" + name.replace(".", "_") for name, kohya in names.items())
    state = {f"{kohya}.{part}": torch.ones(1, 1) if part != "alpha" else torch.tensor(27.0)
             for kohya in names.values() for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    converted = _convert_kohya_flux_lora_to_diffusers(state)
    assert sorted(converted) == sorted(f"transformer.{name}.{part}.weight" for name in names
                                       for part in ("lora_A", "lora_B"))


@pytest.mark.parametrize("name, layers, numel, parameters", [
    ("sd15", 64, 99_648, 859_520_964),        # the released w2w files' N
    ("sdxl", 280, 725_760, 2_567_463_684),    # 70 transformer blocks, 140 attentions
    ("flux", 114, 700_416, 11_901_408_320),   # 19 double and 38 single blocks, 3,072 wide
])
def test_full_size_layouts_from_the_shipped_configs(name, layers, numel, parameters):
    """Rank-1 to_q/to_v LoRAs of the full-size networks, built on the meta device from the configs w2w ships
    (the parameter counts are the published models': the configs are theirs)."""
    network = reference_network(name)
    layout = reference_layout(name)
    assert (len(layout), layout.numel) == (layers, numel)
    assert sum(p.numel() for p in network.parameters()) == parameters


def test_info_prints_a_full_size_layout(capsys):
    assert w2w(["info", "--layout", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "N            725,760 numbers per model" in out and REFERENCE_NETWORKS["sdxl"][1] in out
    assert "    up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v" in out and len(out.splitlines()) == 4 + 280


# ----------------------------------------------------------------------------- bad input

def unknown_pipeline() -> DDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


def test_a_pipeline_of_no_known_family_is_refused_naming_its_class_and_the_families(tmp_path, capsys):
    known = r"sd1 \(StableDiffusionPipeline, .*\), sd2 .*, sdxl \(StableDiffusionXLPipeline\), flux \(FluxPipeline\)"
    with pytest.raises(FamilyError, match=f"a DDPMPipeline is of no base family w2w knows; expected one of: {known}"):
        family_of(unknown_pipeline())
    unknown_pipeline().save_pretrained(tmp_path / "ddpm")
    # a video pipeline's folder, its weights absent: refused from model_index.json alone, before any weights load
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    for base, kind in ((tmp_path / "ddpm", "DDPMPipeline"), (tmp_path / "video", "StableVideoDiffusionPipeline")):
        with pytest.raises(SystemExit) as exit_info:
            w2w(["generate", "--base", str(base), "--prompt", "person", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"w2w: error: {base}: a {kind} is of no base family w2w knows; expected one of: sd1")
        assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_space_of_another_family_is_refused_before_any_model_work(world, toy_world, toy_space, tmp_path, capsys):
    """A space of the SD1 toy world with an SD2, SDXL or FLUX base: invert and generate stop before the VAE or the
    network runs, export from the base's configs alone."""
    _, root = world
    base = root / "base"
    network = type(family_of_base(str(base)).meta_network()).__name__  # UNet2DConditionModel, FluxTransformer2DModel
    assert w2w(["sample", "--space", str(toy_space), "--num", "1", "--out", str(tmp_path / "s")]) == 0
    model = tmp_path / "s" / "sample_000.safetensors"
    capsys.readouterr()
    jobs = [["invert", "--image", str(FACE), "--steps", "1", "--device", "cpu",
             "--out", str(tmp_path / "i.safetensors")],
            ["generate", "--model", str(model), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "g")],
            ["export", "--model", str(model), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]]
    with mock.patch.object(AutoencoderKL, "forward", side_effect=AssertionError("the VAE ran")), \
            mock.patch.object(AutoencoderKL, "encode", side_effect=AssertionError("the VAE ran")), \
            mock.patch.object(UNet2DConditionModel, "forward", side_effect=AssertionError("the UNet ran")), \
            mock.patch.object(FluxTransformer2DModel, "forward", side_effect=AssertionError("the transformer ran")):
        for job in jobs:
            with pytest.raises(SystemExit) as exit_info:
                w2w([*job, "--base", str(base), "--space", str(toy_space)])
            assert exit_info.value.code == 2, job
            error = capsys.readouterr().err.splitlines()[-1]  # after the pipeline's loading bars
            assert error.startswith(f"w2w: error: the LoRA layout does not fit this {network} (") and \
                error.endswith(f"(the base is {family_of_base(str(base))!r})"), error
    assert not any((tmp_path / name).exists() for name in ("i.safetensors", "g", "k.safetensors"))
