"""Importing the released w2w files, on a fixture written here in their exact format."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import write_original_lora, write_released_files

from lora_w2w.errors import PickleRefusedError
from lora_w2w.formats import SD_NAMING, load_peft, save_kohya, save_peft
from lora_w2w.layout import parse_peft_key, sd15_layout
from lora_w2w.official import import_official
from lora_w2w.storage import load_model, load_space

K, M = 8, 10


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files for the Stable Diffusion 1.5 layout (N = 99,648), with K = 8 components."""
    src = tmp_path_factory.mktemp("released")
    files = write_released_files(src, sd15_layout(), K, M)
    return src, files["mean"], files["std"], files["V"], files["proj_1000pc"], files["identity_df"]


@pytest.fixture(scope="module")
def official(released, tmp_path_factory):
    """The imported space's directory."""
    path = tmp_path_factory.mktemp("official") / "space"
    import_official(released[0], path, trust_pickle=True)
    return path


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


@pytest.mark.slow
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


def test_the_layout_cuts_vectors_as_the_originals_reader_does(released, official):
    """utils.py's unflatten: `flattened_weights[0, counter:counter+weight_dimensions[key][0][0]]
    .unflatten(0, weight_dimensions[key][1])`, counter advancing by `weight_dimensions[key][0][0]`."""
    src, space = released[0], load_space(official)
    dimensions = torch.load(src / "weight_dimensions.pt", weights_only=True)
    assert all(isinstance(value[0], torch.Size) and len(value[0]) == 1 for value in dimensions.values())
    flat = torch.randn(1, space.num_weights)
    parts, counter = space.layout.split(flat[0]), 0
    for key in dimensions:
        original = flat[0, counter:counter + dimensions[key][0][0]].unflatten(0, dimensions[key][1])
        counter += dimensions[key][0][0]
        name, part, _ = parse_peft_key(key)
        assert torch.equal(parts[name][0 if part == "lora_A" else 1], original), key
    assert counter == space.num_weights == 99_648


def test_a_malformed_weight_dimensions_value_is_one_line_naming_key_and_value(released, tmp_path, capsys):
    from lora_w2w.cli import main

    src = released[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("mean.pt", "std.pt", "V.pt"):
        (bad / name).write_bytes((src / name).read_bytes())
    dimensions = torch.load(src / "weight_dimensions.pt", weights_only=True)
    key = next(iter(dimensions))
    dimensions[key] = [torch.Size([320, 1]), torch.Size([1, 320])]
    torch.save(dimensions, bad / "weight_dimensions.pt")
    with pytest.raises(SystemExit) as exit:  # an exception other than the CLI's one-line exit fails the test
        main(["import-official", str(bad), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    value = "[torch.Size([320, 1]), torch.Size([1, 320])]"
    assert f"weight_dimensions.pt[{key!r}] = {value}: expected [numel, shape]" in err
    assert not (tmp_path / "o").exists()


def project(capsys, *args) -> tuple[int, str, str]:
    from lora_w2w.cli import main

    try:
        code = main(["project", *map(str, args)])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_project_of_an_original_folder_gives_back_the_models_coefficients(released, official, tmp_path, capsys):
    src, mean, std, basis, *_ = released
    c = torch.load(src / "w2wmodel.pt")  # (1, K)
    weights = ((c @ basis.T) * std + mean)[0]  # the original's save_model_for_diffusers: proj @ v.T * std + mean
    dimensions = torch.load(src / "weight_dimensions.pt", weights_only=True)
    folder = write_original_lora(weights, dimensions, tmp_path / "inversion1", src / "adapter_config.json")
    code, out, err = project(capsys, folder, "--space", official, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    model = load_model(tmp_path / "m.safetensors")
    assert model.space_id == load_space(official).id
    assert float((model.coefficients - c[0]).norm() / c.norm()) < 1e-3
    assert "standardized residual |z - cV| / |z| = 0.0000" in out
    random = weights + 0.05 * torch.randn(weights.shape, generator=torch.Generator().manual_seed(1)) * std
    save_peft(sd15_layout(), random, tmp_path / "random")
    code, out, err = project(capsys, tmp_path / "random", "--space", official, "--components", 4,
                             "--out", tmp_path / "r.safetensors")
    assert code == 0 and load_model(tmp_path / "r.safetensors").coefficients.shape == (4,), err
    z = (random - mean) / std
    expected = float((z - (z @ basis[:, :4]) @ basis[:, :4].T).norm() / z.norm())
    assert f"= {expected:.4f} (0: the LoRA lies in the span" in out and expected > 0.5


def test_project_refuses_a_lora_of_another_layout_naming_the_first_difference(official, tmp_path, capsys):
    first = sd15_layout().layers[0].name  # down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    save_peft(sd15_layout(target_modules=("to_q",)), torch.zeros(sd15_layout(("to_q",)).numel), tmp_path / "q_only")
    save_peft(sd15_layout(rank=2), torch.zeros(sd15_layout(rank=2).numel), tmp_path / "rank2")
    state = load_file(save_kohya(sd15_layout(), torch.zeros(99_648), tmp_path / "k.safetensors"))
    state[f"{SD_NAMING.kohya_name(first)}.lora_down.weight"] = torch.zeros(1, 640)
    save_file(state, tmp_path / "wide.safetensors")
    for lora, message in (("q_only", f"layer {first.replace('to_q', 'to_v')} (320->320) is missing"),
                          ("rank2", "rank 2, expected 1"),
                          ("wide.safetensors", f"layer {first} is 640->320, expected 320->320")):
        code, _, err = project(capsys, tmp_path / lora, "--space", official, "--out", tmp_path / "m.safetensors")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"does not fit the layout (64 layers of rank 1): {message}" in err and lora in err
        assert not (tmp_path / "m.safetensors").exists()


def test_info_and_collect_read_the_originals_folders(released, tmp_path, capsys):
    from lora_w2w.cli import main
    from lora_w2w.dataset import WeightsDataset

    src, mean, std, basis, proj, _ = released
    dimensions = torch.load(src / "weight_dimensions.pt", weights_only=True)
    weights = (proj[:2] @ basis.T) * std + mean  # (2, N): two dataset models
    for i, name in enumerate(("id_b", "id_a")):
        write_original_lora(weights[i], dimensions, tmp_path / "loras" / name, src / "adapter_config.json")
    assert main(["info", str(tmp_path / "loras" / "id_a")]) == 0
    out = capsys.readouterr().out
    assert f"PEFT/diffusers LoRA {tmp_path / 'loras' / 'id_a' / 'unet' / 'adapter_model.safetensors'}" in out
    assert "LoRA layers  64 (to_q, to_v), rank 1, alpha 27" in out and "N            99,648" in out
    assert main(["collect", str(tmp_path / "loras"), str(tmp_path / "dataset")]) == 0
    dataset = WeightsDataset(tmp_path / "dataset")
    assert list(dataset.names) == ["id_a", "id_b"] and dataset.layout == sd15_layout()
    torch.testing.assert_close(dataset.read_rows(0, 2), weights.flip(0))
