"""Text sliders in the manner of Concept Sliders (Gandikota et al. 2023, "Concept Sliders: LoRA Adaptors
for Precise Control in Diffusion Models", Sec. 3.1): a LoRA trained from a prompt pair (c+, c-) alone, so
that with it the model predicts, on a target prompt c_t,

    eps_slider(x_t, c_t, t) = eps(x_t, c_t, t) + eta * (eps(x_t, c+, t) - eps(x_t, c-, t))

and with the LoRA negated (lora_B -> -lora_B) the same with -eta; eps is the frozen base. The slider is
then fused into the UNet at a chosen scale (negative: toward c-) under any model. x_t: the base model's
own latents of c_t, noised to a random timestep (the sliders' code denoises to t with the LoRA'd model).

    latents = target_latents(pipe, "a photo of a person", count=32, steps=25, guidance=5.0)
    slider = train_slider(pipe, layout, "a photo of a person with glasses", "a photo of a person",
                          "a photo of a person", latents, SliderConfig())
    with FusedLora(pipe.unet, layout, slider, scale=1.0):  # the identity's LoRA goes on top of it
        images = generate(pipe, space, model, seeds=[0, 1])

Letters: P pooled latents, B batch, C latent channels, h x w latent size, L tokens, D text width, N
flattened LoRA numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .diffusion import encode_prompt
from .dreambooth import initial_lora_weights
from .errors import W2WError
from .layout import LoraLayout
from .network import LoraUNet


@dataclass(frozen=True)
class SliderConfig:
    """Hyper-parameters of one slider's training."""

    steps: int = field(default=60, metadata={"help": "Adam steps"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate (the tiny world's Dreambooth-LoRA one)"})
    eta: float = field(default=1.0, metadata={"help": "guidance scale of the target: how far c+ - c- moves it"})
    batch_size: int = field(default=4, metadata={"help": "noised latents per step"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA's start, the batches, noise and timesteps"})

    def __post_init__(self):
        for name, ok in (("steps", self.steps >= 1), ("lr", self.lr > 0), ("batch_size", self.batch_size >= 1)):
            if not ok:
                raise W2WError(f"slider {name} must be positive, got {getattr(self, name)}")


def negate(layout: LoraLayout, weights: torch.Tensor) -> torch.Tensor:
    """The LoRA (N,) whose weight change is minus that of `weights`: every lora_B negated."""
    return layout.join({name: (lora_a, -lora_b) for name, (lora_a, lora_b) in layout.split(weights).items()})


def slider_targets(eps_target: torch.Tensor, eps_positive: torch.Tensor, eps_negative: torch.Tensor,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided targets (B, C, h, w) of the slider at +1 and at -1."""
    guidance = eta * (eps_positive - eps_negative)
    return eps_target + guidance, eps_target - guidance


@torch.no_grad()
def target_latents(pipe, prompt: str, count: int, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """(P, C, h, w) latents (scaled as the UNet sees them) of the base model's images of `prompt`."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    return pipe([prompt] * count, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                output_type="latent").images.float()


def train_slider(pipe, layout: LoraLayout, positive: str, negative: str, target: str, latents: torch.Tensor,
                 config: SliderConfig, progress: bool = True) -> torch.Tensor:
    """The slider LoRA (N,) of the pair (positive, negative) on prompt `target`, trained on the base
    UNet of `pipe` with noised `latents` (P, C, h, w) of the target prompt."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    embed = {p: encode_prompt(pipe.tokenizer, pipe.text_encoder, p).to(device, dtype)  # (1, L, D)
             for p in (target, positive, negative)}
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed)
    weights = initial_lora_weights(layout, config.seed).to(device).requires_grad_(True)  # (N,)
    optimizer = torch.optim.Adam([weights], lr=config.lr)
    lora_unet = LoraUNet(unet, layout)
    try:
        for _ in tqdm(range(config.steps), desc=f"slider {positive!r}", disable=not progress):
            b = config.batch_size
            x0 = latents[torch.randint(len(latents), (b,), generator=generator)]          # (B, C, h, w)
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(scheduler.config.num_train_timesteps, (b,), generator=generator)
            noisy = scheduler.add_noise(x0, noise, t).to(device, dtype)
            t = t.to(device)
            with torch.no_grad():
                texts = torch.cat([embed[p].expand(b, -1, -1) for p in (target, positive, negative)])  # (3B, L, D)
                eps = unet(noisy.repeat(3, 1, 1, 1), t.repeat(3), texts).sample.float()          # (3B, C, h, w)
                up, down = slider_targets(*eps.chunk(3), config.eta)
            text = embed[target].expand(b, -1, -1)
            loss = (F.mse_loss(lora_unet(weights, noisy, t, text).sample.float(), up)
                    + F.mse_loss(lora_unet(negate(layout, weights), noisy, t, text).sample.float(), down))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        lora_unet.remove()
    return weights.detach()

