"""RewriteDense: constant-weight Linear and Conv2d layers run our scheduled dense kernels.

TVM 0.27's default CPU pipeline only legalizes a matmul or conv2d into naive loops, 65-150x slower
than BLAS; every speedup we claim is measured against a dense model compiled with these kernels
(``dense_nt``: register-tiled, vectorised along k; conv: im2col + ``dense_gemm``). Run it after
RewriteGroupSparse: it takes whatever that pass left dense. Layers it does not match (dynamic shapes,
grouped or dilated convs, non-fp32) are left as they are. A bias add and ReLU right after a layer run
inside its kernel (``_layers.find_epilogues``), as for the sparse kernels, so the baseline gets the same fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from .. import formats
from ..schedules import cpu
from ..target import HardwareSpec
from ._layers import Conv2d, Linear, LayerRewriter, run_layer_pass


@dataclass(frozen=True)
class DenseConfig:
    spec: HardwareSpec


@tvm.relax.expr_functor.mutator
class _Rewriter(LayerRewriter):
    fuses_epilogue = True

    def __init__(self, mod: tvm.IRModule, config: DenseConfig):
        super().__init__(mod)
        self.config = config

    def rewrite_linear(self, layer: Linear):
        (out_f, in_f), batch = layer.weight.shape, layer.batch
        gv = self.add_kernel(cpu.dense_nt(out_f, in_f, batch, self.config.spec, layer.epilogue),
                             f"dense_nt_{out_f}x{in_f}_b{batch}{layer.epilogue.suffix}")
        return tvm.relax.call_tir(gv, [layer.x, tvm.relax.const(layer.weight), *layer.bias_args()],
                                  out_ty=tvm.relax.TensorType((batch, out_f), "float32"))

    def rewrite_conv2d(self, layer: Conv2d):
        w2 = formats.flatten_per_filter(layer.weight)
        npix = layer.shape[0] * layer.out_hw[0] * layer.out_hw[1]
        gemm = cpu.dense_gemm(w2.shape[0], w2.shape[1], npix, self.config.spec, epilogue=layer.epilogue)
        return self.emit_conv_gemm(layer, gemm, f"dense_gemm_{w2.shape[0]}x{w2.shape[1]}_n{npix}{layer.epilogue.suffix}",
                                   [tvm.relax.const(w2.copy())])


@tvm.transform.module_pass(opt_level=0, name="RewriteDense")
class RewriteDense:
    """Replace constant-weight Linear / Conv2d layers with calls to our scheduled dense kernels."""

    def __init__(self, config: DenseConfig):
        self.config = config

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return run_layer_pass(mod, _Rewriter(mod, self.config), (), "RewriteDense")
