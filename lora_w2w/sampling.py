"""Sampling new identities from a w2w space (the paper's Sec. 4.1): each of the first K coefficients
is drawn from an independent Gaussian fitted to the dataset models' coefficients; `factor` scales
the standard deviations (below 1: more typical identities, above 1: more unusual ones).

    models = sample_models(space, num=8, seed=0)         # list of W2WModel with K = 1,000

Letters: M dataset models, K components, S samples.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .checks import available_memory, check_int, check_number, check_seed, gigabytes
from .errors import ArgumentError, SpaceError
from .space import MODEL_SCALE_MAX, Space, W2WModel

DEFAULT_SAMPLE_COMPONENTS = 1000
MODEL_OVERHEAD_BYTES = 512  # a W2WModel and its tensor in memory, besides the coefficients


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


def _components(space: Space, k: int | None) -> int:
    """k checked against the dataset coefficients' K (default: 1,000, or all they have when fewer)."""
    if space.coefficients is None:
        raise SpaceError("the space has no dataset coefficients to fit the sampling distribution to")
    available = space.coefficients.shape[1]
    return min(DEFAULT_SAMPLE_COMPONENTS, available) if k is None else check_int(k, "components", 1, available)


def iter_sample_models(space: Space, num: int, seed: int = 0, k: int | None = None,
                       factor: float = 1.0) -> Iterator[W2WModel]:
    """`num` new models of `space` on its first k coefficients (default: 1,000, or fewer when the
    dataset coefficients have fewer), drawn one at a time: memory does not grow with `num`. Each knows
    its space and records its seed and draw (`provenance.sampled`)."""
    from .provenance import sampled

    k = _components(space, k)
    check_int(num, "number of models", minimum=1)
    check_number(factor, "factor", above=0.0, maximum=MODEL_SCALE_MAX,
                 why="the models would lie further from the dataset than a model may")
    mean, std = fit_gaussian(space.coefficients[:, :k])
    generator = torch.Generator().manual_seed(check_seed(seed))
    return (W2WModel(sample_coefficients(mean, std, 1, generator, factor)[0], space.id,
                     (sampled(seed, index, k, factor),), space) for index in range(num))


def sample_models(space: Space, num: int, seed: int = 0, k: int | None = None, factor: float = 1.0) -> list[W2WModel]:
    """The models of `iter_sample_models` as a list; refused when the list would not fit in memory."""
    each = 4 * _components(space, k) + MODEL_OVERHEAD_BYTES  # float32 coefficients
    free = available_memory(torch.device("cpu"))
    if check_int(num, "number of models", minimum=1) * each > free:
        raise ArgumentError(f"{num:,} models need about {gigabytes(num * each)}, this machine has {gigabytes(free)} "
                            f"free: at most {free // each:,} fit in a list (iter_sample_models draws one at a time)")
    return list(iter_sample_models(space, num, seed, k, factor))


def nearest_models(space: Space, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of coefficients (S, k): index (S,) and distance (S,) of the nearest dataset model
    in the same first k coefficients."""
    dataset = space.coefficients[:, : coefficients.shape[1]].float()  # (M, k)
    distances = torch.cdist(coefficients.float(), dataset)            # (S, M)
    distance, index = distances.min(dim=1)
    return index, distance
