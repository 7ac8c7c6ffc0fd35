"""SplitGroupedConv: structure (Before/Expected), numerics through the whole build, what it leaves alone."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.relax.frontend.torch import from_exported_program
from tvm.script import relax as R

from tvm_scalpel import build
from tvm_scalpel.passes.rewrite_dense import DenseConfig, RewriteDense
from tvm_scalpel.passes.split_grouped_conv import SplitGroupedConv

W = np.arange(8 * 2 * 3 * 3, dtype="float32").reshape(8, 2, 3, 3) / 100


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32")) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            y = R.nn.conv2d(x, R.const(W), groups=2)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32")) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            x0 = R.strided_slice(x, axes=[1], begin=[0], end=[2])
            c0 = R.nn.conv2d(x0, R.const(W[:4]))
            x1 = R.strided_slice(x, axes=[1], begin=[2], end=[4])
            c1 = R.nn.conv2d(x1, R.const(W[4:]))
            y = R.concat((c0, c1), axis=1)
            R.output(y)
        return y


def _ops(mod) -> list[str]:
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name)
                                    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return ops


def test_grouped_conv_becomes_one_conv_per_group():
    tvm.ir.assert_structural_equal(SplitGroupedConv()(Before), Expected)


def test_plain_conv_and_depthwise_conv_are_left_alone():
    @I.ir_module
    class Plain:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32")) -> R.Tensor((1, 8, 4, 4), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, R.const(W))
                R.output(y)
            return y

    @I.ir_module
    class Depthwise:
        @R.function
        def main(x: R.Tensor((1, 8, 6, 6), "float32")) -> R.Tensor((1, 8, 4, 4), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, R.const(W[:, :1]), groups=8)
                R.output(y)
            return y

    for mod in (Plain, Depthwise):
        tvm.ir.assert_structural_equal(SplitGroupedConv()(mod), mod)


def test_grouped_conv_with_a_runtime_weight_is_left_alone():
    @I.ir_module
    class RuntimeWeight:
        @R.function
        def main(x: R.Tensor((1, 4, 6, 6), "float32"), w: R.Tensor((8, 2, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, groups=2)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SplitGroupedConv()(RuntimeWeight), RuntimeWeight)


@pytest.mark.parametrize("batch", [1, 3])
def test_alexnet_style_grouped_convs_run_our_dense_kernels_and_match_torch(host_spec, batch):
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1, groups=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 12, 3, stride=2, groups=4)).eval()
    x = torch.randn(batch, 6, 9, 9, generator=torch.Generator().manual_seed(0))
    mod = from_exported_program(torch.export.export(net, (x,)))
    assert _ops(mod).count("relax.nn.conv2d") == 2
    dense = RewriteDense(DenseConfig(host_spec))(SplitGroupedConv()(mod))
    assert _ops(dense).count("relax.nn.conv2d") == 0  # every group now on our scheduled kernels (2 + 4 GEMMs)
    assert _ops(dense).count("relax.call_tir") == 2 * (2 + 4)  # an im2col and a GEMM per group
    vm = relax.VirtualMachine(build(mod, host_spec.target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_input_module_is_not_mutated():
    before = Before.script()
    SplitGroupedConv()(Before)
    assert Before.script() == before
