"""The identity metric on photographs that ship in packages: dlib's face descriptor calls the same photograph
flipped, cropped, resized and JPEG-compressed the same person, and three different people (the astronaut,
Grace Hopper, scikit-image's cameraman) not; bad photographs give a one-line error or a result; `w2w score`
prints a similarity as a table and as JSON. 22 s of CPU (50 s on the shared 2-core machine)."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from test_inversion import run_cli

from lora_w2w.errors import NoFaceError, W2WError
from lora_w2w.identity import SAME_PERSON_DISTANCE, DlibIdentity, TinyIdentity, pair_similarities
from lora_w2w.inversion import AUTO_MASK, read_photos

ROOT = Path(__file__).resolve().parents[1]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def variants(photo: Image.Image) -> list[Image.Image]:
    """The photograph flipped, cropped around the face's half of the picture, resized to half, JPEG at 40."""
    width, height = photo.size
    return [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            photo.crop((width // 5, 0, width * 4 // 5, height * 3 // 5)),
            photo.resize((width // 2, height // 2), Image.Resampling.LANCZOS),
            jpeg(photo.resize((256, 256 * height // width), Image.Resampling.LANCZOS), 40)]


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[:, None] - b[None], axis=2)  # (A, B)


@pytest.fixture(scope="module")
def dlib_identity():
    return DlibIdentity()


@pytest.mark.parametrize("photo", ["astronaut", "grace_hopper"])
def test_the_same_photograph_changed_is_the_same_person(photo, request, dlib_identity):
    original = request.getfixturevalue(photo)
    embeddings = dlib_identity.embed([original, *variants(original)])  # (5, 128)
    assert not np.isnan(embeddings).any()
    assert (distances(embeddings[:1], embeddings[1:]) < SAME_PERSON_DISTANCE).all(), distances(embeddings[:1], embeddings)
    score = dlib_identity.score(embeddings[1:], embeddings[:1])
    assert score.same_person_rate == 1.0 and score.similarity > 0.95 and score.no_face == 0


def test_different_people_are_not_the_same_person(astronaut, grace_hopper, dlib_identity):
    """Three people: the astronaut, Grace Hopper and the cameraman (his face turned: only dlib's CNN finds it)."""
    people = np.concatenate([dlib_identity.embed([astronaut, grace_hopper]),
                             DlibIdentity("cnn").embed([Image.fromarray(data.camera())])])  # (3, 128)
    between = distances(people, people)[np.triu_indices(3, 1)]
    assert (between > SAME_PERSON_DISTANCE).all(), between
    astronaut_variants = dlib_identity.embed(variants(astronaut))
    score = dlib_identity.score(astronaut_variants, people[1:])
    assert score.same_person_rate == 0.0 and score.similarity < dlib_identity.score(astronaut_variants,
                                                                                     people[:1]).similarity


def test_no_face_is_a_row_of_nan_and_counted(astronaut, dlib_identity):
    embeddings = dlib_identity.embed([astronaut, Image.new("RGB", (64, 64), "grey")])
    assert not np.isnan(embeddings[0]).any() and np.isnan(embeddings[1]).all()
    score = dlib_identity.score(embeddings, embeddings[:1])
    assert (score.images, score.no_face, score.similarity) == (2, 1, pytest.approx(1.0))
    assert dlib_identity.score(embeddings[1:], embeddings[:1]).similarity is None  # no pair with faces


def test_the_tiny_embedder_is_the_evaluators_identity_similarity():
    from lora_w2w.tiny.evaluator import Evaluator, identity_similarity
    from lora_w2w.tiny.synthetic import render, sample_identity

    evaluator = Evaluator.load(ROOT / "files" / "tiny" / "evaluator.safetensors")
    faces = [render(sample_identity(seed), view_seed=1) for seed in (1, 2)]
    embeddings = TinyIdentity(evaluator).embed(faces)
    np.testing.assert_allclose(pair_similarities(embeddings, embeddings[::-1]),
                               identity_similarity(evaluator.predict(faces), evaluator.predict(faces[::-1])))


# ----------------------------------------------------------------------------- bad photographs

def sixteen_bit(photo: Image.Image) -> Image.Image:
    """The photograph as a 16-bit greyscale PNG reads back (mode I;16)."""
    buffer = io.BytesIO()
    grey = np.asarray(photo.convert("L"), np.uint16) * 257  # (H, W) 0 .. 65535
    Image.fromarray(grey).save(buffer, "PNG")
    return Image.open(buffer)


def test_a_16_bit_png_is_read_as_its_8_bit_picture(astronaut, dlib_identity):
    picture = sixteen_bit(astronaut)
    assert picture.mode.startswith("I;16")
    (photo,) = read_photos([picture], [AUTO_MASK], crop="face", size=64)
    assert photo.picture.size == (64, 64) and photo.mask.max() == 255
    embeddings = dlib_identity.embed([picture, astronaut.convert("L")])
    assert distances(embeddings[:1], embeddings[1:])[0, 0] < 0.05  # the same face as the 8-bit grey copy


@pytest.mark.slow
def test_an_8000_px_photograph_is_aligned_and_embedded(astronaut, dlib_identity):
    """64 M pixels: detection runs on a 1,024 px working copy, the crop is cut from a reduced copy (~6 s)."""
    huge = astronaut.resize((8000, 8000), Image.Resampling.BILINEAR)
    (photo,) = read_photos([huge], [AUTO_MASK], crop="face", size=64)
    assert photo.picture.size == (64, 64) and photo.auto
    embeddings = dlib_identity.embed([huge, astronaut])
    assert distances(embeddings[:1], embeddings[1:])[0, 0] < SAME_PERSON_DISTANCE


# ----------------------------------------------------------------------------- w2w score

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model sampled from the tiny world's space (the default of every command)."""
    from lora_w2w.cli import main as w2w

    out = tmp_path_factory.mktemp("score")
    assert w2w(["sample", "--num", "1", "--out", str(out / "samples")]) == 0
    return out / "samples" / "sample_000.safetensors"


def test_w2w_score_prints_a_similarity_as_a_table_and_as_json(tiny_model, astronaut, tmp_path, capsys):
    astronaut.save(tmp_path / "astronaut.png")
    flags = ["--model", tiny_model, "--images", tmp_path / "astronaut.png", "--steps", 10, "--seeds", 0, 1,
             "--device", "cpu"]
    code, out, err = run_cli(capsys, "score", *flags, "--prompts", "sks person", "a photo of sks person")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == ("identity against 1 photo (dlib embeddings, cosine similarity; same person: distance under "
                        "0.6)")
    assert [line.split()[0] for line in lines[1:]] == ["prompt", "sks", "a", "all"]
    similarity, same_person, no_face = lines[-1].split()[1:]
    assert -1 <= float(similarity) <= 1 and same_person.endswith("%") and no_face.endswith("/4")
    code, out, err = run_cli(capsys, "score", *flags, "--embedder", "tiny", "--json")
    report = json.loads(out)
    assert code == 0 and report["embedder"] == "tiny" and report["same_person_distance"] is None
    assert list(report["per_prompt"]) == ["sks person"] and report["all"]["images"] == 2
    assert report["all"]["no_face"] == 0 and -1 <= report["all"]["similarity"] <= 1


@pytest.mark.parametrize("picture, message", [
    ("coffee", "coffee.png: no face found to score against (dlib's detector); expected a photograph of the "
               "person's face"),
    ("grey", "grey.png: no face found to score against"),
    ("text", "text.png: not a readable photo"),
])
def test_w2w_score_refuses_a_photo_without_a_face_in_one_line(tiny_model, tmp_path, capsys, picture, message):
    path = tmp_path / f"{picture}.png"
    if picture == "coffee":
        Image.fromarray(data.coffee()).save(path)
    elif picture == "grey":
        Image.new("L", (300, 200), 128).save(path)
    else:
        path.write_text("not an image")
    code, out, err = run_cli(capsys, "score", "--model", tiny_model, "--images", path, "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_read_photos_refuses_an_unknown_detector(astronaut):
    with pytest.raises(W2WError, match="unknown face detector 'mtcnn'; expected one of hog, cnn"):
        read_photos([astronaut], crop="face", detector="mtcnn")
    with pytest.raises(NoFaceError):
        read_photos([Image.new("RGB", (64, 64), "grey")], crop="face")
