"""The SIMD-aware group rule (RMS, absolute threshold, last group kept, alignment, ragged K) and
traditional magnitude pruning, checked against hand-computed numbers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tvm_scalpel import formats
from tvm_scalpel.models import build_model
from tvm_scalpel.target import hardware_spec
from tvm_scalpel.training import (GroupConfig, GroupCriterion, MagnitudeConfig, MagnitudeCriterion, NodeConfig,
                                  PruneConfig, TrainingError, expand_groups, magnitude_keep, magnitude_keep_std,
                                  prepare, simd_group_keep, simd_group_keep_sparsity)


def test_rms_threshold_by_hand():
    w = np.array([[0.03, -0.03, 0.03, -0.03, 0.10, 0.0, 0.0, 0.0, 0.01, 0.01, 0.01, 0.01],
                  [0.05, 0.05, 0.05, 0.05, 0.01, 0.01, 0.01, 0.01, 0.0, 0.0, 0.0, 0.0]])
    # RMS per group of 4: row 0: 0.03, 0.05, 0.01; row 1: 0.05, 0.01, 0.0
    keep = simd_group_keep(w, 4, 0.04)
    assert keep.tolist() == [[False, True, True], [True, False, True]]  # last group always kept
    assert simd_group_keep(w, 4, 0.03).tolist() == [[True, True, True], [True, False, True]]  # RMS == thr kept
    mask = expand_groups(keep, 12, 4)
    assert mask.shape == (2, 12) and mask[0, :4].sum() == 0 and mask[0, 4:].all()


def test_ragged_last_group_rms_over_real_members_and_still_kept():
    w = np.array([[0.05] * 8 + [0.02, 0.02]])  # K = 10 at w = 4: groups of 4, 4, 2
    rms = formats.group_rms(w, 4)
    assert np.allclose(rms, [[0.05, 0.05, 0.02]])
    keep = simd_group_keep(w, 4, 0.06)
    assert keep.tolist() == [[False, False, True]]
    assert expand_groups(keep, 10, 4).tolist() == [[False] * 8 + [True, True]]
    with pytest.raises(TrainingError, match="cannot cover K=13"):
        expand_groups(keep, 13, 4)


def test_conv_is_flattened_per_filter():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (3, 2, 3, 3))  # K = 18 per filter
    keep = simd_group_keep(w, 8, 0.05)
    assert keep.shape == (3, 3)
    assert np.array_equal(keep[:, :2], formats.group_rms(w.reshape(3, 18), 8)[:, :2] >= 0.05)


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                  elements=st.floats(-0.25, 0.25, width=32)),
       st.sampled_from([1, 2, 4, 8, 16]), st.floats(0.0, 0.2))
def test_group_mask_is_aligned_and_last_group_kept(w, width, thr):
    k = w.shape[1]
    mask = expand_groups(simd_group_keep(w, width, thr), k, width)
    padded = np.concatenate([mask, np.repeat(mask[:, -1:], (-k) % width, axis=1)], axis=1)
    groups = padded.reshape(w.shape[0], -1, width)
    assert (groups.all(axis=2) | ~groups.any(axis=2)).all()  # whole aligned groups only
    assert mask[:, -1].all()
    start = (k - 1) // width * width
    assert mask[:, start:].all()
    kept_rms = formats.group_rms(w * mask, width)[:, :-1]
    assert ((kept_rms >= thr) | (kept_rms == 0)).all()


def test_layer_sparsity_rule_by_hand():
    # RMS per group of 2: row 0: 0.3, 0.1, 0.0, 0.5; row 1: 0.2, 0.4, 0.05, 0.6 (8 groups)
    w = np.array([[0.3, -0.3, 0.1, 0.1, 0.0, 0.0, 0.5, 0.5], [0.2, 0.2, -0.4, 0.4, 0.05, 0.05, 0.6, 0.6]])
    assert simd_group_keep_sparsity(w, 2, 0.0).all()
    # 4 of 8 groups go: the four lowest RMS among all but each row's last (0.0, 0.05, 0.1, 0.2)
    assert simd_group_keep_sparsity(w, 2, 0.5).tolist() == [[True, False, False, True], [False, True, False, True]]
    # 0.9 of 8 rounds to 7, but only 6 groups are not a row's last: those 6 go
    assert simd_group_keep_sparsity(w, 2, 0.9).tolist() == [[False, False, False, True], [False, False, False, True]]
    assert simd_group_keep_sparsity(w, 8, 0.5).all()  # one group per row: nothing can go
    for bad in (-0.1, 1.0):
        with pytest.raises(TrainingError, match=r"fraction of a layer's groups to prune in \[0, 1\), found"):
            simd_group_keep_sparsity(w, 2, bad)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                  elements=st.floats(-0.25, 0.25, width=32)),
       st.sampled_from([1, 2, 4, 8]), st.floats(0.0, 0.5), st.floats(0.0, 0.45))
def test_layer_sparsity_rule_ranks_within_the_layer_and_is_cumulative(w, width, first, more):
    keep = simd_group_keep_sparsity(w, width, first)
    rms = formats.group_rms(formats.flatten_per_filter(w), width)
    assert keep[:, -1].all()
    n_groups, candidates = rms.size, rms[:, :-1].size
    assert (~keep).sum() == min(int(round(first * n_groups)), candidates)
    if (~keep).any() and keep[:, :-1].any():  # every pruned group ranks at or below every kept candidate
        assert rms[~keep].max() <= rms[:, :-1][keep[:, :-1]].min()
    # the next stage starts from the pruned weight: what went stays gone
    mask = expand_groups(keep, w.shape[1], width)
    again = simd_group_keep_sparsity(w * mask, width, first + more)
    assert not (again & ~keep).any()


def test_pruner_prunes_each_layer_to_its_fraction_of_groups():
    torch.manual_seed(0)
    model = build_model("lenet-5")
    pruner = prepare(model, PruneConfig(group=GroupConfig(width=2, criterion=GroupCriterion.LAYER_SPARSITY)))
    pruner.prune_groups(0.7)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = getattr(model, name).weight.detach().numpy()
        ref = simd_group_keep_sparsity(w, 2, 0.7)
        got = formats.padded_groups(getattr(pruner.model, name).weight.detach().numpy().reshape(len(w), -1), 2)
        assert np.array_equal(got.any(axis=2), ref & formats.padded_groups(w.reshape(len(w), -1), 2).any(axis=2))
        assert abs((~ref).mean() - 0.7) < 0.02, name  # each layer, not the model as a whole
    assert model.conv1.weight.detach().count_nonzero() == model.conv1.weight.numel()  # the input is untouched


def test_width_comes_from_hardware_spec():
    assert GroupConfig.for_target("cortex-m4", "int16").width == hardware_spec("cortex-m4").lanes("int16") == 2
    haswell = {"kind": "llvm", "mcpu": "haswell"}
    assert GroupConfig.for_target(haswell).width == hardware_spec(haswell).lanes("float32") == 8
    with pytest.raises(TrainingError, match="positive int"):
        GroupConfig(width=0)


def test_pruner_applies_groups_and_keeps_them_after_steps():
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    pruner = prepare(model, PruneConfig(group=GroupConfig(width=8)))
    pruner.prune_groups(0.03)
    w = pruner.model.fc1.weight.detach().numpy()
    ref = expand_groups(simd_group_keep(model.fc1.weight.detach().numpy(), 8, 0.03), 784, 8)
    assert np.array_equal(w != 0, ref & (model.fc1.weight.detach().numpy() != 0))
    opt = torch.optim.SGD(pruner.param_groups(0.0), lr=0.1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(pruner.model(x), y).backward()
    opt.step()
    pruner.step(opt)
    assert np.array_equal(pruner.model.fc1.weight.detach().numpy() != 0, ref)
    fin, plan = pruner.finalize()
    lp = plan.layer("fc1")
    assert lp.group_width == 8 and lp.method == "group"
    gm = lp.group_mask.to_array()
    assert gm.shape == (300, 98) and np.array_equal(gm, ref.reshape(300, 98, 8).any(axis=2))
    enc = formats.encode(fin.fc1.weight.detach().numpy(), 8, keep=gm)
    assert lp.stored_bytes == enc.sizes().total + 300 * 4  # values + indices + row pointers + bias
    assert lp.nonzero_weights == int(ref.sum())


def test_groups_are_cut_in_the_node_pruned_matrix():
    """After node pruning the compiler drops dead inputs; groups must align in that compacted matrix."""
    torch.manual_seed(0)
    pruner = prepare(build_model("lenet-300-100"), PruneConfig(node=NodeConfig(), group=GroupConfig(width=4)))
    with torch.no_grad():
        pruner.masks["fc1"].beta[[1, 2, 5]] = 0.0  # kill three fc1 nodes → three fc2 inputs gone
    pruner.model(torch.zeros(1, 1, 28, 28))
    with pytest.raises(TrainingError, match="freeze the node masks"):
        pruner.prune_groups(0.05)
    pruner.freeze_nodes()
    pruner.prune_groups(0.05)
    m = pruner.weight_masks["fc2"].numpy()
    assert not m[:, [1, 2, 5]].any()
    live = np.delete(m, [1, 2, 5], axis=1)  # 100 × 297 compacted
    pad = np.concatenate([live, np.repeat(live[:, -1:], 3, axis=1)], axis=1).reshape(100, -1, 4)
    assert (pad.all(axis=2) | ~pad.any(axis=2)).all()
    _, plan = pruner.finalize()
    lp = plan.layer("fc2")
    assert lp.kept_inputs == tuple(i for i in range(300) if i not in (1, 2, 5))
    assert lp.group_mask.shape == (100, 75)  # ceil(297 / 4)
    assert len(plan.layer("fc1").kept_nodes) == 297


def test_magnitude_pruning_exact_and_cumulative():
    w = np.array([[0.5, -0.1, 0.3, 0.0], [-0.2, 0.05, 0.4, -0.6]])
    assert magnitude_keep(w, 0.5).tolist() == [[True, False, True, False], [False, False, True, True]]
    assert magnitude_keep(w, 0.25).sum() == 6
    assert magnitude_keep_std(w, 1.0).tolist() == (np.abs(w) >= w.std()).tolist()
    with pytest.raises(TrainingError, match="fraction"):
        magnitude_keep(w, 1.0)
    torch.manual_seed(0)
    pruner = prepare(build_model("lenet-300-100"), PruneConfig(magnitude=MagnitudeConfig()))
    pruner.prune_magnitude(0.5)
    first = pruner.weight_masks["fc1"].clone()
    assert abs(pruner.weight_density() - 0.5) < 1e-3
    pruner.prune_magnitude(0.8)
    assert not (pruner.weight_masks["fc1"] & ~first).any()  # pruned weights stay pruned
    assert abs(pruner.weight_density() - 0.2) < 1e-3
    _, plan = pruner.finalize()
    lp = plan.layer("fc1")
    assert lp.method == "magnitude" and abs(lp.sparsity - 0.8) < 1e-3
    nnz = lp.nonzero_weights
    assert lp.stored_bytes == nnz * 8 + 301 * 4 + 300 * 4  # CSR value+index per nonzero, row ptrs, bias
    std_pruner = prepare(build_model("lenet-5"), PruneConfig(
        magnitude=MagnitudeConfig(criterion=MagnitudeCriterion.STD)))
    std_pruner.prune_magnitude(0.0)
    assert std_pruner.weight_density() == 1.0


def test_group_and_magnitude_are_exclusive():
    with pytest.raises(TrainingError, match="not both"):
        PruneConfig(group=GroupConfig(width=4), magnitude=MagnitudeConfig())
