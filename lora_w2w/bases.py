"""Base-model families: what differs between the diffusion models a w2w space can be built on, in one place.

A family is chosen from the loaded pipeline's class and its network's config, never from a model name:
`family_of(pipe)`, or `family_of_base(base)` from a pipeline folder's (or hub id's) config files alone,
before any weights load. A family says

- how a prompt becomes the network's conditioning (`encode_prompt`, as the pipeline computes it);
- which network carries the LoRA (`network`: pipe.unet or pipe.transformer); its target layers are
  named as in every family (`layout.DEFAULT_TARGET_MODULES`: to_q and to_v of every attention, as the
  paper; the --lora-target-modules flag changes them);
- the training and inversion target (`training_scheduler`, `noisy_latents`: the noise or the velocity,
  from the scheduler's `prediction_type`) and how the network is called on noisy latents (`predict`);
- the generation call (`generate`: its default guidance, its dtype on CUDA, its timesteps, the memory its
  network's activations take) and how latents are encoded (`diffusion.latent_factors`: the VAE's scaling
  and shift factors, from its config);
- the names its LoRA files give the layers (`lora_naming`).

| family | pipeline                  | its network                         | conditioning                           |
| ------ | ------------------------- | ----------------------------------- | -------------------------------------- |
| sd1    | StableDiffusionPipeline   | UNet, 1x1-convolution projections   | CLIP's hidden states                   |
| sd2    | StableDiffusionPipeline   | UNet, Linear projections            | OpenCLIP's hidden states               |
| sdxl   | StableDiffusionXLPipeline | UNet, added text-time embedding     | two CLIPs' hidden states, the second's |
|        |                           |                                     | pooled embedding, the add_time_ids     |
| flux   | FluxPipeline              | flow-matching transformer over 2x2  | T5's hidden states, CLIP's pooled      |
|        |                           | patches of the latents              | embedding, the guidance, text ids      |

Everything else (layout, space, PCA, sampling, editing, file formats beyond key names) is family-blind.

    family = family_of(pipe)
    conditioning = family.encode_prompt(pipe, "sks person", resolution)        # once: (1, ...) tensors
    noisy, timesteps, target = family.noisy_latents(mean, std, batch, latent_factors(pipe.vae), scheduler)
    prediction = family.predict(family.network(pipe), noisy, timesteps, conditioning.repeat(len(noisy)))

A new family subclasses `Family` (its abstract methods are the whole interface) and joins FAMILIES.

Letters: B batch, L tokens, D text width, P pooled width, C latent channels, h x w latent size, R image size.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from .diffusion import StepBatch, encode_prompt, image_sizes, noisy_latents
from .errors import FamilyError, LayoutError, W2WError
from .formats import KOHYA_TRANSFORMER_PREFIX, SD_NAMING, LoraNaming
from .layout import LoraLayout


@dataclass(frozen=True)
class Conditioning:
    """A prompt's conditioning of a network, by the name the network takes it under: `batched` tensors have
    one row per sample (B, ...), `shared` ones serve every sample alike."""

    batched: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def repeat(self, count: int) -> Conditioning:
        """One sample's conditioning (1, ...) for `count` samples (count, ...), as views."""
        return Conditioning({name: t.expand(count, *t.shape[1:]) for name, t in self.batched.items()}, self.shared)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The conditionings of B_1, B_2 ... samples as one of B_1 + B_2 + ... samples (the first's shared tensors)."""
        return Conditioning({name: torch.cat([part.batched[name] for part in parts]) for name in parts[0].batched},
                            parts[0].shared)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`, the floating-point tensors in `dtype` when one is given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return Conditioning({name: move(t) for name, t in self.batched.items()},
                            {name: move(t) for name, t in self.shared.items()})


class Family(abc.ABC):
    """One kind of base pipeline, bound to its network's and scheduler's configs."""

    name: ClassVar[str]              # as the CLI and messages spell it
    pipeline: ClassVar[str]          # the diffusers pipeline class (or a base class of it)
    told_apart: ClassVar[str] = ""   # what tells it from other families of the same pipeline class
    network_name: ClassVar[str]      # the pipeline attribute of the network that carries the LoRA
    loading_arguments: ClassVar[dict] = {}  # extra from_pretrained arguments
    guidance: ClassVar[float] = 7.5  # the generation's guidance scale when none is given
    cuda_dtype: ClassVar[torch.dtype] = torch.float16  # generation's on CUDA (`pipeline.resolve_dtype`)

    def __init__(self, network_config: Mapping, scheduler_config: Mapping):
        self.network_config = network_config
        self.scheduler_config = scheduler_config

    def __repr__(self) -> str:
        return self.describe()

    @classmethod
    def describe(cls) -> str:
        """'sd2 (StableDiffusionPipeline, a UNet with Linear projections)'."""
        return f"{cls.name} ({cls.pipeline}{', ' + cls.told_apart if cls.told_apart else ''})"

    @classmethod
    def matches(cls, network_config: Mapping) -> bool:
        """Whether a pipeline of `pipeline`'s class whose network has this config is of this family."""
        return True

    # ------------------------------------------------------------------ loading

    def load_pipeline(self, base: str, dtype: torch.dtype, local_files_only: bool):
        """The pipeline from a folder or hub id, in `dtype`, on the CPU."""
        import diffusers

        return getattr(diffusers, self.pipeline).from_pretrained(base, dtype=dtype, local_files_only=local_files_only,
                                                                  **self.loading_arguments)

    def meta_network(self) -> nn.Module:
        """The network of this family's config on the meta device (no weights)."""
        import diffusers
        from accelerate import init_empty_weights

        with init_empty_weights():
            return getattr(diffusers, self.network_config["_class_name"]).from_config(self.network_config)

    # ------------------------------------------------------------------ the network and its LoRA

    def network(self, pipe) -> nn.Module:
        """The network of `pipe` that carries the LoRA."""
        return getattr(pipe, self.network_name)

    def check_layout(self, network: nn.Module, layout: LoraLayout) -> None:
        """LayoutError when `network` (this family's) lacks the layout's layers, naming the family: a space is
        tied to the base model it was built for."""
        from .network import check_layout

        try:
            check_layout(network, layout)
        except LayoutError as error:
            raise LayoutError(f"{error} (the base is {self!r})") from None

    @abc.abstractmethod
    def lora_naming(self) -> LoraNaming:
        """How LoRA files name this family's layers (the `unet.`/`transformer.` keys diffusers loads, kohya's)."""

    # ------------------------------------------------------------------ training and inversion

    @abc.abstractmethod
    def image_sizes(self, pipe) -> tuple[int, int]:
        """(image resolution R, latent size h) of the pipeline's default images."""

    @abc.abstractmethod
    def encode_prompt(self, pipe, prompt: str, resolution: int) -> Conditioning:
        """The conditioning (1, ...) of `prompt` for images of R x R pixels, as the pipeline computes it."""

    @abc.abstractmethod
    def training_scheduler(self, pipe):
        """The noise schedule that training and inversion draw noisy latents from."""

    @abc.abstractmethod
    def noisy_latents(self, mean: torch.Tensor, std: torch.Tensor, batch: StepBatch,
                      factors: tuple[float, float | None], scheduler) -> tuple[torch.Tensor, ...]:
        """Latent distributions (n, C, h, w) and a batch's draws -> (noisy latents (n, C, h, w), the timesteps
        the network is called with (n,), the target of its prediction (n, C, h, w)); `factors` are the VAE's
        (scaling, shift) (`diffusion.latent_factors`)."""

    @abc.abstractmethod
    def predict(self, network: Callable, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The network's prediction (n, C, h, w) on noisy latents (n, C, h, w) at `timesteps` (n,) under
        `conditioning` (n rows); `network` is the module or a callable taking the same arguments."""

    # ------------------------------------------------------------------ generation

    @abc.abstractmethod
    def generate(self, pipe, prompts: list[str], negative_prompt: str = "", **settings) -> list:
        """PIL images of `prompts` (one each) by the pipeline's own call; `settings`: num_inference_steps,
        guidance_scale, height, width, generator, callback_on_step_end."""

    def first_timestep(self, pipe, num_inference_steps: int, height: int, width: int) -> int:
        """The first timestep of a generation of `num_inference_steps` steps at height x width pixels."""
        pipe.scheduler.set_timesteps(num_inference_steps)
        return int(pipe.scheduler.timesteps[0])

    @abc.abstractmethod
    def activation_bytes(self, pipe, images: int, height: int, width: int) -> int:
        """About the peak bytes of the network's activations while generating `images` images of height x
        width pixels at once (`pipeline.generation_bytes`)."""


# ----------------------------------------------------------------------------- Stable Diffusion 1, 2 and XL

class StableDiffusion1(Family):
    """Stable Diffusion 1.x: one CLIP text encoder, a UNet that projects into its attention blocks with 1x1
    convolutions, the noise (epsilon) as target unless the scheduler says v_prediction."""

    name = "sd1"
    pipeline = "StableDiffusionPipeline"
    told_apart = "a UNet with convolution projections"
    network_name = "unet"
    loading_arguments = {"safety_checker": None, "requires_safety_checker": False}
    kohya_version = "sd_v1"  # kohya sd-scripts' ss_base_model_version

    @classmethod
    def matches(cls, network_config: Mapping) -> bool:
        return not network_config.get("use_linear_projection", False)

    def lora_naming(self) -> LoraNaming:
        return LoraNaming(kohya_metadata={"ss_base_model_version": self.kohya_version})

    def image_sizes(self, pipe) -> tuple[int, int]:
        return image_sizes(pipe)

    def encode_prompt(self, pipe, prompt: str, resolution: int) -> Conditioning:
        return Conditioning({"encoder_hidden_states": encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt)})

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def noisy_latents(self, mean, std, batch, factors, scheduler):
        scaling_factor, shift_factor = factors
        return noisy_latents(mean, std, batch, scaling_factor=scaling_factor, scheduler=scheduler,
                             shift_factor=shift_factor)

    def predict(self, network, noisy, timesteps, conditioning):
        return network(noisy, timesteps, conditioning.batched["encoder_hidden_states"]).sample  # (n, C, h, w)

    def generate(self, pipe, prompts, negative_prompt="", **settings):
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        return pipe(prompts, negative_prompt=negative, **settings).images

    def activation_bytes(self, pipe, images, height, width):
        """The UNet's activations at latent resolution: its skip connections, for both halves of
        classifier-free guidance."""
        network = self.network(pipe)
        itemsize = torch.finfo(network.dtype).bits // 8
        channels = network.config.block_out_channels
        return 2 * 2 * len(channels) * channels[0] * height * width // pipe.vae_scale_factor**2 * itemsize * images


class StableDiffusion2(StableDiffusion1):
    """Stable Diffusion 2.x: SD1's pipeline with OpenCLIP and a UNet that projects with Linear layers; the
    768 px models predict the velocity v (scheduler.config.prediction_type "v_prediction")."""

    name = "sd2"
    told_apart = "a UNet with Linear projections"

    @classmethod
    def matches(cls, network_config: Mapping) -> bool:
        return bool(network_config.get("use_linear_projection", False))

    def lora_naming(self) -> LoraNaming:
        # kohya sd-scripts: model_util.get_model_version_str_for_sd1_sd2 ("sd_v2", "_v" for v-parameterization)
        # and train_network.py's "ss_v2" flag
        v = self.scheduler_config.get("prediction_type") == "v_prediction"
        return LoraNaming(kohya_metadata={"ss_base_model_version": "sd_v2" + "_v" * v, "ss_v2": "True"})


class StableDiffusionXL(StableDiffusion1):
    """Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states are concatenated, the
    second's pooled (projected) embedding and the micro-conditioning add_time_ids as added conditions."""

    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    told_apart = ""
    loading_arguments = {}
    kohya_version = "sdxl_base_v1-0"  # kohya sd-scripts' sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0

    @classmethod
    def matches(cls, network_config: Mapping) -> bool:
        return True

    def lora_naming(self) -> LoraNaming:
        return LoraNaming(kohya_module=partial(sgm_module, layers_per_block=self.network_config["layers_per_block"]),
                          kohya_metadata={"ss_base_model_version": self.kohya_version})

    @torch.no_grad()
    def encode_prompt(self, pipe, prompt: str, resolution: int) -> Conditioning:
        """The pipeline's own encode_prompt (no guidance), and add_time_ids as the pipeline makes them for
        R x R images: original size, crop top-left, target size = (R, R, 0, 0, R, R)."""
        text, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)  # (1, L, D), (1, P)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return Conditioning({"encoder_hidden_states": text.float(), "text_embeds": pooled.float(),
                             "time_ids": time_ids.to(pooled.device)})

    def predict(self, network, noisy, timesteps, conditioning):
        added = {"text_embeds": conditioning.batched["text_embeds"], "time_ids": conditioning.batched["time_ids"]}
        return network(noisy, timesteps, conditioning.batched["encoder_hidden_states"],
                       added_cond_kwargs=added).sample  # (n, C, h, w)


# ----------------------------------------------------------------------------- FLUX.1

class Flux(Family):
    """FLUX.1 (Black Forest Labs): a flow-matching transformer (`pipe.transformer`: 19 double-stream and 38
    single-stream blocks in FLUX.1-dev) over 2 x 2 patches of the VAE's latents, conditioned on T5's hidden
    states, CLIP's pooled embedding and, in the guidance-distilled FLUX.1-dev, an embedded guidance scale.
    Training draws sigma uniformly among the scheduler's training sigmas, x_t = (1 - sigma) x_0 + sigma eps,
    and the network predicts the velocity eps - x_0 (diffusers' examples/dreambooth/
    train_dreambooth_lora_flux.py with its default weighting_scheme "none")."""

    name = "flux"
    pipeline = "FluxPipeline"
    network_name = "transformer"
    guidance = 3.5  # FluxPipeline's default guidance_scale (the embedded guidance of FLUX.1-dev)
    cuda_dtype = torch.bfloat16  # FLUX.1's weights are bfloat16; its activations overflow float16
    # train_dreambooth_lora_flux.py's --guidance_scale default, "the FLUX.1 dev variant is a guidance distilled
    # model": the guidance the transformer is conditioned on while training and inverting
    training_guidance = 3.5
    text_tokens = 512  # FluxPipeline's max_sequence_length default: T5's tokens, in training and generation alike
    kohya_version = "flux1"  # kohya sd-scripts' library/flux_utils.py MODEL_VERSION_FLUX_V1

    def lora_naming(self) -> LoraNaming:
        # ComfyUI's comfy/lora.py model_lora_keys_unet reads Flux LoRAs under diffusers' module names:
        # `key_map["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))] = to #onetrainer`, k the
        # keys of comfy.utils.flux_to_diffusers ("transformer_blocks.{}.attn.to_q.weight", ...); diffusers'
        # FluxLoraLoaderMixin reads the same prefix (lora_conversion_utils, _convert_mixture_state_dict_to_diffusers)
        return LoraNaming(network="transformer", kohya_prefix=KOHYA_TRANSFORMER_PREFIX,
                          kohya_metadata={"ss_base_model_version": self.kohya_version})

    def image_sizes(self, pipe) -> tuple[int, int]:
        """(R, h): R the VAE's sample_size (1,024 for FLUX.1, what FluxPipeline draws by default: its
        default_sample_size 128 times the VAE's scale 8), h = R over the VAE's scale."""
        vae = pipe.vae.config
        resolution = int(vae.sample_size)
        return resolution, resolution // 2 ** (len(vae.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, pipe, prompt: str, resolution: int) -> Conditioning:
        """The pipeline's own encode_prompt (T5's hidden states (1, L, D), CLIP's pooled embedding (1, P), the
        text ids (L, 3)) and, for a guidance-distilled transformer, the training guidance (1,)."""
        patch = 2 * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % patch:
            raise W2WError(f"resolution {resolution}: FLUX packs 2 x 2 patches of latents, so images must be a "
                           f"multiple of {patch} pixels a side")
        text, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=self.text_tokens)
        batched = {"encoder_hidden_states": text.float(), "pooled_projections": pooled.float()}
        if self.network_config.get("guidance_embeds"):
            batched["guidance"] = torch.full((1,), self.training_guidance, device=text.device)
        return Conditioning(batched, {"txt_ids": text_ids.float()})

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def noisy_latents(self, mean, std, batch, factors, scheduler):
        """The draws' timestep indices pick sigma and t among the scheduler's training ones (uniformly, as
        train_dreambooth_lora_flux.py's `indices = (u * num_train_timesteps).long()`)."""
        scaling_factor, shift_factor = factors
        latent_noise, noise, indices = (t.to(mean.device) for t in (batch.latent_noise, batch.noise, batch.timesteps))
        latents = mean + std * latent_noise                                  # (n, C, h, w)
        if shift_factor is not None:
            latents = latents - shift_factor
        latents = latents * scaling_factor                                   # (n, C, h, w)
        sigmas = scheduler.sigmas.to(mean.device)[indices].view(-1, 1, 1, 1)  # (n, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise                      # (n, C, h, w)
        return noisy, scheduler.timesteps.to(mean.device)[indices], noise - latents

    def predict(self, network, noisy, timesteps, conditioning):
        """The transformer on the latents packed into (n, h w / 4, 4 C) tokens with their image ids, at
        timestep t / 1000, as FluxPipeline calls it; its output unpacked to (n, C, h, w)."""
        from diffusers import FluxPipeline

        n, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, n, channels, height, width)  # (n, h w / 4, 4 C)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, noisy.device,
                                                           noisy.dtype)  # (h w / 4, 3)
        batched = conditioning.batched
        output = network(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000,
                         guidance=batched.get("guidance"), pooled_projections=batched["pooled_projections"],
                         encoder_hidden_states=batched["encoder_hidden_states"], txt_ids=conditioning.shared["txt_ids"],
                         img_ids=image_ids).sample                                          # (n, h w / 4, 4 C)
        return FluxPipeline._unpack_latents(output, height, width, 1)                       # (n, C, h, w)

    def generate(self, pipe, prompts, negative_prompt="", **settings):
        """FluxPipeline's call at R x R by default; `guidance_scale` is FLUX.1-dev's embedded guidance, and a
        negative prompt turns on the pipeline's true classifier-free guidance at the same scale."""
        resolution, _ = self.image_sizes(pipe)
        settings["height"] = settings.get("height") or resolution
        settings["width"] = settings.get("width") or resolution
        guidance = settings.pop("guidance_scale", None)
        guidance = self.guidance if guidance is None else guidance
        negative = (dict(negative_prompt=[negative_prompt] * len(prompts), true_cfg_scale=guidance)
                    if negative_prompt else {})
        return pipe(prompts, guidance_scale=guidance, max_sequence_length=self.text_tokens, **negative,
                    **settings).images

    def first_timestep(self, pipe, num_inference_steps, height, width):
        """FluxPipeline's schedule: sigmas from 1 to 1 / steps, shifted by mu for the image's tokens."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = pipe.scheduler.config
        patch = 2 * pipe.vae_scale_factor
        mu = calculate_shift((height // patch) * (width // patch), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if config.get("use_flow_sigmas"):
            pipe.scheduler.set_timesteps(num_inference_steps, mu=mu)
        else:
            pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)
        return int(pipe.scheduler.timesteps[0])

    def activation_bytes(self, pipe, images, height, width):
        """The transformer's activations: about 12 tokens x width tensors alive in a block (q, k, v, the
        attention's output, the 4x-wide MLP, the norms' outputs), over the text's and the image's tokens;
        true guidance runs its two calls one after the other."""
        network = self.network(pipe)
        itemsize = torch.finfo(network.dtype).bits // 8
        patch = 2 * pipe.vae_scale_factor
        tokens = (height // patch) * (width // patch) + self.text_tokens
        hidden = network.config.num_attention_heads * network.config.attention_head_dim
        return 12 * tokens * hidden * itemsize * images


FAMILIES: tuple[type[Family], ...] = (StableDiffusion1, StableDiffusion2, StableDiffusionXL, Flux)


def known_families() -> str:
    return ", ".join(family.describe() for family in FAMILIES)


_UNET_BLOCK = re.compile(r"(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)")


def sgm_module(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the path of the same module in Stability's (SGM's) UNet, which kohya
    sd-scripts' SDXL LoRAs name (its sdxl_original_unet.py: input_blocks[i] = [ResnetBlock2D,
    Transformer2DModel], middle_block = [ResnetBlock2D, Transformer2DModel, ResnetBlock2D]):
    down_blocks.b.attentions.j -> input_blocks.(1 + b (L + 1) + j).1, mid_block.attentions.0 ->
    middle_block.1, up_blocks.b.attentions.j -> output_blocks.(b (L + 1) + j).1, for L layers per block;
    what follows (transformer_blocks.0.attn1.to_q ...) is the same in both."""
    if module.startswith("mid_block.attentions.0."):
        return "middle_block.1." + module.removeprefix("mid_block.attentions.0.")
    match = _UNET_BLOCK.fullmatch(module)
    if match is None:
        raise LayoutError(f"{module}: kohya's SDXL names cover the UNet's attention blocks (down_blocks.B."
                          f"attentions.J, mid_block.attentions.0, up_blocks.B.attentions.J), not this layer")
    block, layer, stride = int(match["block"]), int(match["layer"]), layers_per_block + 1
    if match["kind"] == "down_blocks":
        return f"input_blocks.{1 + block * stride + layer}.1.{match['rest']}"
    return f"output_blocks.{block * stride + layer}.1.{match['rest']}"


# ----------------------------------------------------------------------------- choosing the family

def choose_family(pipeline_class: type, network_config: Callable[[type[Family]], Mapping]) -> type[Family]:
    """The family of a pipeline of `pipeline_class` whose network (the family's `network_name`) has the config
    `network_config(family)`; FamilyError naming the class and the families known."""
    import diffusers

    for family in FAMILIES:
        if issubclass(pipeline_class, getattr(diffusers, family.pipeline)) and family.matches(network_config(family)):
            return family
    raise FamilyError(f"a {pipeline_class.__name__} is of no base family w2w knows; expected one of: "
                      f"{known_families()}")


def family_of(pipe) -> Family:
    """The family of a loaded (or built) pipeline, from its class and its network's config."""
    family = choose_family(type(pipe), lambda f: getattr(getattr(pipe, f.network_name, None), "config", {}))
    scheduler = getattr(pipe, "scheduler", None)
    return family(getattr(pipe, family.network_name).config, scheduler.config if scheduler else {})


def family_of_base(base: str) -> Family:
    """The family of a pipeline folder or hub id from its config files alone (model_index.json, the
    network's config.json, the scheduler's), before any weights load; FamilyError for a pipeline of no
    family w2w knows, W2WError when the configs cannot be read."""
    import diffusers

    local = Path(base).is_dir()

    def read(loader, subfolder: str | None, what: str) -> dict:
        from .pipeline import loading_error

        try:
            return dict(loader.load_config(base, subfolder=subfolder, local_files_only=local))
        except (OSError, ValueError) as error:
            raise loading_error(base, local, error, f"the {what}") from None

    index = read(diffusers.DiffusionPipeline, None, "pipeline's model_index.json")
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if not isinstance(pipeline_class, type):
        raise FamilyError(f"{base}: a {index.get('_class_name')} is of no base family w2w knows; expected one of: "
                          f"{known_families()}")
    configs: dict[str, dict] = {}

    def network_config(family: type[Family]) -> dict:
        if family.network_name not in configs:
            _, class_name = index.get(family.network_name) or (None, None)
            loader = getattr(diffusers, str(class_name), None)
            configs[family.network_name] = ({} if loader is None else
                                            read(loader, family.network_name, f"{family.network_name}'s config"))
        return configs[family.network_name]

    try:
        family = choose_family(pipeline_class, network_config)
    except FamilyError as error:
        raise FamilyError(f"{base}: {error}") from None
    return family(network_config(family), read(diffusers.DDPMScheduler, "scheduler", "scheduler's config"))


def lora_naming_of_base(base: str | None, layout: LoraLayout) -> LoraNaming:
    """The names LoRA files of `layout` take for the family of the pipeline folder or hub id `base`, after
    checking from its config files alone (a meta-device network, no weights) that the layout fits its
    network; Stable Diffusion 1's names for no base."""
    if base is None:
        return SD_NAMING
    family = family_of_base(base)
    family.check_layout(family.meta_network(), layout)
    return family.lora_naming()
