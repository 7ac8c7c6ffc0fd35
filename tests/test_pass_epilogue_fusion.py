"""Layer kernels take over the bias add and ReLU that follow them (passes._layers.find_epilogues), and
only when that is exact: every intermediate read once, a per-channel constant bias."""

import numpy as np
import pytest
import torch
import tvm
from test_pass_rewrite_group_sparse import _import, _ops, _run
from tvm import relax

from tvm_scalpel.passes.rewrite_dense import DenseConfig, RewriteDense


def _kernels(mod):
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")


def _rewrite_and_check(spec, model, x, path="export"):
    model = model.eval()
    mod = _import(model, x, path)
    before = mod.script(show_meta=True)
    out = RewriteDense(DenseConfig(spec))(mod)
    relax.analysis.well_formed(out)  # raises on e.g. a dataflow var used outside its block
    assert mod.script(show_meta=True) == before  # the input module is not mutated
    with torch.no_grad():
        np.testing.assert_allclose(_run(out, spec, x), model(x).numpy(), rtol=1e-4, atol=1e-5)
    return out


class _ConvBlock(torch.nn.Module):
    def __init__(self, relu: bool):
        super().__init__()
        self.conv, self.relu = torch.nn.Conv2d(3, 8, 3, padding=1), relu

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bias_and_relu_move_into_the_gemm(host_spec, batch, relu):
    out = _rewrite_and_check(host_spec, _ConvBlock(relu), torch.randn(batch, 3, 9, 9))
    suffix = "_bias_relu" if relu else "_bias"
    assert [k for k in _kernels(out) if k.startswith("dense_gemm")] == [f"dense_gemm_8x27_n{batch * 81}{suffix}"]
    assert not {"relax.add", "relax.nn.relu"} & set(_ops(out))


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_the_output_layer_fuses_and_stays_the_output(host_spec, path):
    """ONNX binds the last add to the dataflow block's output var itself: the fused kernel's result must
    be bound to an output var, not a dataflow var used outside its block."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    out = _rewrite_and_check(host_spec, model, torch.randn(1, 20), path)
    assert _kernels(out) == ["dense_nt_4x9_b1_bias", "dense_nt_9x20_b1_bias_relu"]


@pytest.mark.parametrize("path", ["export", "onnx"])
def test_linear_without_bias_fuses_its_relu(host_spec, path):
    model = torch.nn.Sequential(torch.nn.Linear(20, 7, bias=False), torch.nn.ReLU())
    out = _rewrite_and_check(host_spec, model, torch.randn(2, 20), path)
    assert _kernels(out) == ["dense_nt_7x20_b2_relu"]
    assert "relax.nn.relu" not in _ops(out)


class _Reused(torch.nn.Module):
    """fc's output is read twice: fusing its ReLU would lose the pre-activation value."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 6)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y) * y


def test_a_tensor_read_twice_is_not_fused_past(host_spec):
    out = _rewrite_and_check(host_spec, _Reused(), torch.randn(1, 12))
    assert _kernels(out) == ["dense_nt_6x12_b1_bias"]  # the bias add had one reader; the sum has two
    assert "relax.nn.relu" in _ops(out)


class _FullAdd(torch.nn.Module):
    """A constant added after the layer that is not a per-channel bias ([batch, out], values per row)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 6, bias=False)
        self.register_buffer("offset", torch.arange(12.0).reshape(2, 6))

    def forward(self, x):
        return torch.relu(self.fc(x) + self.offset)


def test_a_non_channel_constant_is_not_a_bias(host_spec):
    out = _rewrite_and_check(host_spec, _FullAdd(), torch.randn(2, 12))
    assert _kernels(out)[0] == "dense_nt_6x12_b2"  # no epilogue: the add and relu run after it
    assert {"relax.add", "relax.nn.relu"} <= set(_ops(out))


def test_fused_kernels_are_not_shared_with_unfused_ones(host_spec):
    """Two layers of one shape, one with a ReLU after it and one without: two kernels, two names."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    out = _rewrite_and_check(host_spec, Two(), torch.randn(1, 8))
    assert _kernels(out) == ["dense_nt_8x8_b1_bias", "dense_nt_8x8_b1_bias_relu"]
    tvm.ir.assert_structural_equal(RewriteDense(DenseConfig(host_spec))(out), out)  # nothing left to fuse
