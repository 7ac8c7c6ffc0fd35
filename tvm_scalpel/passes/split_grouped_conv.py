"""SplitGroupedConv: a grouped conv2d with a constant weight becomes one plain conv per group.

AlexNet's conv2/4/5 (groups = 2) would otherwise stay on TVM's legalized loops (no schedule: the
dense AlexNet ran 486 ms at batch 1 here, most of it in the grouped convs). Each group is an
ordinary conv on a channel slice of the input with its slice of the filters, so after this pass the
layer passes (dense, group-sparse, CSR, GPU tiles) see plain convs, e.g. AlexNet's conv2 as two
128×48×5×5 convs — per group the 128×1200 × 1200×729 GEMM of the paper's CPU kernel benchmark.

``x → concat([conv(x[:, g·c:(g+1)·c], W[g·o:(g+1)·o]) for g], axis=1)``; exact (each output channel
still sums over the same inputs). Grouped convs with a non-constant weight or another layout are left
alone. Depthwise convs (one input channel per group) are left alone too: a conv per channel would
be a worse schedule than none.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator

from ..compat import constant_array

__all__ = ["SplitGroupedConv"]

logger = logging.getLogger(__name__)


@relax.expr_functor.mutator
class _Splitter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if call.op != tvm.ir.Op.get("relax.nn.conv2d") or int(call.attrs.groups) == 1:
            return call
        x, wexpr = call.args
        bound = self.lookup_binding(wexpr) if isinstance(wexpr, relax.Var) else None
        weight = constant_array(bound if bound is not None else wexpr)
        a = call.attrs
        groups = int(a.groups)
        if weight is None or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or weight.shape[1] == 1:
            logger.debug("SplitGroupedConv: conv2d groups=%d left alone (weight constant: %s, layout %s/%s)",
                         groups, weight is not None, a.data_layout, a.kernel_layout)
            return call
        cin, cout = int(weight.shape[1]), int(weight.shape[0]) // groups
        parts = []
        for g in range(groups):
            xg = self.builder_.emit(relax.op.strided_slice(x, axes=[1], begin=[g * cin], end=[(g + 1) * cin]))
            wg = relax.const(weight[g * cout:(g + 1) * cout].copy())
            parts.append(self.builder_.emit(relax.op.nn.conv2d(
                xg, wg, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=1,
                data_layout="NCHW", kernel_layout="OIHW", out_layout=a.out_layout, out_dtype=a.out_dtype)))
        return relax.op.concat(parts, axis=1)


@tvm.transform.module_pass(opt_level=0, name="SplitGroupedConv")
class SplitGroupedConv:
    """Replace every constant-weight grouped NCHW conv2d with per-group plain convs and a concat."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        splitter = _Splitter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                splitter.builder_.update_func(gv, splitter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(splitter.builder_.get())
