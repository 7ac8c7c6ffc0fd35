"""Pure weight-pruning rules (numpy in, boolean masks out): Scalpel's SIMD-aware groups, GPU-aware tiles
and Han's magnitude.

Kept separate from the lifecycle so they can be tested number by number.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from .errors import TrainingError


def simd_group_keep(weight: np.ndarray, w: int, threshold: float) -> np.ndarray:
    """Which aligned 1×w groups to keep, shape (rows, ceil(K/w)).

    A group is pruned iff its RMS < ``threshold`` (absolute, the same for every layer); the last group
    of every row is always kept, as in the released code.
    """
    if threshold < 0:
        raise TrainingError(f"group threshold: expected a non-negative RMS, found {threshold}")
    w2 = formats.flatten_per_filter(np.asarray(weight))
    if w2.shape[0] == 0:
        return np.zeros((0, -(-w2.shape[1] // w)), dtype=bool)
    keep = formats.group_rms(w2, w) >= threshold
    keep[:, -1] = True
    return keep


def simd_group_keep_sparsity(weight: np.ndarray, w: int, sparsity: float) -> np.ndarray:
    """Which aligned 1×w groups to keep, shape (rows, ceil(K/w)), pruning the ``sparsity`` fraction of the
    layer's groups with the lowest RMS: a per-layer target (traditional pruning's schedule) instead of
    the paper's global threshold. The last group of every row is kept as in ``simd_group_keep`` (so a
    layer with one group per row prunes nothing). Ranked within the layer, ties broken by position;
    already-zero groups have RMS 0 and go first, so raising ``sparsity`` stage by stage is cumulative.
    """
    if not 0.0 <= sparsity < 1.0:
        raise TrainingError(f"group sparsity: expected the fraction of a layer's groups to prune in [0, 1), "
                            f"found {sparsity}")
    w2 = formats.flatten_per_filter(np.asarray(weight))
    rms = formats.group_rms(w2, w) if w2.shape[0] else np.zeros((0, -(-w2.shape[1] // w)))
    candidates = rms[:, :-1].ravel()  # every group but the last of each row
    kept = np.ones(candidates.size, dtype=bool)
    kept[np.argsort(candidates, kind="stable")[:min(int(round(sparsity * rms.size)), candidates.size)]] = False
    keep = np.ones(rms.shape, dtype=bool)
    keep[:, :-1] = kept.reshape(rms.shape[0], rms.shape[1] - 1)
    return keep


def expand_groups(keep: np.ndarray, k: int, w: int) -> np.ndarray:
    """(rows, n_groups) group mask → (rows, k) element mask (the ragged last group cropped)."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape[1] != -(-k // w):
        raise TrainingError(f"expand_groups: {keep.shape[1]} groups cannot cover K={k} at w={w}")
    return np.repeat(keep, w, axis=1)[:, :k]


def tile_keep(weight: np.ndarray, rows: int, k: int, sparsity: float) -> np.ndarray:
    """Which rows×k tiles to keep, shape (row blocks, k blocks): all but the ``sparsity`` fraction of the
    layer's tiles with the lowest RMS (over each tile's real members; ``formats.tile_rms``).

    Ranked within the layer, ties broken by tile order (row-block major). Already-zero tiles have RMS 0
    and go first, so raising ``sparsity`` stage by stage is cumulative.
    """
    if not 0.0 <= sparsity < 1.0:
        raise TrainingError(f"tile sparsity: expected a fraction in [0, 1), found {sparsity}")
    w2 = formats.flatten_per_filter(np.asarray(weight))
    grid = (-(-w2.shape[0] // rows), -(-w2.shape[1] // k))
    if w2.size == 0:
        return np.zeros(grid, dtype=bool)
    rms = formats.tile_rms(w2, rows, k).ravel()
    keep = np.ones(rms.size, dtype=bool)
    keep[np.argsort(rms, kind="stable")[:int(round(sparsity * rms.size))]] = False
    return keep.reshape(grid)


def expand_tiles(keep: np.ndarray, shape: tuple[int, int], rows: int, k: int) -> np.ndarray:
    """(row blocks, k blocks) tile mask → element mask of the 2-D ``shape`` (ragged edge tiles cropped)."""
    keep = np.asarray(keep, dtype=bool)
    out, kk = shape
    if keep.shape != (-(-out // rows), -(-kk // k)):
        raise TrainingError(f"expand_tiles: a {keep.shape} tile grid cannot cover a {out}x{kk} weight "
                            f"in {rows}x{k} tiles")
    return np.repeat(np.repeat(keep, rows, axis=0), k, axis=1)[:out, :kk]


def magnitude_keep(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep all but the ``sparsity`` fraction of smallest-|w| weights (unstructured, Han et al.).

    Weights already zero are the smallest, so raising ``sparsity`` stage by stage is cumulative.
    """
    if not 0.0 <= sparsity < 1.0:
        raise TrainingError(f"magnitude sparsity: expected a fraction in [0, 1), found {sparsity}")
    a = np.abs(np.asarray(weight)).ravel()
    n_prune = int(round(sparsity * a.size))
    keep = np.ones(a.size, dtype=bool)
    keep[np.argsort(a, kind="stable")[:n_prune]] = False
    return keep.reshape(np.shape(weight))


def magnitude_keep_std(weight: np.ndarray, quality: float) -> np.ndarray:
    """Han et al.'s per-layer rule: prune |w| < quality · std(w)."""
    if quality < 0:
        raise TrainingError(f"magnitude quality: expected a non-negative factor, found {quality}")
    weight = np.asarray(weight)
    return np.abs(weight) >= quality * float(weight.std())
