"""The tiny world's evaluator: a small CNN that reads the CelebA attributes, the expression and the
identity traits of `synthetic` off 64 x 64 images, and whether a face is there at all. It stands in for
the paper's attribute classifiers and its FaceNet identity score: sampling, editing and inversion
on the tiny world are scored with it.

    from lora_w2w.tiny.evaluator import Evaluator, identity_similarity, attribute_agreement
    evaluator = Evaluator.load()                       # files/tiny/evaluator.safetensors
    pred = evaluator.predict(images)                   # PIL images (any size) or (B, 3, H, W) in [0, 1]
    pred.attributes                                    # DataFrame of +1/-1: ATTRIBUTES + Smiling
    identity_similarity(pred, evaluator.predict(references))   # (B,) cosine, like FaceNet's ID score
    attribute_agreement(pred, sample_identity(7).attributes)    # fraction of attributes that match

Training renders fresh identities on the fly (seeds 20,000,000 + ..., validation 21,000,000 + ...),
degrades them like generated images (blur, noise, JPEG, colour jitter, down-up sampling, and the
tiny VAE's round trip with --vae), mixes in non-face images for the face head, then measures:

    nice -n 10 python -m lora_w2w.tiny.evaluator --out files/tiny/evaluator.safetensors --vae files/tiny/base
    python -m lora_w2w.tiny.evaluator --evaluate-only --vae files/tiny/base   # measure again, no training
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from lora_w2w.defaults import DEFAULT_EVALUATOR
from lora_w2w.images import eight_bit
from lora_w2w.errors import FileFormatError
from lora_w2w.storage import atomic_output
from lora_w2w.tiny import synthetic
from lora_w2w.tiny.synthetic import ATTRIBUTES, IMAGE_ATTRIBUTES, TRAITS

DEFAULT_PATH = DEFAULT_EVALUATOR
FORMAT = "lora_w2w.tiny.evaluator/1"
LABELS: tuple[str, ...] = ATTRIBUTES + IMAGE_ATTRIBUTES   # the binary outputs
CIRCULAR_TRAITS: tuple[str, ...] = ("clothes_hue",)       # hue 0 == hue 1: predicted as (cos, sin)
# Identity seeds of no other set (weights dataset 0+, base model 1M+, its samples 2M+, demo 3M+, study 4M+).
TRAIN_FIRST_SEED, VALIDATION_FIRST_SEED = 20_000_000, 21_000_000
PERSON_PROMPT = "a photo of a person"


# ----------------------------------------------------------------------------------------------
# The network

@dataclass
class EvaluatorConfig:
    """Sizes of the CNN: a stride-2 stem, one stage (two 3x3 convs, max-pool) per channel, then a
    1x1 conv and an MLP over the flattened map (not a global average: traits are positions)."""

    stem_channels: int = 16
    stage_channels: tuple[int, ...] = (32, 64, 128)
    head_channels: int = 32   # 1x1 conv before flattening the (S/16 x S/16) map
    hidden: int = 128
    image_size: int = 64

    def __post_init__(self):
        self.stage_channels = tuple(self.stage_channels)  # JSON gives lists


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


TRAIT_OUTPUTS = len(TRAITS) + len(CIRCULAR_TRAITS)  # width of the trait head


def _trait_parts(outputs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Trait head outputs (B, TRAIT_OUTPUTS) -> (trait, its columns: (B, 1), or (B, 2) if circular)."""
    parts, i = [], 0
    for trait in TRAITS:
        width = 2 if trait in CIRCULAR_TRAITS else 1
        parts.append((trait, outputs[:, i:i + width]))
        i += width
    return parts


def _circle(hue: torch.Tensor) -> torch.Tensor:
    """(...,) in [0, 1] -> (..., 2) point on the unit circle."""
    angle = 2 * torch.pi * hue
    return torch.stack([angle.cos(), angle.sin()], dim=-1)


def _hue(point: torch.Tensor) -> torch.Tensor:
    """(..., 2) -> (...,) in [0, 1): the inverse of _circle."""
    return torch.atan2(point[..., 1], point[..., 0]).div(2 * torch.pi).remainder(1.0)


@dataclass
class Prediction:
    """What the evaluator reads off B images."""

    attributes: pd.DataFrame      # (B, len(LABELS)) +1/-1
    probabilities: pd.DataFrame   # (B, len(LABELS)) P(attribute)
    traits: np.ndarray            # (B, len(TRAITS)) in [0, 1]
    face_confidence: np.ndarray   # (B,) P(a face is there), from a head trained against non-faces

    def __len__(self) -> int:
        return len(self.traits)

    def select(self, rows) -> "Prediction":
        """The prediction of some rows only: a slice, integer positions or a boolean mask."""
        rows = np.arange(len(self))[rows]
        return Prediction(self.attributes.iloc[rows].reset_index(drop=True),
                          self.probabilities.iloc[rows].reset_index(drop=True),
                          self.traits[rows], self.face_confidence[rows])


class Evaluator(nn.Module):
    """CNN with three linear heads on shared features: attribute logits, traits, face logit."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = config = config or EvaluatorConfig()
        layers, width = [_conv(3, config.stem_channels, stride=2)], config.stem_channels
        for c in config.stage_channels:
            layers += [_conv(width, c), _conv(c, c), nn.MaxPool2d(2)]
            width = c
        side = config.image_size // 2 ** (1 + len(config.stage_channels))
        self.features = nn.Sequential(
            *layers, nn.Conv2d(width, config.head_channels, 1), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(config.head_channels * side * side, config.hidden), nn.ReLU(inplace=True))
        self.attribute_head = nn.Linear(config.hidden, len(LABELS))
        self.trait_head = nn.Linear(config.hidden, TRAIT_OUTPUTS)
        self.face_head = nn.Linear(config.hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, S, S) in [0, 1] -> attribute logits (B, A), trait outputs (B, TRAIT_OUTPUTS),
        face logit (B,)."""
        side = self.config.image_size
        assert x.shape[1:] == (3, side, side), f"expected (B, 3, {side}, {side}), got {tuple(x.shape)}"
        h = self.features(2 * x - 1)  # (B, hidden)
        return self.attribute_head(h), self.trait_head(h), self.face_head(h)[:, 0]

    @staticmethod
    def traits_from_outputs(outputs: torch.Tensor) -> torch.Tensor:
        """Trait head outputs (B, TRAIT_OUTPUTS) -> traits (B, T) in [0, 1]."""
        return torch.stack([_hue(part) if trait in CIRCULAR_TRAITS else part[:, 0].sigmoid()
                            for trait, part in _trait_parts(outputs)], dim=1)  # (B, T)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> Prediction:
        """Attributes, traits and face confidence of `images`: PIL images of any size and mode, or a
        float tensor (B, 3, H, W) in [0, 1]; everything is resized to config.image_size."""
        x = images_to_tensor(images, self.config.image_size)  # (B, 3, S, S)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        outputs = [self(chunk.to(device)) for chunk in x.split(batch_size)]
        self.train(was_training)
        logits, trait_out, face = (torch.cat(o).float().cpu() for o in zip(*outputs))
        p = logits.sigmoid().numpy()  # (B, A)
        return Prediction(
            attributes=pd.DataFrame(np.where(p > 0.5, 1, -1), columns=list(LABELS)),
            probabilities=pd.DataFrame(p, columns=list(LABELS)),
            traits=self.traits_from_outputs(trait_out).numpy(),
            face_confidence=face.sigmoid().numpy(),
        )

    @torch.no_grad()
    def stage_features(self, images) -> list[torch.Tensor]:
        """The conv feature maps (B, C_s, H_s, W_s) after the stem and after each stage, of `images` as
        `predict` takes them."""
        x = 2 * images_to_tensor(images, self.config.image_size).to(next(self.parameters()).device) - 1
        maps = []
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.Flatten):
                break
            x = layer(x)
            if i == 0 or isinstance(layer, nn.MaxPool2d):  # the stem, then the end of each stage
                maps.append(x)
        return maps

    def save(self, path: str | os.PathLike) -> None:
        """Weights and config in one safetensors file, written to a temporary name then renamed."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_output(path) as tmp:
            save_file(state, tmp, metadata={"format": FORMAT, "config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_PATH) -> "Evaluator":
        """An evaluator saved by `save` (or by this module's training script), in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"{path}: no evaluator there; train one with "
                                  f"`python -m lora_w2w.tiny.evaluator --out {path}`")
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise FileFormatError(f"{path}: expected an evaluator file of format {FORMAT!r}, "
                                  f"got {metadata.get('format')!r}")
        evaluator = cls(EvaluatorConfig(**json.loads(metadata["config"])))
        evaluator.load_state_dict(load_file(path))
        return evaluator.eval()


def images_to_tensor(images, size: int = 64) -> torch.Tensor:
    """A PIL image, a list of them (any size and mode) or a float tensor (B, 3, H, W) in [0, 1]
    -> (B, 3, size, size) float32 in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        x = x[None] if x.ndim == 3 else x
        assert x.ndim == 4 and x.shape[1] == 3, f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}"
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)
    arrays = [np.asarray(eight_bit(im).convert("RGB").resize((size, size), Image.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)  # (B, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Identity scores

@functools.lru_cache(maxsize=1)
def _population(num_identities: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (D,) of the embedding features of `num_identities` true identities (seeds 0..)."""
    people = [synthetic.sample_identity(seed) for seed in range(num_identities)]
    traits = np.stack([p.traits for p in people])  # (M, T)
    attributes = np.array([[p.attributes[a] for a in ATTRIBUTES] for p in people], np.float64)  # (M, A)
    features = _embedding_features(traits, 2 * attributes - 1)  # (M, D)
    return features.mean(0), features.std(0)


def _embedding_features(traits: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """traits (B, T) in [0, 1], identity attributes (B, A) in [-1, 1] -> (B, D) raw features;
    circular traits become (cos, sin) so that hue 0.99 is near hue 0.01."""
    columns = []
    for i, trait in enumerate(TRAITS):
        if trait in CIRCULAR_TRAITS:
            angle = 2 * np.pi * traits[:, i]
            columns += [np.cos(angle), np.sin(angle)]
        else:
            columns.append(traits[:, i])
    return np.column_stack([*columns, attributes])  # (B, D)


def identity_embedding(pred: Prediction) -> np.ndarray:
    """(B, D) identity features: predicted traits and identity attributes (2p - 1), each standardized
    by the distribution of true identities, so that cosine similarity compares people."""
    attributes = 2 * pred.probabilities[list(ATTRIBUTES)].to_numpy() - 1  # (B, A)
    mean, std = _population()
    return (_embedding_features(pred.traits, attributes) - mean) / std  # (B, D)


def identity_similarity(a: Prediction, b: Prediction) -> np.ndarray:
    """(B,) cosine similarity of the identity embeddings of a's and b's rows, pair by pair (one
    side may have a single row): the tiny world's analogue of the paper's FaceNet ID score."""
    from ..identity import pair_similarities

    return pair_similarities(identity_embedding(a), identity_embedding(b))  # (B, D), (B, D) or (1, D)


def feature_distance(evaluator: Evaluator, a, b) -> np.ndarray:
    """(B,) LPIPS-style distance of image a[i] to b[i] (Zhang et al. 2018, without the learned channel
    weights): at each of the evaluator's conv stages, the squared difference of the channel-normalized
    feature vectors averaged over positions; then the mean over stages (0: same features, at most 4)."""
    distances = []
    for fa, fb in zip(evaluator.stage_features(a), evaluator.stage_features(b)):  # (B, C, H, W) each
        fa, fb = F.normalize(fa, dim=1), F.normalize(fb, dim=1)
        distances.append((fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2)))          # (B,)
    return torch.stack(distances).mean(dim=0).cpu().numpy()


def attribute_agreement(pred: Prediction, truth, attributes=ATTRIBUTES) -> float:
    """Fraction of `attributes` (over all rows of `pred`) read as in `truth`: a dict name -> bool or
    a Series of bools or +1/-1 (a row of synthetic.attribute_row / attributes.csv)."""
    expected = np.array([bool(truth[a] > 0) for a in attributes])  # (A,)
    read = pred.attributes[list(attributes)].to_numpy() > 0  # (B, A)
    return float((read == expected).mean())


# ----------------------------------------------------------------------------------------------
# Data: faces with labels, non-faces, degradations like those of generated images

@dataclass
class TrainingBatch:
    images: torch.Tensor      # (B, 3, S, S) in [0, 1]
    labels: torch.Tensor      # (B, len(LABELS)) 0/1, rows of non-faces are ignored
    traits: torch.Tensor      # (B, T) in [0, 1]
    is_face: torch.Tensor     # (B,) bool


def render_faces(identity_seeds, view_seeds, size: int = 64):
    """PIL images, labels (B, len(LABELS)) and traits (B, T) of identities seen in views."""
    images, labels, traits = [], [], []
    for seed, view_seed in zip(identity_seeds, view_seeds):
        person = synthetic.sample_identity(int(seed))
        images.append(synthetic.render(person, int(view_seed), size))
        labels.append([person.attributes[a] for a in ATTRIBUTES] + [synthetic.view_smiling(int(view_seed))])
        traits.append(person.traits)
    return images, np.array(labels, np.float32), np.stack(traits)


def non_face(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """An image with no face: smooth noise, random blobs, or a rendered face cut up and shuffled."""
    kind = rng.integers(3)
    if kind == 0:  # coloured noise, smooth at a random scale
        cells = int(rng.choice([2, 4, 8, 16, 64]))
        noise = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        return Image.fromarray(noise).resize((size, size), Image.BICUBIC)
    if kind == 1:  # blobs on a gradient
        image = Image.fromarray(rng.uniform(40, 220, (2, 2, 3)).astype(np.uint8)).resize(
            (size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 7)):
            x, y = rng.uniform(-0.2, 1.0, 2) * size
            w, h = rng.uniform(0.1, 0.7, 2) * size
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return image
    person = synthetic.sample_identity(int(rng.integers(2**31)))  # a face in 4 x 4 shuffled tiles
    tiles = np.asarray(synthetic.render(person, int(rng.integers(2**31)), size))  # (S, S, 3)
    t = size // 4
    tiles = tiles.reshape(4, t, 4, t, 3).transpose(0, 2, 1, 3, 4).reshape(16, t, t, 3)
    tiles = tiles[rng.permutation(16)].reshape(4, 4, t, t, 3).transpose(0, 2, 1, 3, 4)
    return Image.fromarray(np.ascontiguousarray(tiles.reshape(size, size, 3)))


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random degradations of generated images: flip, blur, down-up sampling, colour jitter, JPEG."""
    size = image.size[0]
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.3)))
    if rng.random() < 0.3:
        small = int(rng.integers(size // 2, size - 4))
        image = image.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:  # per-channel gain and saturation, mild: colours carry attributes
        pixels = np.asarray(image, np.float32)  # (S, S, 3)
        grey = pixels.mean(axis=2, keepdims=True)
        pixels = (grey + rng.uniform(0.8, 1.2) * (pixels - grey)) * rng.uniform(0.94, 1.06, 3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
        image = Image.open(buffer).convert("RGB")
    return image


def add_noise(x: torch.Tensor, std: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """x (B, 3, S, S) plus Gaussian noise of per-image std (B,), clamped to [0, 1]."""
    noise = rng.standard_normal(x.shape, dtype=np.float32) * std[:, None, None, None].astype(np.float32)
    return (x + torch.from_numpy(noise)).clamp(0, 1)


def blur_and_noise(images: list[Image.Image], rng: np.random.Generator, radius: float = 0.8,
                   noise: float = 0.03) -> torch.Tensor:
    """The fixed 'degraded' condition of the measurements: Gaussian blur, then Gaussian noise."""
    blurred = [im.filter(ImageFilter.GaussianBlur(radius)) for im in images]
    return add_noise(images_to_tensor(blurred), np.full(len(images), noise), rng)


def load_vae(path: str | os.PathLike):
    """The AutoencoderKL of a tiny pipeline folder (or of its vae/ folder), in eval mode."""
    from diffusers import AutoencoderKL
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileFormatError(f"{path}: expected a diffusers pipeline folder or its vae/ folder")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()


@torch.no_grad()
def vae_round_trip(vae, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """x (B, 3, S, S) in [0, 1] -> encoded (posterior mode) and decoded by the VAE, in [0, 1]."""
    out = []
    for chunk in x.split(batch_size):
        latents = vae.encode(2 * chunk - 1).latent_dist.mode()  # (b, 4, S/4, S/4)
        out.append(vae.decode(latents).sample.add(1).div(2).clamp(0, 1))  # (b, 3, S, S)
    return torch.cat(out)


def training_batch(step: int, args: argparse.Namespace, vae=None) -> TrainingBatch:
    """TrainingBatch `step`: fresh identities (one view each), a share of non-faces, all augmented, and
    a share passed through the VAE. Deterministic from (args.seed, step)."""
    rng = np.random.default_rng([args.seed, step])
    b = args.batch_size
    is_face = rng.random(b) >= args.non_face_fraction  # (B,)
    seeds = args.first_seed + step * b + np.arange(b)
    face_images, labels, traits = render_faces(seeds[is_face], rng.integers(2**31, size=b)[is_face])
    images, k = [], 0
    for face in is_face:
        images.append(augment(face_images[k] if face else non_face(rng), rng))
        k += face
    x = images_to_tensor(images)  # (B, 3, S, S)
    if vae is not None:
        through = torch.from_numpy(rng.random(b) < args.vae_fraction)  # (B,)
        if through.any():
            x[through] = vae_round_trip(vae, x[through])
    x = add_noise(x, rng.uniform(0, args.max_noise, b) * (rng.random(b) < 0.5), rng)
    all_labels = np.zeros((b, len(LABELS)), np.float32)
    all_traits = np.full((b, len(TRAITS)), 0.5, np.float32)
    all_labels[is_face], all_traits[is_face] = labels, traits
    return TrainingBatch(x, torch.from_numpy(all_labels), torch.from_numpy(all_traits), torch.from_numpy(is_face))


# ----------------------------------------------------------------------------------------------
# Training

def trait_targets(traits: torch.Tensor) -> torch.Tensor:
    """True traits (B, T) -> what the trait head regresses (B, TRAIT_OUTPUTS): the trait itself,
    (cos, sin) for a circular one."""
    return torch.cat([_circle(traits[:, i]) if t in CIRCULAR_TRAITS else traits[:, i:i + 1]
                      for i, t in enumerate(TRAITS)], dim=1)


def loss_fn(model: Evaluator, batch: TrainingBatch, trait_weight: float) -> torch.Tensor:
    """BCE on attributes and MSE on traits (faces only) plus BCE on face / not a face."""
    logits, trait_out, face_logit = model(batch.images)  # (B, A), (B, TRAIT_OUTPUTS), (B,)
    face = batch.is_face  # (B,)
    attribute_loss = F.binary_cross_entropy_with_logits(logits[face], batch.labels[face])
    regressed = torch.cat([part if t in CIRCULAR_TRAITS else part.sigmoid()
                           for t, part in _trait_parts(trait_out)], dim=1)  # (B, TRAIT_OUTPUTS)
    trait_loss = F.mse_loss(regressed[face], trait_targets(batch.traits[face]))
    face_loss = F.binary_cross_entropy_with_logits(face_logit, face.float())
    return attribute_loss + trait_weight * trait_loss + face_loss


class _Batches(torch.utils.data.Dataset):
    """training_batch(step) for step in range(args.steps), so that workers can render ahead."""

    def __init__(self, args: argparse.Namespace, vae=None):
        self.args, self.vae = args, vae

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int) -> TrainingBatch:
        return training_batch(step, self.args, self.vae)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def train(args: argparse.Namespace, vae=None) -> Evaluator:
    """An Evaluator trained on training_batch(0 .. args.steps - 1): AdamW, linear warm-up, cosine decay."""
    torch.manual_seed(args.seed)
    model = Evaluator(EvaluatorConfig(stem_channels=args.stem_channels,
                                      stage_channels=tuple(args.stage_channels)))
    batches = torch.utils.data.DataLoader(_Batches(args, vae), batch_size=None, num_workers=args.workers,
                                          worker_init_fn=_one_thread)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / args.steps))))
    model.train()
    bar = tqdm(batches, desc="evaluator", disable=args.quiet)
    for batch in bar:
        loss = loss_fn(model, batch, args.trait_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Measurements

def _accuracies(pred: Prediction, labels: np.ndarray) -> dict[str, float]:
    read = pred.attributes.to_numpy() > 0  # (B, A)
    return {a: float(v) for a, v in zip(LABELS, (read == (labels > 0.5)).mean(0))}


def _trait_errors(pred: Prediction, traits: np.ndarray) -> dict[str, float]:
    error = np.abs(pred.traits - traits)  # (B, T)
    for i, trait in enumerate(TRAITS):
        if trait in CIRCULAR_TRAITS:
            error[:, i] = np.minimum(error[:, i], 1 - error[:, i])
    return {t: float(v) for t, v in zip(TRAITS, error.mean(0))}


def _identity_scores(pred: Prediction, people: np.ndarray) -> dict[str, float]:
    """Same-identity vs different-identity cosine over all pairs of images; people (B,) ids."""
    e = identity_embedding(pred)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    cosine = e @ e.T  # (B, B)
    upper = np.triu(np.ones_like(cosine, dtype=bool), k=1)
    same = (people[:, None] == people[None]) & upper
    different = (people[:, None] != people[None]) & upper
    scores = np.concatenate([cosine[same], cosine[different]])
    truth = np.concatenate([np.ones(same.sum()), np.zeros(different.sum())])
    thresholds = np.linspace(-1, 1, 401)
    balanced = [0.5 * ((cosine[same] > t).mean() + (cosine[different] <= t).mean()) for t in thresholds]
    best = int(np.argmax(balanced))
    return {"same_identity_mean_cosine": float(cosine[same].mean()),
            "different_identity_mean_cosine": float(cosine[different].mean()),
            "verification_auc": float(roc_auc_score(truth, scores)),
            "verification_balanced_accuracy": float(balanced[best]),
            "verification_threshold": float(thresholds[best])}


def measure(model: Evaluator, num_identities: int, views: int, vae=None,
            first_seed: int = VALIDATION_FIRST_SEED) -> dict:
    """Held-out numbers: per-attribute accuracy and trait MAE on clean, blurred+noisy and (with a
    VAE) VAE-round-tripped renders; identity verification; face confidence on faces vs non-faces."""
    people = np.repeat(np.arange(first_seed, first_seed + num_identities), views)  # (B,)
    view_seeds = [synthetic.dataset_view_seed(int(s), k) for s in range(first_seed, first_seed + num_identities)
                  for k in range(views)]
    images, labels, traits = render_faces(people, view_seeds)
    rng = np.random.default_rng(first_seed)
    conditions = {"clean": images_to_tensor(images), "blur_noise": blur_and_noise(images, rng)}
    if vae is not None:
        conditions["vae"] = vae_round_trip(vae, conditions["clean"])
    result = {"num_identities": num_identities, "views": views, "first_seed": first_seed}
    for name, x in conditions.items():
        pred = model.predict(x)
        result[name] = {"accuracy": _accuracies(pred, labels), "trait_mae": _trait_errors(pred, traits),
                        "face_confidence_mean": float(pred.face_confidence.mean()),
                        "identity": _identity_scores(pred, people)}
    non_faces = model.predict([non_face(rng) for _ in images])
    result["non_faces_with_face_confidence_above_half"] = float((non_faces.face_confidence > 0.5).mean())
    return result


def measure_samples(model: Evaluator, pipeline_path: str | os.PathLike, num_samples: int, steps: int) -> dict:
    """Score the base pipeline's samples of PERSON_PROMPT (seeds 0..num_samples-1): how often the
    evaluator sees a face, and the attribute frequencies it reads (beside those of `faces`)."""
    from lora_w2w.tiny.base_model import load_pipeline
    pipe = load_pipeline(pipeline_path)
    generators = [torch.Generator().manual_seed(s) for s in range(num_samples)]
    images = pipe([PERSON_PROMPT] * num_samples, num_inference_steps=steps, generator=generators).images
    pred = model.predict(images)
    return {"prompt": PERSON_PROMPT, "num_samples": num_samples, "steps": steps,
            "face_confidence_above_half": float((pred.face_confidence > 0.5).mean()),
            "face_confidence_mean": float(pred.face_confidence.mean()),
            "attribute_frequency": {a: float(v) for a, v in (pred.attributes > 0).mean().items()},
            "population_frequency": {**dict(zip(ATTRIBUTES, population_frequency())), "Smiling": 0.5}}


def population_frequency() -> np.ndarray:
    """(A,) how often each identity attribute is true among the identities of `faces`."""
    mean, _ = _population()
    return (mean[-len(ATTRIBUTES):] + 1) / 2


def format_report(metrics: dict) -> str:
    """The measurements as a small text table."""
    conditions = [c for c in ("clean", "blur_noise", "vae") if c in metrics]
    lines = [f"{'':14s}" + "".join(f"{c:>12s}" for c in conditions)]
    for a in LABELS:
        lines.append(f"{a:14s}" + "".join(f"{metrics[c]['accuracy'][a]:12.3f}" for c in conditions))
    lines.append("trait MAE")
    for t in TRAITS:
        lines.append(f"{t:14s}" + "".join(f"{metrics[c]['trait_mae'][t]:12.3f}" for c in conditions))
    lines.append("identity")
    for key in metrics["clean"]["identity"]:
        lines.append(f"{key[:30]:30s}" + "".join(f"{metrics[c]['identity'][key]:8.3f}" for c in conditions))
    lines.append("face confidence mean: " + ", ".join(
        f"{c} {metrics[c]['face_confidence_mean']:.3f}" for c in conditions))
    lines.append(f"non-faces read as faces: {metrics['non_faces_with_face_confidence_above_half']:.3f}")
    if "samples" in metrics:
        s = metrics["samples"]
        lines.append(f"samples of {s['prompt']!r}: face confidence > 0.5 for "
                     f"{s['face_confidence_above_half']:.2f}, attribute frequencies "
                     + ", ".join(f"{a} {v:.2f} ({s['population_frequency'][a]:.2f})"
                                 for a, v in s["attribute_frequency"].items()) + " (population)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and measure the tiny world's evaluator.")
    parser.add_argument("--out", default=DEFAULT_PATH,
                        help="Evaluator file to write; its measurements go beside it as .json.")
    parser.add_argument("--vae", default=None, help="A tiny pipeline folder (or its vae/ folder): "
                        "part of each batch and a measurement condition go through its VAE; with a "
                        "pipeline folder, its samples are scored too.")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="Do not train: measure the evaluator at --out and rewrite its .json.")
    parser.add_argument("--steps", type=int, default=4000, help="Training steps.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per step.")
    parser.add_argument("--lr", type=float, default=3e-3, help="Peak AdamW learning rate (cosine decay).")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay.")
    parser.add_argument("--trait-weight", type=float, default=10.0, help="Weight of the trait MSE loss.")
    parser.add_argument("--stem-channels", type=int, default=16, help="Channels of the stride-2 stem.")
    parser.add_argument("--stage-channels", type=int, nargs="+", default=[32, 64, 128],
                        help="Channels of each stage (two convs and a 2x max-pool each).")
    parser.add_argument("--non-face-fraction", type=float, default=0.1,
                        help="Share of each batch that shows no face (for the face head).")
    parser.add_argument("--vae-fraction", type=float, default=0.1,
                        help="Share of each batch round-tripped through the VAE of --vae.")
    parser.add_argument("--max-noise", type=float, default=0.06,
                        help="Largest std of the Gaussian noise added to half the images.")
    parser.add_argument("--first-seed", type=int, default=TRAIN_FIRST_SEED,
                        help="Identity seed of the first training image; each image is a new identity.")
    parser.add_argument("--val-identities", type=int, default=500, help="Held-out identities measured.")
    parser.add_argument("--val-views", type=int, default=4, help="Images per held-out identity.")
    parser.add_argument("--samples", type=int, default=32,
                        help="Samples of the --vae pipeline to score (0: none).")
    parser.add_argument("--sample-steps", type=int, default=25, help="Inference steps of those samples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation and augmentation.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training process.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Processes rendering batches ahead of training (0: render in the main one).")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.val_identities < 2 or args.val_views < 2:
        parser.error(f"--steps >= 1, --batch-size >= 2, --val-identities >= 2 and --val-views >= 2 expected;"
                     f" got {args.steps}, {args.batch_size}, {args.val_identities}, {args.val_views}")
    for flag in ("non_face_fraction", "vae_fraction"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1); got {getattr(args, flag)}")
    if args.evaluate_only and not Path(args.out).is_file():
        parser.error(f"--evaluate-only: no evaluator at --out {args.out}")
    return args


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    vae = load_vae(args.vae) if args.vae else None
    report_path = Path(args.out).with_suffix(".json")
    start = time.perf_counter()
    if args.evaluate_only:
        model = Evaluator.load(args.out)
        training = json.loads(report_path.read_text())["training"] if report_path.is_file() else None
    else:
        model = train(args, vae)
        model.save(args.out)
        training = {"args": {k: v for k, v in vars(args).items() if k not in ("quiet", "evaluate_only")},
                    "seconds": round(time.perf_counter() - start, 1),
                    "parameters": sum(p.numel() for p in model.parameters())}
    metrics = measure(model, args.val_identities, args.val_views, vae)
    if args.vae and args.samples and (Path(args.vae) / "model_index.json").is_file():
        metrics["samples"] = measure_samples(model, args.vae, args.samples, args.sample_steps)
    report = {"format": FORMAT, "config": asdict(model.config), "training": training, "metrics": metrics}
    with atomic_output(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(metrics))
    print(f"wrote {args.out} and {report_path}")
    return report


if __name__ == "__main__":
    main(parse_args())
