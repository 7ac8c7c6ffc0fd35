"""Issue-4 bar: reference models with random node masks (30-70 % of nodes dead) and random group masks
(70-95 % of groups zero) compile with tvm_scalpel.build and equal the masked torch model, through both
torch.export and ONNX."""

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import _import
from tvm import relax

import tvm_scalpel
from tvm_scalpel import formats as F
from tvm_scalpel.models import build_model
from tvm_scalpel.passes.fuse_layer_chain import CHAIN_ATTR, kernel_names


def _random_prune(model, w, seed):
    rng = np.random.default_rng(seed)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        for m in layers[:-1]:  # node-prune every layer but the classifier
            dead = torch.from_numpy(rng.random(m.weight.shape[0]) < rng.uniform(0.3, 0.7))
            m.weight[dead] = 0
            if m.bias is not None:
                m.bias[dead] = 0
        for m in layers:
            w2 = F.flatten_per_filter(m.weight.numpy())
            keep = rng.random((w2.shape[0], -(-w2.shape[1] // w))) >= rng.uniform(0.7, 0.95)
            m.weight.copy_(torch.from_numpy(F.encode(w2, w, keep=keep).to_dense().reshape(m.weight.shape)))
    return model


def _assert_build_matches_torch(model, x, path):
    """Compile with tvm_scalpel.build and compare with the masked torch model; returns the module."""
    mod = _import(model, x, path)
    out = relax.VirtualMachine(tvm_scalpel.build(mod, "host"), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    return mod


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5", "convnet"])
def test_random_masks_compiled_equals_masked_torch(host_spec, name, path):
    model = _random_prune(build_model(name).eval(), host_spec.lanes(), seed=len(name))
    x = model.example_input(2) * 10  # larger activations: a tighter check after heavy pruning
    mod = _assert_build_matches_torch(model, x, path)
    kernels = kernel_names(tvm_scalpel.pipeline("host")(mod))
    assert any(k.startswith("group_sparse") for k in kernels), kernels


class ResidualNet(torch.nn.Module):
    """A conv trunk with a residual add and a branch (concat): coupled nodes must stay exact."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(24 * 7 * 7, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h)) + h  # residual: c1's channels have two readers
        h = torch.nn.functional.max_pool2d(h, 4)
        h = torch.cat([h, torch.relu(self.c3(h))], dim=1)  # branch + concat
        return self.fc2(torch.relu(self.fc1(torch.flatten(h, 1))))

    def example_input(self, batch):
        return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class GroupedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(4, 16, 3)
        self.c2 = torch.nn.Conv2d(16, 16, 3, groups=2)  # AlexNet-style grouped conv
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(h, 3), 1))

    def example_input(self, batch):
        return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("path", ["export", "onnx"])
@pytest.mark.parametrize("net", [ResidualNet, GroupedNet])
def test_branching_and_grouped_models_stay_exact(host_spec, net, path):
    model = _random_prune(net().eval(), host_spec.lanes(), seed=7)
    _assert_build_matches_torch(model, model.example_input(2) * 10, path)


def test_nin_at_batch_1_chains_its_pointwise_convs_and_equals_masked_torch(host_spec):
    """NIN at batch 1: each 1×1 (cccp) conv's GEMM reads the previous GEMM's output, so each conv and
    its two cccp layers are one chain, and the model equals the masked torch model."""
    model = _random_prune(build_model("nin").eval(), host_spec.lanes(), seed=3)
    mod = _assert_build_matches_torch(model, model.example_input(1), "export")
    lowered = tvm_scalpel.pipeline("host")(mod)
    chains = sorted([str(n).split("_")[0] for n in f.attrs[CHAIN_ATTR]] for _, f in lowered.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc) and CHAIN_ATTR in f.attrs)
    assert [c[0] for c in chains] == ["im2col"] * 3 and all(len(c) == 4 for c in chains), chains
    assert not any(k.startswith("im2col") and "_k1x1_" in k for k in kernel_names(lowered))
