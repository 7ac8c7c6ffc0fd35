"""Structure-only NIN / AlexNet: the released structure is built as stated, and the compiler sees it."""

import numpy as np
import pytest
import torch

from tvm_scalpel import formats
from tvm_scalpel.plan import all_dense, stored_weight_bytes
from tvm_scalpel.released import (
    PAPER_CPU_SIZE, StructureError, apply_structure, magnitude_like, released_structure,
)
from tvm_scalpel.sources import resolve


def _weights(model) -> dict[str, np.ndarray]:
    return {n: m.weight.detach().numpy().reshape(m.weight.shape[0], -1).copy()
            for n, m in model.named_children() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.fixture(scope="module")
def nin():
    torch.manual_seed(0)
    dense = resolve("nin").torch_model()
    structure = released_structure("nin", 16)
    return dense, structure, apply_structure(dense, structure)


def test_nin_keeps_one_fraction_of_nodes_and_reaches_the_paper_size(nin):
    dense, structure, pruned = nin
    assert abs(structure.size_percent - PAPER_CPU_SIZE["nin"]) < 0.2
    assert structure.group_layers == () and "cccp6" not in structure.kept_nodes
    w = _weights(pruned)
    for name, kept in structure.kept_nodes.items():
        live_rows = np.abs(w[name]).sum(axis=1) > 0
        assert live_rows.sum() == kept
        assert abs(kept / len(live_rows) - 0.9) < 0.02  # the one fraction that gives 81.16 %
        bias = dict(pruned.named_children())[name].bias.detach().numpy()
        assert np.all(bias[~live_rows] == 0)
    # the input model is not modified
    assert all(np.count_nonzero(v) == v.size for v in _weights(dense).values())


def test_nin_size_as_the_compiler_counts_it_and_outputs_unchanged_by_folding(nin):
    import tvm
    from tvm import relax

    from tvm_scalpel import build, hardware_spec

    dense, structure, pruned = nin
    spec = hardware_spec("host")
    source = resolve("nin")
    mod = source.relax(1, pruned, (3, 32, 32))
    dense_bytes = sum(4 * v.size for v in _weights(dense).values())
    assert stored_weight_bytes(mod) / dense_bytes * 100 == pytest.approx(structure.size_percent, abs=1e-6)
    vm = relax.VirtualMachine(build(mod, spec.target, all_dense(mod, spec).compile_plan()), tvm.cpu())
    x = pruned.example_input(1)
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), pruned(x).detach().numpy(),
                               rtol=1e-4, atol=1e-6)


def test_alexnet_released_neurons_and_groups():
    torch.manual_seed(0)
    dense = resolve("alexnet").torch_model()
    structure = released_structure("alexnet", 8)
    assert structure.kept_nodes == {"fc6": 3001, "fc7": 3029}
    assert abs(structure.size_percent - PAPER_CPU_SIZE["alexnet"]) < 0.05
    pruned = apply_structure(dense, structure)
    w = _weights(pruned)
    assert all(np.count_nonzero(w[c]) == w[c].size for c in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    live6 = np.abs(w["fc6"]).sum(axis=1) > 0
    assert live6.sum() == 3001
    fc7 = w["fc7"][:, live6]  # the layer as the compiler folds it: fc6's dead neurons' columns removed
    fc7 = fc7[np.abs(fc7).sum(axis=1) > 0]
    assert fc7.shape == (3029, 3001)
    keep = formats.group_mask(fc7, 8)
    assert keep[:, -1].all()  # the last group of each row is kept
    pruned_frac = 1 - keep[:, :-1].mean()
    assert pruned_frac == pytest.approx(structure.group_sparsity, abs=1e-3)
    # traditional pruning: the same nonzero count per layer, unstructured, on the dense weights
    trad = _weights(magnitude_like(dense, pruned))
    assert np.count_nonzero(trad["fc7"]) == np.count_nonzero(fc7)
    assert np.count_nonzero(trad["fc6"]) == np.count_nonzero(w["fc6"])
    assert (np.abs(trad["fc7"]).sum(axis=1) > 0).all()  # no whole neuron removed


def test_models_without_a_released_structure_are_refused():
    with pytest.raises(StructureError, match="lenet-5.*expected one of"):
        released_structure("lenet-5", 8)
