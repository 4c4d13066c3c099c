"""Instant inversion: an encoder that maps images of a person to the first K coefficients of a w2w space in
one pass; inversion may start from its prediction and refine it (`inversion.invert(..., init=...)`), as
HyperDreamBooth refines the LoRA its hypernetwork predicts.

The encoder is a regression trained on the space's own dataset: every dataset model's coefficients c (the
PCA coordinates of its LoRA, Sec. 3) paired with each image that LoRA was trained on. Its K outputs are the
coefficients standardized per component over the training models, (c - mu) / sigma; `coefficients` undoes
the standardization. The regression is ridge regression on the images' features f (F numbers each):
W = (X^T X + lambda tr(X^T X) / F I)^-1 X^T Y over the training models' images (X: centred features, Y:
their models' standardized coefficients), accumulated model by model (X^T X, X^T Y and the sums), so that
a dataset of any size streams through in bounded memory and a killed run resumes from its last checkpoint.
On the tiny world a ridge on 16 x 16 pixels fits the held-out models as well as a ridge on the identities'
true traits and attributes, and better than small CNNs trained on the 64 px renders (files/tiny/README.md,
"encoder.safetensors"): the LoRAs' coefficients carry their identity weakly, beside the noise of training.

A regression predicts the mean of the models that fit an image, a blend much closer to mu than any one
model (on the tiny world a third of a dataset model's distance), which draws a faint person; `predict`
moves it out by `gain`, the dataset models' mean distance from mu over the held-out predictions' (measured
after training), so that the model it returns lies as far out as the dataset's. Several images of one
person: the mean of their predictions, moved out alike.

    encoder = train_encoder(space, features_of, EncoderConfig(), seed=0)  # features_of(m): model m's (I_m, F)
    model = encoder.predict([Image.open("me.png")])                         # a W2WModel of the space

How an encoder reads images is an entry of FEATURES, a function from PIL images to features (B, F):
"pixels", the image at S x S (the tiny world's, which keeps clear of its evaluator's features); "dlib",
dlib's 128-D face descriptor of the largest face (photographs, Stable Diffusion 1.5; a row of NaN where
no face is found, left out of the fit and of a prediction's mean; inversion/encoder.md).
Reading image folders and encoder files lives in `encoder_files`; this module is the math, on tensors.

Letters: M models, K components, F features per image, I images, B batch, S image side.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .checks import COUNT, POSITIVE, check_int, check_number, check_seed
from .errors import ArgumentError, SpaceError, W2WError
from .space import Space, W2WModel
from .storage import load_state, save_state

CHECKPOINT_FORMAT = "w2w-encoder-checkpoint"
MAX_FEATURES = 8192  # F: the ridge holds an F x F matrix (float64: 512 MB at this F)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder reads and how it is fitted (defaults: the tiny world's, measured)."""

    features: str = field(default="pixels", metadata={
        "help": "how images are read: pixels (the tiny world's renders) or dlib (photographs; default: pixels)"})
    components: int = field(default=250, metadata={
        "help": "K: the first K coefficients are predicted (default: 250, at most the space's K)", "type": COUNT})
    image_size: int = field(default=16, metadata={
        "help": "S: pixels: every image resized and centre-cropped to S x S, F = 3 S^2 features (default: 16)",
        "type": COUNT})
    ridge: float = field(default=0.3, metadata={
        "help": "lambda: the ridge penalty, a multiple of the features' mean variance tr(X^T X) / F (default: 0.3)",
        "type": POSITIVE})
    held_out: float = field(default=0.1, metadata={
        "help": "fraction of the dataset's models held out of the fit, on which the fit is measured and the gain "
                "set (default: 0.1)", "type": POSITIVE})

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ArgumentError(f"encoder features {self.features!r}: expected one of {', '.join(FEATURES)}")
        check_int(self.components, "encoder components", minimum=1)
        check_int(self.image_size, "encoder image_size", minimum=1)
        check_number(self.ridge, "encoder ridge", above=0.0)
        if not 0 < check_number(self.held_out, "encoder held_out") < 1:
            raise ArgumentError(f"encoder held_out {self.held_out}: expected a fraction between 0 and 1")
        if self.features == "pixels" and 3 * self.image_size ** 2 > MAX_FEATURES:
            raise ArgumentError(f"encoder image_size {self.image_size}: 3 S^2 = {3 * self.image_size ** 2} features, "
                                f"expected at most {MAX_FEATURES} (the ridge holds an F x F matrix)")


# ----------------------------------------------------------------------------- features

def pixel_features(images: Sequence[Image.Image], config: EncoderConfig) -> torch.Tensor:
    """PIL images (any size and mode) -> (B, 3 S^2) in [-1, 1]: resized and centre-cropped as inversion crops them
    (at 4 S), then averaged down to S x S."""
    from .diffusion import prepare_image

    side = config.image_size
    if not images:
        return torch.zeros(0, 3 * side * side)
    pixels = torch.stack([prepare_image(image, 4 * side) for image in images])  # (B, 3, 4S, 4S)
    return F.avg_pool2d(pixels, 4).flatten(1)                                   # (B, 3 S^2)


@dataclass(frozen=True)
class Features:
    """One way of reading images: `extract` (PIL images, config -> (B, F) float features) and `width` (config -> F)."""

    description: str
    extract: Callable[[Sequence[Image.Image], EncoderConfig], torch.Tensor]
    width: Callable[[EncoderConfig], int]


def dlib_features(images: Sequence[Image.Image], config: EncoderConfig) -> torch.Tensor:
    """PIL images -> (B, 128): dlib's face descriptor of each image's largest face (`identity.DlibIdentity`: the
    face found by dlib's HOG detector, its chip aligned by its landmarks); a row of NaN where dlib finds none."""
    from .identity import DlibIdentity

    return torch.from_numpy(DlibIdentity().embed(list(images))).float()  # (B, 128)


FEATURES = {
    "pixels": Features("the image averaged down to S x S pixels (the tiny world's renders)", pixel_features,
                       lambda config: 3 * config.image_size ** 2),
    "dlib": Features("dlib's 128-D face descriptor of the largest face, aligned by its landmarks (photographs; "
                     "the descriptor `w2w score` judges identity by)", dlib_features, lambda config: 128),
}


# ----------------------------------------------------------------------------- the encoder

class CoefficientEncoder(nn.Module):
    """Images -> the first K coefficients of the space `space_id`: standardized coefficients
    (f - feature_mean) @ weights, then times coefficient_std plus coefficient_mean."""

    def __init__(self, config: EncoderConfig, space_id: str, coefficient_mean: torch.Tensor,
                 coefficient_std: torch.Tensor, fit: dict | None = None):
        super().__init__()
        k, width = config.components, FEATURES[config.features].width(config)
        if coefficient_mean.shape != (k,) or coefficient_std.shape != (k,):
            raise SpaceError(f"coefficient mean {tuple(coefficient_mean.shape)} and std "
                             f"{tuple(coefficient_std.shape)}: expected ({k},) each")
        self.config, self.space_id, self.fit = config, space_id, dict(fit or {})
        self.register_buffer("feature_mean", torch.zeros(width))             # (F,)
        self.register_buffer("weights", torch.zeros(width, k))               # (F, K)
        self.register_buffer("coefficient_mean", coefficient_mean.float())  # (K,)
        self.register_buffer("coefficient_std", coefficient_std.float())    # (K,)
        self.register_buffer("gain", torch.ones(()))                        # (): how far `predict` moves out

    @property
    def components(self) -> int:
        """K."""
        return self.config.components

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, F) -> standardized coefficients (B, K)."""
        return (features.to(self.weights) - self.feature_mean) @ self.weights

    def coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, F) -> coefficients (B, K): the regression's, not moved out."""
        return self(features) * self.coefficient_std + self.coefficient_mean

    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> their features (I, F)."""
        return FEATURES[self.config.features].extract(list(images), self.config)

    @torch.no_grad()
    def predict(self, images: Image.Image | Sequence[Image.Image]) -> W2WModel:
        """The model of the person in `images` (one or several of them): the mean of their predictions (of those
        with a face, for features of faces), moved `gain` times as far from the coefficients' mean."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise W2WError("no image to encode; expected at least one")
        features = self.extract(images)                                  # (B, F): NaN rows where no face is found
        found = ~features.isnan().any(1)                                 # (B,)
        if not found.any():
            raise W2WError(f"no face found in the {len(images)} image(s) to encode; the encoder reads "
                           f"{self.config.features} features of a face: expected photographs of a face")
        coefficients = self.coefficients(features[found]).mean(0)        # (K,)
        return W2WModel((self.coefficient_mean + self.gain * (coefficients - self.coefficient_mean)).cpu(),
                        self.space_id)

    def check_space(self, space: Space, name: str = "the encoder") -> None:
        """SpaceError when the encoder was trained for another space, or predicts more components than it has."""
        if self.space_id != space.id:
            raise SpaceError(f"{name} belongs to space {self.space_id}, not to this space ({space.id}); train one "
                             f"for it with `w2w train-encoder`")
        if self.components > space.num_components:
            raise SpaceError(f"{name} predicts K = {self.components} coefficients, the space has "
                             f"K = {space.num_components}")


# ----------------------------------------------------------------------------- fitting

def split_models(num_models: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitted models, held-out models): a seeded shuffle of 0 .. M-1, round(held_out * M) held out (at least one,
    and two fitted: a coefficient's spread needs two)."""
    if num_models < 3:
        raise SpaceError(f"the space has {num_models} dataset model(s); an encoder needs at least 3 (two to fit, one "
                         f"to hold out)")
    order = torch.randperm(num_models, generator=torch.Generator().manual_seed(seed))  # (M,)
    held = min(max(1, round(held_out * num_models)), num_models - 2)
    return order[held:].sort().values, order[:held].sort().values


def fit_scores(predicted: torch.Tensor, true: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """How predicted coefficients (B, K) fit the true ones (B, K): R^2 = 1 - |p - c|^2 / |c - mean|^2 summed over
    rows and components (0: no better than predicting `mean` (K,), the training models' mean), and the mean
    cosine of p and c over rows."""
    residual = (predicted - true).square().sum()
    spread = (true - mean).square().sum()
    cosine = F.cosine_similarity(predicted, true, dim=1).mean()  # (B,) -> ()
    return {"r2": float(1 - residual / spread), "cosine": float(cosine)}


@dataclass
class Sums:
    """What the ridge needs of the training images, summed model by model; and the held-out models' features."""

    gram: torch.Tensor         # (F, F) sum of f f^T
    cross: torch.Tensor        # (F, K) sum of f y^T, y the image's model's standardized coefficients
    feature_sum: torch.Tensor  # (F,)
    target_sum: torch.Tensor   # (K,)
    count: int                 # training images
    held: list[torch.Tensor]   # (I_m, F) per held-out model, in model order

    @classmethod
    def zeros(cls, width: int, k: int) -> "Sums":
        return cls(torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, k, dtype=torch.float64),
                   torch.zeros(width, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0, [])

    def add(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """A training model's images' features (I_m, F) and its standardized coefficients (K,)."""
        x = features.double()                                   # (I_m, F)
        self.gram += x.T @ x                                    # (F, F)
        self.cross += torch.outer(x.sum(0), target.double())    # (F, K)
        self.feature_sum += x.sum(0)
        self.target_sum += len(x) * target.double()
        self.count += len(x)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature mean (F,), weights (F, K)) of the ridge on centred features and targets."""
        mean, target_mean = self.feature_sum / self.count, self.target_sum / self.count     # (F,), (K,)
        gram = self.gram - self.count * torch.outer(mean, mean)                             # (F, F) centred
        cross = self.cross - self.count * torch.outer(mean, target_mean)                    # (F, K) centred
        penalty = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
        return mean.float(), torch.linalg.solve(gram + penalty, cross).float()             # (F,), (F, K)


def held_out_fit(encoder: CoefficientEncoder, held_features: list[torch.Tensor], targets: torch.Tensor,
                 held: torch.Tensor, train: torch.Tensor) -> dict:
    """The fit of the (unmoved) predictions on the held-out models' images, per image and per model (the mean of
    its images' predictions): R^2 above 0 fits better than the training models' mean; and the gain: the
    training models' mean distance from the coefficients' mean over the held-out predictions'."""
    mean = encoder.coefficient_mean
    per_model = [encoder.coefficients(features) for features in held_features]               # (I_m, K) each
    predicted = torch.cat(per_model)                                                         # (I_h, K)
    true = torch.cat([targets[m].expand(len(p), -1) for m, p in zip(held.tolist(), per_model)])  # (I_h, K)
    means = torch.stack([p.mean(0) for p in per_model])                                      # (M_h, K)
    per_image, of_models = fit_scores(predicted, true, mean), fit_scores(means, targets[held], mean)
    gain = (targets[train] - mean).norm(dim=1).mean() / (predicted - mean).norm(dim=1).mean().clamp_min(1e-12)
    return {"models": len(held), "images": len(predicted), "components": encoder.components, **per_image,
            "r2_mean_of_images": of_models["r2"], "cosine_mean_of_images": of_models["cosine"], "gain": float(gain)}


def run_fingerprint(space: Space, config: EncoderConfig, seed: int, sources: Sequence[str]) -> dict:
    """What a checkpoint must share with a run to resume it: the space, the config, the seed and the sources
    of the models' images (their folders' names, say)."""
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
    return {"space": space.id, "seed": seed, "sources": digest, "config": dataclasses.asdict(config)}


def train_encoder(space: Space, features_of: Callable[[int], torch.Tensor], config: EncoderConfig = EncoderConfig(),
                  seed: int = 0, checkpoint: str | os.PathLike | None = None, progress: bool = True,
                  sources: Sequence[str] = (), checkpoint_every: int = 1000) -> CoefficientEncoder:
    """An encoder of `space` fitted on its dataset models' images: `features_of(m)` gives the features (I_m, F) of
    dataset model m's images (row m of space.coefficients), read model by model. Models are split (seeded) into
    fitted and held-out ones; the fit on the held-out ones is the encoder's `fit`. With `checkpoint`, the sums
    are saved there every `checkpoint_every` models, and a run finding it there resumes from it (to the result
    of an uninterrupted run); `sources` names the models' images for its fingerprint."""
    check_seed(seed)
    k = space.check_k(config.components)
    if space.coefficients is None or space.coefficients.shape[1] < k:
        raise SpaceError(f"the space holds no dataset coefficients for K = {k} (an encoder learns them); build it "
                         f"with `w2w build` or import the released proj_1000pc.pt")
    targets = space.coefficients[:, :k].float()                                        # (M, K)
    train, held = split_models(len(targets), config.held_out, seed)
    mean, std = targets[train].mean(0), targets[train].std(0).clamp_min(1e-8)          # (K,) each
    standardized = (targets - mean) / std                                              # (M, K)
    fitted = torch.zeros(len(targets), dtype=torch.bool)
    fitted[train] = True
    fingerprint = run_fingerprint(space, config, seed, sources)
    sums, start = Sums.zeros(FEATURES[config.features].width(config), k), 0
    if checkpoint is not None and Path(checkpoint).is_file():
        sums, start = _load_checkpoint(checkpoint, fingerprint)
    for m in tqdm(range(start, len(targets)), initial=start, total=len(targets), desc="encoder: models",
                  disable=not progress):
        features = features_of(m)                                                      # (I_m, F)
        if fitted[m]:
            sums.add(features, standardized[m])
        else:
            sums.held.append(features.float())
        if checkpoint is not None and (m + 1) % checkpoint_every == 0 and m + 1 < len(targets):
            save_state(checkpoint, CHECKPOINT_FORMAT, {"fingerprint": fingerprint, "models": m + 1,
                                                       "sums": dataclasses.asdict(sums)})
    encoder = CoefficientEncoder(config, space.id, mean, std)
    encoder.feature_mean, encoder.weights = sums.solve(config.ridge)
    encoder.fit = held_out_fit(encoder, sums.held, targets, held, train)
    encoder.gain.fill_(encoder.fit["gain"])
    return encoder.eval()


def _load_checkpoint(path: str | os.PathLike, fingerprint: dict) -> tuple[Sums, int]:
    """The sums a run saved at `path`, and the number of models it had read."""
    state = load_state(path, CHECKPOINT_FORMAT)
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise W2WError(f"{path}: a checkpoint of another encoder run ({key} {state['fingerprint'].get(key)!r} "
                           f"there, {value!r} here); delete it or choose another checkpoint path")
    return Sums(**state["sums"]), int(state["models"])
