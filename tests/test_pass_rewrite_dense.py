"""RewriteDense: dense constant-weight layers run our kernels; the compiled model equals torch."""

import numpy as np
import pytest
import torch
import tvm

from tvm_scalpel.passes.rewrite_dense import DenseConfig, RewriteDense
from tvm_scalpel.passes.rewrite_group_sparse import GroupSparseConfig, RewriteGroupSparse

from test_pass_rewrite_group_sparse import MLP, ConvNet, _group_prune, _import, _ops, _run


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("model_cls, shape", [(MLP, (4, 784)), (ConvNet, (2, 1, 28, 28))])
def test_dense_model_compiles_to_our_kernels_and_matches_torch(host_spec, path, model_cls, shape):
    model = model_cls().eval()
    x = torch.randn(*shape)
    out = RewriteDense(DenseConfig(host_spec))(_import(model, x, path))
    ops = _ops(out)
    assert "relax.matmul" not in ops and "relax.nn.conv2d" not in ops
    kernels = [gv.name_hint for gv in out.get_global_vars()]
    assert any(k.startswith(("dense_nt", "dense_gemm")) for k in kernels)
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_after_group_sparse_only_the_dense_layers_remain(host_spec):
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.1)  # fc1, fc2 sparse; fc3 dense
    x = torch.randn(1, 784)
    mod = RewriteGroupSparse(GroupSparseConfig(host_spec))(_import(model, x, "export"))
    out = RewriteDense(DenseConfig(host_spec))(mod)
    names = sorted(gv.name_hint for gv in out.get_global_vars() if gv.name_hint != "main")
    assert names == ["dense_nt_10x100_b1_bias", f"group_sparse_nt_100x300_w{host_spec.lanes()}_b1_bias_relu",
                     f"group_sparse_nt_300x784_w{host_spec.lanes()}_b1_bias_relu"]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_module_without_layers_is_unchanged(host_spec):
    relu = torch.nn.ReLU().eval()
    mod = _import(relu, torch.randn(2, 8), "export")
    tvm.ir.assert_structural_equal(RewriteDense(DenseConfig(host_spec))(mod), mod)


def test_idempotent_and_input_not_mutated(host_spec):
    mod = _import(ConvNet().eval(), torch.randn(1, 1, 28, 28), "export")
    before = mod.script(show_meta=True)
    once = RewriteDense(DenseConfig(host_spec))(mod)
    tvm.ir.assert_structural_equal(RewriteDense(DenseConfig(host_spec))(once), once)
    assert mod.script(show_meta=True) == before
