"""Benchmark: the project's streamed PCA against in-memory randomized PCA (scikit-learn, torch).

    make bench-pca                                         # M = 8,000, N = 99,648, K = 1,000
    python benchmarks/bench_pca.py --threads 1             # the same, one BLAS thread for every method
    python benchmarks/bench_pca.py --models 2000 --components 250 --work /tmp/bench_pca   # a quick look
    python benchmarks/bench_pca.py --dask                  # the Dask route, 1 and 2 workers, against the default
    python benchmarks/bench_pca.py --dask-plan             # the Dask route's graph at the paper's and SDXL's sizes

A synthetic low-rank-plus-noise matrix W (M x N) is written to disk as a weights dataset (kept in
--work and reused). Its standardized spectrum decays slowly like a real weight space: a signal of
rank 1.5 K with variances proportional to 1/i, plus Gaussian noise whose largest sample eigenvalue
lies a few times below the K-th signal one. Each method runs in its own subprocess, which reports
its wall time and its peak resident memory (resource.getrusage in the child; the parent stays a bare
interpreter, since a child's ru_maxrss starts from its parent's size at the fork), so peaks do not
mix:
- project:            `build_space(dataset, K, memory=--memory)`, streamed from disk (the route its
                      cost model picks);
- project-randomized: the same with method="randomized" (the route of larger matrices);
- sklearn:            W read into memory, standardized, PCA(svd_solver="randomized").fit;
- torch:              W read into memory, standardized, torch.svd_lowrank(Z, q=K + 10, niter=4);
- dask-1, dask-2:     `build_space` with backend="dask" on a LocalCluster of 1 or 2 worker processes of one
                      thread and --memory each (`--dask` runs these and `project`; the peak memory is the
                      client's, the workers' is not counted).
Every time includes reading the data and computing mean and std (and starting the Dask cluster); "cores"
is the CPU time of the child and of its finished children (the Dask workers) over the wall time. Accuracy is measured against the
project's exact route (itself checked against torch.linalg.svd in tests/test_pca.py): relative error
of each explained variance, the fraction of the exact top-K subspace captured (mean cos² of the
principal angles) and the largest principal angle among the top K/2 components.

The last line printed is one JSON object: {"benchmark": "pca", "memory_ratio": project peak /
sklearn peak, "time_ratio": project time / sklearn time, "dask_speedup": dask-1 time / dask-2 time,
"dask_time_ratio": dask-2 time / project time, ...}.

`--dask-plan` computes nothing: it builds the Dask route's task graph (`pca_dask.Graph`) at the paper's
shape (64,974 x 99,648) and SDXL's (65,000 x 725,760), K = 10,000, with --memory per worker, and prints
its blocks, the largest task, the tasks per phase and the time `pca_dask.predict_seconds` predicts for
1, 4 and 16 workers, with this core's float32 matmul rate measured in the same run and --disk-bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, in the child processes: the parent stays small (see above)
    import torch

METHODS = ("project", "project-randomized", "sklearn", "torch", "dask-1", "dask-2")
DEFAULT_METHODS = METHODS[:4]
DASK_METHODS = ("project", "dask-1", "dask-2")
REFERENCE = "project"
SHAPES = {"SD1.5 (the paper)": (64_974, 99_648), "SDXL": (65_000, 725_760)}   # --dask-plan, at K = 10,000


# ----------------------------------------------------------------------------- the synthetic matrix

class LowRankPlusNoise:
    """W (M, N) = (G diag(s)) B + noise, scaled and shifted per column; rows made block by block from
    a seed, so any row range is reproducible. s_i = i^(-1/2) for i <= rank; B (rank, N) has unit rows."""

    def __init__(self, m: int, n: int, rank: int, noise: float, block: int, seed: int = 0):
        import torch

        self.shape = (m, n)
        self.rank, self.noise, self.block, self.seed = rank, noise, block, seed
        g = torch.Generator().manual_seed(seed)
        self.basis = torch.randn(rank, n, generator=g) / n ** 0.5                        # (rank, N)
        self.scales = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5            # (rank,)
        self.column_scale = 0.005 + 0.02 * torch.rand(n, generator=g)                   # (N,) like LoRA weights
        self.column_mean = 0.01 * torch.randn(n, generator=g)                           # (N,)

    def __getitem__(self, rows: slice) -> "torch.Tensor":
        import torch

        start, stop, _ = rows.indices(self.shape[0])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start + 1)
        z = (torch.randn(stop - start, self.rank, generator=g) * self.scales) @ self.basis   # (r, N)
        z += self.noise * torch.randn(stop - start, self.shape[1], generator=g)
        return z * self.column_scale + self.column_mean


def make_dataset(work: Path, m: int, n: int, k: int) -> Path:
    """The benchmark's weights dataset in work/data (made once; reused while the parameters match)."""
    from lora_w2w.dataset import add_models, matrix_source
    from lora_w2w.layout import sd15_layout

    path, stamp = work / "data", work / "data.json"
    rank = (3 * k) // 2
    noise = (k ** -0.5) / 3 / (n / m) ** 0.5 / (1 + (m / n) ** 0.5)  # noise edge ~ 1/9 of the K-th variance
    parameters = {"models": m, "weights": n, "rank": rank, "noise": noise}
    if stamp.is_file() and json.loads(stamp.read_text()) == parameters and (path / "index.json").is_file():
        return path
    layout = sd15_layout()
    if layout.numel != n:
        raise SystemExit(f"N must be Stable Diffusion 1.5's {layout.numel} (got {n})")
    started = time.perf_counter()
    matrix = LowRankPlusNoise(m, n, rank, noise, block=1024)
    add_models(path, matrix_source(matrix, [f"{i:06d}" for i in range(m)], 1024, "synthetic"), layout,
               shard_size=1024)
    stamp.write_text(json.dumps(parameters))
    print(f"wrote the dataset {path} ({m} x {n}) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# ----------------------------------------------------------------------------- one method, in a child process

def load_standardized(dataset) -> "torch.Tensor":
    """The whole matrix in memory, standardized in place like the project does (float64 statistics)."""
    from lora_w2w.pca import Moments, safe_scale

    weights = dataset.read_rows(0, len(dataset))                   # (M, N), the one big allocation
    moments = Moments(weights.shape[1])
    moments.update(weights)
    weights -= moments.mean.float()
    weights /= safe_scale(moments.std()).float()
    return weights


def run_child(method: str, data: Path, k: int, memory: str, out: Path) -> None:
    """Run one method, then write its timing, its peak memory and its result."""
    import sklearn.decomposition  # every child loads the same libraries, so baselines compare
    import torch
    from safetensors.torch import save_file

    from lora_w2w.dataset import WeightsDataset
    from lora_w2w.pca import BuildConfig, build_space

    dataset = WeightsDataset(data)
    m = len(dataset)
    started = time.perf_counter()
    if method.startswith(("project", "dask")):
        config = (BuildConfig(memory=memory, backend="dask", workers=int(method.split("-")[1]))
                  if method.startswith("dask") else
                  BuildConfig(memory=memory, method="randomized" if method == "project-randomized" else "auto"))
        space = build_space(dataset, k=k, config=config,
                            log=lambda message: print(f"  [{method} {time.perf_counter() - started:6.0f} s] {message}",
                                                      flush=True))
        components, variance = space.components, space.explained_variance
    elif method == "sklearn":
        z = load_standardized(dataset)
        fit_start = time.perf_counter()
        pca = sklearn.decomposition.PCA(n_components=k, svd_solver="randomized", random_state=0).fit(z.numpy())
        components, variance = torch.from_numpy(pca.components_), torch.from_numpy(pca.explained_variance_)
    else:
        z = load_standardized(dataset)
        fit_start = time.perf_counter()
        torch.manual_seed(0)
        _, s, v = torch.svd_lowrank(z, q=k + 10, niter=4)       # v (N, K + 10)
        components, variance = v[:, :k].T.contiguous(), s[:k] ** 2 / (m - 1)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    high_water = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]  # children: workers
    result = {"method": method, "seconds": seconds, "peak_bytes": peak, "vm_hwm_bytes": (high_water or [None])[0],
              "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in used)}
    if not method.startswith(("project", "dask")):
        result["fit_seconds"] = seconds - (fit_start - started)   # without reading and standardizing
    (out / f"{method}.json").write_text(json.dumps(result))
    save_file({"components": components.float().contiguous(), "explained_variance": variance.float().contiguous()},
              out / f"{method}.safetensors")


# ----------------------------------------------------------------------------- comparing

def accuracy(result: dict, reference: dict) -> dict:
    """Explained-variance errors and principal angles of `result` against `reference` (dicts of tensors)."""
    import torch

    k = reference["components"].shape[0]
    error = (result["explained_variance"].double() - reference["explained_variance"].double()).abs()
    relative = error / reference["explained_variance"].double()
    cosines = torch.linalg.svdvals(result["components"] @ reference["components"].T).clamp(max=1).double()  # (K,)
    half = torch.linalg.svdvals(result["components"][: k // 2] @ reference["components"][: k // 2].T).clamp(max=1)
    return {"variance_max_relative_error": float(relative.max()),
            "variance_median_relative_error": float(relative.median()),
            "variance_relative_error_at_K": float(relative[-1]),
            "subspace_captured": float((cosines ** 2).mean()),
            "largest_angle_top_half_degrees": float(torch.rad2deg(torch.arccos(half.min().double())))}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8000, help="M, rows of the matrix (default: %(default)s)")
    parser.add_argument("--components", type=int, default=1000, help="K (default: %(default)s)")
    parser.add_argument("--memory", default="2GB", help="the project's --memory budget (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="BLAS/OpenMP threads of every method (default: all cores, %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}; {REFERENCE} is the accuracy "
                             f"reference)")
    parser.add_argument("--dask", action="store_true",
                        help=f"run {' '.join(DASK_METHODS)}: the Dask route with 1 and 2 workers against the default "
                             f"backend, in one run")
    parser.add_argument("--dask-plan", action="store_true",
                        help="compute nothing: print the Dask route's task graph and predicted times at the paper's "
                             "and SDXL's sizes (K = 10,000, --memory per worker)")
    parser.add_argument("--disk-bandwidth", type=float, default=1e9,
                        help="--dask-plan: bytes per second the workers read the dataset at (default: %(default)g)")
    parser.add_argument("--work", default="outputs/bench_pca", help="folder for the dataset and results "
                                                                    "(default: %(default)s)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--make-data", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dask:
        args.methods = list(DASK_METHODS)
    if REFERENCE not in args.methods:
        parser.error(f"--methods must include {REFERENCE}, the accuracy reference")
    return args


def main(args) -> dict:
    work = Path(args.work)
    n = 99_648
    if args.child:
        run_child(args.child, work / "data", args.components, args.memory, work)
        return {}
    if args.make_data:
        make_dataset(work, args.models, n, args.components)
        return {}
    if args.dask_plan:
        return print_dask_plan(args.memory, args.disk_bandwidth)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    common = ["--models", str(args.models), "--components", str(args.components), "--memory", args.memory,
              "--work", str(work)]
    subprocess.run([sys.executable, __file__, "--make-data", *common], env=env, check=True)
    load_start, results = os.getloadavg()[0], {}
    for method in args.methods:
        print(f"running {method} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", method, *common], env=env, check=True)
        results[method] = json.loads((work / f"{method}.json").read_text())
        print(f"  {method}: {results[method]['seconds']:.1f} s, peak {results[method]['peak_bytes'] / 1e9:.2f} GB",
              flush=True)

    import torch
    from safetensors.torch import load_file
    reference = load_file(work / f"{REFERENCE}.safetensors")
    print(f"\nM = {args.models:,}, N = {n:,}, K = {args.components:,}, {args.threads} threads, project --memory "
          f"{args.memory}; data {args.models * n * 4 / 1e9:.2f} GB float32")
    print(f"{'method':20s} {'time s':>8s} {'cores':>6s} {'peak GB':>8s} {'EV max rel err':>15s} {'EV err at K':>12s} "
          f"{'captured':>9s} {'angle top K/2':>14s}")
    for method, result in results.items():
        result |= accuracy(load_file(work / f"{method}.safetensors"), reference)
        print(f"{method:20s} {result['seconds']:8.1f} {result['cpu_seconds'] / result['seconds']:6.2f} "
              f"{result['peak_bytes'] / 1e9:8.2f} "
              f"{result['variance_max_relative_error']:15.2e} {result['variance_relative_error_at_K']:12.2e} "
              f"{result['subspace_captured']:9.5f} {result['largest_angle_top_half_degrees']:13.3f}°")
    summary = {"benchmark": "pca", "models": args.models, "weights": n, "components": args.components,
               "threads": args.threads, "memory_budget": args.memory,
               "load_average": [load_start, os.getloadavg()[0]]}   # 1-minute, at the start and the end
    if "sklearn" in results:
        summary["memory_ratio"] = results["project"]["peak_bytes"] / results["sklearn"]["peak_bytes"]
        summary["time_ratio"] = results["project"]["seconds"] / results["sklearn"]["seconds"]
    if "dask-1" in results and "dask-2" in results:
        summary["dask_speedup"] = results["dask-1"]["seconds"] / results["dask-2"]["seconds"]
        summary["dask_time_ratio"] = results["dask-2"]["seconds"] / results["project"]["seconds"]
        one, two = (load_file(work / f"{method}.safetensors") for method in ("dask-1", "dask-2"))
        summary["dask_bitwise_equal"] = all(torch.equal(one[name], two[name]) for name in one)
        print(f"dask: 2 workers {summary['dask_speedup']:.2f}x as fast as 1; 2 workers take "
              f"{summary['dask_time_ratio']:.2f}x the default backend's time ({args.threads} threads); 1 and 2 "
              f"workers' results {'' if summary['dask_bitwise_equal'] else 'not '}bit for bit equal; load average "
              f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    summary["results"] = results
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------- the Dask route's plan at scale

def core_flops() -> float:
    """Float32 matmul flops per second of one core (numpy, one BLAS thread: set before numpy loads)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best


def print_dask_plan(memory: str, disk_bandwidth: float) -> dict:
    """The Dask route's graph at the paper's and SDXL's shapes; its predicted times for 1, 4, 16 workers."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    from lora_w2w.pca import parse_memory
    from lora_w2w.pca_dask import Graph, plan, predict_seconds

    rate = core_flops()
    print(f"one core: {rate / 1e9:.0f} GFLOP/s float32 matmul; disk {disk_bandwidth / 1e9:.2f} GB/s; --memory {memory} "
          f"per worker")
    summary = {"benchmark": "pca-dask-plan", "core_flops": rate, "disk_bandwidth": disk_bandwidth, "shapes": {}}
    for name, (m, n) in SHAPES.items():
        p = plan(m, n, 10_000, parse_memory(memory), oversamples=10, power_iterations=4)
        sources = [([("weights.safetensors", 0, r1 - r0)], n, "float32") for r0, r1 in p.row_blocks()]
        graph = Graph(p, sources, {"basis": "b", "next basis": "b", "result": "r"}, seed=0, token="plan")
        tasks = [task for phase in graph.phases for task in phase.tasks]
        largest = max(tasks, key=lambda task: task.peak_bytes)
        print(f"\n{name}: M = {m:,} x N = {n:,}, K = 10,000: {p.describe()}")
        print(f"  {len(graph.phases)} phases, {len(tasks):,} tasks; the largest ({largest.kind}): inputs and output "
              f"{largest.io_bytes / 1e9:.2f} GB, with temporaries {largest.peak_bytes / 1e9:.2f} GB")
        print(f"  {'phase':22s} {'tasks':>6s} {'at once':>8s} {'largest GB':>11s} {'read GB':>8s} {'Tflop':>7s}")
        for phase in graph.phases:
            if int((re.findall(r"\d+", phase.name) or [0])[0]) > 1:   # iterations 2-4 repeat iteration 1
                continue
            print(f"  {phase.name:22s} {len(phase.tasks):6,d} {phase.width:8,d} "
                  f"{max((t.peak_bytes for t in phase.tasks), default=0) / 1e9:11.2f} "
                  f"{sum(t.reads for t in phase.tasks) / 1e9:8.1f} "
                  f"{(sum(t.flops for t in phase.tasks) + phase.client_flops) / 1e12:7.1f}")
        hours = {workers: predict_seconds(graph, workers, rate, disk_bandwidth) / 3600 for workers in (1, 4, 16)}
        print("  predicted: " + ", ".join(f"{w} worker{'s' * (w > 1)} {h:.2f} h" for w, h in hours.items()))
        summary["shapes"][name] = {"rows": p.rows, "columns": p.columns, "phases": len(graph.phases),
                                   "tasks": len(tasks), "largest_task_io_bytes": largest.io_bytes,
                                   "largest_task_peak_bytes": largest.peak_bytes, "worker_bytes": p.worker_bytes,
                                   "predicted_hours": hours}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(parse_args())
