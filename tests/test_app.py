"""`w2w app` served on 127.0.0.1 and driven by a real browser (Debian's chromium through Playwright),
by gradio_client and by raw HTTP, on the tiny world, and its engine in-process (crop to face, the auto
mask and several images, against the CLI's inversion).

Two servers: `server`, with the app's defaults, for the page and the endpoints' results; `lean` (one
2-step image per call, files kept LEAN_KEEP seconds) for bad input, attacks and load, where the images
are not what is checked. A few minutes on 2 busy cores, most of it the servers' images.

Without chromium the browser tests are skipped (`apt-get install -y chromium`); with CI=true that skip
is a failure. W2W_APP_BENCH=FILE.json also inverts the page's default steps and the full preset in the
browser, writes the click-to-image times there and the screenshot after an edit to assets/app.png
(benchmarks/README.md).
"""
from __future__ import annotations

import http.client
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from lora_w2w.diffusion import image_sizes
from lora_w2w.editing import attribute_directions
from lora_w2w.errors import NoFaceError, W2WError
from lora_w2w.faces import align_face, find_face
from lora_w2w.formats import load_kohya, load_peft
from lora_w2w.inversion import AUTO_MASK, invert, photo_targets, preset, read_photos
from lora_w2w.sampling import sample_models
from lora_w2w.space import W2WModel
from lora_w2w.storage import load_model, load_space, save_model
from lora_w2w.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "files" / "tiny" / "space"
BASE = ROOT / "files" / "tiny" / "base"
FACE = ROOT / "inversion" / "images" / "face.png"
FACE_MASK = ROOT / "inversion" / "images" / "face_mask.png"
FACE_256 = ROOT / "inversion" / "images" / "face_256.png"  # the same face, larger: a second photo of the person
UPLOAD_LIMIT = 20 * 2**20  # the app's default --max-upload, 20mb
LEAN_KEEP = 4  # seconds the lean server keeps its files
START_TIMEOUT = 240  # seconds for a server to load the pipeline on a busy machine
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


def resident_mb(pid: int) -> float:
    """A process's resident memory (VmRSS, Linux's /proc) in MB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def serve(tmp_path_factory, name: str, *flags: str):
    """`w2w app FLAGS` in its own process on a free port of 127.0.0.1, analytics off, one torch thread (the
    tiny models lose more than they gain from a second one, see tests/conftest.py), Gradio's cache and the
    app's temporary folder in folders of the test: yields (url, process, log, cache, temp)."""
    folder = tmp_path_factory.mktemp(name)
    cache, temp, log = folder / "gradio", folder / "tmp", folder / "server.log"
    temp.mkdir()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "GRADIO_TEMP_DIR": str(cache), "TMPDIR": str(temp)}
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lora_w2w.cli", "app", "--port", str(port), *flags],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # the tiny world
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
    yield SimpleNamespace(url=url, process=process, log=log, cache=cache, temp=temp)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    for served in serve(tmp_path_factory, "app"):
        served.process.url = served.url
        yield served.process


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.url


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    yield from serve(tmp_path_factory, "lean", "--seeds", "0", "--steps", "2", "--keep-files", str(LEAN_KEEP))


def new_client(url: str, folder: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(folder))


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return new_client(server, tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def lean_client(lean, tmp_path_factory):
    return new_client(lean.url, tmp_path_factory.mktemp("lean_client"))


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright; each test opens its own contexts (fresh storage each)."""
    executable = shutil.which("chromium")
    if executable is None:
        message = "no chromium: `apt-get install -y chromium` (Debian) runs the browser test"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A page of the app in a new browser context (its own storage: a new visitor)."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1500})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(url)
    page.wait_for_selector("#sample-button")
    page.get_by_text("Generate", exact=True).first.click()  # open the accordion: its parts are drawn
    page.wait_for_selector("#generate-button")
    return page


def image_sources(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "images => images.map(image => image.src)")


def wait_for_new_images(page, selector: str, old: list[str], timeout: float = JOB_TIMEOUT) -> float:
    """Seconds until the images under `selector` are loaded and differ from `old`; fails at once on a toast."""
    start = time.perf_counter()
    page.wait_for_function("""([selector, old]) => {
        if (document.querySelector('.toast-body')) return true;
        const images = [...document.querySelectorAll(selector)];
        const sources = images.map(image => image.src);
        return images.length > 0 && JSON.stringify(sources) !== JSON.stringify(old)
            && images.every(image => image.complete && image.naturalWidth > 0);
    }""", arg=[selector, old], timeout=timeout)
    seconds = time.perf_counter() - start
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, f"the page shows a toast: {toasts}"
    return seconds


def toast(page, pattern: str) -> str:
    """The text of the toast matching `pattern` once shown (then closed, so that a later toast is new);
    it must be a warning, and no output may show Gradio's error badge."""
    shown = page.locator(".toast-body", has_text=re.compile(pattern))
    shown.first.wait_for(timeout=JOB_TIMEOUT)
    text = shown.first.inner_text()
    shown.first.locator("[data-testid=toast-close]").click()
    page.wait_for_function("!document.querySelector('.toast-body')", timeout=JOB_TIMEOUT)  # a later one is new
    assert not page.locator("[data-testid=status-tracker] .error").count(), "an output shows an error"
    return text


def disabled(page, selector: str) -> bool:
    return page.locator(selector).first.is_disabled()


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
    page.wait_for_selector(f"#{elem_id}:not([disabled])", timeout=JOB_TIMEOUT)
    with page.expect_download(timeout=JOB_TIMEOUT) as info:
        page.click(f"#{elem_id}")
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def photo_names(page) -> list[str]:
    """The Invert tab's file list (a row names its file in its aria-label)."""
    return page.eval_on_selector_all("#invert-file td.filename",
                                     "rows => rows.map(row => row.getAttribute('aria-label'))")


def upload_photos(page, paths: list[Path], expected: list[str]) -> None:
    """Upload `paths` to the Invert tab and wait until its list is `expected` and the editor shows the first
    (a stroke drawn before the editor has its picture would be lost)."""
    with page.expect_response(lambda response: re.search(r"/gradio_api/file=.*\.png$", response.url),
                              timeout=JOB_TIMEOUT):  # the editor's picture
        page.set_input_files("#invert-file input[type=file]", [str(p) for p in paths])
    listed = json.dumps(expected, separators=(",", ":"))  # as JSON.stringify writes it
    page.wait_for_function(f"JSON.stringify([...document.querySelectorAll('#invert-file td.filename')].map(row => "
                           f"row.getAttribute('aria-label'))) === {json.dumps(listed)}", timeout=JOB_TIMEOUT)
    page.wait_for_function(f"document.querySelector('#invert-shown input').value === {json.dumps(paths[0].name)}",
                           timeout=JOB_TIMEOUT)  # the server's answer: the first new photo in the editor
    settled(page)
    page.wait_for_timeout(500)  # the photo drawn into the editor's canvas


def brush_pixels(page) -> int:
    """The pixels of the editor's canvas in the brush's colour, as the user sees them (a screenshot)."""
    from lora_w2w.app import BRUSH_COLOR

    shot = np.asarray(Image.open(io.BytesIO(page.locator("#invert-editor canvas").first.screenshot())).convert("RGB"))
    brush = np.array([int(v) for v in re.findall(r"\d+", BRUSH_COLOR)])  # (3,)
    return int((np.abs(shot.astype(int) - brush).max(-1) < 40).sum())


def draw_stroke(page, tries: int = 3) -> None:
    """Draw a stroke across the middle of the editor's picture, as a user does, and see it drawn: the editor
    takes a new picture a moment after the server's answer (fetching it), which clears a stroke drawn
    before, so a stroke that is not seen is drawn again, as a user would."""
    for _ in range(tries):
        settled(page)
        before = brush_pixels(page)  # the photo's own pixels of that colour
        canvas = page.locator("#invert-editor canvas").first.bounding_box()
        cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
        page.mouse.move(cx - 60, cy - 40, steps=4)
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        page.mouse.down()  # the editor draws only once it has seen its brush over the picture, a frame later
        page.mouse.move(cx + 60, cy + 40, steps=12)
        page.mouse.up()
        page.wait_for_timeout(1000)  # long enough for a picture still on its way to replace the stroke
        if brush_pixels(page) > before + 1000:  # of the stroke's ~5,000
            return
    pytest.fail(f"the stroke is not drawn on the editor after {tries} tries")


def settled(page) -> None:
    """Wait until no event of the page is in flight (no component shows Gradio's progress). A tracker
    hidden (`.hide`: the photo list's events, show_progress="hidden") does not count: Gradio 6.31 leaves
    one of them at "processing" now and then after the event's outputs are shown."""
    page.wait_for_function("![...document.querySelectorAll('.progress-text, .eta-bar')]"
                           ".some(element => element.offsetParent !== null && !element.closest('.hide'))",
                           timeout=JOB_TIMEOUT)


def timer(page, server_process):
    """A function that runs an action and records the wall seconds from its end (the click, the slider's
    release) to new images in the current gallery, and the server's CPU seconds for them."""
    timings, cpu = {}, {}

    def timed(name: str, action, timeout: float = JOB_TIMEOUT) -> None:
        old, start = image_sources(page, "#current-gallery img"), cpu_seconds(server_process.pid)
        action()
        timings[name] = round(wait_for_new_images(page, "#current-gallery img", old, timeout), 2)
        cpu[name] = round(cpu_seconds(server_process.pid) - start, 2)
    timed.timings, timed.cpu = timings, cpu
    return timed


def outside_requests(page, server: str) -> list[str]:
    return sorted({url for url in page.requests if not url.startswith((server, "data:", "blob:"))})


@pytest.mark.slow
def test_browser_sample_generate_edit_download_and_reload(server, server_process, browser, space, tmp_path):
    from lora_w2w.app import AppConfig

    seeds = AppConfig().seeds
    page = open_page(browser, server)
    timed = timer(page, server_process)

    # nothing that needs a model acts before there is one
    for part in ("#edit-Eyeglasses input[type=range]", "#injection input[type=range]", "#generate-button",
                 "#download-w2w", "#download-kohya"):
        assert disabled(page, part), part

    # sample: images of a new identity in one place, and everything that needs a model on
    timed("sample", lambda: page.click("#sample-button"))
    assert len(image_sources(page, "#current-gallery img")) == len(seeds)
    assert "sampled with seed 0" in page.inner_text("#status")
    assert not disabled(page, "#edit-Eyeglasses input[type=range]") and not disabled(page, "#generate-button")

    # generate; then seeds that are not numbers: a warning, and the images stay
    page.fill("#generate-seeds textarea", "0 7")
    page.click("#generate-button")
    page.wait_for_function("document.querySelectorAll('#generated img').length == 2", timeout=JOB_TIMEOUT)
    generated = image_sources(page, "#generated img")
    page.fill("#generate-seeds textarea", "zero")
    page.click("#generate-button")
    toast(page, r"w2w: error: seeds 'zero': expected whole numbers")
    assert image_sources(page, "#generated img") == generated

    # edit: the Eyeglasses slider moved to +3 std changes the images; the before/after shows both
    before = image_sources(page, "#current-gallery img")
    timed("edit", lambda: drag_slider(page, "edit-Eyeglasses", 7 / 8))  # -4 ... +4: about +3
    strength = float(page.input_value("#edit-Eyeglasses input[type=number]"))
    assert 2 <= strength <= 4
    status = page.inner_text("#status")
    assert f"Eyeglasses {strength:+g}" in status
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

    # files that are not models: a warning naming each, the upload box emptied, and nothing else changes
    (tmp_path / "notes.safetensors").write_text("not a model")
    page.get_by_role("tab", name="Upload a model").click()
    page.set_input_files("#model-file input[type=file]", str(tmp_path / "notes.safetensors"))
    toast(page, r"w2w: error: notes\.safetensors: not a valid safetensors file")
    page.wait_for_selector("#model-file input[type=file]", state="attached")  # the file taken out of the box
    page.set_input_files("#model-file input[type=file]", str(FACE))
    toast(page, r"w2w: error: face\.png: not a model file; expected a file ending in \.safetensors, \.pt")
    assert image_sources(page, "#current-gallery img") == after and page.inner_text("#status") == status

    # a reload brings the edited model back from the browser's storage, sliders and all
    page.reload()
    page.wait_for_function("document.querySelectorAll('#current-gallery img').length > 0", timeout=JOB_TIMEOUT)
    assert f"Eyeglasses {strength:+g} (kept by this browser)" in page.inner_text("#status")
    assert float(page.input_value("#edit-Eyeglasses input[type=number]")) == strength
    (tmp_path / "again").mkdir()
    assert torch.equal(load_model(download(page, "download-w2w", tmp_path / "again")).coefficients,
                       model.coefficients)

    # another browser has its own (no) model
    other = open_page(browser, server)
    assert disabled(other, "#edit-Eyeglasses input[type=range]")
    assert "none yet" in other.inner_text("#status")
    other.context.close()

    # a new model clears what belonged to the last one
    page.get_by_text("Generate", exact=True).first.click()
    page.click("#generate-button")
    page.wait_for_function("document.querySelectorAll('#generated img').length > 0", timeout=JOB_TIMEOUT)
    page.get_by_role("tab", name="Sample").click()
    page.fill("#sample-seed input", "1")
    timed("sample_again", lambda: page.click("#sample-button"))
    assert not page.locator("#generated img").count() and "sampled with seed 1" in page.inner_text("#status")

    assert not outside_requests(page, server), f"the page reached beyond the app: {outside_requests(page, server)}"
    print(f"click to image, seconds: {timed.timings}; the server's CPU seconds: {timed.cpu}")
    page.context.close()


def progress_shown(page, pattern: str) -> list[list[str]]:
    """[id of the component holding it, text] of every progress display on the page, once one matches
    `pattern` (a JavaScript regular expression), read at that moment."""
    return page.wait_for_function("""pattern => {
        const shown = [...document.querySelectorAll('.progress-text, .progress-level-inner')]
            .filter(element => element.offsetParent !== null && !element.closest('.hide'))  // as `settled`
            .map(element => [(element.closest('[id]') || {}).id, element.innerText]);
        return shown.some(([_, text]) => new RegExp(pattern).test(text)) ? shown : null;
    }""", arg=pattern, timeout=JOB_TIMEOUT).json_value()


@pytest.mark.slow
def test_browser_photos_mask_inversion_and_its_progress(server, server_process, browser, tmp_path):
    from lora_w2w.app import QUICK_INVERSION_STEPS, fitted_view

    page = open_page(browser, server)
    timed = timer(page, server_process)
    page.get_by_role("tab", name="Invert").click()
    assert disabled(page, "#invert-button")  # no photo yet
    assert page.input_value("#invert-steps input") == str(QUICK_INVERSION_STEPS)

    # a new upload replaces the photos; with "Add" ticked it adds to them; a file of another type is refused
    upload_photos(page, [FACE_256], ["face_256.png"])
    assert not disabled(page, "#invert-button")
    upload_photos(page, [FACE], ["face.png"])
    page.check("#invert-add input[type=checkbox]")
    upload_photos(page, [FACE_256], ["face.png", "face_256.png"])
    page.uncheck("#invert-add input[type=checkbox]")
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#invert-file input[type=file]", str(tmp_path / "notes.txt"))
    toast(page, r"w2w: error: notes\.txt: not an image file; expected a file ending in \.png, \.jpg, ")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    page.set_input_files("#invert-file input[type=file]", str(tmp_path / "broken.png"))
    toast(page, r"w2w: error: broken\.png: not a readable image")
    page.wait_for_function("document.querySelectorAll('#invert-file td.filename').length == 2", timeout=JOB_TIMEOUT)
    assert photo_names(page) == ["face.png", "face_256.png"]

    # the full preset is one click away, for either preset
    page.click("#invert-full")
    page.wait_for_function("document.querySelector('#invert-steps input').value === '400'", timeout=JOB_TIMEOUT)
    page.get_by_label("ood").check()
    page.get_by_role("button", name="Full preset: 800 steps").wait_for(timeout=JOB_TIMEOUT)
    page.get_by_label("real").check()

    # one photo, a mask stroke on it, inverted: the progress is shown once, in the gallery the model's
    # images will fill, with its steps and the time left
    upload_photos(page, [FACE], ["face.png"])
    page.get_by_role("button", name="Brush", exact=True).click()
    draw_stroke(page)
    steps = QUICK_INVERSION_STEPS if BENCH else 20
    page.fill("#invert-steps input", str(steps))
    assert page.locator("#invert-init").get_by_label("encoder", exact=True).is_checked()  # the space names one
    page.locator("#invert-init").get_by_label("zero", exact=True).check()
    shown = []

    def invert_and_watch_the_progress():
        page.click("#invert-button")
        shown.extend(progress_shown(page, r"about \d+ s left"))

    timed(f"invert_{steps}_steps", invert_and_watch_the_progress)
    assert {owner for owner, _ in shown} == {"current-gallery"}, shown
    texts = " ".join(text for _, text in shown)
    assert re.search(rf"\d+/{steps} steps", texts) and re.search(r"loss \d+\.\d{4}, about \d+ s left", texts), texts
    assert f"inverted (real, {steps} steps, with the mask drawn)" in page.inner_text("#status")
    if BENCH:  # the preset's own count, one click away, for the ratio of the two
        page.click("#invert-full")
        timed("invert_full_preset", lambda: page.click("#invert-button"), timeout=4 * JOB_TIMEOUT)  # 400 steps
        page.fill("#invert-steps input", str(steps))

    # from the encoder: its model at once, the status saying so while the steps refine it, then the refined one
    page.locator("#invert-init").get_by_label("encoder", exact=True).check()
    old, start, cpu = image_sources(page, "#current-gallery img"), time.perf_counter(), cpu_seconds(server_process.pid)
    page.click("#invert-button")
    first_status = page.wait_for_function("""old => {
        const images = [...document.querySelectorAll('#current-gallery img')];
        return images.length > 0 && JSON.stringify(images.map(image => image.src)) !== JSON.stringify(old)
            && images.every(image => image.complete && image.naturalWidth > 0)
            && document.querySelector('#status').innerText;
    }""", arg=old, timeout=JOB_TIMEOUT).json_value()
    timed.timings["encoder_model"] = round(time.perf_counter() - start, 2)
    timed.cpu["encoder_model"] = round(cpu_seconds(server_process.pid) - cpu, 2)
    assert f"the encoder's model (real, with the mask drawn), refining {steps} steps" in first_status, first_status
    page.wait_for_selector("#download-w2w:not([disabled])", timeout=JOB_TIMEOUT)  # offered while it refines
    assert "refining" in page.inner_text("#status")
    timed(f"encoder_refined_{steps}_steps", lambda: None)  # from the encoder's images to the refined ones
    assert (f"inverted (real, {steps} steps, with the mask drawn), from the encoder's model"
            in page.inner_text("#status"))
    page.locator("#invert-init").get_by_label("zero", exact=True).check()

    # two photos, cut around the face, inside the auto mask: each shown whole as fitted, the mask dimming
    page.check("#invert-add input[type=checkbox]")
    upload_photos(page, [FACE_256], ["face.png", "face_256.png"])
    page.check("#invert-crop input[type=checkbox]")
    page.check("#invert-auto-mask input[type=checkbox]")
    page.fill("#invert-steps input", "3")
    timed("invert_2_images_3_steps", lambda: page.click("#invert-button"))
    status = page.inner_text("#status")
    assert "inverted (real, 3 steps, 2 images, face crop, with auto masks)" in status
    page.wait_for_function("document.querySelectorAll('#invert-fitted img').length == 2", timeout=JOB_TIMEOUT)
    assert "face_256.png: auto mask" in page.inner_text("#invert-fitted")
    fits = page.eval_on_selector_all("#invert-fitted img", "images => images.map(image => getComputedStyle(image)"
                                                           ".objectFit)")
    assert fits == ["contain", "contain"]  # whole, not cut to fill its box
    (photo,) = read_photos([FACE_256], [AUTO_MASK], "face", 64)  # at the tiny world's resolution
    torch.testing.assert_close(fetch_image(image_sources(page, "#invert-fitted img")[1]),
                               torch.from_numpy(np.array(fitted_view(photo))).float())  # dimmed outside the mask

    # a photo without a face under Crop to face: a warning saying so, before any inversion, and no change
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg")
    page.uncheck("#invert-add input[type=checkbox]")
    upload_photos(page, [tmp_path / "coffee.jpg"], ["coffee.jpg"])
    page.click("#invert-button")
    toast(page, r"w2w: error: coffee\.jpg: no face found .*untick Crop to face")
    assert page.inner_text("#status") == status

    # no photos: Invert is off again
    page.click("#invert-file button[aria-label=Clear]")
    page.wait_for_function("document.querySelector('#invert-button').disabled", timeout=JOB_TIMEOUT)

    assert not outside_requests(page, server), f"the page reached beyond the app: {outside_requests(page, server)}"
    print(f"click to image, seconds: {timed.timings}; the server's CPU seconds: {timed.cpu}")
    if BENCH:
        ratio = timed.timings["encoder_model"] / timed.timings[f"invert_{steps}_steps"]  # the same run's zero-init
        bench = Workbench(BASE, SPACE, "cpu", progress=False)  # the prediction alone, in this process, best of 5
        seconds = []
        for _ in range(6):
            start = time.perf_counter()
            bench.invert(FACE, FACE_MASK, preset("real", bench.space, steps=0), encoder=bench.encoder())
            seconds.append(time.perf_counter() - start)
        Path(BENCH).write_text(json.dumps({"click_to_image_s": timed.timings, "server_cpu_s": timed.cpu,
                                           "encoder_model_over_zero_init": round(ratio, 3),
                                           "encoder_prediction_s": round(min(seconds[1:]), 4),
                                           "load_average": os.getloadavg()}, indent=2))
    page.context.close()


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

    edited_path, images = client.predict(_file(model_path), '{"Eyeglasses": 3}', ["Male", "Age"], api_name="/edit")
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

    # the optional crop, auto mask, more images and init zero: what `w2w invert` computes for the same photos
    both_path, images = client.predict(_file(FACE), _file(FACE_MASK), "real", "3", "face", True, [_file(FACE_256)],
                                       "zero", api_name="/invert")
    bench = Workbench(BASE, SPACE, "cpu", progress=False)  # the space's folder: it names its default encoder
    expected, _ = bench.invert([FACE, FACE_256], [FACE_MASK, AUTO_MASK], preset("real", space, steps=3),
                               crop="face")  # w2w invert's
    torch.testing.assert_close(load_model(both_path).coefficients, expected.coefficients, rtol=1e-4, atol=1e-5)
    assert len(images) == 4

    # init encoder, 0 steps: exactly the encoder's prediction (the space's default encoder, its K padded to K)
    encoded_path, images = client.predict(_file(FACE), None, "real", 0, "face", False, None, "encoder",
                                          api_name="/invert")
    (photo,) = read_photos([FACE], [None], "face", bench.resolution())
    predicted = bench.encoder().predict(photo.picture).coefficients  # (K_encoder,)
    encoded = load_model(encoded_path).coefficients  # (K,)
    assert torch.equal(encoded[:len(predicted)], predicted) and not encoded[len(predicted):].any()
    assert len(images) == 4


def log_since(log: Path, offset: int) -> str:
    with open(log) as f:
        f.seek(offset)
        return f.read()


def call_raw(url: str, endpoint: str, data: list) -> str:
    """An endpoint called over raw HTTP with `data` as Python's json writes it (NaN included, which no
    gradio_client sends): the error of the call, or '' when it succeeded."""
    import httpx

    base = f"{url}gradio_api/call/{endpoint}"
    event = httpx.post(base, content=json.dumps({"data": data}), headers={"content-type": "application/json"})
    stream = httpx.get(f"{base}/{event.json()['event_id']}", timeout=JOB_TIMEOUT / 1000).text
    errors = [json.loads(line[len("data: "):]) for line in stream.splitlines() if "event: error" in stream
              and line.startswith("data: ")]
    return errors[0]["error"] if errors else ""


def upload_raw(url: str, path: Path) -> dict:
    """`path` uploaded over raw HTTP: the file object an endpoint takes."""
    import httpx

    uploaded, = httpx.post(url + "gradio_api/upload", files={"files": (path.name, path.read_bytes())}).json()
    return {"path": uploaded, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.slow
def test_bad_input_to_every_endpoint_is_the_cli_line(lean, lean_client, space, tmp_path):
    from gradio_client.exceptions import AppError

    offset = lean.log.stat().st_size
    client = lean_client
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide_mask.png")
    save_model(W2WModel(torch.zeros(4), "0123456789abcdef"), tmp_path / "other.safetensors")
    model_path, _ = client.predict(0, api_name="/sample")
    model = _file(model_path)
    cases = [  # (arguments, endpoint, the line expected)
        (["abc"], "/sample", r"seed 'abc': expected a whole number"),
        ([-1], "/sample", r"seed: expected an integer from 0 to \d+, got -1"),
        ([2.5], "/sample", r"seed '2\.5': expected a whole number"),
        ([_file(notes), "{}", []], "/edit", r"notes\.txt: not a valid safetensors file"),
        ([_file(tmp_path / "other.safetensors"), "{}", []], "/edit",
         r"the model belongs to space 0123456789abcdef, not to this space"),
        ([None, "{}", []], "/edit", "no model file given"),
        ([model, "[1]", []], "/edit", r"edits '\[1\]': expected a JSON object of attribute names and numbers"),
        ([model, '{"Eyeglasses": "a lot"}', []], "/edit", r"edits '\{\"Eyeglasses\": \"a lot\"\}': expected a JSON object"),
        ([model, "[" * 50_000, []], "/edit", r"edits '\[\[\[.*\(50,000 characters\): not JSON \(nested too deep\)"),
        ([model, "{" * 200_000, []], "/edit", r"edits .*: expected a JSON object of at most 100,000 characters"),
        ([model, '{"Wings": 1}', []], "/edit", "edits: no attribute 'Wings'"),
        ([model, "{}", "Male"], "/edit", r"debias 'Male': expected a list of attribute names"),
        ([model, "{}", ["Wings"]], "/edit", r"debias: no attribute 'Wings'"),
        ([None, None, "real", 3], "/invert", "no image file given"),
        ([_file(notes), None, "real", 3], "/invert", r"notes\.txt: not a readable image"),
        ([_file(FACE), _file(tmp_path / "wide_mask.png"), "real", 3], "/invert",
         r"wide_mask\.png: the mask is 64x32 but the image is 64x64"),
        ([_file(FACE), None, "real", "many"], "/invert", r"inversion steps 'many': expected a whole number"),
        ([_file(FACE), None, "real", 0], "/invert", r"inversion steps 0: expected a whole number from 1 to \d+"),
        ([_file(FACE), None, "sharp", 3], "/invert", r"inversion preset 'sharp': expected one of real, ood"),
        ([_file(FACE), None, "real", 3, "square"], "/invert", r"crop 'square': expected one of center, face"),
        ([_file(FACE), None, "real", 3, "center", "yes"], "/invert", r"auto mask 'yes': expected true or false"),
        ([_file(FACE), None, "real", 3, "center", False, None, "warm"], "/invert",
         r"init 'warm': expected one of encoder, zero"),
        ([model, "sks person", "zero", 2], "/generate", r"seeds 'zero': expected whole numbers"),
        ([model, "sks person", "0", 100000], "/generate", r"steps 100000: expected a whole number from 1 to \d+"),
        ([None, "kohya"], "/export", "no model file given"),
        ([model, "zip"], "/export", r"export format 'zip': expected one of w2w, kohya, peft"),
    ]
    for arguments, endpoint, expected in cases:
        with pytest.raises(AppError, match=r"^w2w: error: " + expected):
            client.predict(*arguments, api_name=endpoint)
    for endpoint, values, expected in [  # what gradio_client does not send
            ("sample", [float("nan")], "seed 'nan': expected a whole number"),
            ("sample", [[1]], r"seed '\[1\]': expected a whole number"),
            ("sample", [{"seed": 1}], r"seed .*: expected a whole number"),
            ("generate", [None, "sks person", "0", float("inf")], "no model file given")]:
        assert re.match(r"w2w: error: " + expected, call_raw(lean.url, endpoint, values)), (endpoint, values)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (UPLOAD_LIMIT + 1))
    with pytest.raises(ValueError, match=f"big.png exceeds the maximum file size of {UPLOAD_LIMIT} bytes"):
        client.predict(_file(big), None, "real", 3, api_name="/invert")  # gradio_client refuses it ...
    assert "Traceback" not in log_since(lean.log, offset)


@pytest.mark.slow
def test_uploads_above_the_limit_are_refused_by_the_server(lean):
    import httpx

    response = httpx.post(lean.url + "gradio_api/upload", files={"files": ("big.png", b"\0" * (UPLOAD_LIMIT + 1))})
    assert response.status_code == 413, response.text  # ... and so does the server, for any other client
    assert f"maximum allowed size of {UPLOAD_LIMIT} bytes" in response.text
    assert httpx.post(lean.url + "gradio_api/upload", files={"files": ("small.png", b"\0" * 1024)}).status_code == 200


@pytest.mark.slow
def test_file_routes_refuse_paths_outside_the_apps_files(lean, lean_client):
    model_path, _ = lean_client.predict(0, api_name="/sample")
    served = lean_client.predict(_file(model_path), "w2w", api_name="/export")  # downloaded from the server
    assert load_model(served).space_id
    written = next((lean.temp).glob("w2w-app-*/*/*/*.safetensors"))  # the app's own file, before Gradio's copy
    paths = [f"{SPACE}/space.json", "files/tiny/space/space.json", "lora_w2w/app.py", "/proc/self/environ",
             "/etc/passwd", "../../../../etc/passwd", "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "%2Fetc%2Fpasswd",
             "%252e%252e/%252e%252e/etc/passwd", f"{lean.cache}/../../../../etc/passwd",
             f"{lean.cache}/%2e%2e/%2e%2e/%2e%2e/etc/passwd", str(written), str(lean.log)]
    for route in ("/gradio_api/file=", "/file="):
        for path in paths:  # raw requests: an HTTP library would resolve the ../ before sending them
            connection = http.client.HTTPConnection("127.0.0.1", int(lean.url.rsplit(":", 1)[1].strip("/")))
            connection.request("GET", route + path)
            response = connection.getresponse()
            body = response.read()
            assert response.status in (403, 404), (route + path, response.status, body[:80])
            assert b"root:" not in body and b"PATH=" not in body


@pytest.mark.slow
def test_an_uploaded_pickle_is_refused_without_running(lean_client, tmp_path):
    from gradio_client.exceptions import AppError

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # unpickling it would create the file `ran`
            return open, (str(ran), "w")

    torch.save(Payload(), tmp_path / "w2wmodel.pt")  # what a w2wmodel.pt from a stranger might hold
    with pytest.raises(AppError, match=r"w2w: error: .*w2wmodel\.pt.*pickle"):
        lean_client.predict(_file(tmp_path / "w2wmodel.pt"), "kohya", api_name="/export")
    assert not ran.exists()


@pytest.mark.slow
def test_eight_concurrent_clients_each_keep_their_own_model(lean, space, tmp_path):
    """Eight clients at once, each sampling its own seed, editing it by its own strength and exporting it:
    each gets what the library computes for its own model."""
    direction = attribute_directions(space, ["Eyeglasses"], debias_against=["Male", "Young"])["Eyeglasses"]

    def session(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        client = new_client(lean.url, tmp_path / f"client{i}")
        sampled, _ = client.predict(10 + i, api_name="/sample")
        edited, _ = client.predict(_file(sampled), json.dumps({"Eyeglasses": i - 3.5}), ["Male", "Young"],
                                   api_name="/edit")
        kohya = client.predict(_file(edited), "kohya", api_name="/export")
        return load_model(sampled).coefficients, load_model(edited).coefficients, load_kohya(space.layout, kohya)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(session, range(8)))
    for i, (sampled, edited, kohya) in enumerate(results):
        expected = sample_models(space, num=1, seed=10 + i)[0].coefficients
        torch.testing.assert_close(sampled, expected)
        torch.testing.assert_close(edited, expected + direction.shift(i - 3.5), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kohya, W2WModel(edited, space.id).weights(space), rtol=1e-5, atol=1e-6)


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.mark.slow
def test_memory_and_temporary_files_stay_bounded_over_50_edits(lean, lean_client):
    """Resident memory grows by little over 50 edits, and the files they write go after --keep-files
    seconds: Gradio's cache (uploads, images, models) and the app's own exports."""
    model = Path(lean_client.predict(0, api_name="/sample")[0])

    def edit(edits: dict) -> None:  # over raw HTTP: gradio_client's downloads would take most of the time
        assert call_raw(lean.url, "edit", [upload_raw(lean.url, model), json.dumps(edits), []]) == ""

    for strength in (1, 2, 3):  # the directions fitted, the allocator warm
        edit({"Eyeglasses": strength})
    start = resident_mb(lean.process.pid)
    for i in range(50):
        edit({"Eyeglasses": i % 8 - 4, "Bald": i % 3})
    grown = resident_mb(lean.process.pid) - start
    assert grown < 50, f"resident memory grew {grown:.1f} MB over 50 edits"
    time.sleep(2 * LEAN_KEEP + 1)  # the files' age, and Gradio's sweep once more
    edit({})  # the app sweeps as it writes a new export
    exports = list(lean.temp.glob("w2w-app-*/*/*"))
    cached = files_under(lean.cache)
    assert len(exports) == 1, exports  # the last one only
    assert len(cached) <= 6, cached  # the last edit's upload, model and image, and what the page's defaults hold
    print(f"resident memory +{grown:.1f} MB over 50 edits; Gradio's cache {len(cached)} files, the app's "
          f"exports {len(exports)}")


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


# ----------------------------------------------------------------------------- the command, in-process

def test_help_documents_every_endpoint(capsys):
    from lora_w2w.cli import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    text = capsys.readouterr().out
    for endpoint in ("/sample(seed)", "/edit(model file, edits, debias)", "/invert(image file, mask file or None, "
                     "preset, steps[, crop, auto mask, more image files, init])",
                     "/generate(model file, prompt, seeds, steps)", "/export(model file, format)",
                     "--auth USER:PASSWORD", "--keep-files"):
        assert endpoint in text


@pytest.mark.parametrize("flags, expected", [
    (["--port", "99999"], "argument --port: expected an integer from 1 to 65535, got 99999"),
    (["--port", "http"], "argument --port: expected an integer, got 'http'"),
    (["--max-upload", "abc"], "argument --max-upload: expected a size such as 20mb, 1gb or 500kb, got 'abc'"),
    (["--max-upload", "0mb"], "argument --max-upload: expected a size such as 20mb"),
    (["--auth", "admin"], "argument --auth: expected USER:PASSWORD"),
    (["--keep-files", "0"], "argument --keep-files: expected an integer >= 1, got 0")])
def test_bad_flags_are_one_line_at_parse_time(flags, expected, capsys):
    from lora_w2w.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["app", *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(f"w2w app: error: {expected}") and error.count("\n") == 1


def test_an_encoder_of_another_space_is_one_line_at_start(tmp_path, capsys):
    from lora_w2w.encoder import CoefficientEncoder, EncoderConfig
    from lora_w2w.encoder_files import save_encoder

    from lora_w2w.cli import main

    k = EncoderConfig().components
    save_encoder(CoefficientEncoder(EncoderConfig(), "another", torch.zeros(k), torch.ones(k)),
                 tmp_path / "enc.safetensors")
    assert main(["app", "--space", str(SPACE), "--base", str(BASE), "--device", "cpu",
                 "--encoder", str(tmp_path / "enc.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("w2w app: error: the encoder ") and "belongs to space another" in error
    assert error.count("\n") == 1


def test_the_network_without_auth_warns_and_auth_reaches_gradio(monkeypatch, capsys):
    from lora_w2w import app
    from lora_w2w.cli import main

    launched = []
    monkeypatch.setattr(app, "Actions", lambda config: config)  # nothing loaded: the launch's settings alone
    monkeypatch.setattr(app, "build_app", lambda config: SimpleNamespace(launch=lambda **kw: launched.append(kw)))
    assert main(["app", "--host", "0.0.0.0", "--max-upload", "5MB"]) == 0
    warning = capsys.readouterr().err
    assert warning.startswith("w2w: warning: serving on 0.0.0.0, beyond this machine, without authentication")
    assert "--auth USER:PASSWORD" in warning and launched[-1]["auth"] is None
    assert launched[-1]["max_file_size"] == "5mb"
    assert main(["app", "--host", "0.0.0.0", "--auth", "ada:pass:word"]) == 0
    assert not capsys.readouterr().err and launched[-1]["auth"] == ("ada", "pass:word")
    assert main(["app"]) == 0  # this machine only: no warning
    assert not capsys.readouterr().err and launched[-1]["server_name"] == "127.0.0.1"


@pytest.mark.slow
def test_the_mask_is_the_brush_strokes_at_the_image_size():
    from lora_w2w.app import mask_from_layers

    layer = Image.new("RGBA", (512, 256), (0, 0, 0, 0))
    layer.paste((255, 64, 160, 90), (256, 0, 512, 128))  # a half-transparent stroke: still inside the mask
    mask = np.asarray(mask_from_layers([Image.new("RGBA", (512, 256)), layer], (128, 64)))
    assert mask.shape == (64, 128) and set(np.unique(mask)) == {0, 255}
    assert (mask[:32, 64:] == 255).all() and (mask[32:] == 0).all() and (mask[:, :64] == 0).all()
    assert mask_from_layers([Image.new("RGBA", (512, 256))], (128, 64)) is None  # no stroke: no mask


def test_values_from_a_page_or_a_client_are_checked():
    from lora_w2w.app import check_steps, parse_seeds, parse_strengths, safe_name, whole_number

    assert [whole_number(v, "seed") for v in (3, 3.0, "3", " 3 ", "3.0", "9223372036854775807")] == [
        3, 3, 3, 3, 3, 2**63 - 1]
    for bad in (float("nan"), float("inf"), 2.5, "abc", "", None, True, [3], {"seed": 3}):
        with pytest.raises(W2WError, match="expected a whole number"):
            whole_number(bad, "seed")
    assert parse_seeds("0, 1 2", 4) == [0, 1, 2]
    with pytest.raises(W2WError, match="expected 1 to 4 seeds, got 5"):
        parse_seeds("0 1 2 3 4", 4)
    with pytest.raises(W2WError, match="expected whole numbers"):
        parse_seeds("0 -1", 4)
    assert check_steps(20.0, 50) == 20
    with pytest.raises(W2WError, match="steps 2.5: expected a whole number"):
        check_steps(2.5, 50)
    assert parse_strengths('{"Bald": -2}', ["Bald"]) == {"Bald": -2.0}
    for bad in ('{"Bald": "a lot"}', '{"Bald": NaN}', "[1]", "3", '{"Bald": true}'):
        with pytest.raises(W2WError, match="expected a JSON object of attribute names and numbers"):
            parse_strengths(bad, ["Bald"])
    assert [safe_name(n) for n in ("sample_seed3", "../../etc/x", "a/b", "", None, ".hidden")] == [
        "sample_seed3", "w2w_model", "w2w_model", "w2w_model", "w2w_model", "w2w_model"]


# ----------------------------------------------------------------------------- the engine, in-process

@pytest.fixture(scope="module")
def engine():
    from lora_w2w.app import Actions, AppConfig

    return Actions(AppConfig(space=str(SPACE), base=str(BASE), device="cpu"))


def test_the_record_a_browser_keeps_comes_back_checked(engine, space):
    from lora_w2w.app import Session, kept_session, kept_value

    model = sample_models(space, num=1, seed=5)[0]
    edited = engine.edit(model, {"Bald": 2.0}, ["Male"])
    session = Session(model, edited, "sample_seed5", "sampled with seed 5", {"Bald": 2.0}, ("Male",), 700)
    kept = json.loads(json.dumps(kept_value(session)))  # as the browser stores it
    back = kept_session(engine, kept)
    assert torch.equal(back.original.coefficients, model.coefficients)
    assert torch.equal(back.current.coefficients, edited.coefficients)
    assert (back.name, back.what, back.strengths, back.debias, back.injection) == (
        "sample_seed5", "sampled with seed 5", {"Bald": 2.0}, ("Male",), 700)
    assert kept_session(engine, None) is None
    for broken, expected in [("a string", "expected the app's own record"),
                             ({**kept, "current": ["x"]}, "current: expected the app's own record"),
                             ({**kept, "current": [0.0] * 10_000}, "current: expected the app's own record"),
                             ({**kept, "original": [float("nan")] * 4}, "NaN"),
                             ({**kept, "space": "0123456789abcdef"}, "belongs to space 0123456789abcdef"),
                             ({**kept, "strengths": {"Wings": 1}}, "no attribute 'Wings'"),
                             ({**kept, "debias": "Male"}, "expected a list of attribute names")]:
        with pytest.raises(W2WError, match=expected):
            kept_session(engine, broken)
    assert kept_session(engine, {**kept, "name": "../../x"}).name == "w2w_model"  # names never make paths


def test_the_sliders_and_debias_ticks_go_by_editings_names(engine, space):
    """The page names its sliders and debias choices through editing.attribute_names (Beard = -No_Beard,
    Age = -Young) and ticks editing's debias default, as `w2w edit` keeps."""
    import gradio as gr

    from lora_w2w.app import build_app
    from lora_w2w.editing import attribute_names, default_debias

    blocks = build_app(engine).blocks.values()
    sliders = [block.label for block in blocks if isinstance(block, gr.Slider)
               and (block.elem_id or "").startswith("edit-")]
    assert sliders == attribute_names(space) and "Beard" in sliders and "No_Beard" not in sliders
    debias, = [block for block in blocks if block.elem_id == "debias"]
    assert debias.value == default_debias(space) == ["Male", "Age"] and debias.choices[1][0] == "Age"


def test_exports_go_after_their_age_and_with_their_session(engine, space, monkeypatch):
    from dataclasses import replace

    model = sample_models(space, num=1, seed=0)[0]
    first = Path(engine.export(model, "kohya", "a", owner="session-1"))
    second = Path(engine.export(model, "peft", "b", owner="session-2"))
    assert first.is_file() and second.is_file() and first.parent.parent != second.parent.parent
    engine.forget("session-1")  # the page closed
    assert not first.exists() and second.exists()
    monkeypatch.setattr(engine, "config", replace(engine.config, keep_files=1))
    time.sleep(1.1)
    third = Path(engine.export(model, "w2w", "c", owner="../../elsewhere"))  # a client's name makes no path
    assert not second.exists() and third.is_file() and engine.outputs in third.parents


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


def test_the_inversion_progress_counts_steps_and_the_time_left():
    from lora_w2w import app

    shown, clock = [], iter([100.0, 101.0, 103.0, 105.0])
    on_step = app.progress_bar(lambda progress, desc, unit: shown.append((progress, desc, unit)), clock=clock.__next__)
    for done, loss in ((1, 0.5), (2, 0.25), (3, 0.125), (4, 0.0625)):
        on_step(done, 4, loss)
    assert shown == [((1, 4), "loss 0.5000, estimating the time left", "steps"),
                     ((2, 4), "loss 0.2500, about 2 s left", "steps"),  # 1 s a step after the first
                     ((3, 4), "loss 0.1250, about 2 s left", "steps"), ((4, 4), "loss 0.0625, about 0 s left", "steps")]


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


def test_a_page_handler_warns_and_changes_nothing(monkeypatch):
    from lora_w2w import app

    toasts = []
    monkeypatch.setattr(app.gr, "Warning", toasts.append)

    @app.answered
    def handler(value):
        raise W2WError(f"{value}: expected something else")

    assert handler("x") == app.gr.skip() and toasts == ["w2w: error: x: expected something else"]

    @app.answered
    def generating(value):  # the encoder's model, then a failing refinement: the first output stays
        yield value
        raise W2WError(f"{value}: expected something else")

    assert list(generating("y")) == ["y", app.gr.skip()] and toasts[1:] == ["w2w: error: y: expected something else"]
