"""Editing identities along linear attribute directions (the paper's Sec. 4.2).

A direction is fitted to the dataset models' coefficients C (M, K) and their ±1 labels y of one
attribute, by one of three methods:

- least squares, d = pinv(C) y, as in the paper;
- logistic regression;
- mean difference (the default), d = mean(C[y = +1]) - mean(C[y = -1]): the change that goes with
  the attribute in the dataset. For centred C it is the least-squares fit's pattern rather than its
  filter (Haufe et al. 2014): cov(C) pinv(C) y = 2p(1 - p) d, p the share of positives. Least
  squares weighs each component by the inverse of its variance, so it leans on small components
  that tell the classes apart but change little in the images; the mean difference moves along the
  large ones the attribute moves. It fits no unknowns, so it can use every component even when the
  dataset is small.

`debias` removes the directions of other attributes (the paper projects them out one by one;
`orthogonalize` removes their whole span at once). An edit moves a model by `strength` standard
deviations of the dataset along the unit direction; the paper's reference strength is the largest
projection of a dataset model on it.

    directions = attribute_directions(space, ["Bald", "Young"], debias_against=["Male"])
    edited = apply_edits(model, {"Bald": 2.0, "Young": -1.0}, directions)

Letters: M dataset models, K components.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .checks import check_int, check_number
from .errors import SpaceError
from .space import MODEL_SCALE_MAX, Space, W2WModel

DEFAULT_EDIT_COMPONENTS = 1000  # the paper's, for 65k models
MODELS_PER_COMPONENT = 10  # least squares overfits with fewer than ~10 models per unknown
DEFAULT_DIRECTION_METHOD = "mean_difference"  # moves along what the attribute changes; least squares finds what tells it apart
DEBIAS_MODES = ("project", "orthogonalize")


# ----------------------------------------------------------------------------- pure math

def least_squares_direction(coefficients: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d (K,) minimizing |C d - y|² for coefficients C (M, K) and labels y (M,) in {-1, +1}."""
    return (torch.linalg.pinv(coefficients.double()) @ labels.double()).float()


def logistic_direction(coefficients: torch.Tensor, labels: torch.Tensor, regularization: float = 1.0) -> torch.Tensor:
    """The weight vector (K,) of an L2-regularized logistic regression of labels (M,) on coefficients (M, K)."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=regularization, max_iter=2000)
    classifier.fit(coefficients.double().numpy(), labels.numpy() > 0)
    return torch.from_numpy(classifier.coef_[0]).float()


def mean_difference_direction(coefficients: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(C[y = +1]) - mean(C[y = -1]) (K,) for coefficients C (M, K) and labels y (M,) in {-1, +1}."""
    coefficients = coefficients.double()
    return (coefficients[labels > 0].mean(0) - coefficients[labels < 0].mean(0)).float()


FITS = {"least_squares": least_squares_direction, "logistic": logistic_direction,
        "mean_difference": mean_difference_direction}  # method -> fit(C (M, K), y (M,)) -> d (K,)
DIRECTION_METHODS = tuple(FITS)


def debias(direction: torch.Tensor, others: list[torch.Tensor], mode: str = "project") -> torch.Tensor:
    """Remove other attributes' directions (K,) from `direction` (K,): 'project' subtracts the projection
    on each in turn (the paper); 'orthogonalize' removes the component in their span."""
    if mode not in DEBIAS_MODES:
        raise SpaceError(f"unknown debias mode {mode!r}; expected one of {', '.join(DEBIAS_MODES)}")
    if not others:
        return direction
    if mode == "project":
        for other in others:
            direction = direction - (direction @ other) / (other @ other) * other
        return direction
    basis, _ = torch.linalg.qr(torch.stack(others, dim=1).double())  # (K, A), orthonormal columns
    return (direction.double() - basis @ (basis.T @ direction.double())).float()


def spread_along(direction: torch.Tensor, coefficients: torch.Tensor) -> tuple[float, float]:
    """(std, largest |projection|) of the dataset coefficients (M, K) along the unit direction."""
    projections = coefficients.float() @ (direction / direction.norm())  # (M,)
    return float(projections.std()), float(projections.abs().max())


# ----------------------------------------------------------------------------- attributes of a space

def attribute_labels(space: Space, attribute: str) -> torch.Tensor:
    """The ±1 labels (M,) of an attribute of the space's attribute table."""
    if space.attributes is None:
        raise SpaceError("the space has no attribute table (attributes.csv): directions cannot be fitted")
    if attribute not in space.attributes.columns:
        raise SpaceError(f"no attribute {attribute!r}; the space has: {', '.join(map(str, space.attributes.columns))}")
    values = space.attributes[attribute].to_numpy()
    if not np.isin(values, (-1, 1)).all():
        raise SpaceError(f"attribute {attribute!r} is not a ±1 column")
    return torch.from_numpy(values.astype(np.float32))


@dataclass
class Direction:
    """A unit attribute direction in the first K coefficients, with the dataset's spread along it."""

    attribute: str
    vector: torch.Tensor  # (K,), unit norm
    std: float            # std of the dataset's projections: the unit of edit strength
    largest: float        # the paper's reference: the largest |projection| of a dataset model

    def shift(self, strength: float) -> torch.Tensor:
        """The coefficient change (K,) of an edit of `strength` standard deviations."""
        return strength * self.std * self.vector


def fit_direction(space: Space, attribute: str, k: int | None = None, method: str = DEFAULT_DIRECTION_METHOD,
                  rows: np.ndarray | None = None) -> torch.Tensor:
    """The raw direction (k,) of `attribute` fitted on the dataset models `rows` (default: all)."""
    if method not in DIRECTION_METHODS:
        raise SpaceError(f"unknown method {method!r}; expected one of {', '.join(DIRECTION_METHODS)}")
    coefficients = _coefficients(space, k, method)
    labels = attribute_labels(space, attribute)
    if rows is not None:
        coefficients, labels = coefficients[rows], labels[rows]
    if len(labels.unique()) < 2:
        raise SpaceError(f"attribute {attribute!r} has one value only in the dataset: no direction to fit")
    return FITS[method](coefficients, labels)


def attribute_directions(space: Space, attributes: list[str], k: int | None = None,
                         method: str = DEFAULT_DIRECTION_METHOD, debias_against: list[str] | None = None,
                         debias_mode: str = "project") -> dict[str, Direction]:
    """Unit directions of `attributes`, each debiased against `debias_against` (minus itself)."""
    coefficients = _coefficients(space, k, method)
    k = coefficients.shape[1]
    raw = {name: fit_direction(space, name, k, method) for name in {*attributes, *(debias_against or [])}}
    directions = {}
    for name in attributes:
        vector = debias(raw[name], [raw[o] for o in debias_against or [] if o != name], debias_mode)
        vector = vector / vector.norm()
        std, largest = spread_along(vector, coefficients)
        directions[name] = Direction(name, vector, std, largest)
    return directions


def apply_edits(model: W2WModel, strengths: dict[str, float], directions: dict[str, Direction]) -> W2WModel:
    """The model moved by strength_a standard deviations along each direction a (edits compose by addition)."""
    unknown = sorted(set(strengths) - set(directions))
    if unknown:
        raise SpaceError(f"no direction for {', '.join(unknown)}; fitted: {', '.join(directions)}")
    coefficients = model.coefficients.clone().float()
    for name, strength in strengths.items():
        check_number(strength, f"strength of {name}", minimum=-MODEL_SCALE_MAX, maximum=MODEL_SCALE_MAX,
                     why="an edit moves the model that many of the dataset's standard deviations")
        shift = directions[name].shift(strength)  # (K,)
        if len(coefficients) < len(shift):  # a model on fewer components gains the direction's
            coefficients = torch.cat([coefficients, coefficients.new_zeros(len(shift) - len(coefficients))])
        coefficients[: len(shift)] += shift
    return W2WModel(coefficients, model.space_id)


def direction_report(space: Space, k: int | None = None, method: str = DEFAULT_DIRECTION_METHOD,
                     held_out: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """For each ±1 attribute: positives, and held-out accuracy / balanced accuracy of sign(C d + b)
    with d fitted on the other models (least squares: b = the training labels' mean, the intercept of
    a fit on centred coefficients; mean difference: the midpoint of the two training classes)."""
    if space.attributes is None:
        raise SpaceError("the space has no attribute table (attributes.csv): there are no attributes to list")
    coefficients = _coefficients(space, k, method)
    m = coefficients.shape[0]
    order = np.random.default_rng(seed).permutation(m)
    test, train = order[: max(1, int(held_out * m))], order[max(1, int(held_out * m)):]
    rows = []
    for attribute in space.attributes.columns:
        try:
            labels = attribute_labels(space, attribute)
            direction = fit_direction(space, attribute, coefficients.shape[1], method, rows=train)
        except SpaceError:
            continue  # not a ±1 column, or one value only
        intercept = 0.0
        if method == "least_squares":
            intercept = float(labels[train].mean())
        elif method == "mean_difference":
            projections, y = coefficients[train] @ direction, labels[train]  # (M_train,)
            intercept = -0.5 * float(projections[y > 0].mean() + projections[y < 0].mean())
        predicted = torch.sign(coefficients[test] @ direction + intercept)
        truth = labels[test]
        recalls = [float((predicted[truth == v] == v).float().mean()) for v in (-1, 1) if (truth == v).any()]
        rows.append({"attribute": attribute, "positives": float((labels > 0).float().mean()),
                     "accuracy": float((predicted == truth).float().mean()),
                     "balanced_accuracy": float(np.mean(recalls))})
    if not rows:
        names = [str(name) for name in space.attributes.columns]
        columns = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "none"
        raise SpaceError(f"the attribute table has no ±1 column with both values among the dataset models (its "
                         f"columns: {columns}); expected CelebA-style attributes of +1 and -1")
    return pd.DataFrame(rows).set_index("attribute")


def edit_components(space: Space, method: str = DEFAULT_DIRECTION_METHOD) -> int:
    """The default K of directions: the paper's 1,000; for a fit (least squares, logistic) at most M / 10,
    so that it does not overfit. A mean difference fits nothing and takes all 1,000."""
    if method == "mean_difference":
        return DEFAULT_EDIT_COMPONENTS
    return max(1, min(DEFAULT_EDIT_COMPONENTS, space.num_models // MODELS_PER_COMPONENT))


def _coefficients(space: Space, k: int | None, method: str = DEFAULT_DIRECTION_METHOD) -> torch.Tensor:
    """The dataset's coefficients (M, k) on the first k components (default: edit_components)."""
    if space.coefficients is None:
        raise SpaceError("the space has no dataset coefficients: directions cannot be fitted")
    available = space.coefficients.shape[1]
    k = min(edit_components(space, method), available) if k is None else check_int(k, "components", 1, available)
    return space.coefficients[:, :k].float()
