"""The LoRA layout: which layers of a UNet carry a LoRA, in which order, and how a flat weight vector
of N numbers is cut into their `lora_A` (r x in) and `lora_B` (out x r) matrices.

The order is the one of the released w2w files: PEFT state-dict keys sorted as strings
(down_blocks, mid_block, up_blocks; attn1 before attn2; to_q before to_v), and per layer
`lora_A.weight` then `lora_B.weight`, each flattened row-major.

    layout = LoraLayout.from_unet(unet)                # a real UNet or one on the meta device
    parts = layout.split(weights)                      # weights (N,) or (B, N)
    weights = layout.join(parts)

Letters: B batch, N flattened LoRA numbers, r the rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import FileFormatError, LayoutError

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGET_MODULES = ("to_q", "to_v")
DEFAULT_RANK = 1
DEFAULT_ALPHA = 27.0  # the released w2w LoRAs: rank 1, lora_alpha 27, so scaling alpha / r = 27


@dataclass(frozen=True)
class LoraLayer:
    """One Linear layer carrying a LoRA: `name` is its module path in the UNet."""

    name: str
    in_features: int
    out_features: int

    def numel(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class LoraLayout:
    """The ordered LoRA layers of a UNet, with rank, alpha and target modules."""

    layers: tuple[LoraLayer, ...]
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.rank < 1:
            raise LayoutError(f"rank must be >= 1, got {self.rank}")
        if not self.layers:
            raise LayoutError(f"no LoRA layers: no Linear module named {list(self.target_modules)}")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise LayoutError("a LoRA layout names the same layer twice")
        offsets = [0]
        for layer in self.layers:
            offsets.append(offsets[-1] + layer.numel(self.rank))
        object.__setattr__(self, "_offsets", tuple(offsets))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(cls, unet: nn.Module, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
                  rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA) -> "LoraLayout":
        """The layout of every `nn.Linear` whose last name part is in `target_modules` (what PEFT's
        `target_modules` matches), sorted like PEFT's state-dict keys. Works on the meta device.
        Modules already wrapped by PEFT count by their base layer."""
        targets = tuple(target_modules)
        layers = []
        for name, module in unet.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                continue
            linear = getattr(module, "base_layer", module)
            if not isinstance(linear, nn.Linear):
                continue
            layers.append(LoraLayer(name, linear.in_features, linear.out_features))
        return cls(tuple(sorted(layers, key=lambda layer: layer.name)), rank, alpha, targets)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], alpha: float = DEFAULT_ALPHA) -> "LoraLayout":
        """The layout of PEFT keys -> 2-d shapes (a state dict's or a safetensors header's), layers in the
        mapping's order. The keys may carry one adapter name (`X.lora_A.identity1.weight`), not two."""
        parts_of = parse_peft_keys(shapes)
        shapes_of: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in shapes.items():
            name, part = parts_of[key]
            shape = tuple(int(size) for size in shape)
            if len(shape) != 2:
                raise LayoutError(f"{key}: shape {shape}, expected a 2-d LoRA matrix")
            shapes_of.setdefault(name, {})[part] = shape
        layers, ranks = [], set()
        for name, parts in shapes_of.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise LayoutError(f"layer {name!r} has {sorted(parts)}, expected lora_A and lora_B")
            (rank, in_features), (out_features, rank_b) = parts["lora_A"], parts["lora_B"]
            if rank != rank_b:
                raise LayoutError(f"layer {name!r} has lora_A rank {rank} but lora_B rank {rank_b}")
            ranks.add(rank)
            layers.append(LoraLayer(name, in_features, out_features))
        if len(ranks) > 1:
            raise LayoutError(f"expected one rank for all layers, got {sorted(ranks)}")
        targets = tuple(sorted({layer.name.rsplit(".", 1)[-1] for layer in layers}))
        return cls(tuple(layers), ranks.pop() if ranks else DEFAULT_RANK, alpha, targets)

    @classmethod
    def from_weight_dimensions(cls, weight_dimensions: Mapping[str, Sequence], alpha: float = DEFAULT_ALPHA,
                               source: str = "weight_dimensions") -> "LoraLayout":
        """The layout of the released `weight_dimensions.pt`: PEFT key -> [numel, shape], in the order the
        released vectors were flattened (the dict's order). `source` names the file in errors."""
        if not isinstance(weight_dimensions, Mapping):
            raise FileFormatError(f"{source}: expected a dict PEFT key -> [numel, shape], got "
                                  f"{type(weight_dimensions).__name__}")
        shapes = {key: _dimension_shape(key, value, source) for key, value in weight_dimensions.items()}
        try:
            return cls.from_shapes(shapes, alpha)
        except LayoutError as error:
            raise LayoutError(f"{source}: {error}") from None

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "layers": [[layer.name, layer.in_features, layer.out_features] for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraLayout":
        try:
            layers = tuple(LoraLayer(str(n), int(i), int(o)) for n, i, o in data["layers"])
            return cls(layers, int(data["rank"]), float(data["alpha"]), tuple(data["target_modules"]))
        except (KeyError, TypeError, ValueError) as error:
            raise LayoutError(f"malformed layout description: {error}") from error

    # ------------------------------------------------------------------ sizes

    @property
    def numel(self) -> int:
        """N, the length of a flat weight vector."""
        return self._offsets[-1]

    @property
    def scaling(self) -> float:
        """PEFT's LoRA scaling alpha / r: delta W = scaling * B @ A."""
        return self.alpha / self.rank

    def __len__(self) -> int:
        return len(self.layers)

    def peft_keys(self) -> list[str]:
        """The PEFT state-dict keys in flat order."""
        return [f"{PEFT_PREFIX}{layer.name}.{part}.weight" for layer in self.layers for part in ("lora_A", "lora_B")]

    def describe_mismatch(self, other: "LoraLayout") -> str | None:
        """None when the two layouts flatten the same way, else a sentence saying how they differ."""
        if self.rank != other.rank:
            return f"rank {self.rank} vs {other.rank}"
        if len(self) != len(other):
            return f"{len(self)} LoRA layers vs {len(other)}"
        for mine, theirs in zip(self.layers, other.layers):
            if mine != theirs:
                return (f"layer {mine.name} ({mine.in_features}->{mine.out_features}) vs "
                        f"{theirs.name} ({theirs.in_features}->{theirs.out_features})")
        return None

    def check_fits(self, other: "LoraLayout") -> None:
        """LayoutError naming the first difference when `other`, a LoRA file's layout, is not this one."""
        difference = self._first_difference(other)
        if difference:
            raise LayoutError(f"the LoRA does not fit the layout ({len(self)} layers of rank {self.rank}): "
                              f"{difference}")

    def _first_difference(self, other: "LoraLayout") -> str | None:
        """None when `other` has this layout's rank and layers (by name, in any order), else the first
        difference in this layout's order."""
        if self.rank != other.rank:
            return f"rank {other.rank}, expected {self.rank}"
        theirs = {layer.name: layer for layer in other.layers}
        for mine in self.layers:
            layer = theirs.pop(mine.name, None)
            if layer is None:
                return f"layer {mine.name} ({mine.in_features}->{mine.out_features}) is missing"
            if layer != mine:
                return (f"layer {mine.name} is {layer.in_features}->{layer.out_features}, expected "
                        f"{mine.in_features}->{mine.out_features}")
        if theirs:
            return f"{len(theirs)} layers not in the layout, e.g. {next(iter(theirs))}"
        return None

    # ------------------------------------------------------------------ flat <-> per-layer

    def split(self, weights: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """weights (..., N) -> {layer name: (lora_A (..., r, in), lora_B (..., out, r))}, views."""
        if weights.shape[-1] != self.numel:
            raise LayoutError(f"weight vector has {weights.shape[-1]} numbers, the layout expects N = {self.numel}")
        batch, r = weights.shape[:-1], self.rank
        parts = {}
        for layer, start in zip(self.layers, self._offsets):
            mid = start + r * layer.in_features
            end = mid + r * layer.out_features
            lora_a = weights[..., start:mid].reshape(*batch, r, layer.in_features)  # (..., r, in)
            lora_b = weights[..., mid:end].reshape(*batch, layer.out_features, r)   # (..., out, r)
            parts[layer.name] = (lora_a, lora_b)
        return parts

    def join(self, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """{layer name: (lora_A (..., r, in), lora_B (..., out, r))} -> weights (..., N)."""
        missing = [layer.name for layer in self.layers if layer.name not in parts]
        if missing:
            raise LayoutError(f"{len(missing)} LoRA layers missing, e.g. {missing[0]!r}")
        extra = sorted(set(parts) - {layer.name for layer in self.layers})
        if extra:
            raise LayoutError(f"{len(extra)} LoRA layers not in the layout, e.g. {extra[0]!r}")
        flat = []
        for layer in self.layers:
            lora_a, lora_b = parts[layer.name]
            expected_a, expected_b = (self.rank, layer.in_features), (layer.out_features, self.rank)
            if tuple(lora_a.shape[-2:]) != expected_a or tuple(lora_b.shape[-2:]) != expected_b:
                raise LayoutError(f"layer {layer.name}: lora_A {tuple(lora_a.shape)} and lora_B "
                                  f"{tuple(lora_b.shape)}, expected {expected_a} and {expected_b}")
            flat += [lora_a.flatten(-2), lora_b.flatten(-2)]
        return torch.cat(flat, dim=-1)

    def to_peft_state_dict(self, weights: torch.Tensor, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
        """weights (N,) -> {prefix + name + '.lora_A.weight': (r, in), ...} (contiguous copies)."""
        state = {}
        for name, (lora_a, lora_b) in self.split(weights).items():
            state[f"{prefix}{name}.lora_A.weight"] = lora_a.contiguous()
            state[f"{prefix}{name}.lora_B.weight"] = lora_b.contiguous()
        return state

    def from_peft_state_dict(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A PEFT/diffusers LoRA state dict (any prefix, with or without one adapter name) -> weights (N,);
        LayoutError naming the first difference when its layers, rank or shapes are not the layout's."""
        self.check_fits(LoraLayout.from_shapes({key: t.shape for key, t in state.items()}))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, (name, part) in parse_peft_keys(state).items():
            parts.setdefault(name, {})[part] = state[key]
        return self.join({name: (p["lora_A"], p["lora_B"]) for name, p in parts.items()})


_PEFT_KEY = re.compile(r"(?P<name>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


def parse_peft_key(key: str) -> tuple[str, str, str]:
    """'base_model.model.X.lora_A.weight', 'unet.X.lora_B.default.weight', 'X.lora_A.identity1.weight'
    -> ('X', 'lora_A', adapter name or ''); diffusers' files name the network first, `unet.` or `transformer.`
    (FLUX)."""
    match = _PEFT_KEY.fullmatch(key)
    if match is None:
        raise LayoutError(f"not a LoRA weight key: {key!r} (expected '<module>.lora_A.weight' or '.lora_B.weight', "
                          f"optionally with an adapter name before '.weight')")
    name = match["name"]
    for prefix in (PEFT_PREFIX, "unet.", "transformer."):
        name = name.removeprefix(prefix)
    return name, match["part"], match["adapter"] or ""


def parse_peft_keys(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{key: (module, part)} for the keys of one LoRA; LayoutError when they hold two or more adapters
    or name a matrix twice."""
    parsed = {key: parse_peft_key(key) for key in keys}
    adapters = sorted({adapter for _, _, adapter in parsed.values()})
    if len(adapters) > 1:
        names = ", ".join(repr(adapter) if adapter else "one without a name" for adapter in adapters)
        raise LayoutError(f"{len(adapters)} adapters in one LoRA ({names}); expected one: save each adapter on its own")
    seen: dict[tuple[str, str], str] = {}
    for key, (name, part, _) in parsed.items():
        if (name, part) in seen:
            raise LayoutError(f"{key!r} and {seen[name, part]!r} are both {part} of layer {name!r}")
        seen[name, part] = key
    return {key: (name, part) for key, (name, part, _) in parsed.items()}


def _dimension_shape(key: str, value, source: str) -> tuple[int, ...]:
    """A released weight_dimensions.pt value [numel, shape] -> shape. numel is read as the original reads
    it, `weight_dimensions[key][0][0]` (a 1-element sequence such as `t.flatten().shape`), or is an int or
    a 1-element tensor; shape is a torch.Size, list or tuple of ints."""
    def bad(expected: str) -> FileFormatError:
        return FileFormatError(f"{source}[{key!r}] = {' '.join(repr(value).split())}: expected [numel, shape] "
                               f"{expected}")

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise bad("(a list or tuple of two)")
    numel, shape = value
    if isinstance(numel, torch.Tensor):
        numel = numel.reshape(-1).tolist() if numel.numel() == 1 and not numel.is_floating_point() else None
    if isinstance(numel, (list, tuple)):
        numel = numel[0] if len(numel) == 1 else None
    if not isinstance(numel, int) or isinstance(numel, bool):
        raise bad("with numel an int, a 1-element torch.Size/list/tuple or a 1-element integer tensor")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise bad("with shape a torch.Size, list or tuple of ints")
    if len(shape) != 2 or _prod(tuple(shape)) != numel:
        raise bad(f"with a 2-d shape of numel numbers (numel {numel}, shape {tuple(shape)})")
    return tuple(shape)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


# The full-size networks whose layouts are known without a download: their configs ship in lora_w2w/data/,
# each as the model's own config.json (SDXL: stabilityai/stable-diffusion-xl-base-1.0 unet/; FLUX.1-dev:
# black-forest-labs/FLUX.1-dev transformer/), and `reference_layout` builds them on the meta device.
REFERENCE_NETWORKS = {
    "sd15": ("Stable Diffusion 1.5's UNet", "sd15_unet_config.json"),
    "sdxl": ("Stable Diffusion XL base 1.0's UNet", "sdxl_unet_config.json"),
    "flux": ("FLUX.1-dev's transformer", "flux1_dev_transformer_config.json"),
}


def reference_network(name: str) -> nn.Module:
    """The full-size network REFERENCE_NETWORKS[name] on the meta device, from its shipped config (no weights,
    no download): its class is the config's `_class_name` in diffusers."""
    import json
    from importlib.resources import files

    import diffusers
    from accelerate import init_empty_weights

    if name not in REFERENCE_NETWORKS:
        raise LayoutError(f"unknown reference network {name!r}; expected one of {', '.join(REFERENCE_NETWORKS)}")
    config = json.loads(files("lora_w2w").joinpath("data", REFERENCE_NETWORKS[name][1]).read_text())
    with init_empty_weights():
        return getattr(diffusers, config["_class_name"]).from_config(config)


def reference_layout(name: str, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES, rank: int = DEFAULT_RANK,
                     alpha: float = DEFAULT_ALPHA) -> LoraLayout:
    """The layout of the full-size network REFERENCE_NETWORKS[name], built on the meta device: for the
    defaults (rank 1 on to_q and to_v) SD1.5 has 64 layers and N = 99,648, SDXL 280 layers and N = 725,760,
    FLUX.1-dev 114 layers and N = 700,416."""
    return LoraLayout.from_unet(reference_network(name), target_modules, rank, alpha)


def sd15_layout(target_modules: Iterable[str] = DEFAULT_TARGET_MODULES, rank: int = DEFAULT_RANK,
                alpha: float = DEFAULT_ALPHA) -> LoraLayout:
    """The layout of Stable Diffusion 1.5's UNet, the released files' (`reference_layout("sd15")`)."""
    return reference_layout("sd15", target_modules, rank, alpha)
