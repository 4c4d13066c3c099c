"""Instant inversion: an encoder that maps images of a person to the first K coefficients of a w2w space in
one forward pass; inversion may start from its prediction and refine it (`inversion.invert(..., init=...)`),
as HyperDreamBooth refines the LoRA its hypernetwork predicts.

The encoder is a regression trained on the space's own dataset: every dataset model's coefficients c (the
PCA coordinates of its LoRA, Sec. 3) paired with each image that LoRA was trained on. Its K outputs are the
coefficients standardized per component over the training models, (c - mu) / sigma, fitted by mean squared
error, so that every component counts alike; `coefficients` undoes the standardization. A regression
predicts the mean of the models that fit an image, a blend much closer to mu than any one model (on the tiny
world a third of a dataset model's distance), which draws a faint person; `predict` moves it out by `gain`,
the dataset models' mean distance from mu over the held-out predictions' (measured after training), so that
the model it returns lies as far out as the dataset's. Several images of one person: the mean of their
predictions, moved out alike.

    encoder, fit = train_encoder(space, inputs, owners, EncoderConfig(), seed=0)  # inputs: prepare_inputs(...)
    model = encoder.predict([Image.open("me.png")])                                # a W2WModel of the space

How an encoder reads images is an entry of FEATURES: `prepare` turns PIL images into the network's input,
`network` maps that input to K outputs, `augment` varies a training batch. "pixels" is a small CNN on the
image at S x S (the tiny world's, chosen by measurement: files/tiny/README.md, "The encoder"). A reader of
photographs (dlib's face descriptor) is one more entry. Reading image folders and encoder files lives in
`encoder_files`; this module is the model and its training, on tensors.

Letters: M models, K components, I images, B batch, S image side, C channels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .checks import check_int, check_number, check_seed
from .errors import ArgumentError, SpaceError, W2WError
from .space import Space, W2WModel
from .storage import load_state, save_state

CHECKPOINT_FORMAT = "w2w-encoder-checkpoint"


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder reads, its size and its training (defaults: the tiny world's, measured)."""

    features: str = field(default="pixels", metadata={"help": "how images are read: an entry of FEATURES"})
    components: int = field(default=250, metadata={"help": "K: the first K coefficients are predicted (at most "
                                                           "the space's)"})
    image_size: int = field(default=64, metadata={"help": "S: pixels: every image resized and centre-cropped to "
                                                          "S x S"})
    channels: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata={
        "help": "pixels: the CNN's stride-2 stem, then one stage (conv, max-pool) per further width"})
    hidden: int = field(default=256, metadata={"help": "width of the hidden layer before the K outputs"})
    epochs: int = field(default=12, metadata={"help": "passes over the training models' images"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW's peak learning rate (cosine decay to 0)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW's weight decay"})
    shift: int = field(default=4, metadata={"help": "pixels: random translation of training images, in pixels"})
    held_out: float = field(default=0.1, metadata={"help": "fraction of the dataset's models held out of training, "
                                                          "on which the fit is measured"})

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ArgumentError(f"encoder features {self.features!r}: expected one of {', '.join(FEATURES)}")
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives lists
        for name in ("components", "image_size", "hidden", "epochs", "batch_size"):
            check_int(getattr(self, name), f"encoder {name}", minimum=1)
        check_int(self.shift, "encoder shift", minimum=0)
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ArgumentError(f"encoder channels {self.channels}: expected one or more integers >= 1")
        side = self.image_size // 2 ** len(self.channels)
        if side < 1:
            raise ArgumentError(f"encoder image_size {self.image_size}: {len(self.channels)} halvings leave nothing; "
                                f"expected at least {2 ** len(self.channels)} pixels")
        check_number(self.lr, "encoder lr", above=0.0)
        check_number(self.weight_decay, "encoder weight_decay", minimum=0.0)
        if not 0 < check_number(self.held_out, "encoder held_out") < 1:
            raise ArgumentError(f"encoder held_out {self.held_out}: expected a fraction between 0 and 1")


# ----------------------------------------------------------------------------- features: "pixels"

def prepare_pixels(images: Sequence[Image.Image], config: EncoderConfig) -> torch.Tensor:
    """PIL images (any size and mode) -> (B, 3, S, S) uint8, resized and centre-cropped as inversion crops them."""
    from .diffusion import prepare_image

    if not images:
        return torch.zeros(0, 3, config.image_size, config.image_size, dtype=torch.uint8)
    pixels = torch.stack([prepare_image(image, config.image_size) for image in images])  # (B, 3, S, S) in [-1, 1]
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class PixelCNN(nn.Module):
    """(B, 3, S, S) uint8 -> (B, K): a stride-2 stem, a conv and a 2x max-pool per further width, then an MLP over
    the flattened map (positions kept: face shape and spacing are positions)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        layers, width = [_conv(3, config.channels[0], stride=2)], config.channels[0]
        for c in config.channels[1:]:
            layers += [_conv(width, c), nn.MaxPool2d(2)]
            width = c
        side = config.image_size // 2 ** len(config.channels)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width * side * side, config.hidden), nn.ReLU(inplace=True),
                                  nn.Linear(config.hidden, config.components))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 127.5 - 1            # (B, 3, S, S) in [-1, 1]
        return self.head(self.features(x))       # (B, K)


def shift_pixels(pixels: torch.Tensor, config: EncoderConfig, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, 3, S, S) moved by up to config.shift pixels each way, the border repeated."""
    if config.shift == 0:
        return pixels
    s, side = config.shift, pixels.shape[-1]
    padded = F.pad(pixels.float(), (s, s, s, s), mode="replicate")          # (B, 3, S + 2s, S + 2s)
    offsets = torch.randint(0, 2 * s + 1, (len(pixels), 2), generator=generator).tolist()
    return torch.stack([image[:, dy:dy + side, dx:dx + side] for image, (dy, dx) in zip(padded, offsets)]
                       ).to(pixels.dtype)                                    # (B, 3, S, S)


@dataclass(frozen=True)
class Features:
    """One way of reading images: `prepare` (images -> the network's input, one row per image), `network`
    (config -> a module from that input to (B, K)), `augment` (a training batch varied, seeded)."""

    description: str
    prepare: Callable[[Sequence[Image.Image], EncoderConfig], torch.Tensor]
    network: Callable[[EncoderConfig], nn.Module]
    augment: Callable[[torch.Tensor, EncoderConfig, torch.Generator], torch.Tensor]


FEATURES = {
    "pixels": Features("a small CNN on the image resized to S x S (the tiny world's renders)", prepare_pixels,
                       PixelCNN, shift_pixels),
}


# ----------------------------------------------------------------------------- the encoder

class CoefficientEncoder(nn.Module):
    """Images -> the first K coefficients of the space `space_id`: the features' network predicts them
    standardized, (c - coefficient_mean) / coefficient_std."""

    def __init__(self, config: EncoderConfig, space_id: str, coefficient_mean: torch.Tensor,
                 coefficient_std: torch.Tensor, fit: dict | None = None):
        super().__init__()
        if coefficient_mean.shape != (config.components,) or coefficient_std.shape != (config.components,):
            raise SpaceError(f"coefficient mean {tuple(coefficient_mean.shape)} and std "
                             f"{tuple(coefficient_std.shape)}: expected ({config.components},) each")
        self.config, self.space_id, self.fit = config, space_id, dict(fit or {})
        self.network = FEATURES[config.features].network(config)
        self.register_buffer("coefficient_mean", coefficient_mean.float())  # (K,)
        self.register_buffer("coefficient_std", coefficient_std.float())    # (K,)
        self.register_buffer("gain", torch.ones(()))                        # (): how far `predict` moves out

    @property
    def components(self) -> int:
        """K."""
        return self.config.components

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Prepared inputs (B, ...) -> standardized coefficients (B, K)."""
        return self.network(inputs)

    def coefficients(self, inputs: torch.Tensor) -> torch.Tensor:
        """Prepared inputs (B, ...) -> coefficients (B, K)."""
        return self(inputs) * self.coefficient_std + self.coefficient_mean

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the network's input (I, ...)."""
        return FEATURES[self.config.features].prepare(list(images), self.config)

    @torch.no_grad()
    def predict(self, images: Image.Image | Sequence[Image.Image]) -> W2WModel:
        """The model of the person in `images` (one or several of them): the mean of their predictions, moved
        `gain` times as far from the coefficients' mean."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise W2WError("no image to encode; expected at least one")
        was_training = self.training
        self.eval()
        device = self.coefficient_mean.device
        coefficients = self.coefficients(self.prepare(images).to(device)).mean(0)  # (K,)
        self.train(was_training)
        return W2WModel((self.coefficient_mean + self.gain * (coefficients - self.coefficient_mean)).cpu(), self.space_id)

    def check_space(self, space: Space, name: str = "the encoder") -> None:
        """SpaceError when the encoder was trained for another space, or predicts more components than it has."""
        if self.space_id != space.id:
            raise SpaceError(f"{name} belongs to space {self.space_id}, not to this space ({space.id}); train one "
                             f"for it with `w2w train-encoder`")
        if self.components > space.num_components:
            raise SpaceError(f"{name} predicts K = {self.components} coefficients, the space has "
                             f"K = {space.num_components}")


# ----------------------------------------------------------------------------- training

def split_models(num_models: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training models, held-out models): a seeded shuffle of 0 .. M-1, round(held_out * M) held out (at least
    one of each)."""
    if num_models < 2:
        raise SpaceError(f"the space has {num_models} dataset model(s); an encoder needs at least 2 (one to train "
                         f"on, one to hold out)")
    order = torch.randperm(num_models, generator=torch.Generator().manual_seed(seed))  # (M,)
    held = min(max(1, round(held_out * num_models)), num_models - 1)
    return order[held:].sort().values, order[:held].sort().values


def fit_scores(predicted: torch.Tensor, true: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """How predicted coefficients (B, K) fit the true ones (B, K): R^2 = 1 - |p - c|^2 / |c - mean|^2 summed over
    rows and components (0: no better than predicting `mean` (K,), the training models' mean), and the mean
    cosine of p and c over rows."""
    residual = (predicted - true).square().sum()
    spread = (true - mean).square().sum()
    cosine = F.cosine_similarity(predicted, true, dim=1).mean()  # (B,) -> ()
    return {"r2": float(1 - residual / spread), "cosine": float(cosine)}


@torch.no_grad()
def held_out_fit(encoder: CoefficientEncoder, inputs: torch.Tensor, owners: torch.Tensor, targets: torch.Tensor,
                 held: torch.Tensor, train: torch.Tensor, batch_size: int = 256) -> dict:
    """The fit of the (unmoved) predictions on the held-out models' images: per image, per model (the mean of
    its images' predictions), and the mean predictor's R^2 (what any encoder should beat); and the gain: the
    training models' mean distance from the coefficients' mean over the held-out predictions'."""
    encoder.eval()
    device = encoder.coefficient_mean.device
    rows = torch.isin(owners, held).nonzero()[:, 0]                                        # (I_h,)
    predicted = torch.cat([encoder.coefficients(inputs[chunk].to(device)).cpu()
                           for chunk in rows.split(batch_size)])                          # (I_h, K)
    true, mean = targets[owners[rows]], encoder.coefficient_mean.cpu()                    # (I_h, K), (K,)
    per_model = torch.stack([predicted[owners[rows] == m].mean(0) for m in held])         # (M_h, K)
    per_image, of_models = fit_scores(predicted, true, mean), fit_scores(per_model, targets[held], mean)
    gain = (targets[train] - mean).norm(dim=1).mean() / (predicted - mean).norm(dim=1).mean()
    return {"models": len(held), "images": len(rows), "components": encoder.components, **per_image,
            "r2_mean_of_images": of_models["r2"], "cosine_mean_of_images": of_models["cosine"],
            "r2_mean_predictor": fit_scores(mean.expand_as(true), true, mean)["r2"], "gain": float(gain)}


def run_fingerprint(space: Space, config: EncoderConfig, seed: int, inputs: torch.Tensor, owners: torch.Tensor
                    ) -> dict:
    """What a checkpoint must share with a run to resume it (all of it: the epochs set the learning-rate schedule)."""
    digest = hashlib.sha256(inputs.contiguous().numpy().tobytes())
    digest.update(owners.contiguous().numpy().tobytes())
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"space": space.id, "seed": seed, "inputs": digest.hexdigest()[:16], "config": settings}


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate falls from its peak to 0 along half a cosine over `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def _train_epoch(encoder: CoefficientEncoder, inputs: torch.Tensor, standardized: torch.Tensor, owners: torch.Tensor,
                 rows: torch.Tensor, optimizer, schedule, generator: torch.Generator, bar) -> float:
    """One pass over the training images `rows` in a seeded order; the mean loss."""
    config, device = encoder.config, encoder.coefficient_mean.device
    augment = FEATURES[config.features].augment
    encoder.train()
    losses = []
    for batch in rows[torch.randperm(len(rows), generator=generator)].split(config.batch_size):
        x = augment(inputs[batch], config, generator).to(device)        # (B, ...)
        y = standardized[owners[batch]].to(device)                      # (B, K)
        loss = F.mse_loss(encoder(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(len(batch))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return float(np.mean(losses))


def train_encoder(space: Space, inputs: torch.Tensor, owners: torch.Tensor, config: EncoderConfig = EncoderConfig(),
                  seed: int = 0, device: str | torch.device = "cpu", checkpoint: str | os.PathLike | None = None,
                  progress: bool = True) -> CoefficientEncoder:
    """An encoder of `space` trained on its dataset models' images: `inputs` (I, ...) prepared by the config's
    features, `owners` (I,) the dataset model (row of space.coefficients) each image belongs to. Models are split
    (seeded) into training and held-out ones; the fit on the held-out ones is the encoder's `fit`. With
    `checkpoint`, the run's state is saved there after every epoch, and a run finding it there resumes from it
    (to the result of an uninterrupted run)."""
    check_seed(seed)
    k = space.check_k(config.components)
    if space.coefficients is None or space.coefficients.shape[1] < k:
        raise SpaceError(f"the space holds no dataset coefficients for K = {k} (an encoder learns them); build it "
                         f"with `w2w build` or import the released proj_1000pc.pt")
    if len(inputs) != len(owners) or not len(owners):
        raise W2WError(f"{len(inputs)} images for {len(owners)} owners; expected one owner per image, at least one")
    targets = space.coefficients[:, :k].float()                                        # (M, K)
    train, held = split_models(len(targets), config.held_out, seed)
    mean, std = targets[train].mean(0), targets[train].std(0).clamp_min(1e-8)          # (K,) each
    torch.manual_seed(seed)
    encoder = CoefficientEncoder(config, space.id, mean, std).to(device)
    rows = torch.isin(owners, train).nonzero()[:, 0]                                   # (I_t,)
    if not len(rows):
        raise W2WError("no image belongs to a training model; expected images of every model")
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = _cosine_schedule(optimizer, config.epochs * math.ceil(len(rows) / config.batch_size))
    generator = torch.Generator().manual_seed(seed)
    fingerprint = run_fingerprint(space, config, seed, inputs, owners)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = _load_checkpoint(checkpoint, fingerprint, encoder, optimizer, schedule, generator)
    standardized = (targets - mean) / std                                              # (M, K)
    with tqdm(total=config.epochs * len(rows), initial=start * len(rows), desc="encoder", unit="image",
              disable=not progress) as bar:
        for epoch in range(start, config.epochs):
            _train_epoch(encoder, inputs, standardized, owners, rows, optimizer, schedule, generator, bar)
            if checkpoint is not None:
                save_state(checkpoint, CHECKPOINT_FORMAT, {
                    "fingerprint": fingerprint, "epoch": epoch + 1, "encoder": encoder.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "rng": generator.get_state()})
    encoder.fit = held_out_fit(encoder, inputs, owners, targets, held, train)
    encoder.gain.fill_(encoder.fit["gain"])
    return encoder.eval()


def _load_checkpoint(path: str | os.PathLike, fingerprint: dict, encoder: CoefficientEncoder, optimizer, schedule,
                     generator: torch.Generator) -> int:
    """Restore a training run's state from `path`; returns the number of epochs it had done."""
    state = load_state(path, CHECKPOINT_FORMAT)
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise W2WError(f"{path}: a checkpoint of another training run ({key} {state['fingerprint'].get(key)!r} "
                           f"there, {value!r} here); delete it or choose another checkpoint path")
    encoder.load_state_dict(state["encoder"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["rng"])
    return int(state["epoch"])
