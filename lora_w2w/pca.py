"""PCA of a weights dataset larger than memory: the w2w space (Dravid et al. 2024, Sec. 3).

    dataset = WeightsDataset("data/weights")
    space = build_space(dataset, k=1000, config=BuildConfig(memory="4GB"))  # streamed from disk, in bounded memory
    save_space(space, "files/my_space")

    w2w build data/weights files/my_space --components 1000 --memory 4GB [--backend dask]

The standardized matrix Z = (W - mean) / std (M, N) is never formed: chunks of W are read and
standardized on the fly (mean and std from a first pass, accumulated in float64; a column of zero
variance keeps std 0 and standardizes to 0, as in `space.standardize`). The top K right singular
vectors of Z are the components (K, N); the models' coefficients are Z Vᵀ (M, K); explained_variance
is s² / (M - 1), the variance of the standardized data along each component.

Routes of the torch backend (`plan` takes the exact one while it fits `memory` and costs at most
1.25 times the randomized one by a cost model measured in benchmarks/README.md, else the randomized):
- exact: eigendecomposition, in float64, of the smaller Gram matrix: Z Zᵀ (M, M) accumulated over
  column slabs of Z, or Zᵀ Z (N, N) over row chunks, then one pass for the other side. Exact up to
  rounding; needs that matrix in memory; costs ~ min(M, N)² max(M, N) + min(M, N)³.
- randomized: subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4, on Zᵀ Z): rows P (L, N),
  L = K + oversamples, start Gaussian; each of `power_iterations` passes over the data makes
  P <- orth(P Zᵀ Z) (one read: Σ over chunks of (Z_c Pᵀ)ᵀ Z_c); a last pass gives Y = Z Pᵀ (M, L), and
  Rayleigh-Ritz, YᵀY = W S² Wᵀ, gives components Wᵀ P and coefficients Y W. Memory ~ (2 N + M) L
  numbers, whatever M x N is.
The `dask` backend (`pca_dask`) runs the randomized route on a dask.distributed cluster, a LocalCluster
of `workers` processes or `scheduler`'s, in tasks that each hold one block of rows or columns; `memory`
is then per worker, and the workers, which must see the dataset's and the state's paths, write the
components and coefficients into the state folder.
Each component's largest-|.| entry is made positive, so rebuilds give the same space.
A build given a `state` directory (`w2w build` keeps one beside OUT) writes there the results of its
finished passes, the column moments and P after each power iteration (and the Dask route's result);
a killed build, run again, resumes after the last finished pass and gives the space an uninterrupted
build gives, bit for bit.

Letters: M models, N flattened LoRA numbers, K components, L = K + oversamples, r rows of a chunk,
b columns of a slab.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import scipy.linalg
import torch

from .checks import (COUNT, MEMORY, NON_NEGATIVE, POWER_ITERATIONS, POWER_ITERATIONS_MAX, SEED,
                     check_power_iterations, check_seed, parse_memory)
from .dataset import WeightsDataset
from .errors import FileFormatError, SettingError, SpaceError, W2WError
from .space import Space
from .storage import (WRITE_BLOCK_BYTES, Output, SafetensorsWriter, atomic_output, check_output, mmap_tensor,
                      owns_only, read_attribute_table, read_safetensors_header, write_tensors)

BACKENDS = ("torch", "dask")
PCA_METHODS = ("auto", "exact", "randomized")
DEFAULT_MEMORY = "4GB"
DEFAULT_OVERSAMPLES = 10
DEFAULT_POWER_ITERATIONS = 4
OVERHEAD_BYTES = 600 * 2**20    # the interpreter with torch, scipy and pandas loaded, outside the budget
RANK_TOLERANCE = 1e-6           # a component whose variance is below this fraction of the first's is noise

# Cost model, in float32 matmul flops (only ratios matter), measured on this project's machine (AMD
# EPYC, one thread per method; benchmarks/README.md): the k largest eigenpairs of an n x n float64
# matrix (LAPACK syevr) cost EIGH_N3 n³ + EIGH_N2K n² k, the QR of an N x L matrix QR_NL2 N L². The
# exact route is preferred while it costs at most EXACT_PREFERENCE times the randomized one.
EIGH_N3, EIGH_N2K = 9.0, 40.0
QR_NL2 = 6.0
EXACT_PREFERENCE = 1.25
SMALL_FLOPS = 1e11         # an exact route cheaper than this (seconds) is taken whatever the ratio
MAX_CHUNK_ROWS = 2048      # larger chunks do not make the matmuls faster, only the process bigger
MAX_SLAB_COLUMNS = 16384

_COLUMN_BLOCK = 4096    # columns of a chunk converted to float64 at a time by the moments
_GRAM_BLOCK = 1024      # rows per block of the Gram's lower triangle


# ----------------------------------------------------------------------------- pure math

class Moments:
    """Column means and variances of rows seen chunk by chunk, in float64 (Chan, Golub & LeVeque 1979)."""

    def __init__(self, n: int):
        self.count = 0
        self.mean = torch.zeros(n, dtype=torch.float64)  # (N,)
        self.m2 = torch.zeros(n, dtype=torch.float64)    # (N,) sum of squared deviations

    def update(self, chunk: torch.Tensor) -> None:
        """Add the rows of chunk (r, N)."""
        r = chunk.shape[0]
        total = self.count + r
        for c0 in range(0, chunk.shape[1], _COLUMN_BLOCK):
            x = chunk[:, c0:c0 + _COLUMN_BLOCK].double()     # (r, b)
            mean = x.mean(0)                                   # (b,)
            m2 = (x - mean).square_().sum(0)                   # (b,)
            delta = mean - self.mean[c0:c0 + _COLUMN_BLOCK]
            self.mean[c0:c0 + _COLUMN_BLOCK] += delta * (r / total)
            self.m2[c0:c0 + _COLUMN_BLOCK] += m2 + delta.square_() * (self.count * r / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """The unbiased standard deviation (N,), float64."""
        return (self.m2 / max(self.count - 1, 1)).sqrt()


def safe_scale(std: torch.Tensor) -> torch.Tensor:
    """The divisor of `space.standardize`: std, or 1 where std is 0."""
    return torch.where(std > 0, std, torch.ones_like(std))


def add_gram_lower(gram: torch.Tensor, slab: torch.Tensor, block: int = _GRAM_BLOCK) -> None:
    """gram (M, M) float64 += slab slabᵀ for slab (M, b), lower triangle only (about half the flops)."""
    m = slab.shape[0]
    for i in range(0, m, block):
        for j in range(0, i + 1, block):
            product = slab[i:i + block] @ slab[j:j + block].T          # (block, block)
            gram[i:i + block, j:j + block] += product  # diagonal blocks fill a little of the upper triangle, unread


def top_eigenpairs(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (k,) and eigenvectors (n, k), largest first, of a symmetric float64
    matrix (n, n) of which only the lower triangle is read. The matrix is overwritten."""
    n = matrix.shape[0]
    # matrix.T is the same memory in Fortran order, which LAPACK overwrites without a copy; its
    # upper triangle is the matrix's lower one
    values, vectors = scipy.linalg.eigh(matrix.numpy().T, lower=False, subset_by_index=[n - k, n - 1],
                                        overwrite_a=True, check_finite=False, driver="evr")
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())


def orthonormalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (L, N) of the row space of rows (L, N) float32, L <= N, by a Householder QR
    done in the memory of `rows` (which it overwrites)."""
    q, _ = scipy.linalg.qr(rows.numpy().T, overwrite_a=True, mode="economic", check_finite=False)  # (N, L)
    return torch.from_numpy(q.T)


def fix_signs(components: torch.Tensor, coefficients: torch.Tensor) -> None:
    """Flip components (K, N) and coefficients (M, K) in place so that each component's largest-|.|
    entry is positive: the sign of a singular vector is otherwise arbitrary."""
    largest = torch.cat([block.abs().argmax(dim=1) for block in components.split(64)])   # (K,), 64 rows at a time
    signs = torch.sign(components.gather(1, largest[:, None])[:, 0])                       # (K,)
    signs[signs == 0] = 1
    components.mul_(signs[:, None])
    coefficients.mul_(signs.to(coefficients.dtype))


def check_rank(values: torch.Tensor, k: int) -> None:
    """SpaceError when fewer than k of the eigenvalues (largest first) carry variance."""
    rank = int((values > RANK_TOLERANCE * values[0]).sum()) if values[0] > 0 else 0
    if rank < k:
        raise SpaceError(f"only {rank} components carry variance (the data has rank {rank} after centering); "
                         f"ask for at most --components {rank}")


# ----------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class Plan:
    """How the torch backend computes a PCA within a memory budget."""

    method: str             # "exact" or "randomized"
    side: str               # exact: "models" (Gram Z Zᵀ, M x M) or "weights" (Zᵀ Z, N x N); randomized: ""
    width: int              # randomized: L = K + oversamples; exact: K
    power_iterations: int   # randomized passes before the last one
    rows: int               # rows per streamed chunk
    columns: int            # columns per slab (exact, side "models")
    peak_bytes: int         # the largest estimated working set, without the interpreter
    flops: float            # estimated cost in float32 matmul flops

    def key(self) -> list:
        """What makes two builds' passes the same (with the data, K and the seed)."""
        return [self.method, self.side, self.rows, self.width, self.power_iterations]

    def describe(self) -> str:
        route = (f"exact ({'M x M Gram' if self.side == 'models' else 'N x N covariance'})" if self.method == "exact"
                 else f"randomized (L = {self.width}, {self.power_iterations} power iterations)")
        return (f"{route}, chunks of {self.rows} rows" + (f", slabs of {self.columns} columns" if self.columns else "")
                + f", about {self.peak_bytes / 1e9:.2f} GB of arrays, {self.flops / 1e12:.1f} Tflop")


def _eigh_flops(n: int, k: int) -> float:
    return EIGH_N3 * n**3 + EIGH_N2K * n**2 * k


def _chunk_row_bytes(n: int) -> int:
    """Bytes per chunk row: the float32 row and the moments' float64 temporaries."""
    return 4 * n + 16 * min(n, _COLUMN_BLOCK)


def _fit(budget: int, phases: list[tuple[int, int]], m: int) -> tuple[int, int] | None:
    """(rows per chunk, peak bytes) for phases of (fixed bytes, bytes per chunk row), or None when one
    does not fit `budget`."""
    rows = min(m, MAX_CHUNK_ROWS)
    for fixed, per_row in phases:
        if fixed + per_row > budget:
            return None
        if per_row:
            rows = min(rows, (budget - fixed) // per_row)
    return rows, max(fixed + rows * per_row for fixed, per_row in phases)


def _output_bytes(m: int, n: int, k: int) -> int:
    """What `save_space` holds while it writes the space: a block of a matrix and its bytes."""
    return 2 * min(WRITE_BLOCK_BYTES, 4 * max(k * n, m * k))


def _plan_exact(m: int, n: int, k: int, budget: int) -> Plan | None:
    row = _chunk_row_bytes(n)
    small = min(m, n)
    eig = (8 * small * small + 16 * small * k + 320 * small, 0)    # the matrix, vectors, LAPACK workspace
    if m <= n:
        block = min(m, _GRAM_BLOCK)
        columns = min(n, MAX_SLAB_COLUMNS, (budget - 8 * m * m - 12 * block * block) // (8 * m))
        if columns < min(n, 256):
            return None
        phases = [(16 * n, row), (8 * m * m + 8 * m * columns + 12 * block * block, 0), eig,
                  (4 * k * n + 12 * m * k, row + 4 * k), (4 * k * n + 4 * m * k + _output_bytes(m, n, k), 0)]
        flops = m * m * n * (1 + block / m) + _eigh_flops(m, k) + 2 * m * n * k
    else:
        columns = 0
        phases = [(16 * n, row), (12 * n * n, row), eig, (4 * n * k + 4 * m * k, row + 4 * k),
                  (4 * k * n + 4 * m * k + _output_bytes(m, n, k), 0)]
        flops = 2 * m * n * n + _eigh_flops(n, k) + 2 * m * n * k
    fit = _fit(budget, phases, m)
    if fit is None:
        return None
    return Plan("exact", "models" if m <= n else "weights", k, 0, fit[0], columns, fit[1], flops)


def _randomized_phases(m: int, n: int, k: int, width: int) -> list[tuple[int, int]]:
    row = _chunk_row_bytes(n) + 4 * width
    return [(16 * n, row),                                              # moments
            (8 * n * width, row),                                       # P and the next P
            (4 * n * width + 4 * m * width + 8 * width * width, row),   # P, Y and YᵀY
            (4 * n * width + 4 * m * width + 4 * m * k + 8 * width * (width + 2 * k), 0),  # + coefficients, eig
            (4 * n * width + 4 * m * k + _output_bytes(m, n, k), 0)]    # the components live in P's memory


def _plan_randomized(m: int, n: int, k: int, budget: int, oversamples: int, power_iterations: int) -> Plan | None:
    width = min(k + oversamples, m, n)
    fit = _fit(budget, _randomized_phases(m, n, k, width), m)
    if fit is None:
        return None
    flops = ((4 * power_iterations + 2) * m * n * width + QR_NL2 * n * width**2 * max(power_iterations, 1)
             + _eigh_flops(width, k) + 2 * m * width**2 + 2 * k * width * n)
    return Plan("randomized", "", width, power_iterations, fit[0], 0, fit[1], flops)


def plan(m: int, n: int, k: int, memory: int, method: str = "auto", oversamples: int = DEFAULT_OVERSAMPLES,
         power_iterations: int = DEFAULT_POWER_ITERATIONS) -> Plan:
    """The route of `method` for K of M x N within `memory` bytes (the interpreter's OVERHEAD_BYTES
    counted in). 'auto' takes the exact route when it fits and either costs at most EXACT_PREFERENCE
    times the randomized route or is small (SMALL_FLOPS), else the randomized route."""
    check_components(m, n, k)
    if method not in PCA_METHODS:
        raise W2WError(f"method {method!r}: expected one of {', '.join(PCA_METHODS)}")
    if oversamples < 0 or power_iterations < 0:
        raise W2WError(f"oversamples ({oversamples}) and power iterations ({power_iterations}) must be >= 0")
    budget = memory - OVERHEAD_BYTES
    exact = _plan_exact(m, n, k, budget) if method in ("auto", "exact") else None
    randomized = (_plan_randomized(m, n, k, budget, oversamples, power_iterations)
                  if method in ("auto", "randomized") else None)
    if exact and randomized:
        cheap = exact.flops <= max(EXACT_PREFERENCE * randomized.flops, SMALL_FLOPS)
        return exact if cheap else randomized
    if exact or randomized:
        return exact or randomized
    width = min(k + oversamples, m, n)
    floor = OVERHEAD_BYTES + max(fixed + per_row for fixed, per_row in _randomized_phases(m, n, k, width))
    raise W2WError(f"--memory {memory / 1e9:.3g} GB is too small for K = {k} of M = {m} x N = {n} with the "
                   f"{method} method; the randomized method needs at least {floor / 1e9:.3g} GB")


def check_components(m: int, n: int, k: int) -> None:
    """SpaceError unless 1 <= K <= min(M - 1, N): centered data of M models has rank at most M - 1."""
    if k < 1:
        raise SpaceError(f"--components must be >= 1, got {k}")
    if k > m - 1:
        raise SpaceError(f"K = {k} components need at least K + 1 = {k + 1} models (the centered data of M models "
                         f"has rank at most M - 1), but the dataset has M = {m}")
    if k > n:
        raise SpaceError(f"K = {k} components, but a model has only N = {n} numbers")


# ----------------------------------------------------------------------------- the state of a build

class BuildState:
    """What a build's finished passes computed, kept in `directory` so that a build killed at any moment
    resumes after its last finished pass: the column moments after the first pass, P after each power
    iteration of the randomized route (L x N floats, written block by block), and the Dask route's result.
    `key` says which build (dataset files, K, plan, seed) a file belongs to; a file of another build is
    ignored with a warning. Without a directory it keeps nothing."""

    def __init__(self, directory: str | os.PathLike | None, key: dict):
        self.directory = None if directory is None else Path(directory)
        self.key = json.loads(json.dumps(key))

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def partial(self, name: str) -> Path:
        """Where `begin` creates `name` for others to fill (a temporary name of this process)."""
        return self.directory / f".{name}.safetensors.partial-{os.getpid()}"

    def _metadata(self, passes: int) -> dict[str, str]:
        return {"key": json.dumps(self.key), "passes": str(passes)}

    def save(self, name: str, tensors: list[torch.Tensor], passes: int) -> None:
        """Keep `tensors` as `name`, computed by `passes` passes (atomically)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path(name)) as tmp:
            write_tensors(tmp, {str(i): t for i, t in enumerate(tensors)}, self._metadata(passes))

    def begin(self, name: str, shapes: dict[str, tuple[int, ...]], passes: int) -> None:
        """Create `name`, float32 tensors of `shapes` computed by `passes` passes, under its `partial` name:
        the header, and zeros for others (the Dask route's workers) to fill; `commit` puts it in place."""
        self.directory.mkdir(parents=True, exist_ok=True)
        check_output(self.path(name))  # removes what killed builds left half-written
        SafetensorsWriter(self.partial(name), shapes, self._metadata(passes)).close()

    def commit(self, name: str) -> None:
        """Put the filled file that `begin` created in place."""
        os.replace(self.partial(name), self.path(name))

    def find(self, name: str) -> tuple[Path, dict, int, int] | None:
        """(path, safetensors header, data start, passes) of this build's file `name`; None when there is
        none (another build's file, or an unreadable one, is ignored with a warning)."""
        path = None if self.directory is None else self.path(name)
        if path is None or not path.is_file():
            return None
        try:
            header, start = read_safetensors_header(path)
            metadata = header.get("__metadata__", {})
            if json.loads(metadata.get("key", "null")) != self.key:
                warnings.warn(f"{path}: the state of another build (other data, K, plan or seed), ignored",
                              stacklevel=3)
                return None
            return path, header, start, int(metadata["passes"])
        except (FileFormatError, KeyError, ValueError) as error:
            warnings.warn(f"{path}: unreadable build state ignored ({error})", stacklevel=3)
            return None

    def load(self, name: str) -> tuple[list[torch.Tensor], int] | None:
        """(tensors, passes) kept as `name` by this build, in memory; None when there are none."""
        found = self.find(name)
        if found is None:
            return None
        path, header, start, passes = found
        return [mmap_tensor(path, header, start, str(i)).clone() for i in range(len(header) - 1)], passes


BUILD_STATE = Output("build state folder", folder=True, owns=owns_only(r"(moments|basis|result)\.safetensors"))


def remove_state(directory: str | os.PathLike) -> None:
    """Delete a build's state folder, when it holds only a build's state."""
    directory = Path(directory)
    if directory.is_dir() and BUILD_STATE.owns(directory):
        for file in directory.iterdir():
            file.unlink()
        directory.rmdir()


def build_key(dataset: WeightsDataset, k: int, plan_key: list, seed: int) -> dict:
    """What makes a build's passes the same: the dataset's files (names, sizes, modification times), K,
    the plan and the seed."""
    files = hashlib.sha256("\n".join(dataset.names).encode())
    for shard in dataset.shards:
        stat = (dataset.path / shard.file).stat()
        files.update(f"{shard.file} {stat.st_size} {stat.st_mtime_ns}".encode())
    return {"data": files.hexdigest()[:16], "k": k, "plan": plan_key, "seed": seed}


# ----------------------------------------------------------------------------- streamed passes (torch)

class _Chunks:
    """The dataset read chunk by chunk into one buffer of `rows` rows, allocated when first needed:
    a chunk is valid until the next one is read."""

    def __init__(self, dataset: WeightsDataset, rows: int):
        self.dataset, self.rows = dataset, min(rows, len(dataset))
        self.buffer: torch.Tensor | None = None

    def raw(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, chunk (r, N)) over the whole dataset."""
        m = len(self.dataset)
        if self.buffer is None:
            self.buffer = torch.empty(self.rows, self.dataset.layout.numel)   # (r, N)
        for start in range(0, m, self.rows):
            stop = min(start + self.rows, m)
            yield start, self.dataset.read_rows(start, stop, out=self.buffer[:stop - start])

    def standardized(self, mean: torch.Tensor, scale: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, Z_c (r, N)): chunks standardized in place."""
        for start, chunk in self.raw():
            yield start, chunk.sub_(mean).div_(scale)

    def release(self) -> None:
        self.buffer = None


def _column_moments(chunks: _Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: mean (N,) and std (N,) as float64; NaN/inf refused naming the model."""
    dataset = chunks.dataset
    moments = Moments(dataset.layout.numel)
    for start, chunk in chunks.raw():
        # NaN/inf make the row's sum so; torch.isfinite(chunk) would take 1.7 chunks of memory
        suspects = (~torch.isfinite(chunk.sum(dim=1))).nonzero()[:, 0]
        for i in suspects.tolist():
            if not torch.isfinite(chunk[i]).all():
                row = start + i
                raise SpaceError(f"{dataset.path}: model {dataset.names[row]!r} (row {row}) holds NaN/inf weights")
        moments.update(chunk)
    return moments.mean, moments.std()


# One pass each; the loops live in functions so that no chunk or slab outlives its pass.

def _models_gram(dataset: WeightsDataset, mean, scale, columns: int, log) -> torch.Tensor:
    """Z Zᵀ (M, M) float64 (lower triangle), accumulated over column slabs Z[:, b] (M, b)."""
    m, n = len(dataset), dataset.layout.numel
    gram = torch.zeros(m, m, dtype=torch.float64)
    for c0 in range(0, n, columns):
        c1 = min(c0 + columns, n)
        add_gram_lower(gram, dataset.read_columns(c0, c1).sub_(mean[c0:c1]).div_(scale[c0:c1]))
        log(f"Gram: columns {c1:,} of {n:,}")
    return gram


def _weights_gram(chunks: _Chunks, mean, scale, log) -> torch.Tensor:
    """Zᵀ Z (N, N) float64, accumulated over row chunks."""
    n = chunks.dataset.layout.numel
    covariance = torch.zeros(n, n, dtype=torch.float64)
    for start, z in chunks.standardized(mean, scale):
        covariance += z.T @ z                                   # (N, N)
        log(f"covariance: rows {start + len(z):,} of {len(chunks.dataset):,}")
    return covariance


def _left_product(chunks: _Chunks, mean, scale, left: torch.Tensor) -> torch.Tensor:
    """leftᵀ Z (K, N) for left (M, K), accumulated over row chunks: Σ left_cᵀ Z_c."""
    out = torch.zeros(left.shape[1], chunks.dataset.layout.numel)
    for start, z in chunks.standardized(mean, scale):
        out.addmm_(left[start:start + len(z)].T, z)
    return out


def _right_product(chunks: _Chunks, mean, scale, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z rightᵀ (M, K), its Gram (Z rightᵀ)ᵀ (Z rightᵀ) (K, K) float64) for right (K, N)."""
    out = torch.empty(len(chunks.dataset), right.shape[0])
    gram = torch.zeros(right.shape[0], right.shape[0], dtype=torch.float64)
    for start, z in chunks.standardized(mean, scale):
        y = torch.mm(z, right.T, out=out[start:start + len(z)])   # (r, K)
        gram += y.T @ y
    return out, gram


def _power_product(chunks: _Chunks, mean, scale, basis: torch.Tensor) -> torch.Tensor:
    """P Zᵀ Z (L, N) for P (L, N) in one pass: Σ (Z_c Pᵀ)ᵀ Z_c."""
    out = torch.zeros_like(basis)
    for _, z in chunks.standardized(mean, scale):
        out.addmm_((z @ basis.T).T, z)
    return out


def _exact_models(chunks: _Chunks, mean, scale, k, p: Plan, log) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z Zᵀ (M, M) over column slabs, its top K eigenpairs U Λ Uᵀ, then V = Λ^(-1/2) Uᵀ Z by one pass."""
    chunks.release()                                          # the slabs and the Gram need the room
    values, vectors = top_eigenpairs(_models_gram(chunks.dataset, mean, scale, p.columns, log), k)  # (K,), (M, K)
    check_rank(values, k)
    root = values.sqrt()
    components = _left_product(chunks, mean, scale, vectors.float())       # Uᵀ Z (K, N)
    chunks.release()
    components /= root.float()[:, None]                                    # V = Λ^(-1/2) Uᵀ Z
    return components, (vectors * root).float(), values                    # coefficients Z Vᵀ = U Λ^(1/2)


def _exact_weights(chunks: _Chunks, mean, scale, k, p: Plan, log) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zᵀ Z (N, N) over row chunks, whose top K eigenvectors are the components; coefficients by one pass."""
    covariance = _weights_gram(chunks, mean, scale, log)
    chunks.release()
    values, vectors = top_eigenpairs(covariance, k)           # (K,), (N, K)
    del covariance
    check_rank(values, k)
    components = vectors.T.float().contiguous()               # (K, N)
    coefficients, _ = _right_product(chunks, mean, scale, components)      # Z Vᵀ (M, K)
    chunks.release()
    return components, coefficients, values


def _randomized(chunks: _Chunks, mean, scale, k, p: Plan, seed: int, state: BuildState, log
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subspace iteration on Zᵀ Z with Rayleigh-Ritz (Halko et al. 2011, Alg. 4.4 and 5.1); P is kept in
    `state` after each power iteration, and taken from there when a killed build left it."""
    n = chunks.dataset.layout.numel
    saved = state.load("basis")
    if saved is not None:
        (basis,), done = saved
        log(f"resuming after power iteration {done} of {p.power_iterations} (from {state.directory})")
    else:
        basis, done = torch.randn(p.width, n, generator=torch.Generator().manual_seed(seed)), 0  # P (L, N)
        if p.power_iterations == 0:
            basis = orthonormalize_rows(basis)
    for iteration in range(done, p.power_iterations):
        basis = orthonormalize_rows(_power_product(chunks, mean, scale, basis))     # P = orth(P Zᵀ Z)
        state.save("basis", [basis], iteration + 1)
        log(f"power iteration {iteration + 1} of {p.power_iterations}")
    sketch, small = _right_product(chunks, mean, scale, basis)                     # Y = Z Pᵀ (M, L), YᵀY
    chunks.release()
    values, rotation = top_eigenpairs(small, k)                                     # (K,), W (L, K)
    del small
    check_rank(values, k)
    rotation = rotation.float()
    coefficients = sketch @ rotation                                                # Y W (M, K)
    del sketch
    for c0 in range(0, n, MAX_SLAB_COLUMNS):                                        # Wᵀ P, in P's memory
        basis[:k, c0:c0 + MAX_SLAB_COLUMNS] = rotation.T @ basis[:, c0:c0 + MAX_SLAB_COLUMNS]
    return basis[:k], coefficients, values                                          # (K, N), (M, K), (K,)


# ----------------------------------------------------------------------------- attributes and the space

def read_attributes(path: str | os.PathLike, names: tuple[str, ...]) -> pd.DataFrame:
    """The attribute table (CSV, first column the model names) with its rows in the dataset's order;
    a dataset model without a row, or a row naming no dataset model, is an error."""
    path = Path(path)
    table = read_attribute_table(path)
    known = set(table.index)
    missing = [name for name in names if name not in known]
    if missing:
        raise FileFormatError(f"{path}: {len(missing)} dataset models have no row, e.g. {missing[0]!r}")
    extra = sorted(known - set(names))
    if extra:
        raise FileFormatError(f"{path}: {len(extra)} rows name no dataset model, e.g. {extra[0]!r}")
    table = table.loc[list(names)]
    table.index.name = table.index.name or "name"
    return table


@dataclass(frozen=True)
class BuildConfig:
    """How `build_space` computes the PCA and what the space records; its fields are `w2w build`'s flags
    (a field left None: what its help says)."""

    memory: int | str = field(default=DEFAULT_MEMORY, metadata={
        "help": "memory budget, e.g. 4GB, 16GiB: of this process with the torch backend, the interpreter included; "
                "of each worker with the dask backend (the LocalCluster's, or the --scheduler's, whose limits are "
                "checked before work), which sizes its blocks", "type": MEMORY})
    backend: str = field(default="torch", metadata={
        "help": "torch: streamed on this machine; dask: in blocks on a dask.distributed cluster",
        "choices": BACKENDS})
    method: str = field(default="auto", metadata={
        "help": f"torch backend: exact (eigendecomposition of the smaller Gram matrix) or randomized (subspace "
                f"iteration); auto: exact when it fits --memory and costs at most {EXACT_PREFERENCE}x the randomized "
                f"route", "choices": PCA_METHODS})
    oversamples: int = field(default=DEFAULT_OVERSAMPLES, metadata={
        "help": "randomized: extra trial vectors beyond K", "type": NON_NEGATIVE})
    power_iterations: int = field(default=DEFAULT_POWER_ITERATIONS, metadata={
        "help": f"randomized: passes of subspace iteration; more are more accurate when the spectrum decays slowly, "
                f"up to {POWER_ITERATIONS_MAX} (each reads the whole dataset; at {POWER_ITERATIONS_MAX} even a 10%% "
                f"spectral gap converges below float32's rounding)", "type": POWER_ITERATIONS})
    seed: int = field(default=0, metadata={"help": "randomized: seed of the trial vectors", "type": SEED})
    attributes: str | os.PathLike | None = field(default=None, metadata={
        "help": "attribute table: CSV, first column the model names, one row per dataset model (default: none)",
        "metavar": "TABLE_CSV"})
    scheduler: str | None = field(default=None, metadata={
        "help": "dask backend: address of a dask.distributed scheduler, whose workers see the dataset and --state at "
                "the same paths (default: a LocalCluster of --workers processes here)", "metavar": "ADDRESS"})
    workers: int | None = field(default=None, metadata={
        "help": "dask backend without a scheduler: worker processes of the LocalCluster, one thread and --memory each "
                "(default: one per core)", "type": COUNT})
    base_model: str | None = field(default=None, metadata={"help": "base model id to record (default: the dataset's)",
                                                           "metavar": "ID"})
    state: str | os.PathLike | None = field(default=None, metadata={
        "help": "directory that keeps the finished passes, to resume from, and the dask backend's result (default: "
                "none kept; the dask backend then works in a temporary folder, and needs one with --scheduler; w2w "
                "build: OUT.build-state, removed once OUT is written)", "metavar": "DIR"})

    def __post_init__(self):
        parse_memory(self.memory)
        if self.workers is not None:
            if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
                raise SettingError("workers", f"must be an integer >= 1, got {self.workers!r}")
            if self.scheduler:
                raise SettingError("workers", "sizes a LocalCluster: a scheduler's cluster has its own workers")


def _build_torch(dataset: WeightsDataset, k: int, memory: int, config: BuildConfig, log: Callable[[str], None]
                 ) -> tuple[torch.Tensor, ...]:
    """(mean, std, components, coefficients, explained variance) by the torch backend's plan."""
    m, n = len(dataset), dataset.layout.numel
    p = plan(m, n, k, memory, config.method, config.oversamples, config.power_iterations)
    log(f"plan: {p.describe()}")
    chunks = _Chunks(dataset, p.rows)
    kept = BuildState(config.state, build_key(dataset, k, p.key(), config.seed))
    saved = kept.load("moments")
    if saved is not None:
        (mean, std), _ = saved
        log(f"mean and std read from {kept.directory}")
    else:
        mean, std = (t.float() for t in _column_moments(chunks))  # float32, as everything after uses them
        kept.save("moments", [mean, std], 1)
        log("mean and std done")
    args = (chunks, mean, safe_scale(std), k, p)
    if p.method == "randomized":
        components, coefficients, values = _randomized(*args, config.seed, kept, log)
    elif p.side == "models":
        components, coefficients, values = _exact_models(*args, log)
    else:
        components, coefficients, values = _exact_weights(*args, log)
    fix_signs(components, coefficients)
    return mean, std, components, coefficients, (values / (m - 1)).float()


def build_space(dataset: WeightsDataset, k: int, *, config: BuildConfig = BuildConfig(),
                log: Callable[[str], None] | None = None) -> Space:
    """The w2w space of the top `k` components of `dataset`, with every model's coefficients (M, K)
    and explained variance (K,). See the module docstring for backends and methods. With `config.state`
    (a directory), the build keeps its finished passes there (`BuildState`) and resumes from them; the
    caller removes the directory once the space is saved (the dask backend's space maps files there)."""
    log = log or (lambda message: None)
    check_seed(config.seed)
    check_power_iterations(config.power_iterations)
    memory = parse_memory(config.memory)
    check_components(len(dataset), dataset.layout.numel, k)
    table = read_attributes(config.attributes, dataset.names) if config.attributes is not None else None
    if config.backend == "torch":
        if config.scheduler or config.workers is not None:
            raise W2WError("--scheduler and --workers go with --backend dask")
        mean, std, components, coefficients, variance = _build_torch(dataset, k, memory, config, log)
    elif config.backend == "dask":
        if config.method == "exact":
            raise W2WError("the dask backend computes randomized PCA only; use --backend torch for --method exact")
        from . import pca_dask

        mean, std, components, coefficients, variance = pca_dask.build(dataset, k, memory, config, log)
    else:
        raise W2WError(f"backend {config.backend!r}: expected one of {', '.join(BACKENDS)}")
    return Space(mean.float(), std.float(), components, dataset.layout, coefficients, table, variance,
                 config.base_model if config.base_model is not None else dataset.base_model)
