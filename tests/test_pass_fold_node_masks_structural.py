"""FoldNodeMasks, structurally: Before/Expected modules in TVMScript."""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_scalpel.passes.fold_node_masks import FoldNodeMasks


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 2), "float32")) -> R.Tensor((1, 2), "float32"):
        with R.dataflow():
            w1 = R.permute_dims(R.const(np.array([[1, 2], [3, 4], [5, 6]], "float32")), axes=[1, 0])
            h = R.matmul(x, w1)
            hb = R.add(R.const(np.array([0.5, 0.25, 0.125], "float32")), h)
            a = R.nn.relu(hb)
            m = R.multiply(a, R.const(np.array([1, 0, 1], "float32")))
            w2 = R.permute_dims(R.const(np.array([[1, 1, 1], [2, 2, 2]], "float32")), axes=[1, 0])
            y = R.matmul(m, w2)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 2), "float32")) -> R.Tensor((1, 2), "float32"):
        with R.dataflow():
            w1 = R.permute_dims(R.const(np.array([[1, 2], [5, 6]], "float32")), axes=[1, 0])
            h = R.matmul(x, w1)
            hb = R.add(R.const(np.array([0.5, 0.125], "float32")), h)
            a = R.nn.relu(hb)
            w2 = R.permute_dims(R.const(np.array([[1, 1], [2, 2]], "float32")), axes=[1, 0])
            y = R.matmul(a, w2)
            R.output(y)
        return y


@I.ir_module
class SecondReader:
    """The same chain, but the activation is also an output: its nodes must stay."""

    @R.function
    def main(x: R.Tensor((1, 2), "float32")):
        with R.dataflow():
            w1 = R.permute_dims(R.const(np.array([[1, 2], [0, 0], [5, 6]], "float32")), axes=[1, 0])
            h = R.matmul(x, w1)
            a = R.nn.relu(h)
            w2 = R.permute_dims(R.const(np.array([[1, 1, 1], [2, 2, 2]], "float32")), axes=[1, 0])
            y = R.matmul(a, w2)
            out = (y, a)
            R.output(out)
        return out


def test_mask_layer_folded_to_expected():
    tvm.ir.assert_structural_equal(FoldNodeMasks()(Before), Expected)


def test_node_with_a_second_reader_is_untouched():
    tvm.ir.assert_structural_equal(FoldNodeMasks()(SecondReader), SecondReader)
