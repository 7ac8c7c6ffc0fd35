"""RewriteCSR: chosen Linear and Conv2d layers run CSR kernels, one index per nonzero weight.

This is how *traditional* pruning (Han et al.: magnitude, unstructured) runs, the paper's baseline:
the weight is stored in CSR (values, a column index per value, row pointers) and computed with
scalar gathers, so its speed shows what an index per weight costs next to Scalpel's groups.

- Linear → ``call_tir(csr_nt, [x, values, col_idx, row_ptr(, bias)])``; the bias add and ReLU after the
  layer run inside the kernel (``_layers.find_epilogues``).
- Conv2d (NCHW/OIHW, groups 1, dilation 1, symmetric padding) → ``im2col`` of the whole batch and a
  CSR GEMM on W flattened per filter. The CSR GEMM is ``group_sparse_gemm`` at w = 1, whose encoding
  (values[nnz, 1], col_idx[nnz], row_ptr) is CSR byte for byte.

Only the layers named in ``CSRConfig.layers`` (``layer_key``: ``"linear:OUTxIN"``, ``"conv2d:..."``)
are rewritten; a key that matches no layer is a ``PlanError``. The encoding keeps every nonzero, so
the result is exact for any weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm

from .. import formats
from ..schedules import cpu
from ..target import HardwareSpec
from ._layers import Conv2d, Linear, LayerRewriter, run_layer_pass

__all__ = ["CSRConfig", "RewriteCSR"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CSRConfig:
    spec: HardwareSpec
    layers: frozenset[str] = frozenset()


def _csr_constants(weight_2d: np.ndarray) -> list[tvm.relax.Expr]:
    """values[nnz, 1] (the w = 1 group layout of CSR's bytes, what both CSR kernels read), col_idx, row_ptr."""
    c = formats.encode_csr(weight_2d)
    values = np.ascontiguousarray(c.values.reshape(-1, 1))
    return [tvm.relax.const(np.array(a)) for a in (values, c.col_idx, c.row_ptr)]


@tvm.relax.expr_functor.mutator
class _Rewriter(LayerRewriter):
    fuses_epilogue = True

    def __init__(self, mod: tvm.IRModule, config: CSRConfig):
        super().__init__(mod)
        self.config = config

    def _chosen(self, key: str, weight_2d: np.ndarray) -> bool:
        chosen = key in self.config.layers and np.count_nonzero(weight_2d) > 0
        logger.debug("RewriteCSR: %s has %.1f%% zero weights: %s", key,
                     100 * (1.0 - np.count_nonzero(weight_2d) / weight_2d.size),
                     "CSR" if chosen else "not chosen (or no nonzero), left alone")
        return chosen

    def rewrite_linear(self, layer: Linear):
        if not self._chosen(layer.key, layer.weight):
            return None
        (out_f, in_f), batch = layer.weight.shape, layer.batch
        gv = self.add_kernel(cpu.csr_nt(out_f, in_f, batch, self.config.spec, layer.epilogue),
                             f"csr_nt_{out_f}x{in_f}_b{batch}{layer.epilogue.suffix}")
        return tvm.relax.call_tir(gv, [layer.x, *_csr_constants(layer.weight), *layer.bias_args()],
                                  out_ty=tvm.relax.TensorType((batch, out_f), "float32"))

    def rewrite_conv2d(self, layer: Conv2d):
        w2 = formats.flatten_per_filter(layer.weight)
        if not self._chosen(layer.key, w2):
            return None
        npix = layer.shape[0] * layer.out_hw[0] * layer.out_hw[1]
        gemm = cpu.group_sparse_gemm(w2.shape[0], w2.shape[1], 1, npix, self.config.spec, epilogue=layer.epilogue)
        name = f"csr_gemm_{w2.shape[0]}x{w2.shape[1]}_n{npix}{layer.epilogue.suffix}"
        return self.emit_conv_gemm(layer, gemm, name, _csr_constants(w2))


@tvm.transform.module_pass(opt_level=0, name="RewriteCSR")
class RewriteCSR:
    """Replace the chosen constant-weight Linear / Conv2d layers with CSR kernel calls."""

    def __init__(self, config: CSRConfig):
        self.config = config

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.config.layers:
            return mod
        return run_layer_pass(mod, _Rewriter(mod, self.config), self.config.layers, "RewriteCSR")
