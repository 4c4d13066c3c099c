"""Sampling, editing and generation: the math on synthetic spaces, generation on the toy pipeline."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_space

from lora_w2w.editing import (apply_edits, attribute_directions, debias, direction_report, edit_components,
                              least_squares_direction, spread_along)
from lora_w2w.errors import SpaceError, W2WError
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
    with pytest.raises(SpaceError, match="9 components asked for"):
        sample_models(labelled_space, 1, k=9)


def test_least_squares_direction_is_the_pseudo_inverse_solution(labelled_space):
    c = labelled_space.coefficients
    y = torch.tensor(labelled_space.attributes["Bald"].to_numpy(), dtype=torch.float32)
    d = least_squares_direction(c, y)
    torch.testing.assert_close(d, torch.linalg.lstsq(c.double(), y.double()[:, None]).solution[:, 0].float(),
                               rtol=1e-4, atol=1e-6)
    direction = attribute_directions(labelled_space, ["Bald"], k=8)["Bald"]
    assert direction.vector[0] > 0.95  # Bald lives on c0
    std, largest = spread_along(direction.vector, c)
    assert direction.std == pytest.approx(std) and largest > 2 * std


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
    report = direction_report(labelled_space, k=8)
    assert list(report.index) == ["Bald", "Male"]  # non-±1 and constant columns are skipped
    assert report.loc["Bald", "accuracy"] > 0.9 and report.loc["Male", "balanced_accuracy"] > 0.9
    logistic = direction_report(labelled_space, k=8, method="logistic")
    assert logistic.loc["Bald", "accuracy"] > 0.9


def test_directions_default_to_at_most_m_over_10_components(labelled_space):
    """The paper's K = 1,000 for its 65k models; at most M/10 for smaller datasets, where least squares
    on more unknowns overfits (M = 60 models on 8 components: 6 of them)."""
    assert edit_components(labelled_space) == 200  # min(1000, 2000 // 10); directions take the space's 8 of them
    assert attribute_directions(labelled_space, ["Bald"])["Bald"].vector.shape == (8,)
    small = labelled_space.truncate(8)
    small.coefficients, small.attributes = small.coefficients[:60], small.attributes.iloc[:60]
    assert edit_components(small) == 6
    assert attribute_directions(small, ["Bald"])["Bald"].vector.shape == (6,)
    big = make_space(SMALL, k=8, m=20_000, seed=0)
    assert edit_components(big) == 1000


def test_generation_fuses_the_model_and_delays_injection(toy_world):
    from lora_w2w.layout import LoraLayout
    from lora_w2w.pipeline import generate, load_base_pipeline

    pipe = load_base_pipeline(str(toy_world / "base"), "cpu", progress=False)
    layout = LoraLayout.from_unet(pipe.unet)
    g = torch.Generator().manual_seed(0)
    weights, edited = 0.3 * torch.randn(2, layout.numel, generator=g)
    kwargs = dict(seeds=[0, 1], num_inference_steps=4, guidance_scale=3.0)

    def run(*args, **extra):
        return np.stack([np.asarray(im, dtype=np.int16) for im in generate(pipe, layout, *args, **kwargs, **extra)])

    base = run(None, "a photo of a person")
    with_model = run(weights, "a photo of a person")
    assert np.abs(with_model - base).mean() > 1  # the model changes the images
    assert np.array_equal(run(None, "a photo of a person"), base)  # and is removed afterwards
    only_edited = run(edited, "a photo of a person")
    assert np.array_equal(run(weights, "a photo of a person", edited=edited, injection_timestep=10_000), only_edited)
    assert np.array_equal(run(weights, "a photo of a person", edited=edited, injection_timestep=-1), with_model)
    delayed = run(weights, "a photo of a person", edited=edited, injection_timestep=500)
    assert np.abs(delayed - only_edited).mean() > 0.5 and np.abs(delayed - with_model).mean() > 0.5
    assert len(generate(pipe, None, None, "a photo", seeds=[3, 4, 5], num_inference_steps=2)) == 3
    with pytest.raises(W2WError, match="needs both"):
        generate(pipe, layout, weights, "x", edited=edited)
