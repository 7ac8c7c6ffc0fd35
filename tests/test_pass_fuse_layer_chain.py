"""FuseLayerChain: a run of layer kernels, each result read only by the next, becomes one PrimFunc (one VM
call); a tensor read twice, or an op that is not one of our kernels, ends the run."""

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import _import
from tvm import relax

import tvm_scalpel
from tvm_scalpel.passes.fuse_layer_chain import CHAIN_ATTR, FuseLayerChain, kernel_names
from tvm_scalpel.passes.rewrite_dense import DenseConfig, RewriteDense


def _prim_calls(mod: tvm.IRModule, fn: str = "main") -> list[str]:
    """The PrimFuncs ``fn`` calls, in order (``call_tir`` before lowering, direct calls after)."""
    called = []

    def visit(e):
        if not isinstance(e, relax.Call):
            return
        gv = e.args[0] if e.op.same_as(tvm.ir.Op.get("relax.call_tir")) else e.op
        if isinstance(gv, tvm.ir.GlobalVar) and isinstance(mod[gv], tvm.tirx.PrimFunc):
            called.append(gv.name_hint)

    relax.analysis.post_order_visit(mod[fn].body, visit)
    return called


def _chains(mod: tvm.IRModule) -> dict[str, list[str]]:
    return {gv.name_hint: [str(k) for k in f.attrs[CHAIN_ATTR]] for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and CHAIN_ATTR in f.attrs}


def _build_matches_torch(model, x, path="export"):
    mod = _import(model, x, path)
    ex = tvm_scalpel.build(mod, "host")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    out = out[0] if not hasattr(out, "numpy") else out
    with torch.no_grad():
        np.testing.assert_allclose(out.numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    return tvm_scalpel.pipeline("host")(mod)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 9), torch.nn.ReLU(), torch.nn.Linear(9, 7), torch.nn.ReLU(),
                               torch.nn.Linear(7, 4)).eval()


def test_the_pass_merges_a_chain_and_leaves_its_input_alone(host_spec):
    mod = RewriteDense(DenseConfig(host_spec))(_import(_mlp(), torch.randn(1, 20), "export"))
    assert len(_prim_calls(mod)) == 3
    before = mod.script(show_meta=True)
    out = FuseLayerChain()(mod)
    assert mod.script(show_meta=True) == before
    relax.analysis.well_formed(out)
    assert _prim_calls(out) == ["fused_chain_main"]
    assert _chains(out) == {"fused_chain_main": ["dense_nt_9x20_b1_bias_relu", "dense_nt_7x9_b1_bias_relu",
                                                 "dense_nt_4x7_b1_bias"]}
    # The fused kernels are gone from the module (they would be compiled for nothing).
    assert [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)] == [
        "fused_chain_main"]
    assert not any(isinstance(f, relax.Function) and f.attrs and f.attrs.get("Primitive", False)
                   for f in out.functions.values())


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("batch", [1, 16])
def test_compiled_chain_equals_torch(host_spec, path, batch):
    lowered = _build_matches_torch(_mlp(), torch.randn(batch, 20), path)
    assert [n for n in _prim_calls(lowered) if n.startswith("fused_chain")] == ["fused_chain_main"]
    assert kernel_names(lowered) == sorted(f"dense_nt_{m}x{k}_b{batch}_bias{r}"
                                           for m, k, r in ((9, 20, "_relu"), (7, 9, "_relu"), (4, 7, "")))


class _Fork(torch.nn.Module):
    """fc1's output is read by two layers: the chain must end there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.fc3, self.fc4 = (torch.nn.Linear(12, 8), torch.nn.Linear(8, 6),
                                                  torch.nn.Linear(8, 5), torch.nn.Linear(6, 5))

    def forward(self, x):
        y = torch.relu(self.fc1(x))
        return self.fc4(torch.relu(self.fc2(y))) + self.fc3(y)


def test_a_tensor_read_twice_ends_the_chain(host_spec):
    lowered = _build_matches_torch(_Fork().eval(), torch.randn(1, 12))
    # fc1 stands alone (two readers); fc2 → fc4 fuse; fc3 stands alone; the final add is TVM's.
    chains = _chains(lowered)
    assert list(chains.values()) == [["dense_nt_6x8_b1_bias_relu", "dense_nt_5x6_b1_bias"]]
    calls = _prim_calls(lowered)
    assert calls.count("dense_nt_8x12_b1_bias_relu") == 1 and calls.count("dense_nt_5x8_b1_bias") == 1


def test_conv_im2col_and_gemm_fuse(host_spec):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU()).eval()
    lowered = _build_matches_torch(model, torch.randn(1, 1, 12, 12))
    chains = sorted(_chains(lowered).values())
    assert len(chains) == 2 and all(len(c) == 2 and c[0].startswith("im2col") and c[1].startswith("dense_gemm")
                                    for c in chains), chains


def _flat_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(21, 9), torch.nn.ReLU(),
                               torch.nn.Linear(9, 4)).eval()


def _reshapes(mod: tvm.IRModule) -> int:
    """Reshape views left in main (R.reshape before lowering, vm.builtin.reshape after)."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.reshape":
            found.append(e)
        if isinstance(e, relax.ExternFunc) and e.global_symbol == "vm.builtin.reshape":
            found.append(e)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return len(found)


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_leading_flatten_is_read_in_place_by_the_chain(host_spec, path, batch):
    """The flatten before the first layer joins the chain as a view: the first kernel reads the model's
    input itself, with neither the VM's reshape call (0.3 us) nor a copy into a scratch buffer (0.09 us
    for 784 floats); results unchanged."""
    x = torch.randn(batch, 1, 3, 7)
    lowered = _build_matches_torch(_flat_mlp(), x, path)
    assert _reshapes(lowered) == 0
    (chain,) = [f for gv, f in lowered.functions_items() if gv.name_hint == "fused_chain_main"]
    assert [int(d) for d in chain.params[0].ty.shape] == [batch, 1, 3, 7]  # the model's input itself
    assert _chains(lowered)["fused_chain_main"] == [f"dense_nt_9x21_b{batch}_bias_relu", f"dense_nt_4x9_b{batch}_bias"]
    # its only scratch buffer is fc1's output: no flattened copy of the input
    scratch = [[int(d) for d in b.shape] for b in chain.body.block.alloc_buffers]
    assert scratch == [[batch, 9]]
    # Told not to (lead_flatten=False) the pass leaves the flatten to the VM.
    mod = RewriteDense(DenseConfig(host_spec))(_import(_flat_mlp(), x, path))
    mod = relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod)))
    assert "reshape" in [n.split("_")[0] for n in _prim_calls(FuseLayerChain(lead_flatten=False)(mod))]
    assert "reshape" not in [n.split("_")[0] for n in _prim_calls(FuseLayerChain()(mod))]


def test_reading_the_flatten_in_place_needs_a_buffer_of_its_size(host_spec):
    from tvm.script import tirx as T

    from tvm_scalpel.errors import KernelError
    from tvm_scalpel.passes.fuse_layer_chain import _input_view
    from tvm_scalpel.schedules import cpu

    kernel = cpu.dense_nt(4, 8, 1, host_spec)  # A: (1, 8)
    assert [int(d) for d in _input_view(kernel, 0, (1, 2, 4)).params[0].shape] == [1, 2, 4]
    with pytest.raises(KernelError, match=r"parameter 0 \(A\) should be a buffer of 6 elements .* found \(1, 8\)"):
        _input_view(kernel, 0, (2, 3))

    @T.prim_func
    def raw(x: T.handle):
        T.evaluate(0)

    with pytest.raises(KernelError, match=r"parameter 0 \(x\) should be a buffer"):
        _input_view(raw, 0, (2, 3))
