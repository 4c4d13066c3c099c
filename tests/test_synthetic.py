"""The procedural faces of the tiny world: determinism, attribute statistics, identity vs view,
the dataset on disk (resumable), captions, speed."""

import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_w2w.tiny import synthetic
from lora_w2w.tiny.synthetic import (ATTRIBUTES, CAPTION_WORDS, HAIR_COLOURS, TRAITS, caption,
                                 dataset_view_seed, render, sample_identity, view_smiling,
                                 write_dataset)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def population() -> pd.DataFrame:
    """Attribute rows of 2,000 sampled identities."""
    return pd.DataFrame([synthetic.attribute_row(sample_identity(seed)) for seed in range(2000)])


def test_identity_fields():
    person = sample_identity(5)
    assert person.name == "000005" and sample_identity(5, name="bob").name == "bob"
    assert tuple(person.attributes) == ATTRIBUTES
    assert person.traits.shape == (len(TRAITS),) and person.traits.dtype == np.float32
    assert 8 <= len(TRAITS) <= 14
    assert np.all((person.traits >= 0) & (person.traits <= 1)), person.traits


def test_render_is_deterministic_and_seeds_matter():
    person = sample_identity(3)
    image = render(person, view_seed=11)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert render(person, view_seed=11, size=32).size == (32, 32)
    np.testing.assert_array_equal(pixels(image), pixels(render(sample_identity(3), 11)))
    assert np.abs(pixels(image) - pixels(render(person, 12))).mean() > 5       # another view
    other_person = render(sample_identity(4), 11)
    assert np.abs(pixels(image) - pixels(other_person)).mean() > 5


def test_smiling_is_drawn_per_view_and_can_be_forced():
    person = sample_identity(8)
    for view_seed in range(6):
        forced = render(person, view_seed, smiling=view_smiling(view_seed))
        np.testing.assert_array_equal(pixels(render(person, view_seed)), pixels(forced))
    assert np.abs(pixels(render(person, 0, smiling=True)) -
                  pixels(render(person, 0, smiling=False))).max() > 100  # an open mouth shows
    share = np.mean([view_smiling(seed) for seed in range(2000)])
    assert 0.45 < share < 0.55, share


def test_attribute_rules(population: pd.DataFrame):
    p = population
    hair = (p[list(HAIR_COLOURS)] == 1).sum(axis=1)
    assert np.all(hair[p.Bald == 1] == 0) and np.all(hair[p.Bald == -1] == 1)
    assert p[list(ATTRIBUTES)].isin([1, -1]).all().all()
    male, young = p.Male == 1, p.Young == 1
    assert (p.No_Beard[~male] == -1).mean() < 0.05
    assert (p.Mustache[~male] == 1).mean() < 0.05
    assert (p.No_Beard[male] == -1).mean() > 0.3
    assert (p.Gray_Hair[young] == 1).mean() < 0.03 < 0.2 < (p.Gray_Hair[~young] == 1).mean()
    assert (p.Bald[male & ~young] == 1).mean() > 5 * (p.Bald[young | ~male] == 1).mean()
    assert not ((p.Bald == 1) & (p.Wearing_Hat == 1)).any()  # a hat would hide baldness
    for name, low, high in (("Male", 0.35, 0.5), ("Young", 0.7, 0.8), ("Eyeglasses", 0.15, 0.25),
                            ("Pale_Skin", 0.25, 0.35), ("Wearing_Hat", 0.07, 0.13),
                            ("Chubby", 0.11, 0.19), ("Bald", 0.02, 0.08)):
        assert low < (p[name] == 1).mean() < high, (name, (p[name] == 1).mean())
    # Traits that attributes pin down do not overlap between the two groups.
    assert p.skin_tone[p.Pale_Skin == 1].min() > p.skin_tone[p.Pale_Skin == -1].max()
    assert p.face_width[p.Chubby == 1].min() > p.face_width[p.Chubby == -1].max()


def test_views_of_one_identity_are_closer_than_other_identities():
    people, views = 10, 4
    images = np.stack([[pixels(render(sample_identity(seed), dataset_view_seed(seed, k)))
                        for k in range(views)] for seed in range(people)])  # (P, V, 64, 64, 3)
    flat = images.reshape(people * views, -1)
    distance = np.abs(flat[:, None] - flat[None]).mean(-1)  # (P*V, P*V)
    same = np.kron(np.eye(people, dtype=bool), np.ones((views, views), dtype=bool))
    off_diagonal = ~np.eye(people * views, dtype=bool)
    within, between = distance[same & off_diagonal].mean(), distance[~same].mean()
    assert within > 10, within  # the views do differ (pose, background, light)
    assert within < 0.8 * between, (within, between)


def test_captions_use_the_vocabulary_and_tell_the_attributes():
    for seed in range(300):
        person = sample_identity(seed)
        for smiling in (False, True):
            words = caption(person, smiling).split()
            assert set(words) <= set(CAPTION_WORDS), caption(person, smiling)
            a = person.attributes
            assert ("smiling" in words) == smiling
            assert ("man" in words) == a["Male"] and ("old" in words) == (not a["Young"])
            assert ("beard" in words) == (not a["No_Beard"])
            for name, word in (("Eyeglasses", "glasses"), ("Mustache", "mustache"),
                               ("Bald", "bald"), ("Wearing_Hat", "hat"), ("Pale_Skin", "pale"),
                               ("Chubby", "chubby"), ("Blond_Hair", "blond"),
                               ("Gray_Hair", "gray")):
                assert (word in words) == a[name], (name, caption(person))


def test_write_dataset_matches_folders_and_resumes(tmp_path, monkeypatch):
    calls = []
    real_render = synthetic.render
    def counting_render(identity, *args, **kwargs):
        calls.append(identity.name)
        return real_render(identity, *args, **kwargs)

    monkeypatch.setattr(synthetic, "render", counting_render)
    options = dict(images_per_identity=2, size=32, progress=False)

    table = write_dataset(tmp_path, 3, first_seed=10, **options)
    names = ["000010", "000011", "000012"]
    assert list(table.index) == names and table.index.name == "name"
    assert list(table.columns) == list(ATTRIBUTES) + list(TRAITS)
    assert table[list(ATTRIBUTES)].isin([1, -1]).all().all()
    assert sorted(p.name for p in (tmp_path / "celeba_generated").iterdir()) == names
    for name in names:
        files = sorted(p.name for p in (tmp_path / "celeba_generated" / name).iterdir())
        assert files == ["0.png", "1.png"], files
        male = sample_identity(int(name)).attributes["Male"]
        assert table.loc[name, "Male"] == (1 if male else -1)
    on_disk = pd.read_csv(tmp_path / "attributes.csv", dtype={"name": str}).set_index("name")
    pd.testing.assert_frame_equal(on_disk, table)
    image = Image.open(tmp_path / "celeba_generated" / "000011" / "1.png")
    np.testing.assert_array_equal(pixels(image), pixels(real_render(
        sample_identity(11), dataset_view_seed(11, 1), 32)))
    shots = pd.read_csv(tmp_path / "images.csv", dtype={"name": str})
    assert len(shots) == 6
    assert list(shots.Smiling) == [1 if view_smiling(s) else -1 for s in shots.view_seed]
    assert len(calls) == 6

    calls.clear()  # complete folders are skipped, a half-written one is redone
    (tmp_path / "celeba_generated" / "000011" / "1.png").unlink()
    write_dataset(tmp_path, 3, first_seed=10, **options)
    assert calls == ["000011", "000011"]
    assert (tmp_path / "celeba_generated" / "000011" / "1.png").is_file()

    calls.clear()  # a later range adds rows and keeps the earlier ones
    table = write_dataset(tmp_path, 2, first_seed=12, **options)
    assert list(table.index) == names + ["000013"] and calls == ["000013", "000013"]
    assert not list(tmp_path.rglob(".*.partial-*"))  # no temporary file is left behind


def test_render_speed():
    people = [sample_identity(seed) for seed in range(20)]
    render(people[0], 0)  # warm up
    best = np.inf
    for _ in range(3):  # CPU time of this process: other processes on a busy machine do not count
        start = time.process_time()
        for i, person in enumerate(people):
            render(person, i)
        best = min(best, (time.process_time() - start) / len(people))
    assert best < 0.005, f"{best * 1e3:.2f} ms per 64 px image"


def test_command_line(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    synthetic.main(synthetic.parse_args(["--out", str(tmp_path / "data"), "--num", "2", "--size", "32",
                                 "--images-per-identity", "1", "--grid", str(grid)]))
    assert Image.open(grid).size[1] == 32
    with pytest.raises(SystemExit) as exit_info:
        synthetic.parse_args(["--out", str(tmp_path), "--num", "0"])
    assert exit_info.value.code == 2
    assert "--num" in capsys.readouterr().err
