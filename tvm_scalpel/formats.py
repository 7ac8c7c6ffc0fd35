"""Group-sparse (1×w block-sparse) weight format: encode, decode, group importance, size accounting.

A weight matrix W (out × in; a conv weight flattened per filter to out × in·kh·kw) is cut along the
reduction axis into aligned groups of ``w`` contiguous weights. Kept groups are stored as
``values[n_groups, w]`` plus one block-column index per group and a row pointer per row: BSR with
1×w blocks. A ragged last group (``in % w != 0``) is zero-padded in ``values``.

The GPU's tile-sparse format is the same idea in two dimensions: rows×k tiles (``encode_tiles``), one
tile-column index per kept tile, the unit of GPU-aware fine-grain pruning (``HardwareSpec.tile``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FormatError

INDEX_DTYPES = ("int32", "int16")


def flatten_per_filter(weight: np.ndarray) -> np.ndarray:
    """(out, in, kh, kw) conv weight → (out, in·kh·kw); a 2-D weight is returned as is."""
    weight = np.asarray(weight)
    if weight.ndim == 2:
        return weight
    if weight.ndim < 2:
        raise FormatError(f"expected a 2-D (out, in) or N-D conv weight, found shape {weight.shape}")
    return weight.reshape(weight.shape[0], -1)


def _as_2d(weight: np.ndarray) -> np.ndarray:
    w2 = flatten_per_filter(weight)
    if w2.size == 0:
        raise FormatError(f"expected a non-empty weight, found shape {np.shape(weight)}")
    return w2


def _check_width(w: int) -> int:
    if not isinstance(w, (int, np.integer)) or w < 1:
        raise FormatError(f"group width w: expected a positive int (the SIMD lanes), found {w!r}")
    return int(w)


def padded_groups(weight: np.ndarray, w: int) -> np.ndarray:
    """View the weight as (out, n_groups, w), zero-padding the ragged last group."""
    w = _check_width(w)
    w2 = _as_2d(weight)
    out, k = w2.shape
    ng = -(-k // w)
    if ng * w != k:
        w2 = np.concatenate([w2, np.zeros((out, ng * w - k), w2.dtype)], axis=1)
    return w2.reshape(out, ng, w)


def group_rms(weight: np.ndarray, w: int) -> np.ndarray:
    """RMS of each aligned group, shape (out, n_groups): Scalpel's group importance.

    The ragged last group's mean is over its real members only, so padding does not lower its score.
    """
    groups = padded_groups(weight, w).astype(np.float64)
    k = _as_2d(weight).shape[1]
    counts = np.full(groups.shape[1], w, dtype=np.float64)
    counts[-1] = k - (groups.shape[1] - 1) * w
    return np.sqrt((groups**2).sum(axis=2) / counts)


def group_mask(weight: np.ndarray, w: int) -> np.ndarray:
    """Boolean (out, n_groups): True where a group has any nonzero weight (the groups to keep)."""
    return np.any(padded_groups(weight, w) != 0, axis=2)


@dataclass(frozen=True)
class SizeReport:
    """Bytes of one stored weight, by part."""

    values: int
    indices: int
    row_pointers: int

    @property
    def total(self) -> int:
        return self.values + self.indices + self.row_pointers

    @property
    def index_fraction(self) -> float:
        """Index bytes over values + indices (row pointers excluded): 1/(w+1) for fp32/int32."""
        denom = self.values + self.indices
        return self.indices / denom if denom else 0.0


@dataclass(frozen=True, eq=False)
class GroupSparseMatrix:
    """A weight in 1×w block-sparse form. Arrays are read-only; ``shape`` is the 2-D (out, in)."""

    shape: tuple[int, int]
    w: int
    values: np.ndarray  # [n_groups, w]
    col_idx: np.ndarray  # [n_groups] block column (group number in its row), sorted per row
    row_ptr: np.ndarray  # [out + 1]

    @property
    def n_groups(self) -> int:
        return int(self.col_idx.shape[0])

    @property
    def groups_per_row(self) -> int:
        return -(-self.shape[1] // self.w)

    @property
    def group_density(self) -> float:
        """Kept groups / all groups."""
        return self.n_groups / (self.shape[0] * self.groups_per_row)

    def to_dense(self) -> np.ndarray:
        out, k = self.shape
        dense = np.zeros((out, self.groups_per_row, self.w), self.values.dtype)
        rows = np.repeat(np.arange(out), np.diff(self.row_ptr))
        dense[rows, self.col_idx] = self.values
        return dense.reshape(out, -1)[:, :k].copy()

    def sizes(self, value_bytes: int | None = None, index_bytes: int = 4) -> SizeReport:
        vb = value_bytes or self.values.dtype.itemsize
        return SizeReport(
            values=self.values.size * vb,
            indices=self.n_groups * index_bytes,
            row_pointers=(self.shape[0] + 1) * index_bytes,
        )


def encode(weight: np.ndarray, w: int, keep: np.ndarray | None = None,
           index_dtype: str = "int32") -> GroupSparseMatrix:
    """Encode a weight at group width ``w``. By default keeps every group with a nonzero weight.

    ``keep`` (out, n_groups) bool selects groups explicitly; values of dropped groups are discarded.
    """
    if index_dtype not in INDEX_DTYPES:
        raise FormatError(f"index_dtype: expected one of {INDEX_DTYPES}, found {index_dtype!r}")
    groups = padded_groups(weight, w)
    out, ng, _ = groups.shape
    if keep is None:
        keep = np.any(groups != 0, axis=2)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (out, ng):
        raise FormatError(f"keep mask: expected shape {(out, ng)}, found {keep.shape}")
    k = _as_2d(weight).shape[1]
    if max(k, out) >= np.iinfo(index_dtype).max:
        raise FormatError(f"a {out}x{k} weight does not fit {index_dtype} indices; use int32")
    rows, cols = np.nonzero(keep)
    row_ptr = np.zeros(out + 1, dtype=index_dtype)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    values = np.ascontiguousarray(groups[rows, cols])
    col_idx = cols.astype(index_dtype)
    for arr in (values, col_idx, row_ptr):
        arr.setflags(write=False)
    return GroupSparseMatrix(shape=(out, k), w=int(w), values=values, col_idx=col_idx, row_ptr=row_ptr)


@dataclass(frozen=True, eq=False)
class CSRMatrix:
    """Plain CSR (one column index per nonzero): the format of traditional, unstructured pruning."""

    shape: tuple[int, int]
    values: np.ndarray
    col_idx: np.ndarray
    row_ptr: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, self.values.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.row_ptr))
        dense[rows, self.col_idx] = self.values
        return dense

    def sizes(self, value_bytes: int | None = None, index_bytes: int = 4) -> SizeReport:
        vb = value_bytes or self.values.dtype.itemsize
        return SizeReport(values=self.nnz * vb, indices=self.nnz * index_bytes,
                          row_pointers=(self.shape[0] + 1) * index_bytes)


def encode_csr(weight: np.ndarray) -> CSRMatrix:
    """CSR of the nonzeros of a 2-D (or per-filter flattened) weight."""
    w2 = _as_2d(weight)
    rows, cols = np.nonzero(w2)
    row_ptr = np.zeros(w2.shape[0] + 1, dtype="int32")
    np.cumsum(np.bincount(rows, minlength=w2.shape[0]), out=row_ptr[1:])
    values = np.ascontiguousarray(w2[rows, cols])
    col_idx = cols.astype("int32")
    for arr in (values, col_idx, row_ptr):
        arr.setflags(write=False)
    return CSRMatrix(shape=w2.shape, values=values, col_idx=col_idx, row_ptr=row_ptr)


def dense_bytes(weight: np.ndarray, value_bytes: int | None = None) -> int:
    """Bytes of the weight stored dense."""
    weight = np.asarray(weight)
    return weight.size * (value_bytes or weight.dtype.itemsize)


def size_table(weight: np.ndarray, w: int, value_bytes: int | None = None,
               index_bytes: int = 4) -> dict[str, SizeReport]:
    """Dense, CSR and group-sparse sizes of the same weight, side by side."""
    w2 = _as_2d(weight)
    vb = value_bytes or w2.dtype.itemsize
    return {
        "dense": SizeReport(values=dense_bytes(w2, vb), indices=0, row_pointers=0),
        "csr": encode_csr(w2).sizes(vb, index_bytes),
        "group": encode(w2, w).sizes(vb, index_bytes),
    }


# ----------------------------------------------------------------------------------------------
# Tile-sparse (r×c blocks, one tile-column index per kept tile): GPU-aware fine-grain pruning
# ----------------------------------------------------------------------------------------------


def padded_tiles(weight: np.ndarray, rows: int, k: int) -> np.ndarray:
    """View the weight as (row blocks, k blocks, rows, k), zero-padding ragged edges on both axes."""
    rows, k = _check_width(rows), _check_width(k)
    w2 = _as_2d(weight)
    out, kk = w2.shape
    rb, kb = -(-out // rows), -(-kk // k)
    padded = np.zeros((rb * rows, kb * k), w2.dtype)
    padded[:out, :kk] = w2
    return padded.reshape(rb, rows, kb, k).transpose(0, 2, 1, 3)


def tile_rms(weight: np.ndarray, rows: int, k: int) -> np.ndarray:
    """RMS of each tile over its real (unpadded) members, shape (row blocks, k blocks)."""
    tiles = padded_tiles(weight, rows, k).astype(np.float64)
    out, kk = _as_2d(weight).shape
    rb, kb = tiles.shape[:2]
    r_count = np.full(rb, rows, dtype=np.float64)
    r_count[-1] = out - (rb - 1) * rows
    k_count = np.full(kb, k, dtype=np.float64)
    k_count[-1] = kk - (kb - 1) * k
    return np.sqrt((tiles**2).sum(axis=(2, 3)) / np.outer(r_count, k_count))


def tile_mask(weight: np.ndarray, rows: int, k: int) -> np.ndarray:
    """Boolean (row blocks, k blocks): True where a tile has any nonzero weight."""
    return np.any(padded_tiles(weight, rows, k) != 0, axis=(2, 3))


@dataclass(frozen=True, eq=False)
class TileSparseMatrix:
    """A weight as kept rows×k tiles: ``values[T, rows, k]``, ``col_idx[T]`` (tile column, sorted per
    row block), ``row_ptr[row blocks + 1]``. Ragged edge tiles are zero-padded in ``values``."""

    shape: tuple[int, int]
    tile: tuple[int, int]
    values: np.ndarray
    col_idx: np.ndarray
    row_ptr: np.ndarray

    @property
    def n_tiles(self) -> int:
        return int(self.col_idx.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(row blocks, k blocks)."""
        return -(-self.shape[0] // self.tile[0]), -(-self.shape[1] // self.tile[1])

    @property
    def tile_density(self) -> float:
        """Kept tiles / all tiles."""
        rb, kb = self.grid
        return self.n_tiles / (rb * kb)

    def to_dense(self) -> np.ndarray:
        (rb, kb), (r, k) = self.grid, self.tile
        dense = np.zeros((rb, kb, r, k), self.values.dtype)
        blocks = np.repeat(np.arange(rb), np.diff(self.row_ptr))
        dense[blocks, self.col_idx] = self.values
        return dense.transpose(0, 2, 1, 3).reshape(rb * r, kb * k)[: self.shape[0], : self.shape[1]].copy()

    def sizes(self, value_bytes: int | None = None, index_bytes: int = 4) -> SizeReport:
        vb = value_bytes or self.values.dtype.itemsize
        return SizeReport(values=self.values.size * vb, indices=self.n_tiles * index_bytes,
                          row_pointers=(self.grid[0] + 1) * index_bytes)


def encode_tiles(weight: np.ndarray, rows: int, k: int, keep: np.ndarray | None = None) -> TileSparseMatrix:
    """Encode a weight in rows×k tiles; by default keeps every tile with a nonzero weight.

    ``keep`` (row blocks, k blocks) bool selects tiles explicitly; values of dropped tiles are discarded.
    """
    tiles = padded_tiles(weight, rows, k)
    rb, kb = tiles.shape[:2]
    keep = tile_mask(weight, rows, k) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != (rb, kb):
        raise FormatError(f"tile keep mask: expected shape {(rb, kb)}, found {keep.shape}")
    blocks, cols = np.nonzero(keep)
    row_ptr = np.zeros(rb + 1, dtype="int32")
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    values = np.ascontiguousarray(tiles[blocks, cols])
    col_idx = cols.astype("int32")
    for arr in (values, col_idx, row_ptr):
        arr.setflags(write=False)
    return TileSparseMatrix(shape=_as_2d(weight).shape, tile=(int(rows), int(k)), values=values,
                            col_idx=col_idx, row_ptr=row_ptr)
