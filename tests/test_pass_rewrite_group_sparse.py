"""RewriteGroupSparse: Linear layers with group-sparse constant weights become group-sparse kernels."""

import io

import numpy as np
import onnx
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.torch import from_exported_program

from tvm_scalpel import formats as F
from tvm_scalpel import PlanError
from tvm_scalpel.passes.rewrite_group_sparse import (GroupSparseConfig, RewriteGroupSparse,
                                                     layer_key)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 300)
        self.fc2 = torch.nn.Linear(300, 100)
        self.fc3 = torch.nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _group_prune(model, w, density, seed=0, layers=("fc1", "fc2")):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name in layers:
            lin = getattr(model, name)
            weight = lin.weight.numpy()
            keep = rng.random((weight.shape[0], -(-weight.shape[1] // w))) < density
            lin.weight.copy_(torch.from_numpy(F.encode(weight, w, keep=keep).to_dense()))
    return model


def _import(model, x, path):
    if path == "export":
        return from_exported_program(torch.export.export(model, (x,)))
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    return from_onnx(onnx.load_from_string(buf.getvalue()), shape_dict={"x": list(x.shape)})


def _run(mod, spec, x):
    vm = relax.VirtualMachine(tvm.compile(mod, spec.target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()  # torch.export returns a tuple


def _ops(mod):
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _kernel_calls(mod):
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("group_sparse_nt"))


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("batch, density", [(1, 0.05), (16, 0.3)])
def test_compiled_equals_masked_torch(host_spec, path, batch, density):
    model = _group_prune(MLP().eval(), host_spec.lanes(), density)
    x = torch.randn(batch, 784)
    mod = _import(model, x, path)
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(mod)
    assert _kernel_calls(out) == [f"group_sparse_nt_100x300_w{host_spec.lanes()}_b{batch}_bias_relu",
                                  f"group_sparse_nt_300x784_w{host_spec.lanes()}_b{batch}_bias_relu"]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_structure_after_rewrite(host_spec):
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.1)
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(_import(model, torch.randn(1, 784), "export"))
    ops = _ops(out)
    assert ops.count("relax.call_tir") == 2  # fc1, fc2
    assert ops.count("relax.matmul") == 1  # fc3 is dense: left alone
    assert ops.count("relax.permute_dims") == 1  # the dead transposes of fc1/fc2 are gone
    # fc1's and fc2's bias adds and ReLUs are in their kernels: only fc3's add is left
    assert ops.count("relax.add") == 1 and "relax.nn.relu" not in ops
    # The kernel's constants are the encoded weight: values [G, w], one index per group, row pointers;
    # then the bias.
    calls = [b.value for blk in out["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.call_tir")]
    values, col_idx, row_ptr, bias = (c.value.numpy() for c in calls[0].args[1].fields[1:])
    np.testing.assert_array_equal(bias, model.fc1.bias.detach().numpy())
    g = F.encode(model.fc1.weight.detach().numpy(), host_spec.lanes())
    np.testing.assert_array_equal(values, g.values)
    np.testing.assert_array_equal(col_idx, g.col_idx)
    np.testing.assert_array_equal(row_ptr, g.row_ptr)


def test_dense_module_is_unchanged_and_input_not_mutated(host_spec):
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    before = mod.script(show_meta=True)
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(mod)
    tvm.ir.assert_structural_equal(out, mod)
    assert mod.script(show_meta=True) == before


def test_idempotent_and_input_not_mutated(host_spec):
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.1)
    mod = _import(model, torch.randn(1, 784), "export")
    before = mod.script(show_meta=True)
    once = RewriteGroupSparse(GroupSparseConfig(host_spec))(mod)
    twice = RewriteGroupSparse(GroupSparseConfig(host_spec))(once)
    tvm.ir.assert_structural_equal(once, twice)
    assert mod.script(show_meta=True) == before


def test_unaligned_sparsity_is_still_exact(host_spec):
    """Weights pruned elementwise (not in groups): every group with a nonzero is kept."""
    model = MLP().eval()
    with torch.no_grad():
        mask = torch.rand_like(model.fc1.weight) < 0.01
        model.fc1.weight.mul_(mask)
    x = torch.randn(2, 784)
    cfg = GroupSparseConfig(host_spec, layers={layer_key((300, 784)): 0.0, layer_key((100, 300)): 2.0,
                                               layer_key((10, 100)): 2.0})
    out = RewriteGroupSparse(cfg)(_import(model, x, "export"))
    assert len(_kernel_calls(out)) == 1
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_threshold_keeps_moderately_sparse_layers_dense(host_spec):
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.7)  # 30 % zero groups < default 50 %
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(_import(model, torch.randn(1, 784), "export"))
    assert _kernel_calls(out) == []


def test_a_setting_for_an_unknown_layer_is_a_clear_error(host_spec):
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    with pytest.raises(PlanError, match=r"linear:999x784.*match no constant-weight layer"):
        RewriteGroupSparse(GroupSparseConfig(host_spec, layers={"linear:999x784": 0.5}))(mod)


class ConvNet(torch.nn.Module):
    """LeNet-5's shapes plus a padded, strided conv: every conv2d attribute the rewrite handles."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 20, 5)
        self.conv2 = torch.nn.Conv2d(20, 50, 5)
        self.conv3 = torch.nn.Conv2d(50, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _group_prune_convs(model, w, density, seed=0):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            w2 = F.flatten_per_filter(conv.weight.numpy())
            keep = rng.random((w2.shape[0], -(-w2.shape[1] // w))) < density
            conv.weight.copy_(torch.from_numpy(F.encode(w2, w, keep=keep).to_dense().reshape(conv.weight.shape)))
    return model


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_compiled_equals_masked_torch(host_spec, path, batch):
    model = _group_prune_convs(ConvNet().eval(), host_spec.lanes(), 0.2, seed=batch)
    x = torch.randn(batch, 1, 28, 28)
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(_import(model, x, path))
    gemms = sorted(gv.name_hint for gv in out.get_global_vars() if gv.name_hint.startswith("group_sparse_gemm"))
    assert len(gemms) == 3, gemms  # conv1 has 25 inputs: 2 groups of 16, one kept per row at most
    assert "relax.nn.conv2d" not in _ops(out)
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_conv_layer_keys_and_thresholds(host_spec):
    model = _group_prune_convs(ConvNet().eval(), host_spec.lanes(), 0.2)
    x = torch.randn(1, 1, 28, 28)
    keep_dense = {layer_key((50, 20, 5, 5)): 2.0}
    out = RewriteGroupSparse(GroupSparseConfig(host_spec, layers=keep_dense))(_import(model, x, "export"))
    assert _ops(out).count("relax.nn.conv2d") == 1  # conv2 stays dense on request
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_grouped_conv_is_left_alone_and_still_compiles(host_spec):
    conv = torch.nn.Conv2d(4, 8, 3, groups=2).eval()
    with torch.no_grad():
        conv.weight.mul_(0)
    x = torch.randn(1, 4, 8, 8)
    mod = _import(conv, x, "export")
    out = RewriteGroupSparse(GroupSparseConfig(host_spec))(mod)
    tvm.ir.assert_structural_equal(out, mod)
    np.testing.assert_allclose(_run(out, host_spec, x), conv(x).detach().numpy(), rtol=1e-4, atol=1e-5)
