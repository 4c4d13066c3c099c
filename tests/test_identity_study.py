"""The identity study's choice of identities: held-out seeds, and with --having only those with the
asked attribute values, an equal share each."""
import pytest

from lora_w2w.errors import W2WError
from lora_w2w.tiny.synthetic import sample_identity, write_dataset
from lora_w2w.tiny.identity_study import STUDY_SEEDS, parse_having, study_seeds


def test_study_seeds_have_the_asked_attribute_values():
    assert study_seeds(3, {}) == [STUDY_SEEDS, STUDY_SEEDS + 1, STUDY_SEEDS + 2]
    having = parse_having(["Blond_Hair=1", "No_Beard=-1", "Bald=+1"])
    assert having == {"Blond_Hair": True, "No_Beard": False, "Bald": True}
    seeds = study_seeds(7, having)
    assert len(set(seeds)) == 7 and min(seeds) >= STUDY_SEEDS
    shares = [seeds[:3], seeds[3:5], seeds[5:]]  # 7 = 3 + 2 + 2
    for share, (name, value) in zip(shares, having.items()):
        assert all(sample_identity(seed).attributes[name] == value for seed in share)
    for bad in (["Blond_Hair"], ["Blond_Hair=2"], ["Blonde=1"]):
        with pytest.raises(W2WError, match="expected ATTRIBUTE=1 or ATTRIBUTE=-1"):
            parse_having(bad)


def test_write_dataset_writes_the_given_seeds(tmp_path):
    table = write_dataset(tmp_path, 0, images_per_identity=1, size=16, progress=False, seeds=[7, 3])
    assert list(table.index) == [sample_identity(3).name, sample_identity(7).name]  # sorted by name
    assert all((tmp_path / "celeba_generated" / name / "0.png").is_file() for name in table.index)


def test_the_study_scores_the_lora_of_each_identity_it_trained(tmp_path):
    from lora_w2w.tiny import identity_study

    args = identity_study.parse_args([
        "--identities", "2", "--samples", "1", "--inference_steps", "2", "--images_per_identity", "2",
        "--threads", "1", "--out", str(tmp_path / "study"), "--having", "Blond_Hair=1", "No_Beard=-1",
        "--max_train_steps", "1", "--num_class_images", "2", "--class_inference_steps", "2"])
    result = identity_study.main(args)
    assert result["identities"] == 2 and result["config"]["having"] == {"Blond_Hair": 1, "No_Beard": -1}
    assert set(result["rendered"]) == {"Blond_Hair=1", "No_Beard=-1"}
    assert all(0 <= share <= 1 for pair in result["rendered"].values() for share in pair)
    assert (tmp_path / "study" / "study.png").is_file()
