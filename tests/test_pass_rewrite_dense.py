"""RewriteDense: dense constant-weight layers run our kernels; the compiled model equals torch."""

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_scalpel
from tvm_scalpel import formats as F
from tvm_scalpel.passes._layers import layer_key
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


class _Pointwise(torch.nn.Module):
    """NIN's shape of block: a 3×3 conv, then 1×1 convs (one after a pool), the last without relu."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(24, 8, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return self.body(x)


def _tir_calls(mod):
    """The PrimFuncs ``main`` calls through call_tir, in order."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


@pytest.mark.parametrize("batch, im2cols", [(1, 1), (2, 4)])
def test_pointwise_convs_read_their_input_without_im2col_at_batch_1(host_spec, batch, im2cols):
    """At batch 1 a 1×1 conv's im2col would copy X unchanged: the GEMM reads a reshape of X instead. At
    batch 2 the columns interleave images, so the copy stays."""
    model = _Pointwise().eval()
    x = torch.randn(batch, 3, 8, 8)
    out = RewriteDense(DenseConfig(host_spec))(_import(model, x, "export"))
    calls = _tir_calls(out)
    assert sum(c.startswith("im2col") for c in calls) == im2cols
    assert sum(c.startswith("dense_gemm") for c in calls) == 4
    assert _ops(out).count("relax.reshape") >= (3 if batch == 1 else 0) + 4  # + each GEMM's output to NCHW
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_pointwise_convs_compile_to_views_and_match_torch(host_spec):
    """Through the whole pipeline, dense and group-sparse: the reshape feeding a 1×1 conv's GEMM is a
    VM view (``vm.builtin.reshape``), no copy kernel is left, and the outputs equal torch's."""
    model = _Pointwise().eval()
    w = host_spec.lanes()
    with torch.no_grad():  # the second 1×1 conv group-sparse: 24 inputs = groups of w, the last partial
        conv = model.body[4]
        keep = np.random.default_rng(0).random((8, -(-24 // w))) < 0.4
        conv.weight.copy_(torch.from_numpy(F.encode(conv.weight.numpy().reshape(8, 24), w, keep=keep)
                                           .to_dense().reshape(conv.weight.shape)))
    x = torch.randn(1, 3, 8, 8)
    plan = tvm_scalpel.CompilePlan(layer_thresholds={layer_key(conv.weight.shape): 0.0})
    lowered = tvm_scalpel.pipeline("host", plan)(_import(model, x, "export"))
    script = lowered["main"].script()
    called = set(re.findall(r"^\s*(\w+)\(", script, flags=re.M))
    assert {c for c in called if c.startswith(("im2col", "fused_chain", "dense_gemm", "group_sparse"))}
    assert not any("reshape" in c or "copy" in c for c in called), called  # views only, no copy kernels
    assert script.count("vm.builtin.reshape") >= 3
    assert any(c.startswith("group_sparse_gemm") for c in called)
    ex = tvm_scalpel.build(_import(model, x, "export"), "host", plan)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
