"""The benchmarks run, cut to the smallest sizes, and end with their JSON line (their figures are
measured by `make bench-*`, not here: a test only keeps them from rotting)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

ROOT = Path(__file__).resolve().parents[1]


def last_json(script: str, *flags: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_invert():
    result = last_json("bench_invert.py", "--steps", "2", "--repeats", "1", "--generate-steps", "2")
    assert result["benchmark"] == "invert" and result["steps"] == 2
    assert result["ratio"] == pytest.approx(result["step_ms"] / result["baseline_step_ms"], abs=1e-3)
    assert 0 < result["ratio_floor_by_caching"] < 1 and result["generate_ratio"] > 0


def test_bench_train():
    result = last_json("bench_train.py", "--identities", "2", "--solo-identities", "1", "--steps", "2",
                       "--class-images", "2")
    assert result["benchmark"] == "train" and (result["identities"], result["solo_identities"]) == (2, 1)
    assert result["ratio"] == pytest.approx(result["identities_per_hour"] / result["baseline_identities_per_hour"],
                                            rel=0.01)
    assert result["step_ratio"] > 0 and result["step_ratio_ceiling"] > 0


def test_bench_pca(tmp_path):
    result = last_json("bench_pca.py", "--models", "60", "--components", "8", "--work", str(tmp_path))
    assert result["benchmark"] == "pca" and set(result["results"]) == {"project", "project-randomized", "sklearn",
                                                                       "torch"}
    assert result["results"]["project"]["variance_max_relative_error"] == 0  # the reference
    assert all(r["subspace_captured"] > 0.99 for r in result["results"].values())


@pytest.mark.slow
def test_bench_pca_dask(tmp_path):
    result = last_json("bench_pca.py", "--dask", "--models", "60", "--components", "8", "--work", str(tmp_path))
    assert set(result["results"]) == {"project", "dask-1", "dask-2"} and result["dask_speedup"] > 0
    assert result["dask_time_ratio"] == pytest.approx(result["results"]["dask-2"]["seconds"]
                                                      / result["results"]["project"]["seconds"])
    assert all(r["subspace_captured"] > 0.99 for r in result["results"].values())
    assert result["dask_bitwise_equal"] and len(result["load_average"]) == 2
    plan = last_json("bench_pca.py", "--dask-plan", "--memory", "8GB")["shapes"]
    assert plan["SD1.5 (the paper)"]["largest_task_io_bytes"] == 3 * 8 * 10_010**2     # two L x L Grams and their sum
    hours = plan["SDXL"]["predicted_hours"]
    assert hours["1"] > hours["4"] > hours["16"]


@pytest.mark.slow
def test_bench_faces():
    result = last_json("bench_faces.py", "--renders", "2", "--cnn-renders", "1", "--repeats", "1")
    assert result["benchmark"] == "faces" and result["renders"] == {"lbp_cascade": 2, "dlib_hog": 2, "dlib_cnn": 1}
    per_render = result["seconds_per_render"]
    assert result["ratio"] == pytest.approx(per_render["dlib_hog"] / per_render["lbp_cascade"])
    assert all(0 <= rate <= 1 for rate in result["detection_rate"].values())
    assert set(result["seconds_per_image"]) == {"astronaut", "grace_hopper"}


def test_bench_outputs():
    result = last_json("bench_outputs.py", "--seeds", "40", "--baseline-seeds", "10", "--pairwise-seeds", "20",
                       "--repeats", "1")
    assert result["benchmark"] == "outputs" and (result["seeds"], result["baseline_seeds"]) == (40, 10)
    assert result["ratio"] > 0 and result["pairwise_ratio"] > 0


def test_bench_import():
    result = last_json("bench_import.py", "--repeats", "1")
    assert result["benchmark"] == "import" and result["repeats"] == 1
    assert result["ratio"] == pytest.approx(result["lazy_s"] / result["eager_s"], abs=1e-3) and result["ratio"] < 1
