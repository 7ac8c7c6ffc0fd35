"""prepare → step → finalize: the user's model is untouched, folding is exact, the plan round-trips."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from tvm_scalpel.models import NodePoint, build_model
from tvm_scalpel.training import (DropoutRescale, GroupConfig, NodeConfig, PruneConfig, TrainingError,
                                  TrainingPlan, prepare)


def _kill(pruner, layer, idx):
    with torch.no_grad():
        pruner.masks[layer].beta[idx] = 0.0


def test_prepare_leaves_the_callers_model_alone():
    model = build_model("lenet-5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = prepare(model, PruneConfig(node=NodeConfig(), group=GroupConfig(width=4)))
    _kill(pruner, "conv1", [0, 1])
    pruner.model(model.example_input(2))
    pruner.freeze_nodes()
    pruner.prune_groups(0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("mask" in n for n, _ in model.named_modules())
    assert pruner.model.pool1.mask.num_nodes == 20


def test_finalize_folds_masks_exactly_lenet5():
    torch.manual_seed(0)
    model = build_model("lenet-5")
    pruner = prepare(model, PruneConfig(node=NodeConfig()))
    _kill(pruner, "conv1", [3, 7])
    _kill(pruner, "conv2", [0, 10, 49])
    _kill(pruner, "fc1", list(range(0, 500, 5)))
    x = model.example_input(8)
    pruner.model.eval()
    with torch.no_grad():
        masked = pruner.model(x)
    final, plan = pruner.finalize()
    assert isinstance(final, nn.Sequential) and not final.training
    assert not any("mask" in n for n, _ in final.named_modules())
    with torch.no_grad():
        assert torch.equal(final(x), masked)
    # zero rows for dead nodes, zero columns in the consumers (conv2 channel c → fc1 inputs 16c..16c+15)
    assert final.conv1.weight[[3, 7]].abs().sum() == 0 and final.conv1.bias[[3, 7]].abs().sum() == 0
    assert final.conv2.weight[:, [3, 7]].abs().sum() == 0
    assert final.fc1.weight[:, 160:176].abs().sum() == 0 and final.fc1.weight[:, 16:160].abs().sum() > 0
    assert final.fc2.weight[:, ::5].abs().sum() == 0
    assert plan.layer("conv2").kept_nodes == tuple(i for i in range(50) if i not in (0, 10, 49))
    assert plan.layer("conv2").kept_inputs == tuple(i for i in range(20) if i not in (3, 7))
    assert len(plan.layer("fc1").kept_inputs) == 47 * 16
    # fc1 stored dense after shrinking: 400 kept rows × 752 kept inputs + 400 biases
    assert plan.layer("fc1").stored_bytes == (400 * 752 + 400) * 4
    assert plan.layer("fc1").dense_bytes == (500 * 800 + 500) * 4


def test_plan_json_round_trip():
    pruner = prepare(build_model("lenet-300-100"), PruneConfig(node=NodeConfig(), group=GroupConfig(width=8)))
    _kill(pruner, "fc2", [4, 5])
    pruner.model(torch.zeros(1, 1, 28, 28))
    pruner.freeze_nodes()
    pruner.prune_groups(0.04)
    _, plan = pruner.finalize(recipe="test", hardware={"isa": "avx2"})
    text = plan.to_json()
    back = TrainingPlan.from_json(text)
    assert back == plan and back.to_json() == text
    assert np.array_equal(back.layer("fc3").group_mask.to_array(), plan.layer("fc3").group_mask.to_array())
    assert back.layer("fc3").group_mask.shape == (10, 13)  # 98 kept inputs at w = 8
    assert 0 < plan.size_ratio < 1 and plan.summary()["layers"]["fc2"]["kept_nodes"] == "98/100"


class _Grouped(nn.Sequential):
    """A user model (no node_points method) whose grouped consumer needs balanced masks."""

    def __init__(self):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(3, 8, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(8, 8, 3, padding=1, groups=2)), ("relu2", nn.ReLU()),
            ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8, 4)),
        ]))


def test_grouped_conv_masks_are_balanced_and_fold_exactly():
    model = _Grouped()
    with pytest.raises(TrainingError, match="node_points"):
        prepare(model, PruneConfig(node=NodeConfig()))
    points = (NodePoint("conv1", "relu1", consumers=("conv2",)), NodePoint("conv2", "relu2", consumers=("fc",)))
    pruner = prepare(model, PruneConfig(node=NodeConfig(min_kept=0), node_points=points))
    assert pruner.masks["conv1"].groups == 2 and pruner.masks["conv2"].groups == 2
    _kill(pruner, "conv1", [0, 1, 2, 4, 5])  # group 0 would keep 1 channel, group 1 two
    with torch.no_grad():
        pruner.masks["conv1"].beta[1] = 0.3  # ... so the higher-beta of the dead ones comes back
    x = torch.randn(2, 3, 6, 6)
    pruner.model.eval()
    with torch.no_grad():
        masked = pruner.model(x)
    assert pruner.masks["conv1"].alpha.tolist() == [0, 1, 0, 1, 0, 0, 1, 1]
    final, plan = pruner.finalize()
    with torch.no_grad():
        assert torch.allclose(final(x), masked, atol=1e-6)
    # conv2's group 0 reads channels 0-3 (local 0-3), group 1 channels 4-7 (local 0-3)
    assert final.conv2.weight[:4, [0, 2]].abs().sum() == 0 and final.conv2.weight[4:, [0, 1]].abs().sum() == 0
    assert final.conv2.weight[:4, [1, 3]].abs().min() > 0 and final.conv2.weight[4:, [2, 3]].abs().min() > 0
    assert plan.layer("conv2").kept_inputs == (1, 3, 6, 7)


def test_round_to_multiple():
    pruner = prepare(build_model("lenet-5"), PruneConfig(node=NodeConfig(round_to=4)))
    _kill(pruner, "conv2", list(range(13)))
    pruner.model(torch.zeros(1, 1, 28, 28))
    assert int(pruner.masks["conv2"].alpha.sum()) == 40  # 37 kept → 40


def test_batchnorm_folding_and_dropout_rescale_vgg():
    torch.manual_seed(0)
    model = build_model("vgg16", width=0.125, fc_width=16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.bias, -1, 1)
    pruner = prepare(model, PruneConfig(node=NodeConfig(dropout_rescale=DropoutRescale.LINEAR)))
    _kill(pruner, "conv1_1", [0, 5])
    _kill(pruner, "conv3_2", [1])
    _kill(pruner, "fc1", list(range(8)))
    x = model.example_input(2)
    pruner.model.eval()
    with torch.no_grad():
        masked = pruner.model(x)
    pruner.freeze_nodes()
    assert pruner.model.drop1.p == pytest.approx(0.25) and pruner.model.drop2.p == pytest.approx(0.5)
    final, _ = pruner.finalize()
    assert final.bn1_1.weight[[0, 5]].abs().sum() == 0 and final.bn1_1.bias[[0, 5]].abs().sum() == 0
    with torch.no_grad():
        assert torch.allclose(final(x), masked, atol=1e-5)


def test_state_dict_round_trip_restores_frozen_masks():
    model = build_model("lenet-300-100")
    a = prepare(model, PruneConfig(node=NodeConfig(), group=GroupConfig(width=4)))
    _kill(a, "fc1", [0, 9])
    a.model(torch.zeros(1, 1, 28, 28))
    a.freeze_nodes()
    a.prune_groups(0.05)
    b = prepare(model, PruneConfig(node=NodeConfig(), group=GroupConfig(width=4)))
    b.load_state_dict(a.state_dict())
    assert b.kept_summary() == a.kept_summary() and b.nodes_frozen
    assert not b.masks["fc1"].beta.requires_grad
    assert all(torch.equal(b.weight_masks[k], a.weight_masks[k]) for k in a.weight_masks)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))


def test_user_errors_are_explained():
    with pytest.raises(TrainingError, match="not Conv2d/Linear layers"):
        prepare(build_model("lenet-5"), PruneConfig(group=GroupConfig(width=4, layers=("pool1",))))
    with pytest.raises(TrainingError, match="no node point"):
        prepare(build_model("lenet-5"), PruneConfig(node=NodeConfig(layers=("fc2",))))
    p = prepare(build_model("lenet-5"), PruneConfig(node=NodeConfig()))
    with pytest.raises(TrainingError, match="without GroupConfig"):
        p.prune_groups(0.1)
    with pytest.raises(TrainingError, match="no such node layers"):
        p.set_lambda({"fc2": 1e-3})
    p.set_lambda(1e-3)
    with pytest.raises(TrainingError, match="pass the optimizer"):
        p.step()


def test_groups_in_grouped_conv_follow_each_row_groups_kept_inputs():
    torch.manual_seed(0)
    points = (NodePoint("conv1", "relu1", consumers=("conv2",)), NodePoint("conv2", "relu2", consumers=("fc",)))
    pruner = prepare(_Grouped(), PruneConfig(node=NodeConfig(min_kept=0), group=GroupConfig(width=4),
                                             node_points=points))
    _kill(pruner, "conv1", [0, 2, 4, 5])  # conv2 group 0 keeps local inputs 1, 3; group 1 keeps 2, 3
    pruner.model(torch.zeros(1, 3, 6, 6))
    pruner.freeze_nodes()
    pruner.prune_groups(0.0)  # threshold 0: every group kept, so the mask is exactly the live inputs
    m = pruner.weight_masks["conv2"].reshape(8, 4, 9)
    assert m[:4, [1, 3]].all() and not m[:4, [0, 2]].any()
    assert m[4:, [2, 3]].all() and not m[4:, [0, 1]].any()
    _, plan = pruner.finalize()
    assert plan.layer("conv2").group_mask.shape == (8, 5)  # 2 kept channels × 9 taps = 18 → 5 groups of 4
