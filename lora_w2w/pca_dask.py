"""The Dask route of `w2w build`: the torch route's randomized PCA on a dask.distributed cluster, in tasks
that each hold one block of rows or of columns.

    w2w build data/weights files/my_space -k 1000 --backend dask --workers 8 --memory 4GB   # a LocalCluster
    w2w build data/weights files/my_space -k 1000 --backend dask --scheduler tcp://host:8786 --memory 16GB

Z (M, N) is cut into blocks Z_ij of r rows x c columns, each read from the dataset's shards by the task
that uses it and standardized there. Subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) keeps
P (L, N) as column blocks P_j (L, c) and Y = Z Pᵀ (M, L) as row blocks Y_i (r, L). A power iteration is
- sketch: Y_i = Σ_j Z_ij P_jᵀ, and power: G_j = Σ_i Y_iᵀ Z_ij, two passes over the data (G = P Zᵀ Z);
- CholeskyQR2 (Yamamoto et al. 2015) of G's rows: the Gram A = Σ_j G_j G_jᵀ (L, L, float64) summed
  across blocks, on the client S = R⁻ᵀ for A = Rᵀ R, then Q_j = S G_j; and the same again on Q. Where A
  is ill-conditioned (κ(R) > CHOLESKY_MAX_CONDITION, or Cholesky fails) the client takes S from A's
  eigendecomposition instead, and directions it cannot resolve (eigenvalue below NULL_TOLERANCE of the
  largest: the data has rank < L there) become fresh Gaussian rows, which the second pass orthonormalises;
- the new P_j written by the workers into the state folder's basis file, which the next iteration reads:
  a killed build resumes after its last finished iteration, and a lost worker's blocks are recomputed
  from that file rather than from the whole history.
The last pass makes Y_i and B = Σ_i Y_iᵀ Y_i; the client takes B's top K eigenpairs (Rayleigh-Ritz, W
(L, K)); the workers make the components' column blocks Wᵀ P_j, their largest entries (each component's
sign is that of its largest-|.| entry, as in the torch route), then write the signed components and the
coefficients Y_i W into the state folder's result file, which the returned space maps from disk.

No task holds more than one row or column block of Z, Y, P, G or the components, besides L x L matrices
(a Gram, S) and W (L x K); the client holds L x L matrices, W and the column moments (N,). `plan` picks the largest blocks with
which the largest task fits WORKER_FRACTION of `memory` (per worker) less a worker's own memory, and
refuses a budget under what the L x L Gram sums need. `Graph` lists every task of a build with the
bytes it holds, reads and computes, without data, for any shape; `predict_seconds` turns it into a time.

Letters: M models, N flattened LoRA numbers, K components, L = K + oversamples, r rows of a row block,
c columns of a column block.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch

from . import pca_blocks as blocks
from .dataset import WeightsDataset
from .errors import SpaceError, W2WError
from .pca import EIGH_N2K, EIGH_N3, BuildState, build_key, check_rank, top_eigenpairs
from .storage import mmap_tensor

WORKER_FRACTION = 0.8        # distributed pauses a worker above 80% of its memory limit (and kills it at 95%)
WORKER_OVERHEAD_BYTES = 400 * 2**20   # a worker's own memory: 300 MiB measured (interpreter, distributed,
                                      # numpy), and room for transfer buffers
BLOCK_ROWS = (2048, 1024, 512, 256, 128, 64)            # tried largest first
BLOCK_COLUMNS = (8192, 4096, 2048, 1024, 512, 256)
FAN_IN = 4                   # blocks added by one task of a sum over blocks
GRAM_FAN_IN = 2              # L x L float64 Grams added by one task
CHOLESKY_MAX_CONDITION = 1e5     # κ(R) above which the client orthonormalises by eigendecomposition
NULL_TOLERANCE = 1e-10       # a Gram eigenvalue below this fraction of the largest is a direction not resolved
CONNECT_TIMEOUT = 20         # seconds to reach a scheduler
RESULT = "result"            # the state file of components, coefficients and explained variance
BASIS = "basis"              # the state file of P (L, N) after the last finished iteration


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class DaskPlan:
    """Blocks of the Dask route for K of M x N within `memory` bytes per worker."""

    m: int
    n: int
    k: int
    width: int              # L = K + oversamples
    power_iterations: int
    rows: int               # r, rows per block
    columns: int            # c, columns per block
    memory: int             # per worker
    itemsize: int           # bytes per number of the dataset on disk
    peak_bytes: int         # the largest task: its inputs, output and temporaries

    def key(self) -> list:
        """What makes two builds' passes the same (with the data, K and the seed)."""
        return ["dask", self.rows, self.columns, self.width, self.power_iterations]

    @property
    def worker_bytes(self) -> int:
        """The memory limit a worker of one thread needs for the largest task."""
        return math.ceil((self.peak_bytes + WORKER_OVERHEAD_BYTES) / WORKER_FRACTION)

    @property
    def client_bytes(self) -> int:
        """What the client holds: the L x L Gram, its factor or eigenvectors, S, and W (L, K)."""
        return 8 * self.width * (3 * self.width + self.k)

    def row_blocks(self) -> list[tuple[int, int]]:
        return [(i, min(i + self.rows, self.m)) for i in range(0, self.m, self.rows)]

    def column_blocks(self) -> list[tuple[int, int]]:
        return [(j, min(j + self.columns, self.n)) for j in range(0, self.n, self.columns)]

    def describe(self) -> str:
        grid = f"{len(self.row_blocks())} x {len(self.column_blocks())}"
        return (f"dask, randomized (L = {self.width}, {self.power_iterations} power iterations), blocks of "
                f"{self.rows} rows x {self.columns} columns ({grid}); --memory {self.memory / 1e9:.3g} GB per "
                f"worker: the largest task holds {self.peak_bytes / 1e9:.2f} GB, a worker needs "
                f"{self.worker_bytes / 1e9:.2f} GB; the client {self.client_bytes / 1e9:.2f} GB")


def task_peaks(r: int, c: int, width: int, k: int) -> dict[str, int]:
    """The bytes each kind of task holds (inputs, output, temporaries) for blocks of r x c; `Graph`'s
    tasks hold these at most (tests/test_pca_dask.py checks it)."""
    lc, rl, l2 = 4 * width * c, 4 * r * width, width * width
    return {
        "moments": 16 * c + 4 * r * c + 8 * r * min(c, blocks.MOMENT_BAND),
        "merge moments": (FAN_IN + 3) * 16 * c,
        "basis": lc,
        "sketch": 8 * c + lc + rl + 4 * r * c,
        "power": 8 * c + rl + lc + 4 * r * c,
        "sum": (FAN_IN + 1) * max(rl, lc, 4 * k * c),
        "gram": lc + 8 * l2 + 2 * lc,
        "gram sum": (GRAM_FAN_IN + 1) * 8 * l2,
        "transform": 4 * l2 + 8 * width + 3 * lc,
        "write basis": lc,
        "gram of sketch": rl + 8 * l2 + 2 * rl,
        "rotate": 4 * width * k + lc + 4 * k * c,
        "maxima": 4 * k * c + 8 * k + 4 * k * c,
        "write components": 4 * k * c + 4 * k + 4 * k * c,
        "write coefficients": 4 * width * k + 4 * k + rl + 4 * r * k,
    }


def plan(m: int, n: int, k: int, memory: int, oversamples: int, power_iterations: int, itemsize: int = 4
         ) -> DaskPlan:
    """The largest blocks (columns first) with which every task fits a worker of `memory` bytes."""
    width = min(k + oversamples, m, n)
    budget = int(memory * WORKER_FRACTION) - WORKER_OVERHEAD_BYTES
    smallest = None
    for c in sorted({min(c, n) for c in BLOCK_COLUMNS}, reverse=True):
        for r in sorted({min(r, m) for r in BLOCK_ROWS}, reverse=True):
            peak = max(task_peaks(r, c, width, k).values())
            if peak <= budget:
                return DaskPlan(m, n, k, width, power_iterations, r, c, memory, itemsize, peak)
            smallest = peak
    need = math.ceil((smallest + WORKER_OVERHEAD_BYTES) / WORKER_FRACTION)
    raise W2WError(f"--memory {memory / 1e9:.3g} GB per worker is too small for the dask backend at L = K + "
                   f"oversamples = {width}: a task needs {smallest / 1e9:.2f} GB (the sum of two L x L float64 "
                   f"Grams), so a worker needs at least {need / 1e9:.2f} GB; lower --components for less")


# ----------------------------------------------------------------------------- the graph

@dataclass(frozen=True)
class Block:
    """An array a task makes, or the client gives (`Phase.given`)."""

    key: str
    shape: tuple[int, ...]
    itemsize: int = 4

    @property
    def nbytes(self) -> int:
        return self.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class Task:
    """One task: `function(*arguments, *inputs)` makes `output`."""

    output: Block
    function: Callable
    arguments: tuple = ()
    inputs: tuple[Block, ...] = ()
    reads: int = 0          # bytes read from the dataset
    flops: float = 0.0      # float32 matmul flops (a float64 one counts twice)
    scratch: int = 0        # bytes of temporaries
    kind: str = ""          # a key of `task_peaks`

    @property
    def io_bytes(self) -> int:
        """Its inputs and its output."""
        return sum(block.nbytes for block in self.inputs) + self.output.nbytes

    @property
    def peak_bytes(self) -> int:
        return self.io_bytes + self.scratch


@dataclass
class Phase:
    """Tasks submitted together. Before them the client runs `step` (a `_Run` method), which reads the
    gathered arrays `needs` and makes the arrays `given`; after them it gathers `gather`."""

    name: str
    tasks: list[Task] = field(default_factory=list)
    gather: list[Block] = field(default_factory=list)
    step: str | None = None
    needs: list[Block] = field(default_factory=list)
    given: list[Block] = field(default_factory=list)
    iteration: int = 0
    client_flops: float = 0.0   # the step's work on the client

    @property
    def width(self) -> int:
        """The most tasks that can run at once: the largest number at one depth (0 for a task whose inputs
        come from before the phase, else 1 + the deepest of its inputs)."""
        depth: dict[str, int] = {}
        for task in self.tasks:  # in order: a task comes after the tasks it depends on
            depth[task.output.key] = 1 + max((depth.get(block.key, -1) for block in task.inputs), default=-1)
        levels = list(depth.values())
        return max((levels.count(level) for level in set(levels)), default=0)


ACK = (0,)  # the shape of what a task that writes a file returns (None)


def _tree(key: str, parts: list[Block], fan_in: int, merge: Callable[[str, list[Block]], Task]
          ) -> tuple[list[Task], Block]:
    """Tasks that reduce `parts` to one block, `fan_in` at a time and in order, and that block."""
    tasks, level = [], 0
    while len(parts) > 1:
        merged = []
        for g in range(0, len(parts), fan_in):
            group = parts[g:g + fan_in]
            if len(group) > 1:
                tasks.append(merge(f"{key}-{level}-{g // fan_in}", group))
            merged.append(tasks[-1].output if len(group) > 1 else group[0])
        parts, level = merged, level + 1
    return tasks, parts[0]


def _adder(kind: str) -> Callable[[str, list[Block]], Task]:
    return lambda key, group: Task(Block(key, group[0].shape, group[0].itemsize), blocks.add, (), tuple(group),
                                   kind=kind)


class Graph:
    """Every task of a Dask build, phase by phase, made without data. `sources[i]` is row block i's
    `pca_blocks` source; `files` holds the state's paths the workers use: "basis" (read), "next basis" and
    "result" (written). `start` is what the state holds: None (nothing), -1 (the moments) or t >= 0 (the
    moments and P after t power iterations)."""

    def __init__(self, p: DaskPlan, sources: list[tuple], files: dict[str, str], seed: int, token: str,
                 start: int | None = None):
        self.p, self.sources, self.files, self.seed, self.token = p, sources, files, seed, token
        self.rows, self.columns = p.row_blocks(), p.column_blocks()
        self.scale = [Block(self._key("scale", j), (2, c1 - c0)) for j, (c0, c1) in enumerate(self.columns)]
        self.phases: list[Phase] = []
        self._written: int | None = None   # the iteration whose P the last phase wrote, to commit next
        moments = self._moments() if start is None else []
        first = self._phase("start", step="standardize", needs=moments, given=list(self.scale))
        basis, done = None, max(start or 0, 0)   # basis None: P is in the basis file
        if start is None or start < 0:
            basis = self._random_basis(first)
            if p.power_iterations == 0:
                self._orthonormalize(0, self._gram(self._phase("gram 0"), basis, "gram-0"))
                basis = None
        for t in range(done + 1, p.power_iterations + 1):
            phase = self._phase(f"sketch {t}")
            sketched = self._products(phase, "sketch", t, self._load_basis(phase) if basis is None else basis)
            phase = self._phase(f"power {t}")
            self._orthonormalize(t, self._gram(phase, self._products(phase, "power", t, sketched), f"gram-{t}"))
            basis = None
        self._final(basis)

    def _key(self, *parts) -> str:
        return "-".join(["w2w", self.token, *map(str, parts)])

    def _phase(self, name: str, **fields) -> Phase:
        """A new phase; the first after one that wrote P commits the basis file before its tasks."""
        if self._written is not None and "step" not in fields:
            fields.update(step="commit_basis", iteration=self._written)
            self._written = None
        self.phases.append(Phase(name, **fields))
        return self.phases[-1]

    def _data_task(self, out: Block, function, i: int, j: int, inputs: tuple[Block, ...], kind: str,
                   flops: float = 0.0) -> Task:
        """A task reading Z_ij (or W_ij) from the dataset."""
        (r0, r1), (c0, c1) = self.rows[i], self.columns[j]
        size = (r1 - r0) * (c1 - c0)
        scratch = 4 * size + (8 * (r1 - r0) * min(c1 - c0, blocks.MOMENT_BAND) if kind == "moments" else 0)
        return Task(out, function, (self.sources[i], c0, c1), inputs, self.p.itemsize * size, flops, scratch, kind)

    def _moments(self) -> list[Block]:
        """Column means and sums of squared deviations (2, c) float64 per column block, gathered."""
        phase = self._phase("moments")
        for j, (c0, c1) in enumerate(self.columns):
            parts = [self._add(phase, self._data_task(Block(self._key("moments", i, j), (2, c1 - c0), 8),
                                                      blocks.block_moments, i, j, (), "moments"))
                     for i in range(len(self.rows))]
            counts = {part.key: r1 - r0 for part, (r0, r1) in zip(parts, self.rows)}

            def merge(key, group, counts=counts):
                counts[key] = sum(counts[b.key] for b in group)
                return Task(Block(key, group[0].shape, 8), blocks.merge_moments, (tuple(counts[b.key] for b in group),),
                            tuple(group), scratch=2 * group[0].nbytes, kind="merge moments")
            tasks, total = _tree(self._key("moments-sum", j), parts, FAN_IN, merge)
            phase.tasks += tasks
            phase.gather.append(total)
        return phase.gather

    def _random_basis(self, phase: Phase) -> list[Block]:
        return [self._add(phase, Task(Block(self._key("basis-0", j), (self.p.width, c1 - c0)), blocks.random_basis,
                                      (self.seed, j, self.p.width, c1 - c0), kind="basis"))
                for j, (c0, c1) in enumerate(self.columns)]

    def _load_basis(self, phase: Phase) -> list[Block]:
        return [self._add(phase, Task(Block(self._key("basis", phase.name, j), (self.p.width, c1 - c0)),
                                      blocks.load_columns, (self.files["basis"], "0", c0, c1), kind="basis"))
                for j, (c0, c1) in enumerate(self.columns)]

    @staticmethod
    def _add(phase: Phase, task: Task) -> Block:
        phase.tasks.append(task)
        return task.output

    def _products(self, phase: Phase, kind: str, t, operands: list[Block]) -> list[Block]:
        """kind "sketch": Y_i = Σ_j Z_ij P_jᵀ (r, L) for operands P_j; "power": G_j = Σ_i Y_iᵀ Z_ij (L, c) for
        operands Y_i; each summed over the other index."""
        sketch = kind == "sketch"
        outer, inner = (self.rows, self.columns) if sketch else (self.columns, self.rows)
        out = []
        for a, (a0, a1) in enumerate(outer):
            parts = []
            for b, (b0, b1) in enumerate(inner):
                i, j = (a, b) if sketch else (b, a)
                shape = (a1 - a0, self.p.width) if sketch else (self.p.width, a1 - a0)
                parts.append(self._add(phase, self._data_task(
                    Block(self._key(kind, t, i, j), shape), getattr(blocks, kind), i, j, (self.scale[j], operands[b]),
                    kind, 2 * (a1 - a0) * (b1 - b0) * self.p.width)))
            tasks, total = _tree(self._key(kind, "sum", t, a), parts, FAN_IN, _adder("sum"))
            phase.tasks += tasks
            out.append(total)
        return out

    def _gram(self, phase: Phase, parts: list[Block], name: str, function=blocks.gram_of_rows,
              kind: str = "gram") -> list[Block]:
        """Adds to `phase` the Gram (L, L) float64 of `parts` (Σ X_j X_jᵀ of column blocks X_j, or Σ Y_iᵀ Y_i
        of row blocks), gathered; returns `parts`."""
        width = self.p.width
        grams = [self._add(phase, Task(Block(self._key(name, n), (width, width), 8), function, (), (part,),
                                       flops=2 * math.prod(part.shape) * width, scratch=2 * part.nbytes,
                                       kind=kind))
                 for n, part in enumerate(parts)]
        tasks, total = _tree(self._key(name, "sum"), grams, GRAM_FAN_IN, _adder("gram sum"))
        phase.tasks += tasks
        phase.gather.append(total)
        return parts

    def _orthonormalize(self, t: int, parts: list[Block]) -> None:
        """CholeskyQR2 of the rows of the column blocks `parts`, whose Gram the last phase gathers; the
        result is written into the next basis file, which the next phase commits."""
        width = self.p.width
        for step in (1, 2):
            matrix = Block(self._key("S", t, step), (width, width))
            replaced = Block(self._key("replaced", t, step), (width,), 8)
            phase = self._phase(f"orthonormalize {t}.{step}", needs=[self.phases[-1].gather[-1]],
                                step="orthonormalizer" if step == 1 else "last_orthonormalizer",
                                given=[matrix, replaced], iteration=t, client_flops=4 / 3 * width ** 3)
            parts = [self._add(phase, Task(Block(self._key("Q", t, step, j), part.shape), blocks.transform,
                                           ((self.seed, t, step, j), self.p.n), (matrix, replaced, part),
                                           flops=2 * width * math.prod(part.shape), scratch=part.nbytes,
                                           kind="transform"))
                     for j, part in enumerate(parts)]
            if step == 1:
                self._gram(phase, parts, f"gram-{t}.2")
        phase.gather = [self._add(phase, Task(Block(self._key("write-basis", t, j), ACK), blocks.write_columns,
                                              (self.files["next basis"], "0", c0), (part,), kind="write basis"))
                        for j, (part, (c0, _)) in enumerate(zip(parts, self.columns))]
        self._written = t

    def _final(self, basis: list[Block] | None) -> None:
        """Rayleigh-Ritz from the last sketch, then the components and coefficients written by the workers."""
        p = self.p
        phase = self._phase("sketch")
        basis = self._load_basis(phase) if basis is None else basis
        sketched = self._products(phase, "sketch", "last", basis)
        self._gram(phase, sketched, "gram-sketch", blocks.gram_of_columns, "gram of sketch")
        rotation = Block(self._key("W"), (p.width, p.k))
        phase = self._phase("rotate", step="rayleigh_ritz", needs=[phase.gather[-1]], given=[rotation],
                            client_flops=EIGH_N3 * p.width ** 3 + EIGH_N2K * p.width ** 2 * p.k)
        components = [self._add(phase, Task(Block(self._key("components", j), (p.k, c1 - c0)), blocks.rotate, (),
                                            (rotation, basis[j]), flops=2 * p.k * p.width * (c1 - c0), kind="rotate"))
                      for j, (c0, c1) in enumerate(self.columns)]
        phase.gather = [self._add(phase, Task(Block(self._key("maxima", j), (2, p.k)), blocks.row_maxima, (), (block,),
                                              scratch=block.nbytes, kind="maxima"))
                        for j, block in enumerate(components)]
        signs = Block(self._key("signs"), (p.k,))
        phase = self._phase("write", step="signs", needs=phase.gather, given=[signs])
        for j, (block, (c0, _)) in enumerate(zip(components, self.columns)):
            self._add(phase, Task(Block(self._key("write-components", j), ACK), blocks.write_columns,
                                  (self.files["result"], "components", c0), (block, signs), scratch=block.nbytes,
                                  kind="write components"))
        for i, (block, (r0, r1)) in enumerate(zip(sketched, self.rows)):
            self._add(phase, Task(Block(self._key("write-coefficients", i), ACK), blocks.write_rotated_rows,
                                  (self.files["result"], "coefficients", r0), (rotation, signs, block),
                                  flops=2 * (r1 - r0) * p.width * p.k, scratch=4 * (r1 - r0) * p.k,
                                  kind="write coefficients"))
        phase.gather = [task.output for task in phase.tasks]
        self._phase("finish", step="commit_result")


def predict_seconds(graph: Graph, workers: int, core_flops: float, disk_bandwidth: float) -> float:
    """The time a build takes on `workers` workers of one core each by this model: per phase, its bytes
    read over `disk_bandwidth` (bytes/s) or its flops over the cores it can use (`core_flops` float32
    matmul flops/s each), whichever is longer, plus the client's step on one core. Transfers between
    workers and the scheduler's overhead are left out."""
    total = 0.0
    for phase in graph.phases:
        cores = max(1, min(workers, phase.width))
        flops = sum(task.flops for task in phase.tasks)
        total += max(sum(task.reads for task in phase.tasks) / disk_bandwidth, flops / (cores * core_flops))
        total += phase.client_flops / core_flops
    return total


# ----------------------------------------------------------------------------- the client's steps

def orthonormalizer(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S (L, L) float32, replaced rows (L',) int64) for the Gram A = G Gᵀ (L, L) float64 of rows G (L, N):
    the rows of S G are orthonormal, but for those listed, which the caller replaces. Cholesky A = Rᵀ R,
    S = R⁻ᵀ (CholeskyQR) while κ(R) <= CHOLESKY_MAX_CONDITION; else from the eigendecomposition A = V Λ Vᵀ,
    S = Λ^(-1/2) Vᵀ, the directions of eigenvalues below NULL_TOLERANCE of the largest replaced."""
    try:
        factor = scipy.linalg.cholesky(gram, lower=False, check_finite=False)         # R (L, L)
        rcond, _ = scipy.linalg.lapack.dtrcon(factor, norm="1", uplo="U")
        if rcond * CHOLESKY_MAX_CONDITION >= 1:
            inverse, _ = scipy.linalg.lapack.dtrtri(factor, lower=0)                 # R⁻¹ (L, L)
            return np.ascontiguousarray(inverse.T, np.float32), np.zeros(0, np.int64)
    except scipy.linalg.LinAlgError:
        pass
    values, vectors = scipy.linalg.eigh(gram, check_finite=False)                   # (L,), (L, L)
    resolved = values > NULL_TOLERANCE * max(values[-1], 0.0)
    scale = np.where(resolved, 1 / np.sqrt(np.where(resolved, values, 1.0)), 0.0)   # (L,)
    return np.ascontiguousarray((vectors * scale).T, np.float32), np.flatnonzero(~resolved)


def combine_signs(maxima: list[np.ndarray]) -> np.ndarray:
    """The sign (K,) of each component's largest-|.| entry (its first, in column order), from the column
    blocks' `row_maxima` (2, K) in column order."""
    largest, entry = maxima[0].copy()                  # (K,), (K,)
    for block in maxima[1:]:
        larger = block[0] > largest
        largest[larger], entry[larger] = block[0][larger], block[1][larger]
    return np.where(entry < 0, -1.0, 1.0).astype(np.float32)


class _Run:
    """A Graph run on a dask.distributed client: tasks submitted phase by phase, the client's steps between
    them; the finished passes kept in `state`."""

    def __init__(self, client, dataset: WeightsDataset, p: DaskPlan, state: BuildState,
                 moments: list[torch.Tensor] | None, log: Callable[[str], None]):
        self.client, self.dataset, self.p, self.state, self.log = client, dataset, p, state, log
        self.moments = moments                  # mean and std (N,) float32, when the state held them
        self.variance: torch.Tensor | None = None   # (K,), from Rayleigh-Ritz
        self.values: dict[str, object] = {}     # gathered results, by key
        self.futures: dict = {}                 # blocks on the cluster, by key

    def run(self, graph: Graph) -> None:
        from concurrent.futures import CancelledError

        from distributed import KilledWorker

        last_use = {}
        for index, phase in enumerate(graph.phases):
            for block in [b for task in phase.tasks for b in task.inputs] + phase.gather:
                last_use[block.key] = index
        kept = f"the finished passes are kept in {self.state.directory}: run again to resume"
        try:
            for index, phase in enumerate(graph.phases):
                self._phase(phase)
                self.futures = {key: f for key, f in self.futures.items() if last_use.get(key, -1) > index}
        except KilledWorker as error:
            raise W2WError(f"dask: workers died running task {error.task!r} {error.allowed_failures + 1} times (out of "
                           f"memory? this plan needs {self.p.worker_bytes / 1e9:.2f} GB per worker); {kept}") from None
        except CancelledError as error:  # the scheduler dropped the tasks: it restarted, or lost every worker
            raise W2WError(f"dask: the cluster cancelled the build's tasks ({error}); {kept}") from None

    def _phase(self, phase: Phase) -> None:
        started = time.perf_counter()
        if phase.step:
            arrays = getattr(self, phase.step)(phase, [self.values.pop(block.key) for block in phase.needs])
            with warnings.catch_warnings():  # dask advises scattering large arguments; see `pca_blocks.given`
                warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
                for block, array in zip(phase.given, arrays):
                    self.futures[block.key] = self.client.submit(blocks.given, array, key=block.key, pure=False)
        for task in phase.tasks:
            self.futures[task.output.key] = self.client.submit(
                task.function, *task.arguments, *(self.futures[block.key] for block in task.inputs),
                key=task.output.key, pure=False)
        if phase.gather:
            self.values.update(zip((block.key for block in phase.gather),
                                   self.client.gather([self.futures[block.key] for block in phase.gather])))
            self.log(f"dask: {phase.name}: {len(phase.tasks)} tasks in {time.perf_counter() - started:.1f} s")

    # the steps, each (phase, its `needs`) -> its `given`

    def standardize(self, phase: Phase, moments: list[np.ndarray]) -> list[np.ndarray]:
        """Mean and std from the column blocks' moments (kept in the state), or from the state; gives each
        column block's (2, c) mean and divisor."""
        if moments:
            stats = np.concatenate(moments, axis=1)                                    # (2, N)
            if not np.isfinite(stats).all():
                self._refuse_nonfinite(np.flatnonzero(~np.isfinite(stats).all(axis=0)))
            self.moments = [torch.from_numpy(stats[0]).float(),
                            torch.from_numpy(np.sqrt(stats[1] / max(self.p.m - 1, 1))).float()]
            self.state.save("moments", self.moments, 1)
            self.log("mean and std done")
        mean, std = (t.numpy() for t in self.moments)
        scale = np.where(std > 0, std, np.float32(1))
        return [np.stack([mean[c0:c1], scale[c0:c1]]) for c0, c1 in self.p.column_blocks()]

    def _refuse_nonfinite(self, columns: np.ndarray) -> None:
        """SpaceError naming the first model that holds NaN/inf in `columns` (where the moments are not finite)."""
        found = []
        for j in sorted({int(c) // self.p.columns for c in columns}):
            c0, c1 = self.p.column_blocks()[j]
            found += [(r0, self.client.submit(blocks.first_bad_row, (self.dataset.row_files(r0, r1), self.p.n,
                                                                     str(self.dataset.dtype)), c0, c1, pure=False))
                      for r0, r1 in self.p.row_blocks()]
        row = min(r0 + first for (r0, _), first in zip(found, self.client.gather([f for _, f in found]))
                  if first >= 0)
        raise SpaceError(f"{self.dataset.path}: model {self.dataset.names[row]!r} (row {row}) holds NaN/inf weights")

    def orthonormalizer(self, phase: Phase, grams: list[np.ndarray]) -> list[np.ndarray]:
        return list(orthonormalizer(grams[0]))

    def last_orthonormalizer(self, phase: Phase, grams: list[np.ndarray]) -> list[np.ndarray]:
        """The orthonormalizer, and the next basis file, which the workers fill."""
        self.state.begin(BASIS, {"0": (self.p.width, self.p.n)}, phase.iteration)
        return self.orthonormalizer(phase, grams)

    def commit_basis(self, phase: Phase, _) -> list:
        self.state.commit(BASIS)
        self.log(f"power iteration {phase.iteration} of {self.p.power_iterations}" if phase.iteration else
                 "the trial vectors orthonormalised")
        return []

    def rayleigh_ritz(self, phase: Phase, grams: list[np.ndarray]) -> list[np.ndarray]:
        """W (L, K): the top K eigenvectors of B = YᵀY; the explained variance from its eigenvalues."""
        values, rotation = top_eigenpairs(torch.from_numpy(grams[0]), self.p.k)      # (K,), (L, K)
        check_rank(values, self.p.k)
        self.variance = (values / (self.p.m - 1)).float()                             # (K,)
        return [rotation.float().numpy()]

    def signs(self, phase: Phase, maxima: list[np.ndarray]) -> list[np.ndarray]:
        """Each component's sign; the result file, which the workers fill."""
        p = self.p
        self.state.begin(RESULT, {"components": (p.k, p.n), "coefficients": (p.m, p.k), "explained_variance": (p.k,)},
                         p.power_iterations + 1)
        return [combine_signs(maxima)]

    def commit_result(self, phase: Phase, _) -> list:
        blocks.write_array(str(self.state.partial(RESULT)), "explained_variance", self.variance.numpy())
        self.state.commit(RESULT)
        return []


# ----------------------------------------------------------------------------- the build

def check_workers(workers: dict[str, dict], p: DaskPlan, scheduler: str) -> None:
    """W2WError, before any work, when the scheduler has no worker or a worker's memory limit (bytes, 0:
    none) is under what `p`'s largest task needs on each of its threads."""
    if not workers:
        raise W2WError(f"dask scheduler {scheduler} has no workers: start some (`dask worker {scheduler} "
                       f"--memory-limit {p.worker_bytes / 1e9:.2f}GB --nthreads 1`)")
    for address, info in sorted(workers.items()):
        limit, threads = info.get("memory_limit") or 0, info.get("nthreads") or 1
        need = math.ceil((threads * p.peak_bytes + WORKER_OVERHEAD_BYTES) / WORKER_FRACTION)
        if 0 < limit < need:
            try:  # smaller blocks, if some fit
                plan(p.m, p.n, p.k, limit // threads, p.width - p.k, p.power_iterations, p.itemsize)
                smaller = f", or build with --memory {limit // threads / 1e9:.3g}GB (smaller blocks)"
            except W2WError:
                smaller = ""
            raise W2WError(f"dask worker {address} has a memory limit of {limit / 1e9:.2f} GB for {threads} "
                           f"thread(s), under the {need / 1e9:.2f} GB this plan needs (its largest task holds "
                           f"{p.peak_bytes / 1e9:.2f} GB per thread): give workers --memory-limit "
                           f"{p.worker_bytes / 1e9:.2f}GB --nthreads 1{smaller}")


@contextmanager
def _client(config, p: DaskPlan) -> Iterator:
    """A client of `config.scheduler`'s cluster, its workers checked against `p`; or of a LocalCluster of
    `config.workers` processes (one per core by default) of one thread and `p.memory` bytes each."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise W2WError("the dask backend needs distributed: pip install 'lora_w2w[dask]'") from None
    with ExitStack() as stack:
        if config.scheduler:
            try:
                client = stack.enter_context(Client(config.scheduler, timeout=CONNECT_TIMEOUT))
            except OSError as error:
                raise W2WError(f"dask scheduler {config.scheduler}: cannot connect ({error}); start one with "
                               f"`dask scheduler`, or check the address") from None
            check_workers(client.scheduler_info(n_workers=-1)["workers"], p, config.scheduler)
        else:
            cluster = stack.enter_context(LocalCluster(
                n_workers=config.workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                memory_limit=p.memory, dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        yield client


def build(dataset: WeightsDataset, k: int, memory: int, config, log: Callable[[str], None]
          ) -> tuple[torch.Tensor, ...]:
    """(mean, std, components, coefficients, explained variance) of `dataset` by the Dask route, for a
    `pca.BuildConfig`; components and coefficients are memory maps of the result file in `config.state`
    (without one: in a temporary folder, removed, which the maps outlive)."""
    m, n = len(dataset), dataset.layout.numel
    p = plan(m, n, k, memory, config.oversamples, config.power_iterations, dataset.dtype.itemsize)
    log(f"plan: {p.describe()}")
    with ExitStack() as stack:
        directory = config.state
        if directory is None:
            if config.scheduler:
                raise W2WError("the dask backend with a scheduler needs a state folder its workers see: "
                               "BuildConfig.state (w2w build keeps OUT.build-state)")
            directory = tempfile.mkdtemp(prefix="w2w-build-")
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
        state = BuildState(directory, build_key(dataset, k, p.key(), config.seed))
        saved = state.load("moments")
        if saved is None or state.find(RESULT) is None:
            basis = state.find(BASIS) if saved is not None else None
            start = None if saved is None else basis[3] if basis is not None else -1
            if start is not None:
                log(f"resuming after power iteration {start} of {p.power_iterations} (from {state.directory})"
                    if start >= 0 else f"mean and std read from {state.directory}")
            client = stack.enter_context(_client(config, p))
            sources = [(dataset.row_files(r0, r1), n, str(dataset.dtype)) for r0, r1 in p.row_blocks()]
            files = {"basis": str(state.path(BASIS)), "next basis": str(state.partial(BASIS)),
                     "result": str(state.partial(RESULT))}
            _Run(client, dataset, p, state, saved and saved[0], log).run(
                Graph(p, sources, files, config.seed, uuid.uuid4().hex[:8], start))
            saved = state.load("moments")
        path, header, start, _ = state.find(RESULT)
        mean, std = saved[0]
        return (mean, std, *(mmap_tensor(path, header, start, name) for name in ("components", "coefficients")),
                mmap_tensor(path, header, start, "explained_variance").clone())
