"""Every file says where it came from, read back by the readers of its clients: a w2w model file's and a kohya
file's safetensors metadata (safetensors' own reader), a PEFT folder's model card (huggingface_hub's
ModelCard), a generated PNG's text chunk (PIL); and `w2w info` shows each."""
import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

from lora_w2w.cli import main
from lora_w2w.errors import FileFormatError
from lora_w2w.formats import save_kohya, save_lora
from lora_w2w.provenance import PROVENANCE_KEY, LoraAbout, hub_id, image_sha256, kohya_metadata
from lora_w2w.space import W2WModel
from lora_w2w.storage import load_model, save_model, save_png, write_tensors
from lora_w2w.workbench import Workbench

SD15 = "stablediffusionapi/realistic-vision-v51"
FACE = Path(__file__).resolve().parents[1] / "inversion" / "images" / "face.png"
# A1111's modules/infotext_utils.py, which parse_generation_parameters reads the `parameters` chunk with:
# re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def info(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


@pytest.fixture
def edited(space):
    """A model sampled from the space (seed 3), then edited."""
    return space.sample(seed=3).edit({"Male": 1.5}, debias=[])


def test_a_model_file_records_how_the_model_was_made(space, edited, tmp_path, capsys):
    assert edited.made_by == "sample seed 3; edit Male +1.5"
    save_model(edited, tmp_path / "m.safetensors")
    steps = json.loads(metadata(tmp_path / "m.safetensors")[PROVENANCE_KEY])
    assert [step["made"] for step in steps] == ["sample", "edit"] and steps[0]["seed"] == 3
    assert steps[1]["strengths"] == {"Male": 1.5} and steps[1]["components"] == space.num_components
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.provenance == edited.provenance and loaded.id == edited.id
    assert loaded.using(space).edit({"Male": -1}, debias=[]).made_by == "sample seed 3; edit Male +1.5; edit Male -1"
    shown = info(tmp_path / "m.safetensors", capsys)
    assert f"model id     {edited.id}" in shown
    assert "made by      sample: components 6, factor 1, index 0, seed 3" in shown

    save_model(W2WModel(torch.randn(4), space.id), tmp_path / "old.safetensors")  # written without provenance
    assert PROVENANCE_KEY not in metadata(tmp_path / "old.safetensors")
    assert load_model(tmp_path / "old.safetensors").provenance == ()
    write_tensors(tmp_path / "bad.safetensors", {"coefficients": torch.zeros(4)},
                  {"format": "w2w-model", "version": "1", PROVENANCE_KEY: '{"made": "sample"}'})
    with pytest.raises(FileFormatError, match="bad.safetensors: metadata 'w2w_provenance' is not a list of steps"):
        load_model(tmp_path / "bad.safetensors")


def test_a_kohya_file_says_what_it_is_as_modelspec_a1111_and_comfyui_read_it(space, edited, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1718236800")  # 2024-06-13
    path = save_lora(space.layout, edited.weights(space), tmp_path / "alice.safetensors", "kohya", SD15,
                     about=LoraAbout.of(edited, space, 512))
    keys = metadata(path)
    assert {key: keys[key] for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title",
                                       "modelspec.date", "modelspec.resolution", "modelspec.trigger_phrase")} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": f"w2w model {edited.id}", "modelspec.date": "2024-06-13",
        "modelspec.resolution": "512x512", "modelspec.trigger_phrase": "sks person"}
    edit = "edit: components 6, debias [], method mean_difference, strengths [Male +1.5]"
    assert edit in keys["modelspec.description"]
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]  # ModelSpec: "a hash of all tensor content (ie excluding the header)"
    assert keys["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + header:]).hexdigest()
    # A1111: self.alias = self.metadata.get('ss_output_name', self.name); 'ss_sd_model_name': "Model:";
    # ComfyUI's View Lora info: JSON.parse(this.metadata.ss_tag_frequency), ss_resolution's "(w, h)"
    assert (keys["ss_output_name"], keys["ss_sd_model_name"], keys["ss_base_model_version"]) == ("alice", SD15, "sd_v1")
    assert json.loads(keys["ss_tag_frequency"]) == {"w2w": {"sks person": 1}} and keys["ss_resolution"] == "(512, 512)"
    assert json.loads(keys[PROVENANCE_KEY]) == json.loads(json.dumps(edited.provenance))
    shown = info(path, capsys)
    assert f"base model   {SD15}" in shown and "date         2024-06-13" in shown and "made by      sample:" in shown

    for version, architecture in (("sd_v2_v", "stable-diffusion-v2-768-v/lora"),  # the base family's keys name it
                                  ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")):
        keys = kohya_metadata(LoraAbout(), SD15, "x", "00", {"ss_base_model_version": version})
        assert keys["modelspec.architecture"] == architecture and keys["ss_base_model_version"] == version
    save_kohya(space.layout, edited.weights(space), tmp_path / "plain.safetensors", str(tmp_path))
    plain = metadata(tmp_path / "plain.safetensors")  # no model known: a LoRA, named as kohya names a local base
    assert plain["ss_sd_model_name"] == tmp_path.name and "modelspec.resolution" not in plain
    snapshot = tmp_path / "hub" / "models--someone--base" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "someone/base" and hub_id(SD15) == SD15 and hub_id("files/tiny/base") == "base"


def test_a_peft_folder_has_a_model_card_the_hub_reads(space, edited, tmp_path, capsys):
    folder = save_lora(space.layout, edited.weights(space), tmp_path / "alice", "peft", SD15,
                       about=LoraAbout.of(edited, space))
    card = ModelCard.load(folder / "README.md")  # huggingface_hub's reader of the Hub's model cards
    assert (card.data.base_model, card.data.library_name, card.data.instance_prompt) == (SD15, "diffusers",
                                                                                        "sks person")
    assert "lora" in card.data.tags and "sample: components 6, factor 1, index 0, seed 3" in card.text
    assert "Interpreting the Weight Space of Customized Diffusion Models" in card.text
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        assert json.loads(metadata(folder / name)[PROVENANCE_KEY])[0]["made"] == "sample"
    shown = info(folder, capsys)
    assert f"base model {SD15}, trigger phrase 'sks person'" in shown and "edit: components 6" in shown

    local = save_lora(space.layout, edited.weights(space), tmp_path / "local", "peft", str(tmp_path))
    assert ModelCard.load(local / "README.md").data.base_model is None  # the Hub takes hub ids only


def test_generated_pngs_carry_a1111_parameters(toy_world, toy_space, tmp_path, capsys):
    bench = Workbench(toy_world / "base", toy_space, "cpu", progress=False)
    model, = bench.sample(1, seed=2)
    edited = bench.edit(model, {"Beard": 2.0})
    image, = bench.images(model, "a photo of sks person, smiling", negative_prompt="blurry", edited=edited,
                          injection_timestep=500, seeds=[7], steps=2, guidance=4.0)
    save_png(image, tmp_path / "seed_0007.png")
    with Image.open(tmp_path / "seed_0007.png") as png:
        text = png.text["parameters"]  # PIL's reader of PNG text chunks
    *prompt, last = text.split("\n")  # A1111 takes the last line as the parameters when it holds 3 or more
    assert prompt == ["a photo of sks person, smiling", "Negative prompt: blurry"]
    fields = {key: json.loads(value) if value.startswith('"') else value for key, value in A1111_PARAM.findall(last)}
    assert {key: fields[key] for key in ("Steps", "CFG scale", "Seed", "Size", "Model", "w2w model", "w2w edited",
                                         "w2w injection timestep")} == {
        "Steps": "2", "CFG scale": "4", "Seed": "7", "Size": "32x32", "Model": "base", "w2w model": model.id,
        "w2w edited": edited.id, "w2w injection timestep": "500"}
    assert fields["w2w edited made by"] == "sample seed 2; edit Beard +2 (debias Age, Male)"
    shown = info(tmp_path / "seed_0007.png", capsys)
    assert "prompt       'a photo of sks person, smiling'" in shown and "Seed         7" in shown


def test_inversion_and_projection_record_their_sources(toy_world, toy_space, tmp_path):
    bench = Workbench(toy_world / "base", toy_space, "cpu", progress=False)
    model, _ = bench.invert(FACE, preset="ood", config=bench.inversion_config("ood", steps=2, components=4),
                            seed=1)
    step, = model.provenance
    assert step == {"made": "invert", "images": 1, "components": 4, "lr": step["lr"], "weight_decay": 0.0, "steps": 2,
                    "images_per_step": 1, "seed": 1, "images_sha256": [image_sha256(FACE)], "crop": "center",
                    "preset": "ood"}
    assert image_sha256(FACE) == hashlib.sha256(FACE.read_bytes()).hexdigest()
    assert model.made_by == f"invert 1 image (preset ood, 2 steps, lr {step['lr']:g}, K 4)"

    lora = bench.export(model, "kohya", tmp_path / "face.safetensors")
    projected, residual = bench.project(lora)
    assert projected.provenance[0] | {"residual": 0} == {
        "made": "project", "lora": "face.safetensors", "lora_sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
        "components": 16, "residual": 0} and residual < 1e-4
    assert main(["project", str(lora), "--space", str(toy_space), "--out", str(tmp_path / "p.safetensors")]) == 0
    assert load_model(tmp_path / "p.safetensors").made_by.startswith("project face.safetensors (K 16, residual ")
