"""PCA of a weights dataset: every route against an exact SVD, streaming within the budget, faults."""
import dataclasses
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from lora_w2w.cli import main
from lora_w2w.dataset import WeightsDataset, add_models, matrix_source
from lora_w2w.errors import FileFormatError, SpaceError, W2WError
from lora_w2w.layout import LoraLayer, LoraLayout
from lora_w2w import pca
from lora_w2w.pca import OVERHEAD_BYTES, BuildConfig, Moments, build_space, parse_memory, plan
from lora_w2w.storage import load_space

WIDE = LoraLayout((LoraLayer("a.to_q", 40, 30), LoraLayer("a.to_v", 40, 30)))  # N = 140 > M
NARROW = LoraLayout((LoraLayer("a.to_q", 9, 7), LoraLayer("a.to_v", 9, 7)))     # N = 32 < M
K = 6


def low_rank_weights(m: int, n: int, rank: int = 10, seed: int = 0) -> torch.Tensor:
    """Low rank plus noise (M, N) with decaying scales, column means and scales, 2 constant columns."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.8, -0.3, rank)
    weights = (torch.randn(m, rank, generator=g) * scales) @ torch.randn(rank, n, generator=g)
    weights += 0.02 * torch.randn(m, n, generator=g)
    weights = weights * (0.01 + torch.rand(n, generator=g)) + torch.randn(n, generator=g)
    weights[:, :2] = 0.25
    return weights


def make_dataset(path, weights, layout, shard_size=16):
    names = [f"id{i:03d}" for i in range(len(weights))]
    return add_models(path, matrix_source(weights, names), layout, "base/model", shard_size).dataset


def exact_pca(weights: torch.Tensor, k: int):
    """(mean, std, explained variance (K,), components (K, N)) by torch.linalg.svd in float64."""
    w = weights.double()
    mean, std = w.mean(0), w.std(0)
    z = (w - mean) / torch.where(std > 0, std, torch.ones_like(std))
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    return mean, std, s[:k] ** 2 / (len(w) - 1), vh[:k], z


@pytest.mark.parametrize("layout, m, options", [
    (WIDE, 50, dict(method="exact")),            # Gram Z Zᵀ (M x M) over column slabs
    (NARROW, 70, dict(method="exact")),          # covariance Zᵀ Z (N x N) over row chunks
    (WIDE, 50, dict(method="randomized")),
    (WIDE, 50, dict(backend="dask")),
], ids=["exact-models", "exact-weights", "randomized", "dask"])
@pytest.mark.slow
def test_every_route_matches_an_exact_svd(tmp_path, layout, m, options):
    weights = low_rank_weights(m, layout.numel)
    dataset = make_dataset(tmp_path / "data", weights, layout)
    space = build_space(dataset, K, config=BuildConfig(memory="2GB", **options))
    mean, std, variance, components, z = exact_pca(weights, K)
    assert torch.allclose(space.mean.double(), mean, atol=1e-6) and torch.allclose(space.std.double(), std, atol=1e-6)
    assert torch.equal(space.std[:2], torch.zeros(2))                                  # zero variance kept as 0
    assert ((space.explained_variance.double() - variance).abs() / variance).max() < 1e-3
    cosines = torch.linalg.svdvals(space.components.double() @ components.T)          # of the principal angles
    assert cosines.min() > 1 - 1e-5
    gram = space.components.double() @ space.components.double().T                   # orthonormal rows
    torch.testing.assert_close(gram, torch.eye(K, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(space.coefficients.double(), z @ space.components.double().T, atol=1e-4, rtol=1e-4)
    assert space.components[:, :2].abs().max() < 1e-6                                   # no weight on constant columns
    largest = space.components.abs().argmax(1)
    assert (space.components.gather(1, largest[:, None]) > 0).all()                   # sign convention
    assert space.base_model == "base/model" and space.num_models == m


def test_rebuilds_are_identical_and_the_cli_writes_the_space(tmp_path, capsys):
    weights = low_rank_weights(40, WIDE.numel, seed=1)
    dataset = make_dataset(tmp_path / "data", weights, WIDE)
    names = list(dataset.names)
    table = pd.DataFrame({"Male": [1, -1] * 20, "Bald": [-1] * 40}, index=pd.Index(names, name="name"))
    table.sample(frac=1, random_state=0).to_csv(tmp_path / "attributes.csv")           # rows in another order
    first = build_space(dataset, K, config=BuildConfig(method="randomized", attributes=tmp_path / "attributes.csv"))
    assert main(["build", str(tmp_path / "data"), str(tmp_path / "space"), "--components", str(K), "--method",
                 "randomized", "--attributes", str(tmp_path / "attributes.csv"), "--base-model", "other"]) == 0
    assert "wrote space" in capsys.readouterr().out
    second = load_space(tmp_path / "space")
    for name in ("mean", "std", "components", "coefficients", "explained_variance"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert list(second.attributes.index) == names and list(second.attributes["Male"]) == [1, -1] * 20
    assert second.base_model == "other" and second.id == first.id


def test_streams_in_chunks_within_the_memory_budget(tmp_path, monkeypatch):
    layout = LoraLayout((LoraLayer("a.to_q", 300, 200), LoraLayer("a.to_v", 300, 200)))   # N = 1000
    weights = low_rank_weights(64, layout.numel)                                          # 256 kB
    dataset = make_dataset(tmp_path / "data", weights, layout, shard_size=64)
    rows, columns = [], []
    read_rows, read_columns = WeightsDataset.read_rows, WeightsDataset.read_columns
    monkeypatch.setattr(WeightsDataset, "read_rows",
                        lambda self, a, b, out=None: rows.append(b - a) or read_rows(self, a, b, out))
    monkeypatch.setattr(WeightsDataset, "read_columns",
                        lambda self, a, b: columns.append(b - a) or read_columns(self, a, b))
    budget = OVERHEAD_BYTES + 300_000
    _, _, variance, _, _ = exact_pca(weights, K)
    for method in ("exact", "randomized"):
        p = plan(64, layout.numel, K, budget, method)
        assert p.peak_bytes <= budget - OVERHEAD_BYTES and p.rows < 64, p
        rows.clear(), columns.clear()
        space = build_space(dataset, K, config=BuildConfig(memory=budget, method=method))
        assert max(rows) <= p.rows and max(columns, default=0) <= max(p.columns, 1) < layout.numel, (p, rows, columns)
        assert ((space.explained_variance.double() - variance).abs() / variance).max() < 1e-3
    with pytest.raises(W2WError, match="too small for K = 6 .* needs at least"):
        plan(64, layout.numel, K, OVERHEAD_BYTES + 1000)


def test_the_route_follows_the_cost_model():
    gib = 2**30
    assert plan(8000, 99_648, 1000, 4 * gib).method == "exact"          # the benchmark's shape: Gram of 0.5 GB
    full = plan(64_974, 99_648, 10_000, 20 * gib)                       # the released matrix: Gram of 34 GB
    assert full.method == "randomized" and full.peak_bytes < 20 * gib - OVERHEAD_BYTES
    assert plan(2000, 500, 200, gib).side == "weights"                  # N < M: the N x N covariance
    assert [parse_memory(t) for t in ("4GB", "512MiB", "1.5e9", 100)] == [4 * 10**9, 512 * 2**20, 1_500_000_000, 100]
    with pytest.raises(W2WError, match="expected a size"):
        parse_memory("lots")


def test_moments_match_numpy_chunk_by_chunk():
    x = torch.randn(37, 5, dtype=torch.float64) * 1e-3 + 1e3                      # a large mean, a small spread
    moments = Moments(5)
    for i in range(0, 37, 8):
        moments.update(x[i:i + 8].float())
    np.testing.assert_allclose(moments.std().numpy(), x.float().double().numpy().std(0, ddof=1), rtol=1e-9)


def test_bad_datasets_are_refused_with_clear_messages(tmp_path):
    weights = low_rank_weights(12, WIDE.numel)
    dataset = make_dataset(tmp_path / "data", weights, WIDE, shard_size=5)
    with pytest.raises(SpaceError, match="K = 12 components need at least K \\+ 1 = 13 models.*M = 12"):
        build_space(dataset, 12)
    rank3 = make_dataset(tmp_path / "rank3", weights[:4].repeat(3, 1), WIDE)       # 4 distinct rows: rank 3
    for method in ("exact", "randomized"):
        with pytest.raises(SpaceError, match="only 3 components carry variance"):
            build_space(rank3, 5, config=BuildConfig(method=method))

    table = pd.DataFrame({"Male": [1] * 12}, index=pd.Index(dataset.names, name="name"))
    table.iloc[:11].to_csv(tmp_path / "short.csv")
    with pytest.raises(FileFormatError, match="1 dataset models have no row, e.g. 'id011'"):
        build_space(dataset, K, config=BuildConfig(attributes=tmp_path / "short.csv"))
    pd.concat([table, pd.DataFrame({"Male": [1]}, index=["stranger"])]).to_csv(tmp_path / "long.csv")
    with pytest.raises(FileFormatError, match="1 rows name no dataset model, e.g. 'stranger'"):
        build_space(dataset, K, config=BuildConfig(attributes=tmp_path / "long.csv"))

    shard = tmp_path / "data" / dataset.shards[1].file                           # rows 5..9
    header_end = shard.stat().st_size - 4 * 5 * WIDE.numel
    with open(shard, "r+b") as f:                                                 # row 7 corrupted on disk
        f.seek(header_end + 4 * (2 * WIDE.numel + 3))
        f.write(np.float32(np.nan).tobytes())
    for backend in ("torch", "dask"):
        with pytest.raises(SpaceError, match="model 'id007' \\(row 7\\) holds NaN/inf"):
            build_space(WeightsDataset(tmp_path / "data"), K, config=BuildConfig(backend=backend))


@pytest.mark.slow
def test_a_build_killed_midway_leaves_nothing_and_the_rerun_gives_the_same_space(tmp_path):
    weights = low_rank_weights(30, WIDE.numel, seed=2)
    make_dataset(tmp_path / "data", weights, WIDE)
    args = ["build", str(tmp_path / "data"), str(tmp_path / "space"), "--components", str(K)]
    script = textwrap.dedent(f"""
        import os, signal
        import lora_w2w.storage as storage
        copy = storage._copy_blocks
        calls = []
        def copy_then_die(*args):
            calls.append(1)
            if len(calls) == 5:          # the state's mean and std, the space's mean and std written: killed
                os.kill(os.getpid(), signal.SIGKILL)
            copy(*args)
        storage._copy_blocks = copy_then_die
        from lora_w2w.cli import main
        main({args!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "space").exists()                                      # only a hidden partial folder
    assert list(tmp_path.glob(".space.partial-*"))
    assert main(args) == 0
    assert not list(tmp_path.glob(".space.partial-*"))                          # the rerun removed it
    rebuilt = load_space(tmp_path / "space")
    reference = build_space(WeightsDataset(tmp_path / "data"), K)
    for name in ("mean", "std", "components", "coefficients", "explained_variance"):
        assert torch.equal(getattr(rebuilt, name), getattr(reference, name)), name


def test_a_randomized_build_killed_in_a_pass_resumes_after_the_last_finished_one(tmp_path):
    """Killed in power iteration 3 of 4: the rerun reads mean, std and P from the state and runs
    iterations 3 and 4 only, and the space is the one an uninterrupted build gives, bit for bit."""
    dataset = make_dataset(tmp_path / "data", low_rank_weights(40, WIDE.numel, seed=3), WIDE)
    config = BuildConfig(method="randomized", power_iterations=4, state=tmp_path / "state")
    reference = build_space(dataset, K, config=BuildConfig(method="randomized", power_iterations=4))
    product = pca._power_product
    calls = []

    def killed_in_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return product(*args)

    with mock.patch.object(pca, "_power_product", side_effect=killed_in_third), pytest.raises(KeyboardInterrupt):
        build_space(dataset, K, config=config)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["basis.safetensors", "moments.safetensors"]
    with mock.patch.object(pca, "_power_product", wraps=product) as resumed, \
            mock.patch.object(pca, "_column_moments", wraps=pca._column_moments) as moments:
        space = build_space(dataset, K, config=config)
    assert resumed.call_count == 2 and moments.call_count == 0
    for name in ("mean", "std", "components", "coefficients", "explained_variance"):
        assert torch.equal(getattr(space, name), getattr(reference, name)), name
    # the state of another build (another seed) is not used: a warning, and the other build's own space
    with pytest.warns(UserWarning, match="the state of another build"):
        other = build_space(dataset, K, config=dataclasses.replace(config, seed=1))
    alone = build_space(dataset, K, config=BuildConfig(method="randomized", power_iterations=4, seed=1))
    assert torch.equal(other.components, alone.components)


def test_the_cli_keeps_the_build_state_beside_out_until_the_space_is_written(tmp_path, capsys):
    make_dataset(tmp_path / "data", low_rank_weights(40, WIDE.numel, seed=4), WIDE)
    (tmp_path / "space.build-state").mkdir()
    (tmp_path / "space.build-state" / "moments.safetensors").write_bytes(b"garbage")  # ignored, with a warning
    assert main(["build", str(tmp_path / "data"), str(tmp_path / "space"), "--components", str(K),
                 "--method", "randomized"]) == 0
    assert "unreadable build state ignored" in capsys.readouterr().err
    assert load_space(tmp_path / "space").num_components == K and not (tmp_path / "space.build-state").exists()
    with pytest.raises(SystemExit, match="2"):                              # an overflowing size: one line
        main(["build", str(tmp_path / "data"), str(tmp_path / "space"), "--components", str(K), "--memory", "1e999GB"])
    assert capsys.readouterr().err == ("w2w build: error: argument --memory: memory '1e999GB': expected a size from 1 byte "
                                       "up to 1 PiB (no machine has more)\n")


def test_a_float16_dataset_builds_the_space_of_its_rounded_weights(tmp_path):
    weights = low_rank_weights(50, WIDE.numel)
    names = [f"id{i:03d}" for i in range(len(weights))]
    half = add_models(tmp_path / "f16", matrix_source(weights, names), WIDE, "base/model", 16, dtype="float16").dataset
    single = make_dataset(tmp_path / "f32", weights.half().float(), WIDE)
    for method in ("exact", "randomized"):
        a, b = (build_space(d, K, config=BuildConfig(method=method)) for d in (half, single))
        assert torch.equal(a.components, b.components) and torch.equal(a.coefficients, b.coefficients)
