"""`w2w app` served on 127.0.0.1 and driven by a real browser (Debian's chromium through Playwright)
and by gradio_client, on the tiny world, and its engine in-process (crop to face, the auto mask and
several images, against the CLI's inversion). About 3 minutes on 2 cores (most of it the server's
start and its images).

Without chromium the browser test is skipped (`apt-get install -y chromium`); with CI=true that skip
is a failure. W2W_APP_BENCH=FILE.json also inverts 100 steps in the browser, writes the click-to-image
times there and the screenshot after an edit to assets/app.png (benchmarks/README.md).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from lora_w2w.diffusion import image_sizes
from lora_w2w.editing import attribute_directions
from lora_w2w.errors import NoFaceError
from lora_w2w.faces import align_face, find_face
from lora_w2w.formats import load_kohya, load_peft
from lora_w2w.inversion import AUTO_MASK, invert, photo_targets, preset, read_photos
from lora_w2w.space import W2WModel
from lora_w2w.storage import load_model, load_space, save_model
from lora_w2w.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "files" / "tiny" / "space"
BASE = ROOT / "files" / "tiny" / "base"
FACE = ROOT / "inversion" / "images" / "face.png"
FACE_MASK = ROOT / "inversion" / "images" / "face_mask.png"
FACE_256 = ROOT / "inversion" / "images" / "face_256.png"  # the same face, larger: a second photo of the person
MAX_UPLOAD_MB = 1  # the server's --max-upload in these tests
START_TIMEOUT = 240  # seconds for the server to load the pipeline on a busy machine
JOB_TIMEOUT = 180_000  # ms a click may take to show its images on a busy machine
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
BENCH = os.environ.get("W2W_APP_BENCH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space():
    return load_space(SPACE)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """`w2w app` in its own process on a free port of 127.0.0.1, analytics off, one torch thread
    (the tiny models lose more than they gain from a second one, see tests/conftest.py)."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lora_w2w.cli", "app", "--port", str(port), "--max-upload",
                                    f"{MAX_UPLOAD_MB}mb"],  # the defaults: the tiny world, relative to ROOT
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"w2w app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    process.url = url
    yield process
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.url


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def browser():
    """A Playwright persistent context over Debian's chromium with a fresh profile."""
    executable = shutil.which("chromium")
    if executable is None:
        message = "no chromium: `apt-get install -y chromium` (Debian) runs the browser test"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS, accept_downloads=True,
            viewport={"width": 1400, "height": 1500})
        yield context
        context.close()


def image_sources(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "images => images.map(image => image.src)")


def wait_for_new_images(page, selector: str, old: list[str]) -> float:
    """Seconds until the images under `selector` are loaded and differ from `old`; fails at once on an error."""
    start = time.perf_counter()
    page.wait_for_function("""([selector, old]) => {
        if (document.querySelector('.toast-body')) return true;
        const images = [...document.querySelectorAll(selector)];
        const sources = images.map(image => image.src);
        return images.length > 0 && JSON.stringify(sources) !== JSON.stringify(old)
            && images.every(image => image.complete && image.naturalWidth > 0);
    }""", arg=[selector, old], timeout=JOB_TIMEOUT)
    seconds = time.perf_counter() - start
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, f"the page shows an error: {toasts}"
    return seconds


def fetch_image(url: str) -> torch.Tensor:
    """The image the page shows at `url` as (H, W, 3) floats in 0..255."""
    with urllib.request.urlopen(url) as response:
        return torch.from_numpy(np.array(Image.open(io.BytesIO(response.read())).convert("RGB"))).float()


def drag_slider(page, elem_id: str, fraction: float) -> None:
    """Drag the thumb of a slider from its middle (0) to `fraction` of its track, like a user."""
    box = page.locator(f"#{elem_id} input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=8)
    page.mouse.up()


def download(page, elem_id: str, folder: Path) -> Path:
    with page.expect_download(timeout=JOB_TIMEOUT) as info:
        page.click(f"#{elem_id}")
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def replace_invert_files(page, paths: list[Path]) -> None:
    """Clear the Invert tab's files, then upload `paths` and wait until the file list has a row for each
    (a row names its file in its aria-label; its text splits the name into stem and extension)."""
    rows = "#invert-file td.filename"
    page.click("#invert-file button[aria-label=Clear]")
    page.wait_for_function(f"!document.querySelector({rows!r})", timeout=JOB_TIMEOUT)
    page.set_input_files("#invert-file input[type=file]", [str(p) for p in paths])
    names = [p.name for p in paths]
    page.wait_for_function(f"{names!r}.every(name => [...document.querySelectorAll({rows!r})]"
                           f".some(row => row.getAttribute('aria-label') === name))", timeout=JOB_TIMEOUT)


@pytest.mark.slow
def test_browser_sample_edit_invert_download_and_errors(server, server_process, browser, space, tmp_path):
    page = browser.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server)
    page.wait_for_selector("#sample-button")
    timings, cpu = {}, {}

    def timed(name: str, action) -> None:
        """Wall seconds from the action's end (the click, the slider's release) to new images, and the
        server's CPU seconds for them."""
        old, start = image_sources(page, "#current-gallery img"), cpu_seconds(server_process.pid)
        action()
        timings[name] = round(wait_for_new_images(page, "#current-gallery img", old), 2)
        cpu[name] = round(cpu_seconds(server_process.pid) - start, 2)

    # sample: four images of a new identity
    timed("sample", lambda: page.click("#sample-button"))
    assert len(image_sources(page, "#current-gallery img")) == 4
    assert "sampled with seed 0" in page.inner_text("#status")

    # edit: the Eyeglasses slider moved to +3 std changes the images; the before/after shows both
    before = image_sources(page, "#current-gallery img")
    timed("edit", lambda: drag_slider(page, "edit-Eyeglasses", 7 / 8))  # -4 ... +4: about +3
    strength = float(page.input_value("#edit-Eyeglasses input[type=number]"))
    assert 2 <= strength <= 4
    assert f"Eyeglasses {strength:+g}" in page.inner_text("#status")
    after = image_sources(page, "#current-gallery img")
    assert (fetch_image(after[0]) - fetch_image(before[0])).abs().mean() > 2  # of 255: the image changed
    page.wait_for_function("document.querySelectorAll('#comparison img').length >= 2", timeout=JOB_TIMEOUT)
    shot = ROOT / "assets" / "app.png" if BENCH else tmp_path / "app.png"
    page.wait_for_selector("#download-kohya:not([disabled])", timeout=JOB_TIMEOUT)
    page.screenshot(path=str(shot), full_page=True)

    # download: the kohya file holds the current (edited) model's weights, by the project's own loader
    model_path, kohya_path = download(page, "download-w2w", tmp_path), download(page, "download-kohya", tmp_path)
    model = load_model(model_path)
    assert model.space_id == space.id
    torch.testing.assert_close(load_kohya(space.layout, kohya_path), model.weights(space), rtol=1e-5, atol=1e-6)
    check_loads_in_diffusers(kohya_path, model.weights(space), space)

    # another browser session does not see this model
    other = browser.new_page()
    other.goto(server)
    other.wait_for_selector("#sample-button")
    drag_slider(other, "edit-Eyeglasses", 7 / 8)
    other.get_by_text("w2w: error: no model to edit yet").wait_for(timeout=JOB_TIMEOUT)
    other.close()

    # invert: upload the face, draw a mask stroke, invert a few steps
    page.get_by_role("tab", name="Invert").click()
    page.set_input_files("#invert-file input[type=file]", str(FACE))
    page.wait_for_function("document.querySelector('#invert-editor canvas') && document.querySelector("
                           "'#invert-file td.filename[aria-label=\"face.png\"]')", timeout=JOB_TIMEOUT)
    page.wait_for_timeout(500)  # the background drawn into the canvas
    page.get_by_role("button", name="Brush", exact=True).click()
    canvas = page.locator("#invert-editor canvas").first.bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx - 60, cy - 40)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 40, steps=12)
    page.mouse.up()
    steps = 100 if BENCH else 10
    page.fill("#invert-steps input", str(steps))

    def invert_and_watch_the_loss():
        page.click("#invert-button")
        page.get_by_text(re.compile(r"loss \d+\.\d{4}")).first.wait_for(timeout=JOB_TIMEOUT)  # the progress bar

    timed(f"invert_{steps}_steps", invert_and_watch_the_loss)
    status = page.inner_text("#status")
    assert f"inverted (real, {steps} steps, with the mask drawn)" in status

    # two photos of the face, cut around it, inside the auto mask: a new model and the two fitted crops
    replace_invert_files(page, [FACE, FACE_256])
    page.check("#invert-crop input[type=checkbox]")
    page.check("#invert-auto-mask input[type=checkbox]")
    page.fill("#invert-steps input", "3")
    timed("invert_2_images_3_steps", lambda: page.click("#invert-button"))
    assert "inverted (real, 3 steps, 2 images, face crop, with auto masks)" in page.inner_text("#status")
    page.wait_for_function("document.querySelectorAll('#invert-fitted img').length == 2", timeout=JOB_TIMEOUT)
    assert "face_256.png: auto mask" in page.inner_text("#invert-fitted")

    # a photo without a face under Crop to face: one line saying so, before any inversion
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg")
    replace_invert_files(page, [tmp_path / "coffee.jpg"])
    page.click("#invert-button")
    page.get_by_text(re.compile(r"w2w: error: coffee\.jpg: no face found .*untick Crop to face")).wait_for(
        timeout=JOB_TIMEOUT)
    page.locator(".toast-close").first.click()  # later checks look for a new toast

    # bad input: a text file as the image to invert shows the CLI's one line
    page.click("#invert-file button[aria-label=Clear]")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.set_input_files("#invert-file input[type=file]", str(notes))
    error = page.get_by_text(re.compile(r"w2w: error: notes\.txt: not a readable image"))
    error.wait_for(timeout=JOB_TIMEOUT)
    assert "Traceback" not in page.content()

    outside = sorted({url for url in requests if not url.startswith(server) and not url.startswith(("data:", "blob:"))})
    assert not outside, f"the page reached beyond the app: {outside[:5]}"
    print(f"click to image, seconds: {timings}; the server's CPU seconds: {cpu}")
    if BENCH:
        Path(BENCH).write_text(json.dumps({"click_to_image_s": timings, "server_cpu_s": cpu,
                                           "load_average": os.getloadavg()}, indent=2))


def check_loads_in_diffusers(kohya_path: Path, weights: torch.Tensor, space) -> None:
    """diffusers' load_lora_weights reads the kohya file into the tiny base's UNet: its output is the
    UNet's with the same weights fused by the project."""
    from conftest import unet_pipeline
    from diffusers import UNet2DConditionModel

    from lora_w2w.network import FusedLora

    unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    inputs = (torch.randn(1, unet.config.in_channels, size, size, generator=g), torch.tensor([500]),
              torch.randn(1, 8, width, generator=g))  # latent (B, C, h, w), timestep (B,), text (B, L, D)
    with torch.no_grad():
        base = unet(*inputs).sample
        with FusedLora(unet, space.layout, weights):
            fused = unet(*inputs).sample
        pipe = unet_pipeline(unet)
        pipe.load_lora_weights(str(kohya_path))
        loaded = pipe.unet(*inputs).sample
    assert (fused - base).abs().max() > 1e-3  # the LoRA changes the UNet
    torch.testing.assert_close(loaded, fused, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_api_endpoints(client, space, tmp_path):
    model_path, images = client.predict(3, api_name="/sample")
    sampled = load_model(model_path)
    assert sampled.space_id == space.id and len(images) == 4

    edited_path, images = client.predict(_file(model_path), '{"Eyeglasses": 3}', ["Male", "Young"], api_name="/edit")
    edited = load_model(edited_path)
    direction = attribute_directions(space, ["Eyeglasses"], debias_against=["Male", "Young"])["Eyeglasses"]
    torch.testing.assert_close(edited.coefficients - sampled.coefficients, direction.shift(3.0), rtol=1e-4, atol=1e-5)
    assert len(images) == 4

    images = client.predict(_file(edited_path), "sks person", "0 7", 4, api_name="/generate")
    assert len(images) == 2

    kohya = client.predict(_file(edited_path), "kohya", api_name="/export")
    torch.testing.assert_close(load_kohya(space.layout, kohya), edited.weights(space), rtol=1e-5, atol=1e-6)
    peft_zip = client.predict(_file(edited_path), "peft", api_name="/export")
    with zipfile.ZipFile(peft_zip) as archive:
        archive.extractall(tmp_path / "peft")
    torch.testing.assert_close(load_peft(space.layout, tmp_path / "peft"), edited.weights(space), rtol=1e-5, atol=1e-6)
    assert torch.equal(load_model(client.predict(_file(edited_path), "w2w", api_name="/export")).coefficients,
                       edited.coefficients)

    inverted_path, images = client.predict(_file(FACE), _file(FACE_MASK), "real", 3, api_name="/invert")
    inverted = load_model(inverted_path)
    assert len(inverted.coefficients) == space.num_components and inverted.coefficients.abs().sum() > 0

    # the optional crop, auto mask and more images: what `w2w invert` computes for the same photos
    both_path, images = client.predict(_file(FACE), _file(FACE_MASK), "real", 3, "face", True, [_file(FACE_256)],
                                       api_name="/invert")
    expected, _ = Workbench(BASE, space, "cpu", progress=False).invert(
        [FACE, FACE_256], [FACE_MASK, AUTO_MASK], preset("real", space, steps=3), crop="face")  # w2w invert's
    torch.testing.assert_close(load_model(both_path).coefficients, expected.coefficients, rtol=1e-4, atol=1e-5)
    assert len(images) == 4


@pytest.mark.slow
def test_api_errors_are_the_cli_line(client, space, tmp_path):
    from gradio_client.exceptions import AppError

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(AppError, match=r"^w2w: error: notes\.txt: not a readable image"):
        client.predict(_file(notes), None, "real", 3, api_name="/invert")

    Image.new("L", (64, 32), 255).save(tmp_path / "wide_mask.png")
    with pytest.raises(AppError, match=r"w2w: error: .*wide_mask\.png: the mask is 64x32 but the image is 64x64"):
        client.predict(_file(FACE), _file(tmp_path / "wide_mask.png"), "real", 3, api_name="/invert")

    save_model(W2WModel(torch.zeros(4), "0123456789abcdef"), tmp_path / "other.safetensors")
    with pytest.raises(AppError, match="w2w: error: the model belongs to space 0123456789abcdef, not to this space"):
        client.predict(_file(tmp_path / "other.safetensors"), "kohya", api_name="/export")

    model_path, _ = client.predict(0, api_name="/sample")
    with pytest.raises(AppError, match=r"w2w: error: steps 100000: expected a whole number from 1 to \d+"):
        client.predict(_file(model_path), "sks person", "0", 100000, api_name="/generate")
    with pytest.raises(AppError, match="w2w: error: no attribute 'Wings'"):
        client.predict(_file(model_path), '{"Wings": 1}', [], api_name="/edit")

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_MB * 2**20 + 1))
    with pytest.raises(ValueError, match=f"big.png exceeds the maximum file size of {MAX_UPLOAD_MB * 2**20} bytes"):
        client.predict(_file(big), None, "real", 3, api_name="/invert")  # gradio_client refuses it ...


def test_uploads_above_the_limit_are_refused_by_the_server(server):
    import httpx

    limit = MAX_UPLOAD_MB * 2**20
    response = httpx.post(server + "gradio_api/upload", files={"files": ("big.png", b"\0" * (limit + 1))})
    assert response.status_code == 413, response.text  # ... and so does the server, for any other client
    assert f"maximum allowed size of {limit} bytes" in response.text
    assert httpx.post(server + "gradio_api/upload", files={"files": ("small.png", b"\0" * limit)}).status_code == 200


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def test_help_documents_every_endpoint(capsys):
    from lora_w2w.cli import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    text = capsys.readouterr().out
    for endpoint in ("/sample(seed)", "/edit(model file, edits, debias)", "/invert(image file, mask file or None, "
                     "preset, steps[, crop, auto mask, more image files])",
                     "/generate(model file, prompt, seeds, steps)", "/export(model file, format)"):
        assert endpoint in text


@pytest.mark.slow
def test_the_mask_is_the_brush_strokes_at_the_image_size():
    from lora_w2w.app import mask_from_layers

    layer = Image.new("RGBA", (512, 256), (0, 0, 0, 0))
    layer.paste((255, 64, 160, 90), (256, 0, 512, 128))  # a half-transparent stroke: still inside the mask
    mask = np.asarray(mask_from_layers([Image.new("RGBA", (512, 256)), layer], (128, 64)))
    assert mask.shape == (64, 128) and set(np.unique(mask)) == {0, 255}
    assert (mask[:32, 64:] == 255).all() and (mask[32:] == 0).all() and (mask[:, :64] == 0).all()
    assert mask_from_layers([Image.new("RGBA", (512, 256))], (128, 64)) is None  # no stroke: no mask


def test_seeds_steps_and_edits_are_checked():
    from lora_w2w.app import check_steps, parse_seeds, parse_strengths
    from lora_w2w.errors import W2WError

    assert parse_seeds("0, 1 2", 4) == [0, 1, 2]
    with pytest.raises(W2WError, match="expected 1 to 4 seeds, got 5"):
        parse_seeds("0 1 2 3 4", 4)
    with pytest.raises(W2WError, match="expected whole numbers"):
        parse_seeds("zero", 4)
    assert check_steps(20.0, 50) == 20
    with pytest.raises(W2WError, match="steps 2.5: expected a whole number from 1 to 50"):
        check_steps(2.5, 50)
    assert parse_strengths('{"Bald": -2}', ["Bald"]) == {"Bald": -2.0}
    with pytest.raises(W2WError, match="expected a JSON object of attribute names and numbers"):
        parse_strengths('{"Bald": "a lot"}', ["Bald"])


# ----------------------------------------------------------------------------- the engine, in-process

@pytest.fixture(scope="module")
def engine():
    from lora_w2w.app import Actions, AppConfig

    return Actions(AppConfig(space=str(SPACE), base=str(BASE), device="cpu"))


def test_crop_to_face_and_the_auto_mask_frame_the_astronaut(engine):
    from lora_w2w.app import OUTSIDE_MASK, fitted_caption, fitted_view

    astronaut = Image.fromarray(data.astronaut())
    _, (photo,) = engine.invert(astronaut, None, "real", 1, crop="face", auto_mask=True)
    aligned = align_face(astronaut, find_face(astronaut).landmarks, 64)  # at the tiny world's resolution
    assert photo.auto and photo.picture.size == aligned.image.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(photo.picture), np.asarray(aligned.image))
    mask = photo.mask.astype(float)  # (H, W) 0..255
    rows, columns = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    centroid = np.array([(columns * mask).sum(), (rows * mask).sum()]) / mask.sum()  # (x, y)
    eyes, nose_tip = aligned.landmarks[36:48].mean(0), aligned.landmarks[30]  # the head's middle, as test_photos
    assert abs(centroid[0] - eyes[0]) < 3.2 and 6.4 < centroid[1] < nose_tip[1], centroid
    shown = np.asarray(fitted_view(photo), dtype=float)  # what the page shows: dimmed outside the mask
    np.testing.assert_allclose(shown[-1, 0], OUTSIDE_MASK * np.asarray(aligned.image)[-1, 0], atol=0.5)
    np.testing.assert_array_equal(shown[32, 32], np.asarray(aligned.image)[32, 32])
    assert fitted_caption(photo) == "image: auto mask"


@pytest.mark.slow
def test_several_images_are_the_cli_and_api_inversion(engine, space):
    """Two photos, a mask file on the first (it wins over the auto mask) and the auto mask on the second:
    the engine computes what `w2w invert` (its Workbench) and the Python API compute, run after run."""
    model, photos = engine.invert([FACE, FACE_256], [FACE_MASK, None], "real", 3, auto_mask=True)
    assert [photo.auto for photo in photos] == [False, True]
    again, _ = engine.invert([FACE, FACE_256], [FACE_MASK, None], "real", 3, auto_mask=True)
    assert torch.equal(model.coefficients, again.coefficients)
    config = preset("real", space, steps=3)
    cli, _ = Workbench(BASE, space, "cpu", progress=False).invert([FACE, FACE_256], [FACE_MASK, AUTO_MASK], config)
    assert torch.equal(model.coefficients, cli.coefficients)
    pipe = engine.bench.pipeline()
    images, masks = photo_targets(read_photos([FACE, FACE_256], [FACE_MASK, AUTO_MASK]), *image_sizes(pipe))
    api = invert(pipe, space, list(images.split(1)), list(masks.split(1)), config, seed=0, progress=False)
    assert torch.equal(model.coefficients, api.coefficients)
    alone, _ = engine.invert(FACE, FACE_MASK, "real", 3)
    assert not torch.allclose(alone.coefficients, model.coefficients, atol=1e-3)  # the second photo counts


def test_no_face_under_crop_to_face_is_the_clis_error(engine, tmp_path):
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg")
    with pytest.raises(NoFaceError, match=r"coffee\.jpg: no face found \(dlib's HOG detector"):
        engine.invert([FACE, tmp_path / "coffee.jpg"], None, "real", 1, crop="face")


def test_the_librarys_warnings_become_toasts_and_others_stay_in_the_log(engine, monkeypatch):
    import warnings

    from lora_w2w import app

    toasts = []
    monkeypatch.setattr(app.gr, "Warning", toasts.append)
    grey = Image.new("RGB", (80, 64), "grey")  # no face: the auto mask falls back to the centre, with a warning
    with pytest.warns(UserWarning, match="a torch warning") as logged:
        with app.warnings_shown():
            _, (photo,) = engine.invert(grey, None, "real", 1, auto_mask=True)
            warnings.warn("a torch warning")
    assert photo.auto and len(toasts) == 1 and "image: no face found for the automatic mask" in toasts[0]
    assert [str(w.message) for w in logged] == ["a torch warning"]
