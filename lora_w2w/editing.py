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

Attributes go by friendly names with the sign folded in (ALIASES: Beard is -No_Beard, Age is -Young),
or by the attribute table's own: every function here takes either. `attribute_names(space)` lists the
names an edit takes (a slider each), `resolve_attribute(name)` gives the table's column and sign.

    directions = attribute_directions(space, ["Bald", "Age"], debias_against=["Male"])
    edited = apply_edits(model, {"Bald": 2.0, "Age": 1.0}, directions)  # the edited model records the edit

Letters: M dataset models, K components.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
# Friendly names of CelebA's attributes that read backwards on a slider (No_Beard -3 adds a beard): name ->
# (column of the attribute table, sign). An edit of `name` by s moves `column` by sign * s.
ALIASES = {"Beard": ("No_Beard", -1.0), "Age": ("Young", -1.0)}
# What edits keep by default (the app's ticks, `w2w edit --debias`, model.edit): sex and age, those of them
# the space has.
DEFAULT_DEBIAS = ("Male", "Age")


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

def resolve_attribute(name: str, space: Space | None = None) -> tuple[str, float]:
    """(column of the attribute table, sign) of an attribute named friendly (ALIASES) or as the table does;
    with `space`, SpaceError when its table has no such column, listing the names edits take."""
    column, sign = ALIASES.get(name, (name, 1.0))
    if space is not None and space.attributes is not None and column not in space.attributes.columns:
        raise SpaceError(f"no attribute {name!r}; the space has: {', '.join(attribute_names(space))}")
    return column, sign


def friendly(column: str) -> tuple[str, float]:
    """(the name an edit of the table's `column` goes by, the sign from the column to it): its alias when it has
    one, else the column's own name and +1."""
    return next(((alias, sign) for alias, (aliased, sign) in ALIASES.items() if aliased == column), (column, 1.0))


def friendly_name(column: str) -> str:
    """The name an edit of the table's `column` goes by (`friendly`)."""
    return friendly(column)[0]


def binary_attributes(space: Space) -> list[str]:
    """The ±1 columns of the space's attribute table, with both values present: the attributes edits move."""
    if space.attributes is None:
        return []
    return [str(name) for name in space.attributes.columns
            if np.isin(space.attributes[name].to_numpy(), (-1, 1)).all()
            and len(np.unique(space.attributes[name].to_numpy())) == 2]


def attribute_names(space: Space) -> list[str]:
    """The names of the attributes edits move, in the table's order, friendly (Beard, Age) where ALIASES has
    one: what the app's sliders show and `w2w edit --edit NAME=S` takes."""
    return [friendly_name(column) for column in binary_attributes(space)]


def resolve_strengths(strengths: dict[str, float]) -> dict[str, float]:
    """Strengths by friendly or table name -> strengths by column, signs folded in; SpaceError when two names
    move one column (Beard and No_Beard)."""
    resolved, given = {}, {}
    for name, strength in strengths.items():
        column, sign = resolve_attribute(name)
        if column in resolved:
            raise SpaceError(f"{given[column]!r} and {name!r} name one direction ({column}); give one of them")
        resolved[column], given[column] = sign * float(strength), name
    return resolved


def default_debias(space: Space) -> list[str]:
    """DEFAULT_DEBIAS: the attributes edits keep unless told otherwise, those the space has."""
    names = set(attribute_names(space))
    return [name for name in DEFAULT_DEBIAS if name in names]


def debias_or_default(space: Space, debias) -> list[str]:
    """`debias` as given (a list of names; empty: none), or `default_debias` when it is None."""
    return default_debias(space) if debias is None else list(debias)


def attribute_labels(space: Space, attribute: str) -> torch.Tensor:
    """The ±1 labels (M,) of an attribute column of the space's attribute table."""
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

    attribute: str        # the attribute table's column
    vector: torch.Tensor  # (K,), unit norm
    std: float            # std of the dataset's projections: the unit of edit strength
    largest: float        # the paper's reference: the largest |projection| of a dataset model
    debias: tuple[str, ...] = ()  # the columns whose directions were removed from it
    method: str = DEFAULT_DIRECTION_METHOD

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
    """Unit directions of `attributes` (friendly or table names), each debiased against `debias_against`
    (minus itself), keyed by the table's columns; a friendly name's direction is its column's (the sign is
    the edit's: `apply_edits`)."""
    coefficients = _coefficients(space, k, method)
    k = coefficients.shape[1]
    columns = list(dict.fromkeys(resolve_attribute(name, space)[0] for name in attributes))
    # the columns in one order, since 'project' removes them in turn: Age and Young, given in any order, agree
    against = sorted({resolve_attribute(name, space)[0] for name in debias_against or []})
    raw = {name: fit_direction(space, name, k, method) for name in {*columns, *against}}
    directions = {}
    for name in columns:
        others = [o for o in against if o != name]
        vector = debias(raw[name], [raw[o] for o in others], debias_mode)
        vector = vector / vector.norm()
        std, largest = spread_along(vector, coefficients)
        directions[name] = Direction(name, vector, std, largest, tuple(others), method)
    return directions


def apply_edits(model: W2WModel, strengths: dict[str, float], directions: dict[str, Direction]) -> W2WModel:
    """The model moved by strength_a standard deviations along each direction a (friendly or table names; edits
    compose by addition), its provenance extended by the edit."""
    from .provenance import edited

    resolved = resolve_strengths(strengths)
    unknown = sorted(set(resolved) - set(directions))
    if unknown:
        raise SpaceError(f"no direction for {', '.join(unknown)}; fitted: {', '.join(directions)}")
    coefficients = model.coefficients.clone().float()
    for name, strength in resolved.items():
        check_number(strength, f"strength of {name}", minimum=-MODEL_SCALE_MAX, maximum=MODEL_SCALE_MAX,
                     why="an edit moves the model that many of the dataset's standard deviations")
        shift = directions[name].shift(strength)  # (K,)
        if len(coefficients) < len(shift):  # a model on fewer components gains the direction's
            coefficients = torch.cat([coefficients, coefficients.new_zeros(len(shift) - len(coefficients))])
        coefficients[: len(shift)] += shift
    used = [directions[name] for name in resolved]
    step = edited({friendly(c)[0]: friendly(c)[1] * s for c, s in resolved.items()},  # as the user names them
                  sorted({friendly_name(o) for d in used for o in d.debias}),
                  ",".join(sorted({d.method for d in used})), max((len(d.vector) for d in used), default=0))
    return replace(model, coefficients=coefficients, provenance=(*model.provenance, step))


def direction_report(space: Space, k: int | None = None, method: str = DEFAULT_DIRECTION_METHOD,
                     held_out: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """For each ±1 attribute, by its friendly name: positives (the share of models having it: for Beard, those
    with a beard), and held-out accuracy / balanced accuracy of sign(C d + b) with d fitted on the other
    models (least squares: b = the training labels' mean, the intercept of a fit on centred coefficients;
    mean difference: the midpoint of the two training classes)."""
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
        name, sign = friendly(attribute)
        rows.append({"attribute": name, "positives": float((sign * labels > 0).float().mean()),
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
