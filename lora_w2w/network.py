"""Applying flat LoRA weights (N,) to a diffusers UNet, two ways:

- `LoraUNet`: every LoRA layer computes with W + (alpha / r) * B @ A, A and B supplied at call
  time, so the output is differentiable in the weights (and so in w2w coefficients, through
  `Space.unproject`) while every base weight stays frozen and untouched. For inversion: one small
  matmul and one linear per layer, as cheap as the base layer itself.
- `FusedLora`: W <- W + scale * (alpha / r) * B @ A in every LoRA layer, so generation costs
  exactly what the base model costs; `remove()` restores the original weights bit for bit.

Both check first that the layout fits the UNet, so a space made for one base model is refused by
another before any work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayoutError
from .layout import LoraLayout
from .space import check_finite


def check_layout(unet: nn.Module, layout: LoraLayout) -> None:
    """Raise LayoutError when the LoRA layers of the UNet (or any network: a base family's `network`)
    differ from the layout's."""
    network = type(unet).__name__
    try:
        actual = LoraLayout.from_unet(unet, layout.target_modules, layout.rank, layout.alpha)
    except LayoutError as error:
        raise LayoutError(f"the {network} does not fit the LoRA layout: {error}") from None
    mismatch = layout.describe_mismatch(actual)
    if mismatch:
        raise LayoutError(f"the LoRA layout does not fit this {network} ({mismatch}): a space is tied to the base "
                          f"model it was built for")


def _linear_slot(unet: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) holding the Linear of LoRA layer `name` (inside a PEFT layer if any)."""
    module = unet.get_submodule(name)
    if hasattr(module, "base_layer"):
        return module, "base_layer"
    parent, _, leaf = name.rpartition(".")
    return unet.get_submodule(parent), leaf


def _linear(unet: nn.Module, name: str) -> nn.Linear:
    return getattr(*_linear_slot(unet, name))


class DeltaLinear(nn.Linear):
    """A frozen Linear (sharing its weight and bias) that computes with W + scaling * B @ A while
    `factors` = (A (r, in), B (out, r)) is set, and as the Linear itself otherwise."""

    def __init__(self, linear: nn.Linear, scaling: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.scaling = scaling
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factors is None:
            return super().forward(x)
        lora_a, lora_b = self.factors
        weight = torch.addmm(self.weight, lora_b, lora_a, alpha=self.scaling)  # (out, in)
        return F.linear(x, weight, self.bias)


class LoraUNet:
    """`unet` whose LoRA layers take their weights as an argument: `lora_unet(weights, sample, t, text)`.
    Freezes every parameter of the UNet; `remove()` puts the original layers and flags back."""

    def __init__(self, unet: nn.Module, layout: LoraLayout):
        check_layout(unet, layout)
        self.unet = unet
        self.layout = layout
        self.dtype = unet.dtype  # looked up once: the property walks every parameter
        self.flags = {name: p.requires_grad for name, p in unet.named_parameters()}
        unet.requires_grad_(False)
        self.deltas: dict[str, DeltaLinear] = {}
        self.originals: list[tuple[nn.Module, str, nn.Linear]] = []  # (parent, attribute, Linear)
        for name in (layer.name for layer in layout.layers):
            parent, leaf = _linear_slot(unet, name)
            original = getattr(parent, leaf)
            self.originals.append((parent, leaf, original))
            self.deltas[name] = DeltaLinear(original, layout.scaling)
            setattr(parent, leaf, self.deltas[name])

    def __call__(self, weights: torch.Tensor, *args, **kwargs):
        """The UNet's output with the LoRA `weights` (N,); differentiable in `weights`."""
        parts = self.layout.split(weights.to(self.dtype))
        try:
            for name, factors in parts.items():
                self.deltas[name].factors = factors  # (r, in), (out, r)
            return self.unet(*args, **kwargs)
        finally:
            for delta in self.deltas.values():
                delta.factors = None

    def remove(self) -> None:
        """Put the original Linear layers and requires_grad flags back."""
        for parent, leaf, original in self.originals:
            setattr(parent, leaf, original)
        self.deltas, self.originals = {}, []
        for name, p in self.unet.named_parameters():
            p.requires_grad_(self.flags.get(name, False))


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
