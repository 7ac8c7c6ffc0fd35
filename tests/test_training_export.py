"""A finalized model exports (torch.export, ONNX opset 17), reproduces the masked model, and its
weights alone show the structure (zero rows, zero input columns, zero groups)."""

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tvm_scalpel import formats
from tvm_scalpel.models import build_model
from tvm_scalpel.training import GroupConfig, NodeConfig, PruneConfig, prepare


def _pruned(name, group_width=None, **model_kw):
    """Masks as after training: some nodes dead (frozen), groups cut at a threshold."""
    torch.manual_seed(0)
    model = build_model(name, **model_kw)
    cfg = PruneConfig(node=NodeConfig(), group=GroupConfig(width=group_width) if group_width else None)
    pruner = prepare(model, cfg)
    with torch.no_grad():
        for mask in pruner.masks.values():
            mask.beta[1::3] = 0.0
    pruner.model(model.example_input(1))
    pruner.freeze_nodes()
    if group_width:
        pruner.prune_groups(0.03)
    pruner.model.eval()
    x = model.example_input(4)
    with torch.no_grad():
        masked = pruner.model(x)
    final, plan = pruner.finalize()
    return final, plan, x, masked


def _onnx_run(model, x):
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    proto = onnx.load_from_string(buf.getvalue())
    return proto, ReferenceEvaluator(proto).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("name,w", [("lenet-5", 8), ("lenet-300-100", 4), ("convnet", None)])
def test_torch_export_reproduces_masked_model(name, w):
    final, _, x, masked = _pruned(name, w)
    ep = torch.export.export(final, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), masked, atol=1e-5)


# dynamo=False (the TorchScript exporter) is the path TVM's ONNX frontend is tested with; torch warns
# that it is deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name,w", [("lenet-5", 8), ("convnet", None)])
def test_onnx_export_reproduces_masked_model_and_carries_zeros(name, w):
    final, plan, x, masked = _pruned(name, w)
    proto, y = _onnx_run(final, x)
    np.testing.assert_allclose(y, masked.numpy(), atol=1e-5)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for lp in plan.layers:
        weight = inits[f"{lp.name}.weight"]
        assert np.count_nonzero(weight) == lp.nonzero_weights
        dead = sorted(set(range(lp.num_nodes)) - set(lp.kept_nodes))
        assert not weight[dead].any()


def test_weights_alone_reveal_nodes_and_groups():
    final, plan, _, _ = _pruned("lenet-300-100", 4)
    fc1, fc2 = final.fc1.weight.detach().numpy(), final.fc2.weight.detach().numpy()
    live_fc1 = np.nonzero(np.abs(fc1).sum(axis=1) + np.abs(final.fc1.bias.detach().numpy()))[0]
    assert tuple(live_fc1) == plan.layer("fc1").kept_nodes
    live_fc2 = np.nonzero(np.abs(fc2).sum(axis=1))[0]
    compact = fc2[np.ix_(live_fc2, live_fc1)]  # what the compiler encodes after shrinking
    assert np.array_equal(formats.group_mask(compact, 4), plan.layer("fc2").group_mask.to_array())
