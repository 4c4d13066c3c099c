"""Photographs: dlib's face detector on real photographs that ship in packages (scikit-image's astronaut,
matplotlib's Grace Hopper) and on the tiny world's drawn faces, FFHQ's alignment and the landmark mask,
multi-image inversion (deterministic, and with one image bit for bit the single-image inversion), and the
command lines' one-line errors. 18 s of CPU (85 s on the shared 2-core machine)."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_space
from PIL import Image
from skimage import data
from test_inversion import K, pipe, run_cli, toy_space  # noqa: F401 (pipe, toy_space: the toy world's fixtures)

from lora_w2w.diffusion import image_sizes
from lora_w2w.errors import NoFaceError, W2WError
from lora_w2w.faces import align_face, detect_faces, find_face, landmark_mask, template_mask
from lora_w2w.inversion import AUTO_MASK, InversionConfig, check_mask, invert, load_target, photo_targets, read_photos
from lora_w2w.layout import LoraLayout
from lora_w2w.pipeline import load_base_pipeline
from lora_w2w.storage import load_model, load_space, save_space

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "inversion" / "images" / "face.png"
FACE_MASK = ROOT / "inversion" / "images" / "face_mask.png"
CONFIG = InversionConfig(components=K, lr=1.0, weight_decay=0.0, steps=6, checkpoint_every=2)
# invert(pipe, toy_space, *load_target(FACE, FACE_MASK), CONFIG, seed=3) and (FACE, no mask, seed=5) as
# computed by the single-image code before multi-image inversion existed (commit f169816), float.hex
SINGLE_IMAGE = {
    3: ['0x1.0473600000000p-2', '0x1.2b8dfa0000000p+1', '0x1.3aa7d20000000p+1', '0x1.de250e0000000p+1',
        '-0x1.47b4d80000000p+0', '-0x1.dd79fc0000000p+0', '-0x1.1c59c40000000p+1', '-0x1.9e6cd60000000p+1'],
    5: ['-0x1.777a0e0000000p+1', '-0x1.ea57680000000p-1', '-0x1.38c9720000000p+1', '0x1.1cca380000000p+1',
        '-0x1.89d1e00000000p+1', '0x1.65aef00000000p+2', '-0x1.00e9720000000p+1', '-0x1.259a6a0000000p+2'],
}
ALIGNED = 256  # px of the aligned crops checked here


def ffhq_eyes(size: int) -> np.ndarray:
    """Where FFHQ's crop puts the eye centres (2, 2) in a square of `size` px, for a face whose eye-to-mouth
    distance is its eye-to-eye distance: the square is 4 eye distances wide, centred on the eyes' midpoint
    moved a tenth of the eye-to-mouth distance down."""
    eye_distance = size / 4
    middle = np.array([size / 2, size / 2 - 0.1 * eye_distance]) - 0.5  # pixel indices
    return middle + np.array([[-eye_distance / 2, 0], [eye_distance / 2, 0]])


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    return np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0)])  # (2, 2)


# ----------------------------------------------------------------------------- detection, alignment, mask

def test_the_astronaut_has_one_face_and_its_landmarks_lie_in_the_box(astronaut):
    (face,) = detect_faces(astronaut)
    assert face.box == (179, 83, 266, 170) and face.landmarks.shape == (68, 2)
    left, top, right, bottom = face.box
    eyes = eye_centres(face.landmarks)
    assert ((eyes >= (left, top)) & (eyes <= (right, bottom))).all() and eyes[0, 0] < eyes[1, 0], eyes


@pytest.mark.parametrize("photo", ["astronaut", "grace_hopper"])
def test_the_aligned_crop_puts_the_eyes_where_ffhqs_template_does(photo, request):
    """The landmarks found again on the aligned crop: each eye within 4 px of FFHQ's template at 256 px."""
    image = request.getfixturevalue(photo)
    aligned = align_face(image, find_face(image).landmarks, ALIGNED)
    assert aligned.image.size == (ALIGNED, ALIGNED) and aligned.image.mode == "RGB"
    np.testing.assert_allclose(eye_centres(aligned.landmarks), ffhq_eyes(ALIGNED), atol=4)  # mapped by the transform
    np.testing.assert_allclose(eye_centres(find_face(aligned.image).landmarks), ffhq_eyes(ALIGNED), atol=4)


def test_the_landmark_mask_lies_on_the_face_and_reads_back_as_a_mask(astronaut):
    aligned = align_face(astronaut, find_face(astronaut).landmarks, ALIGNED)
    mask = np.asarray(landmark_mask(aligned.image.size, aligned.landmarks)).astype(float)  # (H, W)
    rows, columns = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    centroid = np.array([(columns * mask).sum(), (rows * mask).sum()]) / mask.sum()  # (x, y)
    eyes, nose_tip = eye_centres(aligned.landmarks).mean(0), aligned.landmarks[30]  # (2,) each
    assert abs(centroid[0] - eyes[0]) < 0.05 * ALIGNED and 0.1 * ALIGNED < centroid[1] < nose_tip[1], centroid
    # (the head's middle: across, on the eyes' midpoint; down, between the hair and the tip of the nose)
    assert mask[0, ALIGNED // 2] == 255 and mask[-1, ALIGNED // 2] == 0  # over the hair, not the neck
    assert 0 < ((mask > 16) & (mask < 239)).mean() < 0.05  # feathered, narrow enough for --mask FILE
    check_mask(Image.fromarray(mask.astype(np.uint8)), aligned.image.size)


def test_a_photo_without_a_face_is_refused_with_the_way_out():
    with pytest.raises(NoFaceError, match="coffee.png: no face found .* use --crop center"):
        find_face(Image.fromarray(data.coffee()), "coffee.png")


def test_the_tiny_worlds_drawn_faces_are_found():
    """The 64 px example face, upscaled to the detector's working size: the box covers its centre."""
    (face,) = detect_faces(Image.open(FACE))
    left, top, right, bottom = face.box
    assert left < 32 < right and top < 32 < bottom and 20 <= right - left <= 40, face.box


def test_an_automatic_mask_without_a_face_falls_back_to_the_template_with_a_warning():
    grey = Image.new("RGB", (80, 64), "grey")
    with pytest.warns(UserWarning, match="image: no face found for the automatic mask; fitting an ellipse over the centre"):
        (photo,) = read_photos([grey], [AUTO_MASK])
    assert photo.auto and photo.mask.shape == (64, 80)
    np.testing.assert_array_equal(photo.mask, np.asarray(template_mask((80, 64))))


def test_a_mask_file_is_cut_like_the_face_crop(astronaut, tmp_path):
    left_half = np.zeros((512, 512), np.uint8)
    left_half[:, :224] = 255  # the image's columns 0..223 (the face spans 179..266)
    Image.fromarray(left_half).resize((256, 256), Image.Resampling.NEAREST).save(tmp_path / "m.png")  # a scaled copy
    (photo,) = read_photos([astronaut], [tmp_path / "m.png"], crop="face", size=ALIGNED)
    assert photo.picture.size == (ALIGNED, ALIGNED) and not photo.auto
    to_source = align_face(astronaut, find_face(astronaut).landmarks, ALIGNED).to_source  # (2, 3)
    rows, columns = np.mgrid[0:ALIGNED, 0:ALIGNED] + 0.5
    source_x = to_source[0, 0] * columns + to_source[0, 1] * rows + to_source[0, 2]  # (H, W) in the photo
    assert ((photo.mask == 255) == (source_x < 224)).mean() > 0.99


# ----------------------------------------------------------------------------- multi-image inversion

def test_one_image_is_the_single_image_inversion_bit_for_bit(pipe, toy_space):
    image, mask = load_target(FACE, FACE_MASK, *image_sizes(pipe))
    photos = read_photos([FACE], [FACE_MASK])
    images, masks = photo_targets(photos, *image_sizes(pipe))
    assert torch.equal(images, image) and torch.equal(masks, mask)
    for seed, used in ((3, mask), (5, None)):
        expected = torch.tensor([float.fromhex(x) for x in SINGLE_IMAGE[seed]])
        single = invert(pipe, toy_space, image, used, CONFIG, seed, progress=False).coefficients
        # the recorded values hold to rounding: the sums' order follows the BLAS thread count of the machine
        torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-4)
    listed = invert(pipe, toy_space, [image], [None], CONFIG, 5, progress=False).coefficients
    assert torch.equal(listed, single)  # in one process, a list of one image is the single image bit for bit


@pytest.mark.slow
def test_several_images_are_deterministic_and_all_used(pipe, toy_space):
    sizes = image_sizes(pipe)
    images, _ = photo_targets(read_photos([FACE, Image.open(FACE).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                                           ROOT / "inversion" / "images" / "drawing.png"]), *sizes)
    assert images.shape == (3, 3, *[sizes[0]] * 2)
    first = invert(pipe, toy_space, images, None, CONFIG, seed=1, progress=False).coefficients
    again = invert(pipe, toy_space, list(images.split(1)), None, CONFIG, seed=1, progress=False).coefficients
    assert torch.equal(first, again)
    alone = invert(pipe, toy_space, images[:1], None, CONFIG, seed=1, progress=False).coefficients
    assert not torch.allclose(first, alone, atol=1e-3)
    batched = invert(pipe, toy_space, images, None, InversionConfig(**{**CONFIG.__dict__, "images_per_step": 2}),
                     seed=1, progress=False).coefficients
    assert torch.isfinite(batched).all() and not torch.allclose(batched, first, atol=1e-3)


@pytest.mark.slow
def test_a_multi_image_run_resumes_from_its_checkpoint(pipe, toy_space, tmp_path):
    images, masks = photo_targets(read_photos([FACE, FACE], [FACE_MASK, None]), *image_sizes(pipe))
    assert masks.shape == (2, 1, 8, 8) and torch.equal(masks[1], torch.ones(1, 8, 8))  # None: fitted everywhere
    uninterrupted = invert(pipe, toy_space, images, masks, CONFIG, seed=2, progress=False)
    as_lists = invert(pipe, toy_space, list(images.split(1)), [masks[:1], None], CONFIG, seed=2, progress=False)
    assert torch.equal(as_lists.coefficients, uninterrupted.coefficients)  # lists, a None mask: fitted everywhere
    half = InversionConfig(**{**CONFIG.__dict__, "steps": 4})
    invert(pipe, toy_space, images, masks, half, seed=2, progress=False, checkpoint=tmp_path / "run.ckpt")
    resumed = invert(pipe, toy_space, images, masks, CONFIG, seed=2, progress=False, checkpoint=tmp_path / "run.ckpt")
    assert torch.equal(resumed.coefficients, uninterrupted.coefficients)
    with pytest.raises(W2WError, match="a checkpoint of another run \\(image"):
        invert(pipe, toy_space, images[:1], None, CONFIG, seed=2, progress=False, checkpoint=tmp_path / "run.ckpt")


# ----------------------------------------------------------------------------- command lines

@pytest.fixture(scope="module")
def space_dir(toy_space, tmp_path_factory):
    return save_space(toy_space, tmp_path_factory.mktemp("photos") / "space")


@pytest.mark.slow
def test_cli_crops_to_the_face_and_shows_the_automatic_masks(toy_world, space_dir, astronaut, tmp_path, capsys):
    astronaut.save(tmp_path / "astronaut.png")
    flags = ["--steps", 1, "--components", K, "--space", space_dir, "--base", toy_world / "base", "--device", "cpu"]
    code, out, err = run_cli(capsys, "invert", "--image", tmp_path / "astronaut.png", "--crop", "face", "--mask",
                             AUTO_MASK, *flags, "--out", tmp_path / "a.safetensors", "--score")
    assert code == 0, err
    table = out.split("identity against 1 photo (dlib embeddings")[1].splitlines()  # --score: the model's images
    assert table[-1].split()[0] == "all" and table[-1].split()[-1].endswith("/4")  # seeds 0-3, faces found or not
    crop, mask = Image.open(tmp_path / "a.crop.png"), Image.open(tmp_path / "a.mask.png")
    aligned = align_face(astronaut, find_face(astronaut).landmarks, 32)  # at the toy pipeline's resolution
    assert crop.size == mask.size == (32, 32) and mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(aligned.image))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(landmark_mask((32, 32), aligned.landmarks)))
    code, out, err = run_cli(capsys, "invert", "--image", tmp_path / "astronaut.png", "--image", FACE, "--mask",
                             AUTO_MASK, *flags, "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    assert "inverting 2 images" in out and Image.open(tmp_path / "b.mask.1.png").size == (512, 512)
    assert Image.open(tmp_path / "b.mask.2.png").size == (64, 64) and not (tmp_path / "b.crop.1.png").exists()
    assert load_model(tmp_path / "b.safetensors").coefficients.shape == (K,)


@pytest.mark.parametrize("flags, message", [
    (["--image", "coffee.png", "--crop", "face"], "coffee.png: no face found (dlib's HOG detector finds faces of "
                                                  "40 px and up, frontal); use --crop center"),
    (["--image", "face.png", "--image", "face.png", "--mask", "mask.png"],
     "--mask given 1 times for 2 --image; expected one --mask per --image"),
    (["--image", "face.png", "--image", "coffee.png", "--mask-dir", "masks"],
     "masks: no mask for the image coffee.png; expected one file coffee.png"),
])
def test_cli_bad_photos_are_one_line_exit_2_and_write_nothing(toy_world, space_dir, tmp_path, capsys, monkeypatch,
                                                               flags, message):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(data.coffee()).save("coffee.png")
    Image.open(FACE).save("face.png")
    Path("masks").mkdir()
    Image.open(FACE_MASK).save("masks/face.png")
    Image.open(FACE_MASK).save("mask.png")
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, "invert", *flags, "--steps", 1, "--components", K, "--space", space_dir,
                           "--base", toy_world / "base", "--device", "cpu", "--out", "out.safetensors")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and sorted(tmp_path.rglob("*")) == before


def test_invert_script_inverts_a_folder_of_images_together(toy_world, space_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("invert_script", ROOT / "inversion" / "invert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    for name, flip in (("a", False), ("b", True)):
        face, mask = Image.open(FACE), Image.open(FACE_MASK)
        if flip:
            face, mask = (x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for x in (face, mask))
        face.save(tmp_path / "photos" / f"{name}.jpg", quality=95)
        mask.save(tmp_path / "masks" / f"{name}.png")
    script.main(script.parse_args(["--space", str(space_dir), "--base", str(toy_world / "base"), "--imfolder",
                                   str(tmp_path / "photos"), "--mask_dir", str(tmp_path / "masks"), "--epochs", "2",
                                   "--dim", str(K), "--lr", "1", "--device", "cpu", "--save_name", str(tmp_path / "out")]))
    model = load_model(tmp_path / "out" / "w2wmodel.safetensors")
    photos = read_photos(sorted((tmp_path / "photos").iterdir()), sorted((tmp_path / "masks").iterdir()))
    pipe = load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)
    expected = invert(pipe, load_space(space_dir), *photo_targets(photos, *image_sizes(pipe)),
                      InversionConfig(components=K, lr=1.0, steps=2), progress=False)
    assert torch.equal(model.coefficients, expected.coefficients)
    with pytest.raises(W2WError, match="one mask for 2 images; give --mask_dir"):
        script.main(script.parse_args(["--space", str(space_dir), "--imfolder", str(tmp_path / "photos"),
                                       "--mask_path", str(FACE_MASK), "--save_name", str(tmp_path / "out2")]))


def test_a_photo_with_a_face_draws_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_photos([FACE], [AUTO_MASK])


@pytest.mark.slow
def test_the_multi_image_evaluation_scores_each_number_of_views(toy_world, tmp_path):
    """`w2w evaluate`'s multi_image_inversion section, on the toy pipeline with a random space (the figures
    come from the tiny world: files/tiny/README.md)."""
    from lora_w2w.tiny import tables
    from lora_w2w.tiny.evaluator import Evaluator

    from lora_w2w.workbench import Workbench

    toy = load_base_pipeline(str(toy_world / "base"), device="cpu", progress=False)
    space = make_space(LoraLayout.from_unet(toy.unet), k=4)
    settings = tables.Settings(seeds=1, steps=2, inversions=1, inversion_steps=2)
    bench = Workbench(toy_world / "base", space, "cpu", progress=False)
    context = tables.Context(bench, Evaluator.load(ROOT / "files/tiny/evaluator.safetensors"))
    report = tables.evaluate_multi_image_inversion(context, settings)
    assert {"1 view", "3 views", "5 views"} <= set(report) and report["scored_against_views"] == [5, 6, 7, 8, 9]
    for views in ("1 view", "3 views", "5 views"):
        assert -1 <= report[views]["identity_similarity"] <= 1
        assert report[views]["attribute_agreement"] in {a / 13 for a in range(14)}  # 13 attributes of one image
    assert report["config"]["steps"] == 2 and report["identities"] == 1
    assert report["face_detection_rate"] in {n / 10 for n in range(11)}  # the identity's 10 views
    assert "multi_image_inversion" in tables.parse_args([]).only
