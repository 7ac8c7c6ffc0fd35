"""RewriteTileSparse (CUDA): Linear and Conv2d layers run our tiled GPU kernels, which walk a per-row-block
list of kept weight tiles (``HardwareSpec.tile``) and so skip every pruned tile.

- Linear → ``call_tir(tile_gemv | tile_gemm, [values, tile_cols, row_ptr, x])`` (layout "nk").
- Conv2d (NCHW/OIHW, groups 1, dilation 1, symmetric padding) → GPU ``im2col`` of the whole batch, one
  tile GEMM over the weight flattened per filter (layout "kn"), and a reshape (+ transpose for batch > 1).

A layer whose fraction of all-zero tiles reaches its threshold is encoded without its zero tiles (they
are skipped). Below its threshold a conv still runs our kernel, with every tile kept (dense: TVM's GPU
rules, dlight, have no convolution schedule), and a Linear is left to dlight's GEMV/matmul rules.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import tvm
from tvm import relax

from .. import formats
from ..errors import TargetError
from ..schedules import cuda
from ..target import HardwareClass, HardwareSpec
from ._layers import Conv2d, LayerRewriter, Linear, run_layer_pass

__all__ = ["TileSparseConfig", "RewriteTileSparse"]

logger = logging.getLogger(__name__)

# Not yet measured on a GPU (none was lent while this was written): a Linear with under 30 % zero tiles
# stays with dlight's dense GEMV/matmul, which reads the weight with wider loads than our tile walk; a
# conv skips its zero tiles whenever it has any (a skipped tile is a whole reduction step saved).
DEFAULT_MIN_SPARSITY_FC = 0.3
DEFAULT_MIN_SPARSITY_CONV = 1e-9


@dataclass(frozen=True)
class TileSparseConfig:
    """``layers`` maps a layer key (``"linear:OUTxIN"``, ``"conv2d:OCxICxKHxKW"``) to its minimum
    fraction of zero tiles for skipping them; a value > 1 keeps the layer dense.
    ``emulate`` builds the kernels' CPU emulation (``schedules.cuda``), for tests on machines without a GPU."""

    spec: HardwareSpec
    fc_min_sparsity: float = DEFAULT_MIN_SPARSITY_FC
    conv_min_sparsity: float = DEFAULT_MIN_SPARSITY_CONV
    layers: Mapping[str, float] = field(default_factory=dict)
    emulate: bool = False

    def __post_init__(self) -> None:
        if self.spec.hardware_class is not HardwareClass.GPU:
            raise TargetError(f"RewriteTileSparse: expected a CUDA target, found a {self.spec.hardware_class.value} "
                              f"({self.spec.cpu}); the CPU kernels come from RewriteGroupSparse / RewriteDense")


def _zero_tiles(weight_2d: np.ndarray, tile: tuple[int, int]) -> float:
    return 1.0 - float(formats.tile_mask(weight_2d, *tile).mean())


def tile_constants(weight_2d: np.ndarray, tile: tuple[int, int], skip_zero_tiles: bool) -> list[relax.Expr]:
    """values, tile_cols, row_ptr of the tile encoding (zero tiles dropped, or every tile kept), as Relax
    constants."""
    keep = None if skip_zero_tiles else np.ones(formats.tile_mask(weight_2d, *tile).shape, dtype=bool)
    t = formats.encode_tiles(weight_2d, *tile, keep=keep)
    return [relax.const(np.array(a)) for a in (t.values, t.col_idx, t.row_ptr)]


@tvm.relax.expr_functor.mutator
class _Rewriter(LayerRewriter):
    def __init__(self, mod: tvm.IRModule, config: TileSparseConfig):
        super().__init__(mod)
        self.config = config
        self.tile = config.spec.tile

    def _wins(self, key: str, weight_2d: np.ndarray, default: float) -> bool:
        zero = _zero_tiles(weight_2d, self.tile)
        threshold = self.config.layers.get(key, default)
        logger.debug("RewriteTileSparse: %s has %.1f%% zero %dx%d tiles, threshold %.0f%%", key, 100 * zero,
                     *self.tile, 100 * threshold)
        return zero >= threshold

    def rewrite_linear(self, layer: Linear):
        if not self._wins(layer.key, layer.weight, self.config.fc_min_sparsity):
            return None
        (out_f, in_f), batch = layer.weight.shape, layer.batch
        func, name = cuda.tile_matmul(out_f, in_f, batch, self.tile, "nk", emulate=self.config.emulate)
        gv = self.add_kernel(func, name)
        return relax.call_tir(gv, [*tile_constants(layer.weight, self.tile, True), layer.x],
                              out_ty=relax.TensorType((batch, out_f), "float32"))

    def rewrite_conv2d(self, layer: Conv2d):
        w2 = formats.flatten_per_filter(layer.weight)
        sparse = self._wins(layer.key, w2, self.config.conv_min_sparsity)
        npix = layer.shape[0] * layer.out_hw[0] * layer.out_hw[1]
        func, name = cuda.tile_matmul(w2.shape[0], w2.shape[1], npix, self.tile, "kn", emulate=self.config.emulate)
        im2col = functools.partial(cuda.im2col, emulate=self.config.emulate)
        return self.emit_conv_gemm(layer, func, name, tile_constants(w2, self.tile, sparse), im2col_kernel=im2col)


@tvm.transform.module_pass(opt_level=0, name="RewriteTileSparse")
class RewriteTileSparse:
    """Put every constant-weight Conv2d and every tile-sparse Linear on our tiled CUDA kernels."""

    def __init__(self, config: TileSparseConfig):
        self.config = config

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return run_layer_pass(mod, _Rewriter(mod, self.config), self.config.layers, "RewriteTileSparse")
