import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_space

from lora_w2w.errors import FileFormatError, SpaceError
from lora_w2w.layout import LoraLayout, LoraLayer
from lora_w2w.space import Space, W2WModel
from lora_w2w.storage import SPACE_TENSORS, load_model, load_space, read_safetensors_header, save_model, save_space

SMALL = LoraLayout((LoraLayer("a.to_q", 5, 4), LoraLayer("a.to_v", 3, 4)))  # N = 16


def test_full_rank_round_trip_is_exact():
    space = make_space(SMALL, k=SMALL.numel, dtype=torch.float64)
    weights = torch.randn(7, SMALL.numel, dtype=torch.float64)
    coefficients = space.project(weights)  # (7, N)
    assert coefficients.shape == (7, SMALL.numel)
    torch.testing.assert_close(space.unproject(coefficients), weights, rtol=0, atol=1e-12)


def test_project_matches_the_papers_formula(space):
    weights = torch.randn(3, space.num_weights)
    expected = ((weights - space.mean) / space.std) @ space.components[:4].T  # c = z V, V (N x k)
    torch.testing.assert_close(space.project(weights, k=4), expected)
    back = (expected @ space.components[:4]) * space.std + space.mean     # w = (c Vᵀ) * std + mean
    torch.testing.assert_close(space.unproject(expected), back)
    assert space.project(weights[0]).shape == (space.num_components,)


def test_the_residual_is_the_share_of_the_standardized_weights_outside_the_span(space):
    c = torch.randn(3, space.num_components)
    inside = space.unproject(c)  # (3, N)
    torch.testing.assert_close(space.residual(inside, space.project(inside)), torch.zeros(3), atol=1e-5, rtol=0)
    outside = torch.randn(space.num_weights)
    outside -= space.components.T @ (space.components @ outside)  # orthogonal to every component
    w = space.mean + (2 * space.components[0] + outside) * space.std  # z = 2 V_0 + outside
    expected = float(outside.norm() / (4 + outside.norm() ** 2).sqrt())
    assert float(space.residual(w, space.project(w))) == pytest.approx(expected, rel=1e-5)
    assert float(space.residual(w, space.project(w, k=1))) == pytest.approx(expected, rel=1e-5)  # V_0 is kept
    assert float(space.residual(space.mean, space.project(space.mean))) == 0.0  # z = 0: nothing outside


def test_zero_variance_columns_do_not_divide_by_zero(space):
    space.std[:3] = 0
    coefficients = space.project(torch.randn(space.num_weights))
    assert torch.isfinite(coefficients).all()
    assert torch.equal(space.unproject(coefficients)[:3], space.mean[:3])


def test_k_larger_than_space_is_refused(space):
    with pytest.raises(SpaceError, match="7 components asked for, the space has K = 6"):
        space.project(torch.zeros(space.num_weights), k=7)
    with pytest.raises(SpaceError, match="K = 6"):
        space.unproject(torch.zeros(7))


def test_save_load_is_bit_exact(space, tmp_path):
    space = dataclasses.replace(space, inversion_presets={"ood": {"lr": 0.1}})
    save_space(space, tmp_path / "space")
    loaded = load_space(tmp_path / "space")
    for name in ("mean", "std", "components", "coefficients"):
        assert torch.equal(getattr(loaded, name), getattr(space, name)), name
    assert loaded.layout == space.layout and loaded.id == space.id and loaded.base_model == "tiny-test"
    assert loaded.inversion_presets == {"ood": {"lr": 0.1}} == loaded.truncate(2).inversion_presets
    description = json.loads((tmp_path / "space" / "space.json").read_text())
    (tmp_path / "space" / "space.json").write_text(json.dumps(description | {"inversion_presets": {"ood": 0.1}}))
    with pytest.raises(FileFormatError, match=r"space.json: inversion_presets.ood is 0.1; expected inversion settings such as \{\"lr\": 0.1\}"):
        load_space(tmp_path / "space")
    assert loaded.attributes.equals(space.attributes)
    assert sorted(p.name for p in (tmp_path / "space").iterdir()) == ["attributes.csv", "space.json", SPACE_TENSORS]
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_partial_load_reads_only_the_first_rows(space, tmp_path):
    save_space(space, tmp_path / "space")
    path = tmp_path / "space" / SPACE_TENSORS
    header, start = read_safetensors_header(path)
    begin = start + header["components"]["data_offsets"][0]
    row = 4 * space.num_weights
    with open(path, "r+b") as f:  # poison every row after the second: a partial load must not touch them
        f.seek(begin + 2 * row)
        f.write(np.full((space.num_components - 2) * space.num_weights, np.nan, np.float32).tobytes())
    loaded = load_space(tmp_path / "space", k=2)
    assert loaded.components.shape == (2, space.num_weights)
    assert torch.equal(loaded.components, space.components[:2])
    assert loaded.coefficients.shape == (space.num_models, 2)
    assert loaded.id == space.id  # a truncated space keeps its id, so its models stay valid
    with pytest.raises(FileFormatError, match="9 components asked for"):
        load_space(tmp_path / "space", k=9)


def test_corrupt_and_truncated_files_are_named(space, tmp_path):
    save_space(space, tmp_path / "space")
    path = tmp_path / "space" / SPACE_TENSORS
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(FileFormatError, match=f"{SPACE_TENSORS}: truncated"):
        load_space(tmp_path / "space")
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(FileFormatError, match="not a valid safetensors file"):
        load_space(tmp_path / "space")
    with pytest.raises(FileFormatError, match="not a w2w space"):
        load_space(tmp_path)


def test_failed_save_keeps_the_old_space(space, tmp_path, monkeypatch):
    save_space(space, tmp_path / "space")
    before = (tmp_path / "space" / SPACE_TENSORS).read_bytes()
    monkeypatch.setattr("lora_w2w.storage.json.dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        save_space(space.truncate(3), tmp_path / "space")
    assert (tmp_path / "space" / SPACE_TENSORS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["space"]


def test_model_round_trip_and_provenance(space, tmp_path):
    model = W2WModel(torch.randn(4), space.id)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert torch.equal(loaded.coefficients, model.coefficients) and loaded.space_id == space.id
    torch.testing.assert_close(loaded.weights(space), space.unproject(model.coefficients))
    other = make_space(space.layout, k=6, seed=1)
    with pytest.raises(SpaceError, match=f"belongs to space {space.id}"):
        loaded.weights(other)
    with pytest.raises(SpaceError, match="NaN/inf"):
        W2WModel(torch.tensor([0.0, float("nan")]))
    with pytest.raises(SpaceError, match="K = 6"):
        W2WModel(torch.zeros(7)).weights(space)


def test_space_json_is_readable(space, tmp_path):
    save_space(space, tmp_path / "space")
    description = json.loads((tmp_path / "space" / "space.json").read_text())
    assert description["num_components"] == 6 and description["num_models"] == 12
    assert description["layout"]["rank"] == 1 and len(description["layout"]["layers"]) == len(space.layout)


def test_mismatched_shapes_are_refused(space):
    with pytest.raises(SpaceError, match="components"):
        Space(space.mean, space.std, space.components[:, :-1], space.layout)
    with pytest.raises(SpaceError, match="attribute table has 3 rows"):
        Space(space.mean, space.std, space.components, space.layout, space.coefficients, space.attributes[:3])
