"""RewriteGroupSparse: Linear and Conv2d layers whose constant weight is group-sparse run group-sparse
kernels.

- Linear (``matmul(x, permute_dims(W))`` as torch.export and ONNX import it, or ``matmul(x, Wt)`` with a
  constant [in, out] ``Wt``) → ``call_tir(group_sparse_nt, [x, values, col_idx, row_ptr(, bias)])``; the
  bias add and ReLU after the layer run inside the kernel (``_layers.find_epilogues``).
- Conv2d (NCHW/OIHW, groups 1, dilation 1, symmetric padding) → ``im2col`` of the whole batch, one
  ``group_sparse_gemm`` on W flattened per filter, and a reshape (plus a transpose when batch > 1).

A layer is rewritten when its fraction of all-zero groups of width ``w`` (along the reduction axis)
reaches its threshold; anything else is left exactly as it was. Weights need not be group-aligned: a
group with any nonzero is kept, so the result is exact for every sparsity pattern.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import tvm

from .. import formats
from ..schedules import cpu
from ..target import HardwareSpec
from ._layers import Conv2d, Linear, LayerRewriter, encoded_constants, layer_key, run_layer_pass

__all__ = ["GroupSparseConfig", "RewriteGroupSparse", "layer_key"]

logger = logging.getLogger(__name__)

# From benchmarks/results/kernels.json (znver4, w = lanes): group-sparse matrix-vector beats the best
# dense at 50 % sparsity (1.5-2.1x) and loses at 0 % (0.86x); group-sparse GEMM breaks even at 50 %
# (~1.0x) and wins from 70 % (1.4-1.7x). The defaults sit above both crossovers.
DEFAULT_MIN_SPARSITY_FC = 0.5
DEFAULT_MIN_SPARSITY_CONV = 0.6


@dataclass(frozen=True)
class GroupSparseConfig:
    """Group width and thresholds. ``layers`` maps a layer key (``layer_key``: ``"linear:OUTxIN"``,
    ``"conv2d:OCxICxKHxKW"``) to its minimum sparsity (a value > 1 keeps that layer dense)."""

    spec: HardwareSpec
    width: int | None = None
    fc_min_sparsity: float = DEFAULT_MIN_SPARSITY_FC
    conv_min_sparsity: float = DEFAULT_MIN_SPARSITY_CONV
    layers: Mapping[str, float] = field(default_factory=dict)

    @property
    def w(self) -> int:
        return self.width or self.spec.lanes("float32")


@tvm.relax.expr_functor.mutator
class _Rewriter(LayerRewriter):
    fuses_epilogue = True

    def __init__(self, mod: tvm.IRModule, config: GroupSparseConfig):
        super().__init__(mod)
        self.config = config

    def _wins(self, key: str, weight_2d: np.ndarray, default: float) -> bool:
        """Is this layer sparse enough (in all-zero groups along its reduction axis) to rewrite?"""
        zero_groups = 1.0 - formats.group_mask(weight_2d, self.config.w).mean()
        threshold = self.config.layers.get(key, default)
        logger.debug("RewriteGroupSparse: %s has %.1f%% zero groups at w=%d, threshold %.0f%%: %s", key,
                     100 * zero_groups, self.config.w, 100 * threshold,
                     "group-sparse" if zero_groups >= threshold else "dense")
        return zero_groups >= threshold

    def rewrite_linear(self, layer: Linear):
        if not self._wins(layer.key, layer.weight, self.config.fc_min_sparsity):
            return None
        (out_f, in_f), w, batch = layer.weight.shape, self.config.w, layer.batch
        gv = self.add_kernel(cpu.group_sparse_nt(out_f, in_f, w, batch, self.config.spec, layer.epilogue),
                             f"group_sparse_nt_{out_f}x{in_f}_w{w}_b{batch}{layer.epilogue.suffix}")
        return tvm.relax.call_tir(gv, [layer.x, *encoded_constants(layer.weight, w), *layer.bias_args()],
                                  out_ty=tvm.relax.TensorType((batch, out_f), "float32"))

    def rewrite_conv2d(self, layer: Conv2d):
        w2 = formats.flatten_per_filter(layer.weight)
        if not self._wins(layer.key, w2, self.config.conv_min_sparsity):
            return None
        b, w = layer.shape[0], self.config.w
        npix = b * layer.out_hw[0] * layer.out_hw[1]
        gemm = cpu.group_sparse_gemm(w2.shape[0], w2.shape[1], w, npix, self.config.spec, epilogue=layer.epilogue)
        name = f"group_sparse_gemm_{w2.shape[0]}x{w2.shape[1]}_w{w}_n{npix}{layer.epilogue.suffix}"
        return self.emit_conv_gemm(layer, gemm, name,
                                   encoded_constants(w2, w))


@tvm.transform.module_pass(opt_level=0, name="RewriteGroupSparse")
class RewriteGroupSparse:
    """Replace group-sparse constant-weight Linear / Conv2d layers with group-sparse kernel calls."""

    def __init__(self, config: GroupSparseConfig):
        self.config = config

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return run_layer_pass(mod, _Rewriter(mod, self.config), self.config.layers, "RewriteGroupSparse")
