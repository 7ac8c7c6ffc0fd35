"""RewriteDense: dense constant-weight layers run our kernels; the compiled model equals torch."""

import re

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import MLP, ConvNet, _group_prune, _import, _ops, _run
from tvm import relax

import tvm_scalpel
from tvm_scalpel import formats as F
from tvm_scalpel.passes._layers import layer_key
from tvm_scalpel.passes.fuse_layer_chain import CHAIN_ATTR
from tvm_scalpel.passes.rewrite_dense import DenseConfig, RewriteDense
from tvm_scalpel.passes.rewrite_group_sparse import GroupSparseConfig, RewriteGroupSparse


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
    """NIN's shape of block: a 3×3 conv, two 1×1 convs, a pool, a 1×1 conv without relu."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 20, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(20, 8, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return self.body(x)


def _gemm_inputs(mod):
    """For each GEMM call in ``main``, in order: (kernel name, what made its D operand: a kernel whose
    output it reads directly, or a Relax op)."""
    made_by = {}
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(tvm.ir.Op.get("relax.call_tir")):
                made_by[b.var] = v.args[0].name_hint
                if "gemm" in v.args[0].name_hint:  # weights and bias are constants: D is the one var
                    (d,) = [a for a in v.args[1].fields if isinstance(a, relax.Var)]
                    out.append((v.args[0].name_hint, made_by.get(d, d.name)))
            elif isinstance(v, relax.Call):
                made_by[b.var] = v.op.name
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_convs_read_their_input_without_im2col_at_batch_1(host_spec, batch):
    """At batch 1 a 1×1 conv's im2col would copy X unchanged: its GEMM reads a reshape of X, which TVM's
    RemoveRedundantReshape (next in the pipeline) turns into the previous GEMM's output itself, or a
    reshape of the pool's output. At batch 2 the columns interleave images: every conv keeps its im2col."""
    model = _Pointwise().eval()
    x = torch.randn(batch, 3, 8, 8)
    rewritten = RewriteDense(DenseConfig(host_spec))(_import(model, x, "export"))
    out = relax.transform.RemoveRedundantReshape()(rewritten)
    d = [src for _, src in _gemm_inputs(out)]
    if batch == 1:
        assert d[0].startswith("im2col") and d[1:3] == [n for n, _ in _gemm_inputs(out)[:2]]
        assert d[3] == "relax.reshape"  # the pool's NCHW output as [c, h·w]
    else:
        assert all(s.startswith("im2col") for s in d) and len(d) == 4
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_pointwise_convs_chain_with_the_conv_before_them_and_match_torch(host_spec):
    """Through the whole pipeline, dense and group-sparse: 3×3 conv → 1×1 → 1×1 is one fused chain with
    no copy between the GEMMs, and the outputs equal torch's. (The 1×1 after the pool is a chain too:
    FuseLayerChain leads the reshape of the pool's output into it as a copy.)"""
    model = _Pointwise().eval()
    w = host_spec.lanes()
    with torch.no_grad():  # the second 1×1 conv group-sparse; 20 inputs end in a partial group at w = 8, 16
        conv = model.body[4]
        keep = np.random.default_rng(0).random((8, -(-20 // w))) < 0.4
        conv.weight.copy_(torch.from_numpy(F.encode(conv.weight.numpy().reshape(8, 20), w, keep=keep)
                                           .to_dense().reshape(conv.weight.shape)))
    x = torch.randn(1, 3, 8, 8)
    plan = tvm_scalpel.CompilePlan(layer_thresholds={layer_key(conv.weight.shape): 0.0})
    lowered = tvm_scalpel.pipeline("host", plan)(_import(model, x, "export"))
    chains = [[str(n) for n in f.attrs[CHAIN_ATTR]] for _, f in lowered.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and CHAIN_ATTR in f.attrs]
    assert sorted([n.split("_")[0] + "_" + n.split("_")[1] for n in c] for c in chains) == [
        ["dense_gemm"], ["im2col_3x8x8", "dense_gemm", "dense_gemm", "group_sparse"]]
    script = lowered["main"].script()
    called = re.findall(r"^\s*(\w+)\(", script, flags=re.MULTILINE)
    assert [c.split("_")[0] for c in called] == ["fused", "max", "fused"], called  # nothing else is called
    assert script.count("vm.builtin.reshape") == 2  # views: to NCHW for the pool, and the output
    ex = tvm_scalpel.build(_import(model, x, "export"), "host", plan)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
