"""The one build flow: tvm_scalpel.build / pipeline for the host CPU and CUDA."""

import shutil

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import MLP, ConvNet, _group_prune, _import
from tvm import relax

import tvm_scalpel
from tvm_scalpel import CompilePlan, TargetError
from tvm_scalpel.passes.fuse_layer_chain import kernel_names


def _vm_out(ex, x):
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _prune_nodes_and_groups(model, w, seed=0):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        dead = torch.from_numpy(rng.random(300) < 0.5)
        model.fc1.weight[dead] = 0
        model.fc1.bias[dead] = 0
    return _group_prune(model, w, 0.1, seed=seed)


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("pruned", [False, True])
def test_build_mlp_matches_torch(host_spec, path, pruned):
    model = MLP().eval()
    if pruned:
        _prune_nodes_and_groups(model, host_spec.lanes())
    x = torch.randn(4, 784)
    ex = tvm_scalpel.build(_import(model, x, path), "host")
    np.testing.assert_allclose(_vm_out(ex, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    # On the CPU the VM's main is compiled to machine code (no bytecode to interpret per call).
    assert relax.VMExecutable(ex.mod).as_text().startswith("@main num_inputs=1 vm_tir_func;")


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_build_convnet_matches_torch(host_spec, path):
    model = ConvNet().eval()
    x = torch.randn(2, 1, 28, 28)
    ex = tvm_scalpel.build(_import(model, x, path), "host")
    np.testing.assert_allclose(_vm_out(ex, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_no_naive_loops_left(host_spec):
    """Every PrimFunc after the pipeline is one of our kernels or carries a schedule."""
    model = _prune_nodes_and_groups(MLP().eval(), host_spec.lanes())
    for m, x in ((model, torch.randn(1, 784)), (ConvNet().eval(), torch.randn(1, 1, 28, 28))):
        lowered = tvm_scalpel.pipeline("host")(_import(m, x, "export"))
        prims = {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        assert prims
        unscheduled = [n for n, f in prims.items() if not f.attrs.get("tir.is_scheduled", False)]
        assert unscheduled == []
        # Legalized elementwise functions with room for SIMD really were vectorised (tiny ones, a few
        # hundred scalars, rightly stay scalar loops; reductions such as pooling run in parallel only
        # with enough work: test_schedule_generic.py)
        for name, f in prims.items():
            if name.startswith(("dense_", "group_sparse_", "im2col", "fused_chain")):
                continue
            script = f.script()
            out_elems = int(np.prod([int(d) for d in f.params[-1].ty.shape]))
            if out_elems >= 1024 and out_elems % host_spec.lanes() == 0 and "T.init()" not in script:
                assert "T.vectorized" in script, name


def test_pruned_model_uses_folded_and_group_sparse_layers(host_spec):
    model = _prune_nodes_and_groups(MLP().eval(), host_spec.lanes())
    lowered = tvm_scalpel.pipeline("host")(_import(model, torch.randn(1, 784), "export"))
    names = kernel_names(lowered)
    kept = int((model.fc1.weight.abs().sum(1) != 0).sum())
    assert any(n.startswith(f"group_sparse_nt_{kept}x784") for n in names), names
    assert any(n.startswith(f"group_sparse_nt_100x{kept}") or n.startswith(f"dense_nt_100x{kept}")
               for n in names), names


def test_plan_thresholds_and_errors(host_spec):
    model = _prune_nodes_and_groups(MLP().eval(), host_spec.lanes())
    mod = _import(model, torch.randn(1, 784), "export")
    with pytest.raises(tvm_scalpel.PlanError, match="linear:1x1"):
        tvm_scalpel.pipeline("host", CompilePlan(layer_thresholds={"linear:1x1": 0.5}))(mod)
    with pytest.raises(TargetError, match="has no Relax pipeline"):
        tvm_scalpel.pipeline("cortex-m4")
    with pytest.raises(tvm_scalpel.PlanError, match="expected out_dir=... and calibration"):
        tvm_scalpel.build(mod, "cortex-m4")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit needed to check PTX)")
def test_cuda_build_generates_code_that_compiles_to_ptx():
    from tvm_scalpel.compat import compile_ptx, cuda_sources

    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:150] = 0
        model.fc1.bias[:150] = 0
    ex = tvm_scalpel.build(_import(model, torch.randn(1, 784), "export"), "cuda")
    sources = cuda_sources(ex)
    assert sources and "__global__" in sources[0]
    assert b".entry" in compile_ptx(sources[0], tvm_scalpel.hardware_spec("cuda").target)
