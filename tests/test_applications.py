"""Sampling, editing and generation: the math on synthetic spaces, generation on the toy pipeline."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_space

from lora_w2w.editing import (DEFAULT_DIRECTION_METHOD, DIRECTION_METHODS, apply_edits, attribute_directions, debias, direction_report,
                              edit_components, least_squares_direction, mean_difference_direction, spread_along)
from lora_w2w.errors import ArgumentError, SpaceError, W2WError
from lora_w2w.layout import LoraLayer, LoraLayout
from lora_w2w.sampling import fit_gaussian, nearest_models, sample_models
from lora_w2w.space import W2WModel

SMALL = LoraLayout((LoraLayer("a.to_q", 5, 4), LoraLayer("a.to_v", 3, 4)))  # N = 16


@pytest.fixture
def labelled_space():
    """2,000 dataset models on K = 8; Bald follows c0, Male follows c0 + c1 (so the two correlate)."""
    space = make_space(SMALL, k=8, m=2000, seed=3)
    g = torch.Generator().manual_seed(4)
    c = torch.randn(2000, 8, generator=g) * torch.linspace(3, 0.5, 8)  # (M, K), decreasing variance
    space.coefficients = c
    noise = 0.3 * torch.randn(2000, generator=g)
    space.attributes = pd.DataFrame({
        "Bald": np.where(c[:, 0] + noise > 0, 1, -1),
        "Male": np.where(c[:, 0] + c[:, 1] > 0, 1, -1),
        "Constant": np.ones(2000, dtype=int),
        "Score": np.linspace(0, 1, 2000),
    }, index=[f"{i:06d}" for i in range(2000)])
    return space


def test_sampling_fits_the_dataset_gaussian(labelled_space):
    models = sample_models(labelled_space, 4000, seed=0, k=8)
    draws = torch.stack([m.coefficients for m in models])  # (S, K)
    mean, std = fit_gaussian(labelled_space.coefficients)
    torch.testing.assert_close(draws.mean(0).double(), mean, atol=0.15, rtol=0)
    torch.testing.assert_close(draws.std(0).double(), std, atol=0, rtol=0.05)
    half = torch.stack([m.coefficients for m in sample_models(labelled_space, 4000, seed=0, k=8, factor=0.5)])
    torch.testing.assert_close(half.std(0).double(), 0.5 * std, atol=0, rtol=0.05)
    assert all(m.space_id == labelled_space.id for m in models)
    again = sample_models(labelled_space, 3, seed=0, k=8)
    assert all(torch.equal(a.coefficients, b.coefficients) for a, b in zip(again, models[:3]))  # deterministic
    index, distance = nearest_models(labelled_space, draws[:5])
    assert index.shape == (5,) and (distance > 0).all()
    with pytest.raises(ArgumentError, match="components: expected an integer from 1 to 8, got 9"):
        sample_models(labelled_space, 1, k=9)


def test_least_squares_direction_is_the_pseudo_inverse_solution(labelled_space):
    c = labelled_space.coefficients
    y = torch.tensor(labelled_space.attributes["Bald"].to_numpy(), dtype=torch.float32)
    d = least_squares_direction(c, y)
    torch.testing.assert_close(d, torch.linalg.lstsq(c.double(), y.double()[:, None]).solution[:, 0].float(),
                               rtol=1e-4, atol=1e-6)
    direction = attribute_directions(labelled_space, ["Bald"], k=8, method="least_squares")["Bald"]
    assert direction.vector[0] > 0.95  # Bald lives on c0
    std, largest = spread_along(direction.vector, c)
    assert direction.std == pytest.approx(std) and largest > 2 * std


def test_mean_difference_direction_is_the_gap_of_the_class_means(labelled_space):
    c = labelled_space.coefficients
    y = torch.tensor(labelled_space.attributes["Bald"].to_numpy(), dtype=torch.float32)
    d = mean_difference_direction(c, y)
    bald, rest = c[y > 0], c[y < 0]
    torch.testing.assert_close(d, bald.mean(0) - rest.mean(0))
    # Bald is about c0 > 0 with c0 ~ N(0, 3²): the class means of c0 lie 2·3·sqrt(2/pi) apart ...
    assert float(d[0]) == pytest.approx(2 * 3 * (2 / np.pi) ** 0.5, rel=0.05)
    assert d[1:].abs().max() < 0.1 * d[0]  # ... and close on the components it does not depend on
    # for centred coefficients it is the pattern of the least-squares filter: cov(C) pinv(C) y = 2p(1 - p) d
    centred = (c - c.mean(0)).double()
    p = float((y > 0).float().mean())
    pattern = centred.T @ centred / len(c) @ least_squares_direction(centred.float(), y).double()
    torch.testing.assert_close(pattern, 2 * p * (1 - p) * mean_difference_direction(centred.float(), y).double(),
                               rtol=1e-4, atol=1e-5)
    direction = attribute_directions(labelled_space, ["Bald"], method="mean_difference")["Bald"]
    assert direction.vector.shape == (8,) and direction.vector[0] > 0.99
    report = direction_report(labelled_space, k=8, method="mean_difference")
    assert report.loc["Bald", "accuracy"] > 0.9 and report.loc["Male", "balanced_accuracy"] > 0.9
    # the midpoint of the classes is the threshold: shifting every model leaves the accuracy as it is
    shifted = make_space(SMALL, k=8, m=2000, seed=3)
    shifted.coefficients, shifted.attributes = labelled_space.coefficients + 5.0, labelled_space.attributes
    assert direction_report(shifted, k=8, method="mean_difference").equals(report)


def test_the_debiased_direction_is_the_same_for_any_order_and_spelling_of_the_attributes(labelled_space):
    """'project' removes the others in turn, so their order counts: the columns go in one order, whatever
    the order and names (friendly or the table's) the caller gave."""
    space = copy.copy(labelled_space)
    c = space.coefficients
    space.attributes = labelled_space.attributes.assign(Young=np.where(c[:, 0] - c[:, 2] > 0, 1, -1))
    given = [["Male", "Young"], ["Young", "Male"], ["Age", "Male"]]  # Age: the friendly name of -Young
    vectors = [attribute_directions(space, ["Bald"], k=8, debias_against=g)["Bald"].vector for g in given]
    assert all(torch.equal(vectors[0], v) for v in vectors[1:])
    raw = attribute_directions(space, ["Bald", "Male", "Young"], k=8)
    in_turn = [debias(raw["Bald"].vector, [raw[a].vector for a in g]) for g in given[:2]]
    assert not torch.allclose(in_turn[0], in_turn[1], atol=1e-6)  # the order would matter without it


def test_debiasing_removes_the_other_direction(labelled_space):
    raw = attribute_directions(labelled_space, ["Male", "Bald"], k=8)
    debiased = attribute_directions(labelled_space, ["Male"], k=8, debias_against=["Bald"])["Male"]
    assert abs(float(raw["Male"].vector @ raw["Bald"].vector)) > 0.3  # correlated before
    bald_raw = attribute_directions(labelled_space, ["Bald"], k=8)["Bald"].vector
    assert abs(float(debiased.vector @ bald_raw)) < 1e-5               # orthogonal after
    others = [torch.randn(8), torch.randn(8)]
    for mode in ("project", "orthogonalize"):
        out = debias(torch.randn(8), others, mode)
        if mode == "orthogonalize":
            assert all(abs(float(out @ o)) < 1e-5 for o in others)
    with pytest.raises(SpaceError, match="unknown debias mode"):
        debias(torch.randn(8), others, "nope")


def test_edits_move_by_dataset_standard_deviations_and_compose(labelled_space):
    directions = attribute_directions(labelled_space, ["Bald", "Male"], k=8)
    model = W2WModel(torch.zeros(8), labelled_space.id)
    edited = apply_edits(model, {"Bald": 2.0}, directions)
    moved = edited.coefficients @ directions["Bald"].vector
    assert float(moved) == pytest.approx(2.0 * directions["Bald"].std, rel=1e-5)
    both = apply_edits(model, {"Bald": 2.0, "Male": -1.0}, directions)
    torch.testing.assert_close(both.coefficients,
                               apply_edits(apply_edits(model, {"Bald": 2.0}, directions), {"Male": -1.0},
                                           directions).coefficients)
    longer = apply_edits(W2WModel(torch.ones(12)), {"Bald": 1.0}, directions)  # a model on more components
    assert torch.equal(longer.coefficients[8:], torch.ones(4))
    shorter = apply_edits(W2WModel(torch.ones(4)), {"Bald": 1.0}, directions)
    assert shorter.coefficients.shape == (8,)
    with pytest.raises(SpaceError, match="no direction for Chubby"):
        apply_edits(model, {"Chubby": 1.0}, directions)
    with pytest.raises(SpaceError, match="no attribute 'Chubby'; the space has: Bald, Male"):
        attribute_directions(labelled_space, ["Chubby"], k=8)
    with pytest.raises(SpaceError, match="one value only"):
        attribute_directions(labelled_space, ["Constant"], k=8)


def test_direction_report_scores_held_out_models(labelled_space):
    report = direction_report(labelled_space, k=8, method="least_squares")
    assert list(report.index) == ["Bald", "Male"]  # non-±1 and constant columns are skipped
    assert report.loc["Bald", "accuracy"] > 0.9 and report.loc["Male", "balanced_accuracy"] > 0.9
    logistic = direction_report(labelled_space, k=8, method="logistic")
    assert logistic.loc["Bald", "accuracy"] > 0.9


def test_fitted_directions_default_to_at_most_m_over_10_components(labelled_space):
    """The paper's K = 1,000 for its 65k models; for a fit, at most M/10 for smaller datasets, where least
    squares on more unknowns overfits (M = 60 models on 8 components: 6 of them)."""
    assert edit_components(labelled_space, "least_squares") == 200  # min(1000, 2000 // 10)
    assert attribute_directions(labelled_space, ["Bald"], method="least_squares")["Bald"].vector.shape == (8,)
    small = labelled_space.truncate(8)
    small.coefficients, small.attributes = small.coefficients[:60], small.attributes.iloc[:60]
    assert edit_components(small, "least_squares") == edit_components(small, "logistic") == 6
    assert attribute_directions(small, ["Bald"], method="least_squares")["Bald"].vector.shape == (6,)
    big = make_space(SMALL, k=8, m=20_000, seed=0)
    assert edit_components(big, "least_squares") == 1000
    # the mean difference fits nothing: every component, up to 1,000; it is the default
    assert edit_components(small, "mean_difference") == edit_components(small) == 1000
    assert attribute_directions(small, ["Bald"])["Bald"].vector.shape == (8,)


def test_the_cli_offers_every_editing_method():
    from lora_w2w.cli import build_parser

    for command in (["edit", "--model", "m", "--edit", "Bald=1", "--out", "o"], ["directions"]):
        assert build_parser().parse_args(command).method == DEFAULT_DIRECTION_METHOD
        for method in DIRECTION_METHODS:
            assert build_parser().parse_args([*command, "--method", method]).method == method


@pytest.mark.slow
def test_generation_fuses_the_model_and_delays_injection(toy_world):
    from lora_w2w.layout import LoraLayout
    from lora_w2w.pipeline import generate_from_weights, load_base_pipeline

    pipe = load_base_pipeline(str(toy_world / "base"), "cpu", progress=False)
    layout = LoraLayout.from_unet(pipe.unet)
    g = torch.Generator().manual_seed(0)
    weights, edited = 0.3 * torch.randn(2, layout.numel, generator=g)
    kwargs = dict(seeds=[0, 1], num_inference_steps=4, guidance_scale=3.0)

    def run(*args, **extra):
        images = generate_from_weights(pipe, layout, *args, **kwargs, **extra)
        return np.stack([np.asarray(im, dtype=np.int16) for im in images])

    base = run(None, "a photo of a person")
    with_model = run(weights, "a photo of a person")
    assert np.abs(with_model - base).mean() > 1  # the model changes the images
    assert np.array_equal(run(None, "a photo of a person"), base)  # and is removed afterwards
    only_edited = run(edited, "a photo of a person")
    assert np.array_equal(run(weights, "a photo of a person", edited=edited, injection_timestep=1000), only_edited)
    assert np.array_equal(run(weights, "a photo of a person", edited=edited, injection_timestep=0), with_model)
    with pytest.raises(ArgumentError, match="injection timestep: expected an integer from 0 to 1000, got -1"):
        run(weights, "a photo of a person", edited=edited, injection_timestep=-1)
    delayed = run(weights, "a photo of a person", edited=edited, injection_timestep=500)
    assert np.abs(delayed - only_edited).mean() > 0.5 and np.abs(delayed - with_model).mean() > 0.5
    assert len(generate_from_weights(pipe, None, None, "a photo", seeds=[3, 4, 5], num_inference_steps=2)) == 3
    with pytest.raises(W2WError, match="needs both"):
        generate_from_weights(pipe, layout, weights, "x", edited=edited)


@pytest.mark.slow
def test_generate_takes_the_space_and_a_model():
    """generate(pipe, space, model) is generate_from_weights with the model's weights and the space's prompt,
    bit for bit, on the tiny world."""
    from pathlib import Path

    from lora_w2w.pipeline import generate, generate_from_weights, load_base_pipeline
    from lora_w2w.storage import load_space

    tiny = Path(__file__).resolve().parents[1] / "files" / "tiny"
    pipe = load_base_pipeline(str(tiny / "base"), "cpu", progress=False)
    space = load_space(tiny / "space")
    model = sample_models(space, num=1, seed=0)[0]
    kwargs = dict(seeds=[0, 1], num_inference_steps=2, guidance_scale=3.0)

    def pixels(images):
        return np.stack([np.asarray(im) for im in images])

    assert space.prompt == "sks person"
    expected = pixels(generate_from_weights(pipe, space.layout, model.weights(space), space.prompt, **kwargs))
    assert np.array_equal(pixels(generate(pipe, space, model, **kwargs)), expected)
    assert np.array_equal(pixels(generate(pipe, space, model.coefficients, **kwargs)), expected)
    assert np.array_equal(pixels(generate(pipe, space, model, "sks person", **kwargs)), expected)
    other = pixels(generate(pipe, space, model, "a photo of sks person smiling", **kwargs))
    assert np.array_equal(other, pixels(generate_from_weights(pipe, space.layout, model.weights(space),
                                                              "a photo of sks person smiling", **kwargs)))
    assert not np.array_equal(other, expected)
    base = pixels(generate_from_weights(pipe, None, None, space.prompt, **kwargs))
    assert np.array_equal(pixels(generate(pipe, space, None, **kwargs)), base) and not np.array_equal(base, expected)
    edited = sample_models(space, num=1, seed=1)[0]
    delayed = dict(kwargs, injection_timestep=500)
    assert np.array_equal(pixels(generate(pipe, space, model, edited=edited, **delayed)),
                          pixels(generate_from_weights(pipe, space.layout, model.weights(space), space.prompt,
                                                       edited=edited.weights(space), **delayed)))
    old_style = r"takes a Space, got LoraLayout; .* call generate_from_weights\(pipe, layout, weights, prompt\)"
    with pytest.raises(TypeError, match=old_style):
        generate(pipe, space.layout, model.weights(space), space.prompt, **kwargs)
    with pytest.raises(SpaceError, match="components asked for"):
        generate(pipe, space, torch.zeros(space.num_components + 1), **kwargs)
