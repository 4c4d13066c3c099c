"""Importing the released w2w files, on a fixture written here in their exact format."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lora_w2w.errors import PickleRefusedError
from lora_w2w.formats import load_peft
from lora_w2w.layout import sd15_layout
from lora_w2w.official import import_official
from lora_w2w.storage import load_model

K, M = 8, 10


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files for the Stable Diffusion 1.5 layout (N = 99,648), with K = 8 components."""
    src = tmp_path_factory.mktemp("released")
    layout = sd15_layout()
    n = layout.numel
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n, K, generator=g))[0]  # (N, K), orthonormal columns
    mean, std = 0.01 * torch.randn(n, generator=g), 0.01 + torch.rand(n, generator=g)
    torch.save(mean, src / "mean.pt")
    torch.save(std, src / "std.pt")
    torch.save(basis, src / "V.pt")
    proj = torch.randn(M, 5, generator=g)
    torch.save(proj, src / "proj_1000pc.pt")
    torch.save(torch.linalg.pinv(proj), src / "pinverse_1000pc.pt")
    shapes = {}
    for layer in layout.layers:
        shapes[f"base_model.model.{layer.name}.lora_A.weight"] = (layer.in_features, torch.Size([1, layer.in_features]))
        shapes[f"base_model.model.{layer.name}.lora_B.weight"] = (layer.out_features, torch.Size([layer.out_features, 1]))
    torch.save(shapes, src / "weight_dimensions.pt")
    frame = pd.DataFrame({"Male": [1, -1] * (M // 2), "Eyeglasses": [-1] * M})
    torch.save(frame, src / "identity_df.pt")
    (src / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 27, "target_modules": ["to_q", "to_v"]}))
    torch.save(torch.randn(1, K, generator=g), src / "w2wmodel.pt")
    return src, mean, std, basis, proj, frame


def test_import_gives_the_weights_of_the_papers_formula(released, tmp_path):
    src, mean, std, basis, proj, frame = released
    space = import_official(src, tmp_path / "official", trust_pickle=True)
    assert (space.num_weights, space.num_components, space.num_models) == (99_648, K, M)
    assert space.layout == sd15_layout()
    assert space.base_model == "stablediffusionapi/realistic-vision-v51"
    assert torch.equal(space.coefficients, proj)
    assert list(space.attributes["Male"]) == list(frame["Male"])
    c = torch.randn(2, K)
    expected = (c @ basis.T) * std + mean  # w = (c Vᵀ) * std + mean
    torch.testing.assert_close(space.unproject(c), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(space.project(expected), c, rtol=1e-4, atol=1e-4)


def test_pickles_are_refused_without_consent(released, tmp_path):
    src = released[0]
    with pytest.raises(PickleRefusedError, match="identity_df.pt needs unpickling.*--trust-pickle"):
        import_official(src, tmp_path / "official")
    assert not (tmp_path / "official").exists()
    result = subprocess.run([sys.executable, "-m", "lora_w2w.cli", "import-official", str(src), str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "identity_df.pt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_import_of_a_saved_w2wmodel_exports_like_the_formula(released, tmp_path):
    src, mean, std, basis, *_ = released
    import_official(src, tmp_path / "official", trust_pickle=True)
    from lora_w2w.cli import main

    assert main(["export", "--space", str(tmp_path / "official"), "--model", str(src / "w2wmodel.pt"),
                 "--format", "peft", "--out", str(tmp_path / "lora")]) == 0
    c = torch.load(src / "w2wmodel.pt")
    weights = load_peft(sd15_layout(), tmp_path / "lora")
    torch.testing.assert_close(weights, ((c @ basis.T) * std + mean)[0], rtol=1e-5, atol=1e-6)
    assert main(["import-official", "--model", str(src / "w2wmodel.pt"), str(tmp_path / "m.safetensors")]) == 0
    assert torch.equal(load_model(tmp_path / "m.safetensors").coefficients, c[0])


def test_missing_and_wrong_files(released, tmp_path):
    src = released[0]
    with pytest.raises(Exception, match="missing mean.pt, std.pt, V.pt"):
        import_official(tmp_path, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("mean.pt", "std.pt", "V.pt"):
        (bad / name).write_bytes((src / name).read_bytes())
    torch.save(torch.zeros(5), bad / "mean.pt")
    with pytest.raises(Exception, match="mean.pt: 5 numbers, the layout has N = 99648"):
        import_official(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
