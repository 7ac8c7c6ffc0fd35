"""RewriteGroupSparse, structurally: a TVMScript Before and the exact Expected module."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_scalpel import formats as F
from tvm_scalpel.compat import with_root_block
from tvm_scalpel.passes.rewrite_group_sparse import GroupSparseConfig, RewriteGroupSparse
from tvm_scalpel.schedules import cpu

W = np.zeros((4, 32), "float32")
W[0, 0:8] = 1.0  # row 0: group 0; row 2: group 3; rows 1, 3 empty -> 2 of 16 groups at w = 8
W[2, 24:32] = np.arange(8)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 32), "float32")) -> R.Tensor((1, 4), "float32"):
        with R.dataflow():
            wt = R.permute_dims(R.const(W), axes=[1, 0])
            y = R.matmul(x, wt)
            R.output(y)
        return y


def _expected(spec, w):
    g = F.encode(W, w)
    name = f"group_sparse_nt_4x32_w{w}_b1"
    kernel = (with_root_block(cpu.group_sparse_nt(4, 32, w, 1, spec)).with_attr("global_symbol", name)
              .with_attr("op_pattern", 8).with_attr("tir.is_scheduled", True).with_attr("scalpel.kernel", True))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(kernel, name)
            consts = [relax.const(np.array(a)) for a in (g.values, g.col_idx, g.row_ptr)]
            y = bb.emit_output(relax.call_tir(gv, [x, *consts], out_ty=relax.TensorType((1, 4), "float32")))
        bb.emit_func_output(y)
    return bb.get()


def test_linear_becomes_exactly_the_expected_kernel_call(host_spec):
    out = RewriteGroupSparse(GroupSparseConfig(host_spec, width=8))(Before)
    tvm.ir.assert_structural_equal(out, _expected(host_spec, 8))


def test_below_threshold_is_left_exactly_as_before(host_spec):
    out = RewriteGroupSparse(GroupSparseConfig(host_spec, width=8, fc_min_sparsity=0.95))(Before)
    tvm.ir.assert_structural_equal(out, Before)  # 87.5 % zero groups < 95 %: untouched
