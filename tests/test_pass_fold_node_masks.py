"""FoldNodeMasks: dead neurons / channels are removed and the layers around them shrink, exactly."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvm_scalpel import PlanError
from tvm_scalpel.compat import constant_array
from tvm_scalpel.passes.fold_node_masks import FoldConfig, FoldNodeMasks

from test_pass_rewrite_group_sparse import MLP, _import, _run


def _weights(mod):
    """Shapes of every constant with rank >= 2 in main (the layer weights), in order of use."""
    shapes = []

    def visit(e):
        a = constant_array(e)
        if a is not None and a.ndim >= 2:
            shapes.append(tuple(a.shape))

    relax.analysis.post_order_visit(mod["main"], visit)
    return shapes


def _kill_rows(lin_or_conv, dead):
    with torch.no_grad():
        lin_or_conv.weight[dead] = 0
        lin_or_conv.bias[dead] = 0


class Masked(torch.nn.Module):
    """Linear -> relu -> explicit 0/1 mask (as a mask layer exports) -> Linear."""

    def __init__(self, mask):
        super().__init__()
        self.fc1 = torch.nn.Linear(20, 12)
        self.fc2 = torch.nn.Linear(12, 5)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) * self.mask)


class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3)
        self.c2 = torch.nn.Conv2d(8, 6, 3)
        self.fc = torch.nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.nn.functional.avg_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 10)
        self.fc2 = torch.nn.Linear(10, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h  # h has two readers: its nodes must not be removed


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_zero_rows_are_removed_mlp(host_spec, path):
    model = MLP().eval()
    rng = np.random.default_rng(0)
    dead1 = rng.random(300) < 0.5
    dead2 = rng.random(100) < 0.4
    _kill_rows(model.fc1, torch.from_numpy(dead1))
    _kill_rows(model.fc2, torch.from_numpy(dead2))
    x = torch.randn(3, 784)
    mod = _import(model, x, path)
    out = FoldNodeMasks()(mod)
    k1, k2 = int((~dead1).sum()), int((~dead2).sum())
    assert _weights(out) == [(k1, 784), (k2, k1), (10, k2)]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_explicit_mask_layer_is_folded_and_deleted(host_spec, path):
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.float32)
    model = Masked(mask).eval()
    x = torch.randn(2, 20)
    out = FoldNodeMasks()(_import(model, x, path))
    assert _weights(out) == [(7, 20), (5, 7)]
    ops = []
    relax.analysis.post_order_visit(out["main"], lambda e: isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and ops.append(e.op.name))
    assert "relax.multiply" not in ops
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_conv_pool_flatten_linear(host_spec, path):
    model = Conv().eval()
    _kill_rows(model.c1, torch.tensor([1, 3, 4, 6]))
    _kill_rows(model.c2, torch.tensor([0, 5]))
    x = torch.randn(2, 1, 16, 16)
    out = FoldNodeMasks()(_import(model, x, path))
    assert _weights(out) == [(4, 1, 3, 3), (4, 4, 3, 3), (5, 16)]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_zero_consumer_columns_make_nodes_dead(host_spec):
    model = MLP().eval()
    with torch.no_grad():
        model.fc2.weight[:, :150] = 0  # nobody reads fc1's first 150 nodes
    x = torch.randn(1, 784)
    out = FoldNodeMasks()(_import(model, x, "export"))
    assert _weights(out)[:2] == [(150, 784), (100, 150)]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_round_to_keeps_a_multiple_and_stays_exact(host_spec):
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.float32)
    model = Masked(mask).eval()
    x = torch.randn(2, 20)
    out = FoldNodeMasks(FoldConfig(round_to=4))(_import(model, x, "export"))
    assert _weights(out) == [(8, 20), (5, 8)]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(PlanError, match="round_to"):
        FoldConfig(round_to=0)


def test_node_with_two_readers_is_left_alone(host_spec):
    model = Residual().eval()
    _kill_rows(model.fc1, torch.tensor([0, 1, 2]))
    x = torch.randn(1, 10)
    mod = _import(model, x, "export")
    out = FoldNodeMasks()(mod)
    tvm.ir.assert_structural_equal(out, mod)
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_unchanged_when_nothing_is_dead_idempotent_and_input_untouched():
    mod = _import(MLP().eval(), torch.randn(1, 784), "export")
    tvm.ir.assert_structural_equal(FoldNodeMasks()(mod), mod)
    model = MLP().eval()
    _kill_rows(model.fc1, torch.arange(0, 300, 2))
    mod = _import(model, torch.randn(1, 784), "export")
    before = mod.script(show_meta=True)
    once = FoldNodeMasks()(mod)
    tvm.ir.assert_structural_equal(FoldNodeMasks()(once), once)
    assert mod.script(show_meta=True) == before


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_convnet_folds_through_within_channel_lrn(host_spec, path):
    from tvm_scalpel.models import build_model

    model = build_model("convnet").eval()
    with torch.no_grad():
        for name, dead in (("conv1", [0, 3, 5, 7, 9]), ("conv2", [1, 2]), ("conv3", list(range(0, 64, 3)))):
            _kill_rows(getattr(model, name), torch.tensor(dead))
    x = model.example_input(2)
    out = FoldNodeMasks()(_import(model, x, path))
    assert _weights(out) == [(27, 3, 5, 5), (30, 27, 5, 5), (42, 30, 5, 5), (10, 42 * 16)]
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class Sigmoid(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_zero_rows_before_sigmoid_are_not_dead(host_spec):
    """sigmoid(0) = 0.5: a zero row still feeds the next layer, so nothing may be removed."""
    model = Sigmoid().eval()
    _kill_rows(model.fc1, torch.tensor([0, 2]))
    x = torch.randn(2, 8)
    mod = _import(model, x, "export")
    out = FoldNodeMasks()(mod)
    tvm.ir.assert_structural_equal(out, mod)
    np.testing.assert_allclose(_run(out, host_spec, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
