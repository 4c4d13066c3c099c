"""Sampling new identities from a w2w space (the paper's Sec. 4.1): each of the first K coefficients
is drawn from an independent Gaussian fitted to the dataset models' coefficients; `factor` scales
the standard deviations (below 1: more typical identities, above 1: more unusual ones).

    models = sample_models(space, num=8, seed=0)         # list of W2WModel with K = 1,000

Letters: M dataset models, K components, S samples.
"""
from __future__ import annotations

import torch

from .errors import SpaceError
from .space import Space, W2WModel

DEFAULT_SAMPLE_COMPONENTS = 1000


def fit_gaussian(coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component mean and std (K,), (K,) of the dataset coefficients (M, K)."""
    if coefficients.shape[0] < 2:
        raise SpaceError(f"fitting a Gaussian needs at least 2 dataset models, got {coefficients.shape[0]}")
    coefficients = coefficients.double()
    return coefficients.mean(0), coefficients.std(0)


def sample_coefficients(mean: torch.Tensor, std: torch.Tensor, num: int, generator: torch.Generator,
                        factor: float = 1.0) -> torch.Tensor:
    """num draws (S, K) of independent N(mean_k, (factor * std_k)^2); drawn row by row, so the first
    draws do not depend on how many are asked for."""
    noise = torch.stack([torch.randn(mean.shape[0], generator=generator, dtype=torch.float64)
                         for _ in range(num)])  # (S, K)
    return (mean + factor * std * noise).float()


def sample_models(space: Space, num: int, seed: int = 0, k: int | None = None, factor: float = 1.0) -> list[W2WModel]:
    """`num` new models of `space` on its first k coefficients (default: 1,000, or fewer when the
    dataset coefficients have fewer)."""
    if space.coefficients is None:
        raise SpaceError("the space has no dataset coefficients to fit the sampling distribution to")
    available = space.coefficients.shape[1]
    k = min(DEFAULT_SAMPLE_COMPONENTS, available) if k is None else k
    if not 1 <= k <= available:
        raise SpaceError(f"{k} components asked for, the space's dataset coefficients have {available}")
    if num < 1 or factor <= 0:
        raise SpaceError(f"need num >= 1 and factor > 0, got num={num}, factor={factor}")
    mean, std = fit_gaussian(space.coefficients[:, :k])
    draws = sample_coefficients(mean, std, num, torch.Generator().manual_seed(seed), factor)  # (S, k)
    return [W2WModel(c, space.id) for c in draws]


def nearest_models(space: Space, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of coefficients (S, k): index (S,) and distance (S,) of the nearest dataset model
    in the same first k coefficients."""
    dataset = space.coefficients[:, : coefficients.shape[1]].float()  # (M, k)
    distances = torch.cdist(coefficients.float(), dataset)            # (S, M)
    distance, index = distances.min(dim=1)
    return index, distance
