"""Applying flat LoRA weights (N,) to a diffusers UNet, two ways:

- `LoraUNet`: a PEFT adapter whose lora_A/lora_B are supplied at call time through
  `torch.func.functional_call`, so the output is differentiable in the weights (and so in w2w
  coefficients, through `Space.unproject`) while every base weight stays untouched. For inversion.
- `FusedLora`: W <- W + scale * (alpha / r) * B @ A in every LoRA layer, so generation costs
  exactly what the base model costs; `remove()` restores the original weights bit for bit.

Both check first that the layout fits the UNet, so a space made for one base model is refused by
another before any work.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .errors import LayoutError
from .layout import LoraLayout
from .space import check_finite

ADAPTER_NAME = "w2w"


def check_layout(unet: nn.Module, layout: LoraLayout) -> None:
    """Raise LayoutError when the UNet's LoRA layers differ from the layout's."""
    try:
        actual = LoraLayout.from_unet(unet, layout.target_modules, layout.rank, layout.alpha)
    except LayoutError as error:
        raise LayoutError(f"the UNet does not fit the LoRA layout: {error}") from None
    mismatch = layout.describe_mismatch(actual)
    if mismatch:
        raise LayoutError(f"the LoRA layout does not fit this UNet ({mismatch}): a space is tied to the base "
                          f"model it was built for")


def _linear(unet: nn.Module, name: str) -> nn.Linear:
    module = unet.get_submodule(name)
    return getattr(module, "base_layer", module)


class LoraUNet(nn.Module):
    """`unet` with a w2w LoRA adapter whose weights are an argument: `lora_unet(weights, sample, t, text)`."""

    def __init__(self, unet: nn.Module, layout: LoraLayout):
        super().__init__()
        check_layout(unet, layout)
        if ADAPTER_NAME not in getattr(unet, "peft_config", {}):
            from peft import LoraConfig

            config = LoraConfig(r=layout.rank, lora_alpha=layout.alpha, target_modules=list(layout.target_modules),
                                init_lora_weights=True)  # lora_B = 0: at rest the adapter changes nothing
            unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        unet.set_adapter(ADAPTER_NAME)
        self.unet = unet
        self.layout = layout
        self.dtype = unet.dtype  # looked up once: the property walks every parameter

    def lora_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """weights (N,) -> the adapter's parameter names and their values."""
        params = {}
        for name, (lora_a, lora_b) in self.layout.split(weights).items():
            params[f"{name}.lora_A.{ADAPTER_NAME}.weight"] = lora_a  # (r, in)
            params[f"{name}.lora_B.{ADAPTER_NAME}.weight"] = lora_b  # (out, r)
        return params

    def forward(self, weights: torch.Tensor, *args, **kwargs):
        """The UNet's output with the LoRA `weights` (N,); differentiable in `weights`."""
        params = self.lora_parameters(weights.to(self.dtype))
        return functional_call(self.unet, params, args, kwargs, strict=False, tie_weights=False)


class FusedLora:
    """LoRA weights (N,) fused into the UNet's base weights; use as a context manager or call remove()."""

    def __init__(self, unet: nn.Module, layout: LoraLayout, weights: torch.Tensor, scale: float = 1.0):
        check_layout(unet, layout)
        check_finite(weights, "LoRA weights")
        self.unet = unet
        self.originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, (lora_a, lora_b) in layout.split(weights.detach()).items():
                linear = _linear(unet, name)
                self.originals[name] = linear.weight.detach().clone()
                delta = (scale * layout.scaling) * (lora_b.float() @ lora_a.float())  # (out, in)
                linear.weight.add_(delta.to(linear.weight))

    def remove(self) -> None:
        """Restore the original base weights exactly."""
        with torch.no_grad():
            for name, original in self.originals.items():
                _linear(self.unet, name).weight.copy_(original)
        self.originals = {}

    def __enter__(self) -> "FusedLora":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
