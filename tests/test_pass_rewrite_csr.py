"""RewriteCSR and traditional-pruning plans: magnitude-pruned layers run CSR kernels (an index per
weight), exactly equal to the masked torch model."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_scalpel
from tvm_scalpel import CompilePlan, PlanError
from tvm_scalpel import formats as F
from tvm_scalpel.passes.rewrite_csr import CSRConfig, RewriteCSR
from tvm_scalpel.passes.rewrite_group_sparse import layer_key
from tvm_scalpel.plan import Method, traditional

from test_pass_rewrite_group_sparse import MLP, ConvNet, _import, _ops, _run

MLP_KEYS = frozenset({layer_key((300, 784)), layer_key((100, 300)), layer_key((10, 100))})


def _magnitude_prune(model, sparsity, seed=0, empty_row=True):
    """Han et al.-style: zero the smallest |w| of every layer (unstructured), plus one empty row."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.add_(torch.from_numpy(rng.normal(0, 1e-3, m.weight.shape).astype("float32")))
                cut = m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values
                m.weight.mul_((m.weight.abs() > cut).float())
                if empty_row:
                    m.weight[0] = 0  # an empty CSR row (its bias keeps the neuron alive)
    return model


def _csr_kernels(mod):
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("csr_"))


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("batch", [1, 5])
def test_linear_csr_equals_masked_torch(host_spec, path, batch):
    model = _magnitude_prune(MLP().eval(), 0.9, seed=batch)
    x = torch.randn(batch, 784)
    out = RewriteCSR(CSRConfig(host_spec, layers=MLP_KEYS))(_import(model, x, path))
    # bias and ReLU fused into the kernels (fc3 has no ReLU after it)
    assert _csr_kernels(out) == [f"csr_nt_100x300_b{batch}_bias_relu", f"csr_nt_10x100_b{batch}_bias",
                                 f"csr_nt_300x784_b{batch}_bias_relu"]
    assert not {"relax.matmul", "relax.add", "relax.nn.relu"} & set(_ops(out))
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_constants_are_the_csr_encoding(host_spec):
    model = _magnitude_prune(MLP().eval(), 0.8)
    out = RewriteCSR(CSRConfig(host_spec, layers={layer_key((300, 784))}))(
        _import(model, torch.randn(1, 784), "export"))
    ops = _ops(out)
    assert ops.count("relax.call_tir") == 1 and ops.count("relax.matmul") == 2  # only fc1 was chosen
    assert ops.count("relax.add") == 2 and ops.count("relax.nn.relu") == 1  # fc1's went into its kernel
    calls = [b.value for blk in out["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.call_tir")]
    values, col_idx, row_ptr, bias = (c.value.numpy() for c in calls[0].args[1].fields[1:])
    csr = F.encode_csr(model.fc1.weight.detach().numpy())
    assert values.shape == (csr.nnz, 1) and csr.nnz == np.count_nonzero(model.fc1.weight.detach().numpy())
    np.testing.assert_array_equal(values[:, 0], csr.values)
    np.testing.assert_array_equal(bias, model.fc1.bias.detach().numpy())
    np.testing.assert_array_equal(col_idx, csr.col_idx)
    np.testing.assert_array_equal(row_ptr, csr.row_ptr)
    assert row_ptr[1] == row_ptr[0]  # row 0 is empty


@pytest.mark.parametrize("batch", [1, 2])
def test_conv_csr_gemm_equals_masked_torch(host_spec, batch):
    model = _magnitude_prune(ConvNet().eval(), 0.85, seed=batch)
    x = torch.randn(batch, 1, 28, 28)
    keys = frozenset({layer_key(tuple(m.weight.shape)) for m in (model.conv1, model.conv2, model.conv3, model.fc)})
    out = RewriteCSR(CSRConfig(host_spec, layers=keys))(_import(model, x, "export"))
    assert "relax.nn.conv2d" not in _ops(out) and "relax.matmul" not in _ops(out)
    assert sum(k.startswith("csr_gemm_") for k in _csr_kernels(out)) == 3
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_no_layers_chosen_leaves_the_module_unchanged(host_spec):
    mod = _import(_magnitude_prune(MLP().eval(), 0.9), torch.randn(1, 784), "export")
    tvm.ir.assert_structural_equal(RewriteCSR(CSRConfig(host_spec))(mod), mod)


def test_idempotent_and_input_not_mutated(host_spec):
    mod = _import(_magnitude_prune(MLP().eval(), 0.9), torch.randn(1, 784), "export")
    before = mod.script(show_meta=True)
    once = RewriteCSR(CSRConfig(host_spec, layers=MLP_KEYS))(mod)
    # A second run finds no matmul left to match: only the keys check can complain, so give it none.
    tvm.ir.assert_structural_equal(RewriteCSR(CSRConfig(host_spec))(once), once)
    assert mod.script(show_meta=True) == before


def test_unknown_layer_key_is_a_clear_error(host_spec):
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    with pytest.raises(PlanError, match=r"RewriteCSR.*linear:999x784.*match no constant-weight layer"):
        RewriteCSR(CSRConfig(host_spec, layers={"linear:999x784"}))(mod)


def test_compile_plan_rejects_a_layer_that_is_both_csr_and_group():
    key = layer_key((300, 784))
    with pytest.raises(PlanError, match="both CSR and group-sparse"):
        CompilePlan(layer_thresholds={key: 0.0}, csr_layers={key})
    with pytest.raises(PlanError, match="expected a set of layer keys"):
        CompilePlan(csr_layers=key)
    assert CompilePlan(layer_thresholds={key: 2.0}, csr_layers={key}).csr_layers == frozenset({key})


def test_traditional_plan_builds_csr_everywhere_and_matches_torch(host_spec):
    """The paper's baseline through tvm_scalpel.build: a magnitude-pruned model, a CSR kernel per
    sparse layer (a dense one for a layer without zeros), the compiled output equal to torch."""
    model = _magnitude_prune(MLP().eval(), 0.9, empty_row=False)
    with torch.no_grad():
        model.fc3.weight.add_(1.0)  # no zeros left in fc3
    x = torch.randn(3, 784)
    mod = _import(model, x, "export")
    plan = traditional(mod, host_spec)
    assert [d.method for d in plan.layers] == [Method.CSR, Method.CSR, Method.DENSE]
    assert plan.layers[0].reached_sparsity == pytest.approx(0.9, abs=0.01)
    assert "90% zero weights, CSR" in plan.layers[0].reason
    cp = plan.compile_plan()
    assert cp.csr_layers == {layer_key((300, 784)), layer_key((100, 300))}
    ex = tvm_scalpel.build(mod, "host", cp)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose(out[0].numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_traditional_plan_needs_a_cpu_target():
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    with pytest.raises(PlanError, match="CPU targets only, found gpu"):
        traditional(mod, tvm_scalpel.hardware_spec("cuda"))
