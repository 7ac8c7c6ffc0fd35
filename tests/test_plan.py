"""Per-layer decisions from hardware class, profile and reached sparsity; the plan drives the build."""

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import MLP, _group_prune, _import
from tvm import relax

import tvm_scalpel
from tvm_scalpel import PlanError
from tvm_scalpel.passes.fuse_layer_chain import kernel_names
from tvm_scalpel.plan import Method, PruningPlan, decide
from tvm_scalpel.profiling import HardwareProfile, LayerProfile, layer_shapes


def _profile(spec, shapes, crossover_by_m):
    layers = []
    for s in shapes:
        c = crossover_by_m.get(s.m)
        sparse = [5.0 if c is not None and sp >= c else 20.0 for sp in (0.0, 0.5, 0.7, 0.9)]
        layers.append(LayerProfile(shape=s, w=spec.lanes(), sparsities=(0.0, 0.5, 0.7, 0.9), dense_us=10.0,
                                   sparse_us=tuple(sparse)))
    return HardwareProfile(target=spec.target_json, kernel_version="test", layers=tuple(layers))


def test_cpu_decisions_follow_profile_and_reached_sparsity(host_spec):
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.3)  # fc1, fc2 reach ~70 %; fc3 dense
    mod = _import(model, torch.randn(1, 784), "export")
    shapes = layer_shapes(mod)
    prof = _profile(host_spec, shapes, {300: 0.5, 100: 0.9, 10: None})
    plan = decide(mod, host_spec, prof)
    by_key = {d.key: d for d in plan.layers}
    fc1, fc2, fc3 = by_key["linear:300x784"], by_key["linear:100x300"], by_key["linear:10x100"]
    assert fc1.method is Method.GROUP and fc1.crossover == 0.5 and "sparse wins from 50%" in fc1.reason
    assert fc2.method is Method.DENSE and "reached only" in fc2.reason  # 70 % < the 90 % crossover
    assert fc3.method is Method.DENSE and "never wins" in fc3.reason
    assert PruningPlan.from_json(plan.to_json()) == plan
    # The plan drives the build: fc1 group-sparse, fc2 and fc3 dense.
    lowered = tvm_scalpel.pipeline("host", plan.compile_plan())(mod)
    names = [n for n in kernel_names(lowered) if n.startswith(("dense_", "group_sparse_"))]
    assert [n.split("_b")[0] for n in names] == [
        "dense_nt_100x300", "dense_nt_10x100", f"group_sparse_nt_300x784_w{host_spec.lanes()}"]
    x = torch.randn(1, 784)
    ex = tvm_scalpel.build(_import(model, x, "export"), "host", plan.compile_plan())
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_mcu_groups_everywhere_and_gpu_node_only(host_spec):
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    mcu = decide(mod, tvm_scalpel.hardware_spec("cortex-m4"))
    assert {d.method for d in mcu.layers} == {Method.GROUP} and {d.group_width for d in mcu.layers} == {2}
    gpu = decide(mod, tvm_scalpel.hardware_spec("cuda"))
    assert {d.method for d in gpu.layers} == {Method.DENSE} and "GPU" in gpu.layers[0].reason


def test_cpu_without_profile_or_with_missing_shape_is_an_error(host_spec):
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    with pytest.raises(PlanError, match="needs a hardware profile"):
        decide(mod, host_spec)
    partial = _profile(host_spec, layer_shapes(mod)[:1], {300: 0.5})
    with pytest.raises(PlanError, match="no profile for"):
        decide(mod, host_spec, partial)
