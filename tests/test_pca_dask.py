"""The Dask route of the PCA: its task graph at the paper's and SDXL's sizes (built, not computed), its
client-side algebra, and builds on a real dask.distributed cluster: resumed, with a worker killed,
refused before work."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch

from lora_w2w import pca_dask
from lora_w2w.cli import main
from lora_w2w.dataset import WeightsDataset
from lora_w2w.errors import W2WError
from lora_w2w.pca import BuildConfig, build_space
from lora_w2w.pca_dask import Graph, check_workers, orthonormalizer, plan, predict_seconds, task_peaks
from lora_w2w.storage import load_space
from test_pca import WIDE, exact_pca, low_rank_weights, make_dataset

distributed = pytest.importorskip("distributed")

GB = 10**9
FILES = {"basis": "state/basis.safetensors", "next basis": "state/.basis", "result": "state/.result"}


def paper_graph(m: int, n: int, memory: int = 8 * GB) -> Graph:
    p = plan(m, n, 10_000, memory, oversamples=10, power_iterations=4)
    sources = [([("weights-00000.safetensors", 0, r1 - r0)], n, "float32") for r0, r1 in p.row_blocks()]
    return Graph(p, sources, FILES, seed=0, token="test")


@pytest.mark.parametrize("m, n, column_blocks", [(64_974, 99_648, 13), (65_000, 725_760, 89)], ids=["sd15", "sdxl"])
def test_the_graph_at_scale_holds_one_block_per_task(m, n, column_blocks):
    """The paper's 64,974 x 99,648 and SDXL's 65,000 x 725,760 at K = 10,000, with 8 GB workers: blocks
    of 2,048 x 8,192, and every task holds its inputs and output within a few GB whatever M and N."""
    graph = paper_graph(m, n)
    p, width = graph.p, 10_010
    assert (p.rows, p.columns, p.width) == (2048, 8192, width)
    assert (len(p.row_blocks()), len(p.column_blocks())) == (32, column_blocks)
    tasks = [task for phase in graph.phases for task in phase.tasks]
    largest = max(tasks, key=lambda task: task.peak_bytes)
    assert largest.kind == "gram sum" and largest.io_bytes == 3 * 8 * width**2 == 2_404_802_400  # 2 Grams + their sum
    assert largest.peak_bytes == p.peak_bytes and p.worker_bytes < 3.6 * GB
    peaks = task_peaks(p.rows, p.columns, width, p.k)
    for kind in peaks:                                                  # the plan's figures are the graph's
        assert max(t.peak_bytes for t in tasks if t.kind == kind) == peaks[kind], kind
    data = [t for t in tasks if t.kind in ("sketch", "power")]
    assert max(t.io_bytes for t in data) == 8 * 8192 + 4 * width * 8192 + 4 * 2048 * width   # scale, P_j, Y_i
    one_block = max(8 * width**2, 4 * width * p.k, 4 * width * p.columns, 4 * p.rows * width, 4 * p.k * p.columns)
    assert all(block.nbytes <= one_block for t in tasks for block in (*t.inputs, t.output))
    assert sum(t.reads for t in data) == 2 * 4 * 4 * m * n + 4 * m * n          # 4 iterations x 2 passes, + the last

    widths = {phase.name: phase.width for phase in graph.phases}
    blocks = 32 * column_blocks
    assert widths["moments"] == widths["sketch 1"] == widths["power 4"] == widths["sketch"] == blocks
    assert widths["orthonormalize 2.1"] == widths["rotate"] == column_blocks and widths["write"] == column_blocks + 32
    assert [phase.name for phase in graph.phases][-4:] == ["sketch", "rotate", "write", "finish"]

    hours = [predict_seconds(graph, workers, 150e9, 1e9) / 3600 for workers in (1, 4, 16)]
    assert hours[0] > hours[1] > hours[2] and hours[0] / hours[2] > 8


def test_a_worker_under_one_task_is_refused_with_the_figure():
    with pytest.raises(W2WError, match=r"--memory 3 GB per worker is too small .* L = K \+ oversamples = 10010: a "
                                       r"task needs 2.40 GB .* at least 3.53 GB"):
        plan(64_974, 99_648, 10_000, 3 * GB, 10, 4)
    p = plan(64_974, 99_648, 10_000, 8 * GB, 10, 4)
    check_workers({"tcp://a:1": {"memory_limit": 4 * GB, "nthreads": 1}, "tcp://b:1": {"memory_limit": 0}}, p, "s")
    with pytest.raises(W2WError, match=r"dask worker tcp://b:1 has a memory limit of 4.00 GB for 2 thread\(s\), under "
                                       r"the 6.54 GB this plan needs"):
        check_workers({"tcp://b:1": {"memory_limit": 4 * GB, "nthreads": 2}}, p, "s")
    with pytest.raises(W2WError, match="has no workers"):
        check_workers({}, p, "tcp://s:1")
    with pytest.raises(W2WError, match=r"^workers must be an integer >= 1, got 0$"):
        BuildConfig(backend="dask", workers=0)
    with pytest.raises(W2WError, match="^workers sizes a LocalCluster: a scheduler's cluster has its own workers$"):
        BuildConfig(backend="dask", workers=2, scheduler="tcp://s:1")


def test_the_orthonormalizer_takes_cholesky_or_replaces_what_it_cannot_resolve():
    g = np.random.default_rng(0)
    rows = g.standard_normal((20, 500)) * np.logspace(0, -3, 20)[:, None]      # κ = 1e3: CholeskyQR
    matrix, replaced = orthonormalizer(rows @ rows.T)
    q = matrix.astype(np.float64) @ rows
    assert len(replaced) == 0 and np.abs(q @ q.T - np.eye(20)).max() < 1e-3
    rows[15:] = rows[:5]                                                       # rank 15: 5 directions unresolved
    matrix, replaced = orthonormalizer(rows @ rows.T)
    assert len(replaced) == 5
    q = matrix.astype(np.float64) @ rows
    q[replaced] = g.standard_normal((5, 500)) / np.sqrt(500)                  # the workers' fresh rows
    matrix, replaced = orthonormalizer(q @ q.T)                                # the second pass
    q = matrix.astype(np.float64) @ q
    assert len(replaced) == 0 and np.abs(q @ q.T - np.eye(20)).max() < 1e-5


def test_a_product_of_an_unaligned_block_has_the_bits_of_an_aligned_one():
    """distributed may hand a task a block at an unaligned offset of a message; numpy's matmul then sums in
    another order than BLAS: `operand` copies such a block, so a build's bits do not depend on its workers."""
    from lora_w2w import pca_blocks

    g = np.random.default_rng(0)
    z, basis = g.standard_normal((16, 32), dtype=np.float32), g.standard_normal((16, 32), dtype=np.float32)
    message = np.zeros(basis.nbytes + 1, np.uint8)
    unaligned = message[1:].view(np.float32).reshape(basis.shape)
    unaligned[...] = basis
    assert not unaligned.flags.aligned
    assert not np.array_equal(z @ unaligned.T, z @ basis.T)                 # what the build met
    assert np.array_equal(z @ pca_blocks.operand(unaligned).T, z @ basis.T)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GB",
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        yield cluster


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 rows x 32 columns: a 45 x 140 matrix makes 3 x 5 blocks, and sums over 5 blocks two
    levels deep."""
    monkeypatch.setattr(pca_dask, "BLOCK_ROWS", (16,))
    monkeypatch.setattr(pca_dask, "BLOCK_COLUMNS", (32,))


def dask_config(cluster, state, **options) -> BuildConfig:
    return BuildConfig(memory="2GB", backend="dask", scheduler=cluster.scheduler_address, state=state, **options)


@pytest.mark.slow
def test_a_dask_build_killed_in_a_pass_resumes_after_the_last_finished_one(tmp_path, cluster, small_blocks):
    """Interrupted in power iteration 3 of 4: the rerun reads mean, std and P from the state and runs
    iterations 3 and 4 only, to the space an uninterrupted build gives, bit for bit; a rerun once the
    result is written computes nothing. The components match the exact SVD's."""
    weights = low_rank_weights(45, WIDE.numel, seed=5)
    dataset = make_dataset(tmp_path / "data", weights, WIDE, shard_size=8)
    messages = []
    reference = build_space(dataset, 6, config=dask_config(cluster, tmp_path / "reference"), log=messages.append)
    assert "blocks of 16 rows x 32 columns (3 x 5)" in messages[0]

    def interrupt_in_third(message):
        messages.append(message)
        if message.startswith("dask: power 3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_space(dataset, 6, config=dask_config(cluster, tmp_path / "state"), log=interrupt_in_third)
    assert sorted(p.name for p in (tmp_path / "state").iterdir() if not p.name.startswith(".")) == [
        "basis.safetensors", "moments.safetensors"]
    messages.clear()
    space = build_space(dataset, 6, config=dask_config(cluster, tmp_path / "state"), log=messages.append)
    assert "resuming after power iteration 2 of 4" in messages[1]
    assert [m.split(":")[1] for m in messages if m.startswith("dask: power")] == [" power 3", " power 4"]
    for name in ("mean", "std", "components", "coefficients", "explained_variance"):
        assert torch.equal(getattr(space, name), getattr(reference, name)), name
    with mock.patch.object(pca_dask, "_client") as client:
        again = build_space(dataset, 6, config=dask_config(cluster, tmp_path / "state"))
    assert client.call_count == 0 and torch.equal(again.coefficients, reference.coefficients)
    _, _, _, components, _ = exact_pca(weights, 6)
    assert torch.linalg.svdvals(space.components.double() @ components.T).min() > 1 - 1e-5


@pytest.mark.slow
def test_a_dask_build_survives_a_killed_worker(tmp_path, cluster, small_blocks):
    """A worker killed (SIGKILL) while it holds blocks of G = P Zᵀ Z of iteration 2: the scheduler remakes
    them from the basis file and the data, and the space is the one an undisturbed build gives, bit for bit."""
    dataset = make_dataset(tmp_path / "data", low_rank_weights(45, WIDE.numel, seed=6), WIDE, shard_size=8)
    reference = build_space(dataset, 6, config=dask_config(cluster, tmp_path / "reference"))
    with distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
    killed = []

    def kill_a_worker(message):
        if message.startswith("dask: power 2") and not killed:
            killed.append(next(iter(pids.values())))
            os.kill(killed[0], signal.SIGKILL)

    space = build_space(dataset, 6, config=dask_config(cluster, tmp_path / "state"), log=kill_a_worker)
    assert killed
    for name in ("components", "coefficients", "explained_variance"):
        assert torch.equal(getattr(space, name), getattr(reference, name)), name


def errors(text: str) -> list[str]:
    """The lines of stderr that are not progress."""
    return [line for line in text.splitlines() if not line.startswith(("plan:", "mean and std", "resuming"))]


@pytest.mark.slow
def test_the_cli_resumes_a_killed_dask_build_and_refuses_what_cannot_run(tmp_path, cluster, capfd):
    """`w2w build --backend dask` killed (SIGKILL) once power iteration 3 wrote P, before it is put in
    place, then run again: it resumes after iteration 2, to the space of an uninterrupted build. An
    unreachable scheduler and workers with too little memory: one line each, before any work."""
    dataset = make_dataset(tmp_path / "data", low_rank_weights(45, WIDE.numel, seed=7), WIDE, shard_size=8)
    args = ["build", str(tmp_path / "data"), str(tmp_path / "space"), "-k", "6", "--backend", "dask",
            "--memory", "2GB", "--scheduler", cluster.scheduler_address]
    script = textwrap.dedent(f"""
        import os, signal
        from lora_w2w import pca_dask
        commit = pca_dask._Run.commit_basis
        def commit_then_die(self, phase, needs):
            if phase.iteration == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(self, phase, needs)
        pca_dask._Run.commit_basis = commit_then_die
        from lora_w2w.cli import main
        main({args!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert main(args) == 0
    assert "resuming after power iteration 2 of 4" in capfd.readouterr().err   # the 3rd was not committed
    reference = build_space(WeightsDataset(tmp_path / "data"), 6, config=dask_config(cluster, tmp_path / "reference"))
    space = load_space(tmp_path / "space")
    assert torch.equal(space.components, reference.components) and not (tmp_path / "space.build-state").exists()

    with mock.patch.object(pca_dask, "CONNECT_TIMEOUT", 1), pytest.raises(SystemExit, match="2"):
        main([*args[:-1], "tcp://127.0.0.1:1"])
    (error,) = errors(capfd.readouterr().err)
    assert error.startswith("w2w: error: dask scheduler tcp://127.0.0.1:1: cannot connect")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit="300MB",
                                  dashboard_address=":0") as small, \
            pytest.raises(SystemExit, match="2"):
        main([*args[:-1], small.scheduler_address])
    (error,) = errors(capfd.readouterr().err)
    assert "has a memory limit of 0.30 GB for 1 thread(s), under the 0.52 GB this plan needs" in error
