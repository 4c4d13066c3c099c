"""The Workbench under every front end: the dtype each job runs in (checked for CUDA on a machine without
one), the pipeline loaded once per dtype, the space once, and the jobs the front ends share."""
import pytest
import torch

from lora_w2w import pipeline, workbench
from lora_w2w.defaults import EXAMPLES
from lora_w2w.errors import W2WError
from lora_w2w.inversion import AUTO_MASK
from lora_w2w.storage import load_model
from lora_w2w.workbench import Workbench, export_path, fitted_path, job_dtype



def test_the_dtype_of_each_job():
    """On CUDA generation runs in float16, inversion and training in bfloat16 (float16 gradients underflow);
    float32 elsewhere."""
    cuda = torch.device("cuda")
    assert job_dtype("generate", cuda) == torch.float16
    assert job_dtype("invert", cuda) == job_dtype("train", "cuda:1") == torch.bfloat16
    for device in ("cpu", "mps"):
        assert {job_dtype(job, device) for job in workbench.JOBS} == {torch.float32}
    with pytest.raises(W2WError, match="unknown job 'paint'; expected one of generate, invert, train"):
        job_dtype("paint", cuda)


def test_the_names_of_the_files_beside_a_model(tmp_path):
    out = tmp_path / "me.safetensors"
    assert export_path(out, "peft") == tmp_path / "me_lora"
    assert export_path(out, "kohya") == tmp_path / "me_lora.safetensors"
    assert fitted_path(out, "mask", 0, 1) == tmp_path / "me.mask.png"
    assert fitted_path(out, "crop", 1, 2) == tmp_path / "me.crop.2.png"


def test_each_job_loads_the_pipeline_in_its_dtype_once(toy_world, toy_space, monkeypatch):
    """The jobs ask for their dtypes (float64 standing in for CUDA's bfloat16 here): the app and the demo
    invert in the dtype of the CLI's inversion, not in the generation's."""
    from lora_w2w.app import Actions, AppConfig

    monkeypatch.setattr(workbench, "job_dtype",
                        lambda job, device, family=None: torch.float64 if job == "invert" else torch.float32)
    loads = []
    load = pipeline.load_base_pipeline
    monkeypatch.setattr(pipeline, "load_base_pipeline", lambda *a, **k: loads.append(a[2]) or load(*a, **k))
    actions = Actions(AppConfig(space=str(toy_space), base=str(toy_world / "base"), device="cpu"))
    bench = actions.bench
    assert loads == [torch.float32] and bench.pipeline() is bench.pipeline("generate")
    model, photos = actions.invert(EXAMPLES / "face.png", None, "real", 1, auto_mask=True)
    assert loads == [torch.float32, torch.float64] and bench.pipeline("invert").unet.dtype == torch.float64
    assert photos[0].auto and model.coefficients.abs().sum() > 0
    actions.images(model, seeds=[0], steps=1)
    assert loads == [torch.float32, torch.float64]  # both loaded once
    assert bench.using(bench.space).pipeline("invert") is bench.pipeline("invert")  # another space's bench shares them


def test_the_jobs_the_front_ends_share(toy_world, toy_space, tmp_path):
    bench = Workbench(toy_world / "base", toy_space, "cpu", progress=False)
    model, = bench.sample(1, seed=2)
    edited = bench.edit(model, {"Eyeglasses": 2.0}, debias=["Male"])
    directions = bench.directions(["Eyeglasses"], debias=["Male"])
    assert bench.directions(["Eyeglasses"], debias=["Male"]) is directions  # fitted once
    torch.testing.assert_close(edited.coefficients - model.coefficients, directions["Eyeglasses"].shift(2.0))
    assert torch.equal(load_model(bench.export(edited, "w2w", tmp_path / "e.safetensors")).coefficients,
                       edited.coefficients)
    base_alone = bench.images(None, "a photo of a person", seeds=[0], steps=1)
    with_model = bench.images(model, seeds=[0], steps=1)
    assert len(base_alone) == len(with_model) == 1 and base_alone[0].tobytes() != with_model[0].tobytes()
    assert Workbench(toy_world / "base", None, "cpu").images(None, "a person", seeds=[0], steps=1)  # no space needed
    _, photos = bench.invert([EXAMPLES / "face.png"] * 2, [None, AUTO_MASK], bench.inversion_config("real", steps=1))
    assert [photo.auto for photo in photos] == [False, True]
    with pytest.raises(W2WError, match=f"components 99: the space {toy_space} has K = 16; pass 16 or fewer"):
        Workbench(toy_world / "base", toy_space).inversion_config("real", components=99)


def test_ctrl_c_that_a_loader_turns_into_its_own_error_is_still_ctrl_c(toy_world, monkeypatch, capsys):
    """diffusers' weight loader catches every Exception into "Unable to load weights from checkpoint file", and
    a library may turn the signal's KeyboardInterrupt into one: the command is then interrupted (exit 130),
    not given a bad pipeline (exit 2). A genuine loading error stays one."""
    import os
    import signal

    from lora_w2w.bases import family_of_base
    from lora_w2w.errors import exit_code

    family = type(family_of_base(str(toy_world / "base")))

    def interrupted(self, base, dtype, local_files_only):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Python's handler raises KeyboardInterrupt here
        except KeyboardInterrupt as caught:
            raise OSError(f"Unable to load weights from checkpoint file for '{base}'") from caught

    def load():
        pipeline.load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)

    monkeypatch.setattr(family, "load_pipeline", interrupted)
    assert exit_code("w2w", load) == 130 and capsys.readouterr().err == "w2w: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    def broken(self, base, dtype, local_files_only):
        raise OSError("Unable to load weights from checkpoint file")

    monkeypatch.setattr(family, "load_pipeline", broken)
    assert exit_code("w2w", load) == 2 and "cannot load the pipeline" in capsys.readouterr().err
