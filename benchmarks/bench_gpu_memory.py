"""Peak GPU memory of each job on Stable Diffusion 1.5 at 512 px, and on Stable Diffusion XL and FLUX.1-dev at
their native 1,024 px, estimated on the CPU with no GPU and no download: the real code paths run on fake
tensors (`FakeTensorMode`: shapes, dtypes and lifetimes, no data, no compute) over full-size models built
from their configs, while a dispatch mode adds up the bytes of the tensor storages alive after every op.

    python benchmarks/bench_gpu_memory.py [--steps 25] [--images 1 4] [--identities 8 16]  # make bench-gpu-memory
    python benchmarks/bench_gpu_memory.py --families-only --families sdxl flux            # the other families alone

The jobs, in the dtypes our code picks on CUDA and with its default flags:
- generate (float16, `workbench.job_dtype`): a w2w model fused into the UNet (`FusedLora`), the
  prompt and the empty negative prompt encoded, `--steps` denoising steps (UNet at batch 2 for
  classifier-free guidance, 64 x 64 latents, DDIM step), the VAE decoding one 512 x 512 image; and
  the same for 4 images at once (`w2w generate`'s default: 4 seeds, so the UNet at batch 8);
- invert (bfloat16, `workbench.job_dtype`): the preset "real" (K = 10,000 components, whose
  basis is held in float32), `encode_target`, then `invert`'s loop body (`inversion_loss`, backward to
  the coefficients, Adam);
- train (float32, `dreambooth.load_base`, `--mixed_precision no`): `train_dreambooth.py`'s step (PEFT
  rank-1 LoRA on to_q/to_v, 1 instance + 1 class latent, AdamW), after the two preparation phases of
  a first run: generating the missing class images (`ensure_class_images`: a second pipeline, float16,
  while the base is held, `class_image_batch_size` images at once) and caching latents (`encode_images`,
  `encode_batch_size` images at once);
- train_identities_kK: `train_identities.train_group`'s step for K identities at once (`LoraBank`s).
The generation runs the network as its family calls it (`bases.Family.predict`): the UNet at batch 2n for
classifier-free guidance, FLUX's transformer at batch n (its guidance is embedded) over 4,096 image and 512
text tokens; SDXL's VAE decodes in float32, as its pipeline upcasts it (force_upcast). SDXL (2 CLIP
encoders, the UNet of lora_w2w/data/sdxl_unet_config.json) and FLUX.1-dev (CLIP-L, T5-XXL, the transformer
of lora_w2w/data/flux1_dev_transformer_config.json) run the same jobs with one image and K =
--family-identities; the script checks their published parameter counts.
Training and inversion steps are taken twice: the second, with the optimizer's state, is the steady
state. Every job holds the whole pipeline (text encoder, VAE, UNet) on the GPU, as the code does.

What is counted: every tensor storage, rounded up to 512 bytes as the CUDA caching allocator rounds
its blocks, from the op that creates it until Python frees it; the figure to compare is
torch.cuda.max_memory_allocated(). Not counted: the CUDA context (~0.5 GB), blocks the caching
allocator keeps reserved, fragmentation, and the workspaces kernels take (cuDNN, cuBLAS): add 0.5-1 GB.
Attention runs through `scaled_dot_product_attention`; its CPU kernel (flash attention) keeps, like
CUDA's flash and memory-efficient kernels, no L x L attention matrix, which the script checks.

Validation: the same jobs run on the tiny world's pipeline (SD1.5's architecture at 64 px) with real
tensors and with fake ones; `estimate_vs_measured_ratio` is the fake/real ratio of the phase peaks
farthest from 1 (1.0 when fake tensors live and die exactly as real ones; the script fails beyond
1%). The real runs are also profiled: `cpu_allocator_over_tracked` is the CPU allocator's peak over
the tracked one, which shows that no tensor escapes the tracker (~1.0 in bfloat16 and float32; above
1, the scratch buffers of CPU kernels, larger for float16). The last line is one JSON object
{"benchmark": "gpu_memory", "estimate_vs_measured_ratio": ..., "generate_gib": ..., ...}.

Letters: K components (or identities), N LoRA numbers, C latent channels, h x w latent size, R image
size, L tokens, D text width, b instance images per step.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import tempfile
import time
import weakref
from contextlib import contextmanager, nullcontext
from functools import partial
from importlib.resources import files

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lora_w2w.bases import Conditioning, Flux, StableDiffusion1, StableDiffusionXL, family_of
from lora_w2w.diffusion import StepSampler, encode_batch_size, encode_images, latent_factors
from lora_w2w.dreambooth import (Base, DreamboothConfig, IdentityData, SharedData, add_identity_lora,
                                 class_image_batch_size, identities_loss, initial_lora_weights, load_base, lora_layout)
from lora_w2w.inversion import PRESETS, differentiable_unet, encode_target, inversion_loss
from lora_w2w.layout import LoraLayout
from lora_w2w.network import FusedLora
from lora_w2w.space import TRIGGER_PROMPT
from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline, build_t5_tokenizer, build_tokenizer
from lora_w2w.train_identities import identity_banks
from lora_w2w.workbench import job_dtype

GIB = 2 ** 30
CUDA = torch.device("cuda")
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes

# Stable Diffusion 1.5's text encoder (CLIP ViT-L/14's) and VAE; the UNet's config ships in lora_w2w/data.
SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu")
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,  # the decoder has layers_per_block + 1 = 3 ResNets per block
                latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}  # SD1.5's: checks the configs

# Stable Diffusion XL base 1.0: CLIP ViT-L/14's text encoder (as SD1.5's, its penultimate layer used), OpenCLIP
# ViT-bigG/14's with its projection, SD1.5's VAE architecture at 1,024 px; the UNet's config ships in lora_w2w/data.
SDXL_TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                           num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading")
SDXL_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                   "vae": 83_653_863}
# FLUX.1-dev: CLIP-L (pooled), T5 v1.1 XXL's encoder (512 tokens), its 16-channel VAE, FlowMatchEuler with dynamic
# shifting; the transformer's config ships in lora_w2w/data.
FLUX_TEXT_ENCODER_2 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
FLUX_VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
FLUX_PARAMETERS = {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                   "vae": 83_819_683}


def default_of(function, parameter: str):
    """A parameter's default value in our code, so that the benchmark follows the code."""
    return inspect.signature(function).parameters[parameter].default


DREAMBOOTH = DreamboothConfig()  # the defaults of train_dreambooth.py and w2w train-identities: the paper's recipe
TRAINING_DTYPE = default_of(load_base, "dtype")  # float32 (with --mixed_precision no, the default)
NUM_INSTANCE_IMAGES = 10  # an identity's images (their cached latents are tiny)


# ----------------------------------------------------------------------------- measuring live tensor bytes

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive (each rounded up to CUDA_BLOCK) and their peak: a storage is
    added when an op first returns it and subtracted when Python frees it (a weakref callback).
    Tensors that exist before the mode is entered are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.ops: set[str] = set()
        self._seen = WeakIdKeyDictionary()  # storage -> its weakref, whose callback subtracts its bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:  # a view, or an in-place op's result
            return
        nbytes = math.ceil(storage.nbytes() / CUDA_BLOCK) * CUDA_BLOCK
        self._seen[storage] = weakref.ref(storage, partial(self._free, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    @contextmanager
    def phase(self, name: str, peaks: dict[str, int]):
        """Record in peaks[name] the highest live bytes while the block runs (the maximum over repeats)."""
        self.peak = self.live
        yield
        peaks[name] = max(peaks.get(name, 0), self.peak)


class ForgetFakeMemo(TorchDispatchMode):
    """FakeTensorMode memoizes the fake tensors it makes in a WeakValueDictionary, and that weakref makes
    `nn.Module.to()` fail on a fake Parameter ("_apply(): Couldn't swap"; fixes pending in PyTorch, PRs
    #178584 and #196558), which PEFT's add_adapter calls. Clearing the memo after every op (its only
    cost: a real tensor met again is converted again) lets the real code run unchanged."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.memo.clear()
        return out


@contextmanager
def tracking(fake: bool):
    """A LiveTensorBytes over everything the block does, on fake tensors (no data, no compute) or real ones."""
    if not fake:
        with LiveTensorBytes() as tracker:
            yield tracker
        return
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # real inputs (scheduler tables, ids) become fake
    with fake_mode, ForgetFakeMemo(fake_mode), LiveTensorBytes() as tracker:
        yield tracker


@contextmanager
def built_in(dtype: torch.dtype):
    """Build modules directly in `dtype`, as from_pretrained(dtype=...) loads them (and no `.to(dtype)`
    copy, which fake parameters would not survive anyway)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------- the models

def shipped_config(name: str) -> dict:
    return json.loads(files("lora_w2w").joinpath("data", name).read_text())


def check_parameters(pipe, expected: dict[str, int], what: str) -> None:
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in expected}
    assert counts == expected, f"the configs do not give {what}'s parameter counts: {counts}"


def sd15_pipeline(dtype: torch.dtype) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5 from its configs, randomly initialised, in `dtype` (a BPE tokenizer over a
    few words stands in for CLIP's: the ids do not matter, the 77 tokens do)."""
    unet_config = shipped_config("sd15_unet_config.json")
    with built_in(dtype), tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(["sks", "person"], tmp, max_length=SD15_TEXT_ENCODER["max_position_embeddings"])
        pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE),
                                       text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
                                       tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(unet_config),
                                       scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    check_parameters(pipe, SD15_PARAMETERS, "SD1.5")
    return pipe


def sdxl_pipeline(dtype: torch.dtype, divisor: int = 1) -> StableDiffusionXLPipeline:
    """Stable Diffusion XL base 1.0 from its configs, randomly initialised, in `dtype` (one BPE tokenizer over a
    few words for both encoders: 77 tokens each). `divisor` > 1 divides every width (channels, the encoders'
    widths and so the cross-attention's, norm groups) and keeps the depths: SDXL's architecture, small."""
    unet = shipped_config("sdxl_unet_config.json")
    unet |= {"block_out_channels": [c // divisor for c in unet["block_out_channels"]],
             "cross_attention_dim": unet["cross_attention_dim"] // divisor,
             "projection_class_embeddings_input_dim": 6 * unet["addition_time_embed_dim"]  # 6 time ids + pooled
             + SDXL_TEXT_ENCODER_2["projection_dim"] // divisor, "norm_num_groups": 32 // divisor}
    encoders = [{**config, **{key: config[key] // divisor for key in ("hidden_size", "intermediate_size",
                                                                      "projection_dim")}}
                for config in (SD15_TEXT_ENCODER, SDXL_TEXT_ENCODER_2)]
    vae = dict(SDXL_VAE, block_out_channels=tuple(c // divisor for c in SDXL_VAE["block_out_channels"]),
               norm_num_groups=32 // divisor)
    with unset_fake_temporarily():  # the scheduler's tables are real tensors (its constructor reads values)
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    with built_in(dtype), tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(["sks", "person"], tmp, max_length=SD15_TEXT_ENCODER["max_position_embeddings"])
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**vae), text_encoder=CLIPTextModel(CLIPTextConfig(**encoders[0])),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**encoders[1])), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel.from_config(unet), scheduler=scheduler)
    if divisor == 1:
        check_parameters(pipe, SDXL_PARAMETERS, "SDXL")
    return pipe


def flux_pipeline(dtype: torch.dtype) -> FluxPipeline:
    """FLUX.1-dev from its configs, randomly initialised, in `dtype` (tokenizers over a few words: CLIP's 77 tokens,
    T5's 512; T5's embedding tied as from_pretrained ties it)."""
    with unset_fake_temporarily():  # the scheduler's tables are real tensors (its constructor reads values)
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    with built_in(dtype), tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(["sks", "person"], tmp, max_length=SD15_TEXT_ENCODER["max_position_embeddings"])
        text_encoder_2 = T5EncoderModel(T5Config(**FLUX_TEXT_ENCODER_2))
        text_encoder_2.tie_weights()
        pipe = FluxPipeline(
            vae=AutoencoderKL(**FLUX_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
            text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=build_t5_tokenizer(["sks", "person"]),
            transformer=FluxTransformer2DModel.from_config(shipped_config("flux1_dev_transformer_config.json")),
            scheduler=scheduler)
    check_parameters(pipe, FLUX_PARAMETERS, "FLUX.1-dev")
    return pipe


def tiny_pipeline(dtype: torch.dtype) -> StableDiffusionPipeline:
    """The tiny world's pipeline (SD1.5's architecture at 64 px), randomly initialised, in `dtype`."""
    with built_in(dtype):
        return build_pipeline(TinyPipelineConfig(), seed=0)


def resident(tracker: LiveTensorBytes, peaks: dict[str, int]) -> None:
    """Record what is held before the job's work starts (weights, caches) as the phase "resident"."""
    peaks["resident"] = tracker.live


# ----------------------------------------------------------------------------- the jobs

@torch.no_grad()
def denoise_and_decode(pipe, prompts: list[str], steps: int, tracker: LiveTensorBytes, peaks: dict[str, int],
                       prefix: str = "") -> None:
    """What the pipeline's call does for n copies of a prompt: encode it and, for classifier-free guidance (the
    UNet families), the empty negative prompt; `steps` denoising steps of the network as its family calls it
    (`Family.predict`: the UNet at batch 2n, FLUX's transformer at batch n, its guidance embedded), each ending in
    a latent-sized update as a scheduler's step; decode the latents (SDXL's VAE upcast to float32, as its
    pipeline does for force_upcast)."""
    family = family_of(pipe)
    network = family.network(pipe)
    n, device, dtype = len(prompts), network.device, network.dtype
    resolution, latent_size = family.image_sizes(pipe)
    guided = not isinstance(family, Flux)
    with tracker.phase(prefix + "text", peaks):
        parts = [family.encode_prompt(pipe, prompt, resolution) for prompt in [""] * guided + prompts[:1]]
        conditioning = Conditioning.cat([part.repeat(n) for part in parts]).to(device, dtype)  # (2n or n, ...)
    with tracker.phase(prefix + "denoise", peaks):
        latents = torch.randn(n, pipe.vae.config.latent_channels, latent_size, latent_size, dtype=dtype)  # (n, C, h, w)
        for t in (999 * (1 - i / steps) for i in range(steps)):  # the values do not matter, the calls do
            both = torch.cat([latents] * 2) if guided else latents                       # (2n or n, C, h, w)
            prediction = family.predict(network, both, torch.full((len(both),), t, dtype=dtype), conditioning)
            if guided:
                uncond, cond = prediction.chunk(2)                                       # (n, C, h, w) each
                prediction = uncond + family.guidance * (cond - uncond)
            latents = latents - prediction / steps                                       # (n, C, h, w)
    with tracker.phase(prefix + "decode", peaks):
        scaling, shift = latent_factors(pipe.vae)
        upcast = (isinstance(family, StableDiffusionXL) and pipe.vae.dtype == torch.float16
                  and pipe.vae.config.force_upcast)
        if upcast:
            pipe.vae.to(torch.float32)
        pipe.vae.decode((latents / scaling + (shift or 0)).to(pipe.vae.dtype))  # images (n, 3, R, R)
        if upcast:
            pipe.vae.to(torch.float16)


def generate_job(build, tracker: LiveTensorBytes, steps: int, images: int, family=StableDiffusion1) -> dict[str, int]:
    """`pipeline.generate` of `images` images (one per seed) with a w2w model fused into the network."""
    peaks: dict[str, int] = {}
    pipe = build(job_dtype("generate", CUDA, family))
    network = family_of(pipe).network(pipe)
    layout = LoraLayout.from_unet(network)
    resident(tracker, peaks)
    with tracker.phase("fuse", peaks), unset_fake_temporarily():  # FusedLora checks the weights' values
        fused = FusedLora(network, layout, 0.01 * torch.randn(layout.numel))  # keeps the original weights
    denoise_and_decode(pipe, ["sks person"] * images, steps, tracker, peaks)
    fused.remove()
    return peaks


def invert_job(build, tracker: LiveTensorBytes, k: int) -> dict[str, int]:
    """`inversion.invert` with K components: the basis and the pipeline held, `encode_target`, two steps."""
    peaks: dict[str, int] = {}
    config = PRESETS["real"]
    pipe = build(job_dtype("invert", CUDA))
    family = family_of(pipe)
    network = family.network(pipe)
    layout = LoraLayout.from_unet(network)
    basis = (torch.zeros(layout.numel), torch.ones(layout.numel), torch.randn(k, layout.numel))  # (N,) (N,) (K, N)
    resolution, _ = family.image_sizes(pipe)
    image = torch.rand(1, 3, resolution, resolution) * 2 - 1  # (1, 3, R, R)
    resident(tracker, peaks)
    with tracker.phase("encode", peaks):
        target = encode_target(pipe, image, None, TRIGGER_PROMPT)
    with unset_fake_temporarily():  # the schedule's tables are real tensors (FLUX's constructor reads values)
        scheduler = family.training_scheduler(pipe)
    sampler = StepSampler(0, num_instance=1, num_class=0, batch_size=1,
                          latent_shape=tuple(target.latent_mean.shape[1:]),
                          num_train_timesteps=scheduler.config.num_train_timesteps)
    coefficients = torch.zeros(k, requires_grad=True)  # (K,)
    optimizer = torch.optim.Adam([coefficients], lr=config.lr, weight_decay=config.weight_decay)
    with differentiable_unet(network, layout) as lora_unet:
        for _ in range(2):
            with tracker.phase("step", peaks):  # invert()'s loop body
                loss = inversion_loss(lora_unet, basis, coefficients, target, scheduler, sampler.next())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return peaks


def frozen_base(pipe) -> Base:
    """`load_base` of a pipeline built here: frozen, with its family and training scheduler."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    family = family_of(pipe)
    with unset_fake_temporarily():  # the schedule's tables are real tensors (FLUX's constructor reads values)
        return Base(pipe, family, family.training_scheduler(pipe))


def training_base(build) -> Base:
    """`load_base`: the pipeline in its dtype, frozen."""
    return frozen_base(build(TRAINING_DTYPE))


def training_inputs(base: Base, identities: int) -> tuple[list[IdentityData], SharedData]:
    """What `prepare_shared` and `prepare_identity` cache on the GPU (the values do not matter): the
    class and instance latent distributions (I, C, h, w), the two prompts' conditioning (1, L, D)."""
    resolution, latent_size = base.family.image_sizes(base.pipe)
    latent = (base.vae.config.latent_channels, latent_size, latent_size)
    classes, instances = DREAMBOOTH.num_class_images, NUM_INSTANCE_IMAGES
    conditionings = [base.family.encode_prompt(base.pipe, prompt, resolution)
                     for prompt in (DREAMBOOTH.instance_prompt, DREAMBOOTH.class_prompt)]
    scheduler = base.scheduler
    shared = SharedData(torch.randn(classes, *latent), torch.rand(classes, *latent), *conditionings,
                        latent_factors(base.vae), scheduler, base.family)
    data = [IdentityData(f"{i:06d}", torch.randn(instances, *latent), torch.rand(instances, *latent),
                         StepSampler(DREAMBOOTH.seed, num_instance=instances, num_class=classes,
                                     batch_size=DREAMBOOTH.train_batch_size, latent_shape=latent,
                                     num_train_timesteps=scheduler.config.num_train_timesteps))
            for i in range(identities)]
    return data, shared


def train_job(build, tracker: LiveTensorBytes, family=StableDiffusion1) -> dict[str, int]:
    """`train_dreambooth.py` (`dreambooth.train_one`) with the default flags: the preparation of a first
    run (class images missing), then two training steps."""
    peaks: dict[str, int] = {}
    args = DREAMBOOTH
    base = training_base(build)
    layout = lora_layout(base, args)
    resolution = base.resolution
    resident(tracker, peaks)
    with tracker.phase("class_images_load", peaks):  # ensure_class_images: a second pipeline
        generator = build(job_dtype("generate", CUDA, family))  # load_base_pipeline's dtype
    denoise_and_decode(generator, [args.class_prompt] * class_image_batch_size(resolution), args.class_inference_steps, tracker,
                       peaks, prefix="class_images_")
    del generator
    with tracker.phase("encode_latents", peaks):  # encode_images, one full batch
        batch = encode_batch_size(resolution)
        encode_images(base.vae, torch.rand(batch, 3, resolution, resolution) * 2 - 1)  # (B, 3, R, R)
    (identity,), shared = training_inputs(base, 1)
    unet = base.network
    optimizer = add_identity_lora(unet, layout, args)
    for _ in range(2):
        with tracker.phase("step", peaks):  # train_one's loop body
            identities_loss(unet, [identity], shared, args).backward()
            optimizer.step()
            optimizer.zero_grad()
    return peaks


def train_identities_job(build, tracker: LiveTensorBytes, identities: int) -> dict[str, int]:
    """`train_identities.train_group` with K identities and the default flags: two steps (its
    preparation is train_job's)."""
    peaks: dict[str, int] = {}
    args = DREAMBOOTH
    base = training_base(build)
    layout = lora_layout(base, args)
    data, shared = training_inputs(base, identities)
    resident(tracker, peaks)
    initial = initial_lora_weights(layout, args.seed).expand(identities, -1)  # (K, N)
    with identity_banks(base.network, layout, initial) as banks:
        params = [p for bank in banks.values() for p in (bank.lora_A, bank.lora_B)]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        for _ in range(2):
            with tracker.phase("step", peaks):  # train_group's loop body
                (identities_loss(base.network, data, shared, args) / args.gradient_accumulation_steps).backward()
                optimizer.step()
                optimizer.zero_grad()
    return peaks


# ----------------------------------------------------------------------------- running

def allocator_peak(prof: profile) -> int:
    """The most bytes the CPU allocator held during a profile: its [memory] events, + on allocation, - on free."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_jobs(build, fake: bool, args: argparse.Namespace, components: int, family=StableDiffusion1,
             images: list[int] | None = None, identities: list[int] | None = None) -> tuple[dict, dict, set[str]]:
    """Every job on the pipelines `build` makes (of `family`), each in its own tracker: {job: {phase: peak
    bytes}}; with real tensors {job: the CPU allocator's peak bytes} (from the profiler: kernels' scratch
    buffers included); the ops that ran. `images` and `identities` default to the flags'."""
    jobs = {**{"generate" if n == 1 else f"generate_{n}_images":
               partial(generate_job, steps=args.steps, images=n, family=family) for n in images or args.images},
            "invert": partial(invert_job, k=components), "train": partial(train_job, family=family),
            **{f"train_identities_k{k}": partial(train_identities_job, identities=k)
               for k in identities or args.identities}}
    peaks, allocator, ops = {}, {}, set()
    for name, job in jobs.items():
        start = time.perf_counter()
        profiler = nullcontext() if fake else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with profiler as prof:
            with tracking(fake) as tracker:
                peaks[name] = job(build, tracker)
        if not fake:
            allocator[name] = allocator_peak(prof)
        ops |= tracker.ops
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return peaks, allocator, ops


def gib(nbytes: int) -> float:
    return round(nbytes / GIB, 3)


FAMILY_BUILDS = {"sdxl": (sdxl_pipeline, StableDiffusionXL), "flux": (flux_pipeline, Flux)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25,
                        help="denoising steps of the generation (default: %(default)s)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4],
                        help="images per generation; 4 is w2w generate's default (4 seeds) (default: %(default)s)")
    parser.add_argument("--identities", type=int, nargs="+", default=[8, 16],
                        help="K, identities trained together by train_identities; 16 is its default "
                             "--identities_per_batch (default: %(default)s)")
    parser.add_argument("--families", nargs="*", choices=tuple(FAMILY_BUILDS), default=list(FAMILY_BUILDS),
                        help="the other families to estimate at their native size, after SD1.5 (default: all)")
    parser.add_argument("--families-only", action="store_true",
                        help="only those families: no validation, no SD1.5 (the last line is then "
                             '{"benchmark": "gpu_memory_families", "families": ...})')
    parser.add_argument("--family-identities", type=int, nargs="+", default=[2],
                        help="K of train_identities for those families (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    return parser.parse_args()


def job_figures(peaks: dict[str, dict[str, int]]) -> dict:
    """The JSON figures of a family's jobs: each job's peak (a training job's: its step's), and every phase."""
    return {**{f"{job}_gib": gib(phases["step"] if job.startswith("train") else max(phases.values()))
               for job, phases in peaks.items()},
            "phases_gib": {job: {phase: gib(v) for phase, v in phases.items()} for job, phases in peaks.items()}}


def print_phases(title: str, peaks: dict[str, dict[str, int]]) -> None:
    print(f"{title + ': job, phase':40s} {'GiB':>7s}")
    for job, phases in peaks.items():
        for phase, nbytes in phases.items():
            print(f"{job + ', ' + phase:40s} {nbytes / GIB:7.2f}")


def other_families(args: argparse.Namespace) -> dict:
    """SDXL and FLUX.1-dev at 1,024 px on fake tensors: {family: its figures (`job_figures`) and dtypes}."""
    results = {}
    for name in args.families:
        build, family = FAMILY_BUILDS[name]
        print(f"{name}, 1,024 px, fake tensors", flush=True)
        peaks, _, _ = run_jobs(build, True, args, PRESETS["real"].components, family, [1], args.family_identities)
        print_phases(name, peaks)
        results[name] = {**job_figures(peaks),
                         "dtypes": {"generate": str(job_dtype("generate", CUDA, family)),
                                    "invert": str(job_dtype("invert", CUDA)), "train": str(TRAINING_DTYPE)}}
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.families_only:
        print(json.dumps({"benchmark": "gpu_memory_families", "steps": args.steps,
                          "components": PRESETS["real"].components, "families": other_families(args)}))
        return

    print("validation: the tiny world's pipeline, real tensors then fake ones", flush=True)
    small = PRESETS["ood"].components  # K = 1,000: the tiny layout's N is a few thousand
    measured, allocator, _ = run_jobs(tiny_pipeline, False, args, small)
    estimated, _, _ = run_jobs(tiny_pipeline, True, args, small)
    ratios = {(job, phase): estimated[job][phase] / measured[job][phase] for job in measured for phase in measured[job]}
    print(f"{'tiny pipeline: job, phase':40s} {'real MiB':>9s} {'fake MiB':>9s} {'fake/real':>9s}")
    for (job, phase), ratio in ratios.items():
        print(f"{job + ', ' + phase:40s} {measured[job][phase] / 2**20:9.2f} {estimated[job][phase] / 2**20:9.2f} "
              f"{ratio:9.4f}")
    over_tracked = {job: allocator[job] / max(measured[job].values()) for job in measured}
    print("CPU allocator's peak / tracked peak, real tensors:",
          ", ".join(f"{job} {ratio:.3f}" for job, ratio in over_tracked.items()))
    worst = max(ratios.values(), key=lambda r: abs(r - 1))
    assert abs(worst - 1) < 0.01, f"fake tensors do not reproduce the real peaks (worst ratio {worst:.4f})"

    print("Stable Diffusion 1.5, 512 px, fake tensors", flush=True)
    sd15, _, ops = run_jobs(sd15_pipeline, True, args, PRESETS["real"].components)
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops and "_softmax" not in ops, (
        "attention did not run through the flash kernel: the estimate would count L x L attention matrices")
    print_phases("SD1.5", sd15)
    families = other_families(args)

    train = sd15["train"]
    print(json.dumps({
        "benchmark": "gpu_memory",
        "estimate_vs_measured_ratio": round(worst, 4),
        **{f"{job}_gib": gib(max(sd15[job].values())) for job in sd15 if job.startswith("generate")},
        "invert_gib": gib(max(sd15["invert"].values())),
        "train_gib": gib(train["step"]),
        **{f"{job}_gib": gib(sd15[job]["step"]) for job in sd15 if job.startswith("train_identities")},
        "train_class_images_gib": gib(max(v for phase, v in train.items() if phase.startswith("class_images"))),
        "train_encode_latents_gib": gib(train["encode_latents"]),
        "phases_gib": {job: {phase: gib(v) for phase, v in peaks.items()} for job, peaks in sd15.items()},
        "cpu_allocator_over_tracked": {job: round(ratio, 3) for job, ratio in over_tracked.items()},
        "dtypes": {"generate": str(job_dtype("generate", CUDA)), "invert": str(job_dtype("invert", CUDA)),
                   "train": str(TRAINING_DTYPE)},
        "steps": args.steps, "components": PRESETS["real"].components,
        "families": families,
    }))


if __name__ == "__main__":
    main()
