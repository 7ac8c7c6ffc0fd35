"""RewriteGroupSparse: Linear and Conv2d layers whose constant weight is group-sparse run group-sparse
kernels.

- ``matmul(x, permute_dims(W))`` (how torch.export and ONNX import a Linear; W is [out, in]) or
  ``matmul(x, Wt)`` with a constant [in, out] ``Wt``, static 2-D fp32 ``x`` →
  ``call_tir(group_sparse_nt, [x, values, col_idx, row_ptr])``.
- ``nn.conv2d(x, W)`` NCHW/OIHW, groups 1, dilation 1, symmetric padding, constant W →
  ``im2col`` of the whole batch, one ``group_sparse_gemm`` on W flattened per filter, and a reshape
  (plus a transpose when batch > 1) back to NCHW.

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
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .. import formats
from ..compat import constant_array, with_root_block
from ..errors import PlanError
from ..schedules import cpu
from ..target import HardwareSpec

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


def layer_key(weight_shape: tuple[int, ...]) -> str:
    """``linear:OUTxIN`` for a 2-D [out, in] weight, ``conv2d:OCxICxKHxKW`` for an OIHW weight."""
    kind = "linear" if len(weight_shape) == 2 else "conv2d"
    return f"{kind}:" + "x".join(str(int(d)) for d in weight_shape)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, config: GroupSparseConfig):
        super().__init__(mod)
        self.config = config
        self.seen_keys: set[str] = set()

    def _weight_nk(self, rhs: relax.Expr) -> np.ndarray | None:
        """The [out, in] weight behind a matmul's right operand, if it is a constant."""
        if isinstance(rhs, relax.Var):
            bound = self.lookup_binding(rhs)
            rhs = bound if bound is not None else rhs
        direct = constant_array(rhs)
        if direct is not None:
            return direct.T if direct.ndim == 2 else None
        if isinstance(rhs, relax.Call) and rhs.op == tvm.ir.Op.get("relax.permute_dims"):
            inner = rhs.args[0]
            if isinstance(inner, relax.Var):
                inner = self.lookup_binding(inner) or inner
            w = constant_array(inner)
            axes = rhs.attrs.axes
            if w is not None and w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return w
        return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if call.op == tvm.ir.Op.get("relax.matmul"):
            return self._linear(call)
        if call.op == tvm.ir.Op.get("relax.nn.conv2d"):
            return self._conv2d(call)
        return call

    def _wins(self, key: str, weight_2d: np.ndarray, default: float) -> bool:
        """Is this layer sparse enough (in all-zero groups along its reduction axis) to rewrite?"""
        self.seen_keys.add(key)
        zero_groups = 1.0 - formats.group_mask(weight_2d, self.config.w).mean()
        threshold = self.config.layers.get(key, default)
        logger.debug("RewriteGroupSparse: %s has %.1f%% zero groups at w=%d, threshold %.0f%%: %s", key,
                     100 * zero_groups, self.config.w, 100 * threshold,
                     "group-sparse" if zero_groups >= threshold else "dense")
        return zero_groups >= threshold

    def _kernel(self, func: tvm.tirx.PrimFunc, name: str) -> tvm.ir.GlobalVar:
        # op_pattern 8 (opaque): our kernels are scheduled already; FuseOps must not merge them.
        func = with_root_block(func).with_attr("global_symbol", name).with_attr("op_pattern", 8)
        return self.builder_.add_func(func, name)

    def _encoded(self, weight_2d: np.ndarray) -> list[relax.Expr]:
        g = formats.encode(weight_2d, self.config.w)
        return [relax.const(np.array(a)) for a in (g.values, g.col_idx, g.row_ptr)]

    def _linear(self, call: relax.Call) -> relax.Expr:
        x, rhs = call.args
        shape = _static_shape(x, ndim=2)
        weight = self._weight_nk(rhs)
        if shape is None or weight is None or weight.dtype != np.float32:
            return call
        out_f, in_f = weight.shape
        if not self._wins(layer_key(weight.shape), weight, self.config.fc_min_sparsity):
            return call
        batch, w = shape[0], self.config.w
        gv = self._kernel(cpu.group_sparse_nt(out_f, in_f, w, batch, self.config.spec),
                          f"group_sparse_nt_{out_f}x{in_f}_w{w}_b{batch}")
        return relax.call_tir(gv, [x, *self._encoded(weight)],
                              out_ty=relax.TensorType((batch, out_f), "float32"))

    def _conv2d(self, call: relax.Call) -> relax.Expr:
        x, wexpr = call.args
        a = call.attrs
        shape = _static_shape(x, ndim=4)
        weight = constant_array(wexpr)
        pad = [int(p) for p in a.padding]
        plain = (a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
                 and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
                 and pad[0] == pad[2] and pad[1] == pad[3])
        if shape is None or weight is None or weight.dtype != np.float32 or not plain:
            logger.debug("RewriteGroupSparse: skip conv2d %s (not a plain NCHW fp32 conv)", call.attrs)
            return call
        oc, ic, kh, kw = weight.shape
        w2 = formats.flatten_per_filter(weight)
        if not self._wins(layer_key(weight.shape), w2, self.config.conv_min_sparsity):
            return call
        b, c, h, wd = shape
        stride = tuple(int(s) for s in a.strides)
        oh, ow = cpu.conv_out_size(h, kh, stride[0], pad[0]), cpu.conv_out_size(wd, kw, stride[1], pad[1])
        npix, w = b * oh * ow, self.config.w
        tag = f"{c}x{h}x{wd}_k{kh}x{kw}_s{stride[0]}x{stride[1]}_p{pad[0]}x{pad[1]}_b{b}"
        im2col = self._kernel(cpu.im2col(b, c, h, wd, kh, kw, stride, (pad[0], pad[1])), f"im2col_{tag}")
        cols = self.builder_.emit(relax.call_tir(im2col, [x], out_ty=relax.TensorType(
            (c * kh * kw, npix), "float32")))
        gemm = self._kernel(cpu.group_sparse_gemm(oc, w2.shape[1], w, npix, self.config.spec),
                            f"group_sparse_gemm_{oc}x{w2.shape[1]}_w{w}_n{npix}")
        out = self.builder_.emit(relax.call_tir(gemm, [*self._encoded(w2), cols], out_ty=relax.TensorType(
            (oc, npix), "float32")))
        if b == 1:
            return relax.op.reshape(out, (1, oc, oh, ow))
        out = self.builder_.emit(relax.op.reshape(out, (oc, b, oh, ow)))
        return relax.op.permute_dims(out, [1, 0, 2, 3])


def _static_shape(x: relax.Expr, ndim: int) -> list[int] | None:
    """x's shape if it is a static fp32 tensor of rank ``ndim``, else None."""
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != ndim or ty.dtype != "float32" or ty.shape is None:
        return None
    dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    return None if None in dims else dims


@tvm.transform.module_pass(opt_level=0, name="RewriteGroupSparse")
class RewriteGroupSparse:
    """Replace group-sparse constant-weight Linear layers with group-sparse kernel calls."""

    def __init__(self, config: GroupSparseConfig):
        self.config = config

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.config)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        unknown = set(self.config.layers) - rewriter.seen_keys
        if unknown:
            raise PlanError(f"RewriteGroupSparse: per-layer settings for {sorted(unknown)} match no "
                            f"constant-weight layer; the module has {sorted(rewriter.seen_keys)}")
        out = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(out) if out is not mod else mod
