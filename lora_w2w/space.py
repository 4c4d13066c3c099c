"""The w2w space: PCA over standardized LoRA weights (Dravid et al. 2024, Sec. 3).

A model's weights w (N,) are standardized column-wise, z = (w - mean) / std, and projected onto the
first K principal components: coefficients c = z Vᵀ with V = components[:K] (K x N, orthonormal
rows). Back: w = (c V) * std + mean. Pure tensor math; reading and writing lives in `storage`.

The classes' methods that read, write, sample, edit or generate (`Space.from_pretrained`, `space.sample`,
`model.edit`, `model.save_lora` ...) are a thin layer over the library functions, in `api`.

Letters: M dataset models, N flattened LoRA numbers, K components, B batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import pandas as pd
import torch

from .api import ModelMethods, SpaceMethods
from .errors import SpaceError
from .layout import LoraLayout

TRIGGER_PROMPT = "sks person"
# A model whose coefficients' norm passes MODEL_SCALE_MAX times the dataset models' typical norm in the same
# components (the root of the dataset's variance there) is refused where it is used: dataset models lie near
# 1 times it, sampling at factor f near f times, an edit of a few standard deviations moves a model by a
# fraction of it; a model a million standard deviations out draws noise or black images.
MODEL_SCALE_MAX = 1000.0
# The largest |coefficient| a model holds at all, whatever its space: MODEL_SCALE_MAX times the typical norm
# of a space of 10^8 numbers per LoRA (each standardized number has variance 1, so at most sqrt(10^8));
# SDXL's and Flux's rank-1 LoRAs have about 7 x 10^5 numbers.
COEFFICIENT_MAX = MODEL_SCALE_MAX * 1e4
REAL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what coefficients may be


def standardize(weights: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z = (w - mean) / std; columns of zero variance map to 0 instead of dividing by zero."""
    return (weights - mean) / torch.where(std > 0, std, torch.ones_like(std))


def project(weights: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """weights (..., N) -> coefficients (..., K) for components (K, N)."""
    return standardize(weights, mean, std) @ components.T


def unproject(coefficients: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, components: torch.Tensor
              ) -> torch.Tensor:
    """coefficients (..., K) -> weights (..., N) for components (K, N)."""
    return (coefficients @ components) * std + mean


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise SpaceError naming `what` when `values` holds NaN or inf."""
    bad = ~torch.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise SpaceError(f"{what} holds {int(bad.sum())} NaN/inf values, first at index {index}")


@dataclass(repr=False)
class Space(SpaceMethods):
    """A w2w space. `coefficients` (M, K_c <= K) are the dataset models' coordinates; `attributes`
    has one row per dataset model (CelebA columns, +1/-1)."""

    mean: torch.Tensor          # (N,)
    std: torch.Tensor           # (N,)
    components: torch.Tensor    # (K, N), orthonormal rows, ordered by explained variance
    layout: LoraLayout
    coefficients: torch.Tensor | None = None   # (M, K_c)
    attributes: pd.DataFrame | None = None     # M rows
    explained_variance: torch.Tensor | None = None  # (K,) variance of the standardized data along each component
    base_model: str = ""
    prompt: str = TRIGGER_PROMPT
    id: str = field(default="")
    # settings of inversion presets measured on this space, by preset name: {"ood": {"lr": 0.1}}
    inversion_presets: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        n = self.layout.numel
        if self.mean.shape != (n,) or self.std.shape != (n,):
            raise SpaceError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} must both be "
                             f"(N,) = ({n},) for the layout")
        if self.components.ndim != 2 or self.components.shape[1] != n:
            raise SpaceError(f"components {tuple(self.components.shape)} must be (K, N) with N = {n}")
        if self.coefficients is not None:
            if self.coefficients.ndim != 2 or self.coefficients.shape[1] > self.num_components:
                raise SpaceError(f"dataset coefficients {tuple(self.coefficients.shape)} must be (M, K_c) "
                                 f"with K_c <= K = {self.num_components}")
            if self.attributes is not None and len(self.attributes) != self.coefficients.shape[0]:
                raise SpaceError(f"attribute table has {len(self.attributes)} rows but the space has "
                                 f"{self.coefficients.shape[0]} dataset models")
        if not self.id:
            self.id = space_id(self.mean, self.std, self.components)

    @property
    def num_weights(self) -> int:
        """N."""
        return self.layout.numel

    @property
    def num_components(self) -> int:
        """K."""
        return self.components.shape[0]

    @property
    def num_models(self) -> int:
        """M (0 when the space has no dataset coefficients)."""
        return 0 if self.coefficients is None else self.coefficients.shape[0]

    def check_k(self, k: int | None) -> int:
        """k, or K when None; SpaceError when it is not in 1..K."""
        if k is None:
            return self.num_components
        if not 1 <= k <= self.num_components:
            raise SpaceError(f"{k} components asked for, the space has K = {self.num_components}")
        return k

    def project(self, weights: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """weights (..., N) -> coefficients (..., k) on the first k components."""
        k = self.check_k(k)
        weights = weights.to(self.mean)
        return project(weights, self.mean, self.std, self.components[:k])

    def residual(self, weights: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """weights (..., N) and their coefficients (..., k) -> (...,) the standardized residual |z - c V| / |z|:
        0 when the weights lie in the span of the first k components, 1 when orthogonal to it."""
        k = self.check_k(coefficients.shape[-1])
        z = standardize(weights.to(self.mean), self.mean, self.std)  # (..., N)
        rest = z - coefficients.to(self.mean) @ self.components[:k]   # (..., N)
        norm = z.norm(dim=-1)
        return torch.where(norm > 0, rest.norm(dim=-1) / norm, torch.zeros_like(norm))

    def typical_norm(self, k: int) -> float:
        """The root mean square norm of the dataset models' first k coefficients: the root of the variance
        they explain (explained_variance), or, for a space without it, the root of the number of weights
        of nonzero std (the standardized dataset's whole variance, which bounds it)."""
        if self.explained_variance is not None:
            return float(self.explained_variance[:k].double().clamp(min=0).sum().sqrt())
        return float((self.std > 0).sum()) ** 0.5

    def unproject(self, coefficients: torch.Tensor) -> torch.Tensor:
        """coefficients (..., k), k <= K -> weights (..., N); differentiable in the coefficients."""
        k = self.check_k(coefficients.shape[-1])
        return unproject(coefficients, self.mean, self.std, self.components[:k])

    def explained_variance_ratio(self) -> torch.Tensor:
        """(K,) the fraction of the standardized dataset's total variance along each component: every
        column of nonzero std has variance 1 after standardizing, so the total is their count."""
        if self.explained_variance is None:
            raise SpaceError("the space has no explained variance (it was not built by w2w build)")
        return self.explained_variance / (self.std > 0).sum()

    def truncate(self, k: int) -> "Space":
        """The same space with its first k components (its id stays: models remain valid)."""
        k = self.check_k(k)
        coefficients = None if self.coefficients is None else self.coefficients[:, :k]
        variance = None if self.explained_variance is None else self.explained_variance[:k]
        return dataclasses.replace(self, components=self.components[:k], coefficients=coefficients,
                                   explained_variance=variance)

    def to(self, device=None, dtype=None) -> "Space":
        """The tensors moved to a device/dtype (the dataset coefficients too)."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return dataclasses.replace(self, mean=move(self.mean), std=move(self.std), components=move(self.components),
                                   coefficients=move(self.coefficients),
                                   explained_variance=move(self.explained_variance))


def space_id(mean: torch.Tensor, std: torch.Tensor, components: torch.Tensor) -> str:
    """A short fingerprint of a space that does not change when components are truncated: hash of
    N, mean, std and the first component (whose sign a rebuild may flip)."""
    digest = hashlib.sha256(str(mean.numel()).encode())
    for tensor in (mean, std, components[0]):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_id(coefficients: torch.Tensor) -> str:
    """A short fingerprint of a model: hash of its coefficients (k,) as float32."""
    values = coefficients.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(values.astype("<f4").tobytes()).hexdigest()[:16]


@dataclass(repr=False)
class W2WModel(ModelMethods):
    """A point in a w2w space: coefficients (k,) on the first k components of the space `space_id`
    (None for a model of unknown space, such as the original `w2wmodel.pt`). `provenance`: how it was
    made, its steps oldest first (`provenance` module); `space`: the space the object layer's methods
    use (`api`), when known."""

    coefficients: torch.Tensor  # (k,)
    space_id: str | None = None
    provenance: tuple[dict, ...] = ()
    space: Space | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.coefficients.ndim == 2 and self.coefficients.shape[0] == 1:
            self.coefficients = self.coefficients[0]  # the original saves (1, k)
        if self.coefficients.ndim != 1:
            raise SpaceError(f"model coefficients must be (k,) or (1, k), got {tuple(self.coefficients.shape)}")
        if self.coefficients.dtype not in REAL_FLOAT_DTYPES:
            raise SpaceError(f"model coefficients of dtype {str(self.coefficients.dtype).removeprefix('torch.')}; "
                             f"expected real floating point numbers (float16, bfloat16, float32 or float64)")
        check_finite(self.coefficients, "model coefficients")
        largest = float(self.coefficients.abs().max()) if len(self.coefficients) else 0.0
        if largest > COEFFICIENT_MAX:
            raise SpaceError(f"model coefficients reach |c| = {largest:.3g}; expected at most {COEFFICIENT_MAX:.0e}: "
                             f"no space's model lies that far from its dataset")
        self.provenance = tuple(self.provenance)
        if self.space is not None:
            self.check_space(self.space)

    @property
    def id(self) -> str:
        """The model's fingerprint (`model_id`)."""
        return model_id(self.coefficients)

    def weights(self, space: Space) -> torch.Tensor:
        """The model's flat LoRA weights (N,) in `space`; SpaceError when they hold NaN/inf (a space whose
        components do), so that no such LoRA is written or used."""
        self.check_space(space)
        weights = space.unproject(self.coefficients.to(space.mean))
        check_finite(weights, f"the weights of the model in space {space.id} (its components hold NaN/inf)")
        return weights

    def check_space(self, space: Space) -> None:
        """SpaceError when the model belongs to another space, has more coefficients than the space has
        components, or lies further than MODEL_SCALE_MAX times the dataset's typical norm from its mean."""
        if self.space_id is not None and self.space_id != space.id:
            raise SpaceError(f"the model belongs to space {self.space_id}, not to this space ({space.id})")
        k = space.check_k(len(self.coefficients))
        norm, typical = float(self.coefficients.double().norm()), space.typical_norm(k)
        if norm > MODEL_SCALE_MAX * typical:
            raise SpaceError(f"the model's coefficients have norm {norm:.3g}, {norm / max(typical, 1e-300):.3g} times "
                             f"the typical norm of the space's dataset models ({typical:.3g}); expected at most "
                             f"{MODEL_SCALE_MAX:g} times: a model that far from the dataset draws noise")
