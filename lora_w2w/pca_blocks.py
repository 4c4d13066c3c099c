"""The work of one task of the Dask PCA (`pca_dask`), on blocks of the standardized matrix Z (M, N).

Numpy only (no torch), so that a dask worker starts at once. Each function takes the task's small
arguments first, then the blocks it depends on, and returns one array, or None when it writes a file.
A row block's `source` is (pieces, N, dtype): `pieces` lists (shard file, byte offset of its first row,
rows), as `WeightsDataset.row_files` gives them; files the workers write are safetensors files that
the client created with their header (`BuildState.begin`), filled in place.

Letters: r rows of a row block, c columns of a column block, L = K + oversamples, K components.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

MOMENT_BAND = 2048  # columns of a block converted to float64 at a time by `block_moments`


# ----------------------------------------------------------------------------- the data

def given(array: np.ndarray) -> np.ndarray:
    """An array the client gives, as a task's result: the scheduler keeps the task and remakes the array
    if the worker holding it dies (a scattered array would be lost with it)."""
    return array


def read_block(source: tuple, c0: int, c1: int) -> np.ndarray:
    """W[rows of source, c0:c1] (r, c) float32, through memory maps dropped after the copy."""
    pieces, n, dtype = source
    out = np.empty((sum(rows for _, _, rows in pieces), c1 - c0), np.float32)   # (r, c)
    at = 0
    for path, offset, rows in pieces:
        shard = np.memmap(path, np.dtype(dtype), "r", offset, (rows, n))       # (rows, N)
        out[at:at + rows] = shard[:, c0:c1]
        del shard
        at += rows
    return out


def standardized(source: tuple, c0: int, c1: int, scale: np.ndarray) -> np.ndarray:
    """Z[rows, c0:c1] = (W - mean) / std (r, c) float32, for scale (2, c): mean, then std or 1 where std is 0."""
    z = read_block(source, c0, c1)   # (r, c)
    z -= scale[0]
    z /= scale[1]
    return z


def block_moments(source: tuple, c0: int, c1: int) -> np.ndarray:
    """(2, c) float64: the column means of a block and the sums of squared deviations from them (NaN/inf
    where the block holds NaN/inf)."""
    w = read_block(source, c0, c1)                        # (r, c)
    out = np.empty((2, c1 - c0))                          # (2, c)
    for b in range(0, c1 - c0, MOMENT_BAND):
        x = w[:, b:b + MOMENT_BAND].astype(np.float64)    # (r, band)
        out[0, b:b + MOMENT_BAND] = mean = x.mean(0)
        x -= mean
        out[1, b:b + MOMENT_BAND] = np.square(x, out=x).sum(0)
    return out


def merge_moments(counts: tuple[int, ...], *parts: np.ndarray) -> np.ndarray:
    """The moments (2, c) of the rows of `parts` (2, c) together, part i having counts[i] rows (Chan,
    Golub & LeVeque 1979), merged left to right."""
    mean, m2 = parts[0].copy()                            # (c,), (c,)
    total = counts[0]
    for count, part in zip(counts[1:], parts[1:]):
        delta = part[0] - mean                            # (c,)
        merged = total + count
        mean += delta * (count / merged)
        m2 += part[1] + np.square(delta) * (total * count / merged)
        total = merged
    return np.stack([mean, m2])


def first_bad_row(source: tuple, c0: int, c1: int) -> int:
    """The first row of the block (0 = its first) holding NaN/inf, or -1."""
    bad = ~np.isfinite(read_block(source, c0, c1)).all(axis=1)    # (r,)
    return int(np.argmax(bad)) if bad.any() else -1


# ----------------------------------------------------------------------------- products

def operand(block: np.ndarray) -> np.ndarray:
    """`block` C-ordered and aligned (copied if it is not). numpy's matmul calls BLAS for aligned operands
    only and otherwise sums in its own order, and distributed may hand a task a block that sits at an
    unaligned offset of a message from another worker: without this a product's bits would depend on
    which worker made its inputs, and a rerun or resumed build would not repeat a build bit for bit."""
    return np.require(block, requirements="CA")


def sketch(source: tuple, c0: int, c1: int, scale: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Z_ij P_jᵀ (r, L), block (i, j)'s share of Y_i = Z_i Pᵀ, for P_j (L, c)."""
    return standardized(source, c0, c1, scale) @ operand(basis).T


def power(source: tuple, c0: int, c1: int, scale: np.ndarray, sketched: np.ndarray) -> np.ndarray:
    """Y_iᵀ Z_ij (L, c), block (i, j)'s share of G_j = Yᵀ Z_j, for Y_i (r, L)."""
    return operand(sketched).T @ standardized(source, c0, c1, scale)


def add(*parts: np.ndarray) -> np.ndarray:
    """The sum of equal-shaped blocks, added left to right."""
    out = parts[0].copy()
    for part in parts[1:]:
        out += part
    return out


def gram_of_rows(block: np.ndarray) -> np.ndarray:
    """block blockᵀ (L, L) float64 for a column block (L, c)."""
    wide = block.astype(np.float64)    # (L, c)
    return wide @ wide.T               # numpy takes the symmetric product (syrk) for x @ x.T


def gram_of_columns(block: np.ndarray) -> np.ndarray:
    """blockᵀ block (L, L) float64 for a row block (r, L)."""
    tall = block.astype(np.float64)    # (r, L)
    return tall.T @ tall


def random_basis(seed: int, j: int, width: int, columns: int) -> np.ndarray:
    """Column block j (L, c) of the Gaussian start P of subspace iteration, from (seed, j) alone."""
    return np.random.default_rng([seed, j]).standard_normal((width, columns), dtype=np.float32)


def transform(seed: tuple[int, ...], n: int, matrix: np.ndarray, replaced: np.ndarray,
              block: np.ndarray) -> np.ndarray:
    """matrix block (L, c) for matrix (L, L) and a column block (L, c); the rows listed in `replaced`
    (L',) are instead fresh Gaussian rows of norm ~1 over all N columns, from `seed` (which names the
    block) alone."""
    out = operand(matrix) @ operand(block)                                # (L, c)
    if len(replaced):
        rows = np.random.default_rng(list(seed)).standard_normal((len(replaced), block.shape[1]), dtype=np.float32)
        out[replaced] = rows / np.float32(np.sqrt(n))                     # (L', c)
    return out


def rotate(rotation: np.ndarray, block: np.ndarray) -> np.ndarray:
    """rotationᵀ block (K, c): column block j of the components Wᵀ P, for W (L, K) and P_j (L, c)."""
    return operand(rotation).T @ operand(block)


def row_maxima(block: np.ndarray) -> np.ndarray:
    """(2, K): each row's largest |.| and the entry where it first occurs (its sign decides the row's)."""
    first = np.abs(block).argmax(axis=1)                  # (K,)
    entry = block[np.arange(len(block)), first]           # (K,)
    return np.stack([np.abs(entry), entry])


# ----------------------------------------------------------------------------- files

def _tensor_at(path: str, name: str) -> tuple[int, list[int]]:
    """(byte offset of tensor `name`'s data, its shape) in the safetensors file `path`."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(length))[name]
    return 8 + length + info["data_offsets"][0], info["shape"]


def load_columns(path: str, name: str, c0: int, c1: int) -> np.ndarray:
    """Columns c0 .. c1 (rows, c) of the float32 matrix `name` in the safetensors file `path`."""
    offset, shape = _tensor_at(path, name)
    matrix = np.memmap(path, np.float32, "r", offset, tuple(shape))    # (rows, columns)
    out = np.array(matrix[:, c0:c1])
    del matrix
    return out


def _write(path: str, writes) -> None:
    """(byte offset, float32 array) pairs written in place, then flushed to disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, array in writes:
            os.pwrite(fd, np.ascontiguousarray(array, np.float32).data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_array(path: str, name: str, array: np.ndarray) -> None:
    """Tensor `name` in `path` := array (its shape)."""
    offset, _ = _tensor_at(path, name)
    _write(path, [(offset, array)])


def write_columns(path: str, name: str, c0: int, block: np.ndarray, signs: np.ndarray | None = None) -> None:
    """Columns c0 .. c0 + c of matrix `name` in `path` := block (rows, c), each row times its sign (rows,)."""
    offset, (rows, columns) = _tensor_at(path, name)
    if signs is not None:
        block = block * signs[:, None]
    _write(path, ((offset + 4 * (i * columns + c0), block[i]) for i in range(rows)))


def write_rotated_rows(path: str, name: str, r0: int, rotation: np.ndarray, signs: np.ndarray,
                       sketched: np.ndarray) -> None:
    """Rows r0 .. r0 + r of matrix `name` (M, K) in `path` := (Y_i W) * signs, for Y_i (r, L), W (L, K): the
    block's coefficients."""
    offset, (_, columns) = _tensor_at(path, name)
    _write(path, [(offset + 4 * r0 * columns, (operand(sketched) @ operand(rotation)) * signs)])
