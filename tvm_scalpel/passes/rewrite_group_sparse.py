"""RewriteGroupSparse: a Linear whose constant weight is group-sparse becomes a group-sparse kernel.

Matches ``matmul(x, permute_dims(W))`` (how torch.export and ONNX import a Linear; W is [out, in]) and
``matmul(x, Wt)`` with a constant [in, out] ``Wt``, for a static 2-D fp32 ``x``. If the fraction of
all-zero groups of width ``w`` along ``in`` reaches the layer's threshold, the matmul becomes
``call_tir(group_sparse_nt, [x, values, col_idx, row_ptr])`` with the encoded weight as constants.
Anything else is left exactly as it was. Weights need not be group-aligned: a group with any nonzero
is kept, so the result is exact for every sparsity pattern.
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
from ..compat import constant_array
from ..errors import PlanError
from ..schedules import cpu
from ..target import HardwareSpec

logger = logging.getLogger(__name__)

# From benchmarks/results/kernels.json (znver4, w = lanes): group-sparse matrix-vector beats the best
# dense at 50 % sparsity (1.5-2.1x) and loses at 0 % (0.86x); 0.5 keeps a margin for small layers.
DEFAULT_MIN_SPARSITY_FC = 0.5


@dataclass(frozen=True)
class GroupSparseConfig:
    """Group width and per-layer thresholds. ``layers`` maps a weight's [out, in] shape key
    (``"linear:OUTxIN"``) to a minimum sparsity (a value > 1 keeps that layer dense)."""

    spec: HardwareSpec
    width: int | None = None
    min_sparsity: float = DEFAULT_MIN_SPARSITY_FC
    layers: Mapping[str, float] = field(default_factory=dict)

    @property
    def w(self) -> int:
        return self.width or self.spec.lanes("float32")


def layer_key(out_features: int, in_features: int) -> str:
    return f"linear:{out_features}x{in_features}"


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
        if call.op != tvm.ir.Op.get("relax.matmul"):
            return call
        x, rhs = call.args
        x_ty = x.ty
        if not isinstance(x_ty, relax.TensorType) or x_ty.ndim != 2 or x_ty.dtype != "float32":
            logger.debug("RewriteGroupSparse: skip matmul with input %s (need static 2-D fp32)", x_ty)
            return call
        shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else None for s in x_ty.shape.values]
        if None in shape:
            return call
        weight = self._weight_nk(rhs)
        if weight is None or weight.dtype != np.float32:
            return call
        out_f, in_f = weight.shape
        key = layer_key(out_f, in_f)
        self.seen_keys.add(key)
        w = self.config.w
        zero_groups = 1.0 - formats.group_mask(weight, w).mean()
        threshold = self.config.layers.get(key, self.config.min_sparsity)
        if zero_groups < threshold:
            logger.debug("RewriteGroupSparse: %s keeps dense (%.1f%% zero groups < %.0f%%)",
                         key, 100 * zero_groups, 100 * threshold)
            return call
        g = formats.encode(weight, w)
        batch = shape[0]
        name = f"group_sparse_nt_{out_f}x{in_f}_w{w}_b{batch}"
        kernel = cpu.group_sparse_nt(out_f, in_f, w, batch, self.config.spec)
        gv = self.builder_.add_func(kernel.with_attr("global_symbol", name), name)
        logger.debug("RewriteGroupSparse: %s -> group-sparse w=%d (%.1f%% zero groups)", key, w,
                     100 * zero_groups)
        consts = [relax.const(np.array(a)) for a in (g.values, g.col_idx, g.row_ptr)]
        return relax.call_tir(gv, [x, *consts], out_ty=relax.TensorType((batch, out_f), "float32"))


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
                            f"constant-weight Linear; the module has {sorted(rewriter.seen_keys)}")
        out = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(out) if out is not mod else mod
