"""The mask-layer rule, number by number: hysteresis, clamping, straight-through gradients, L1 penalty."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_scalpel.training import (MaskRule, NodeConfig, NodeMask, PruneConfig, TrainingError, balance,
                                  hysteresis, prepare)
from tvm_scalpel.models import build_model

T, EPS = 0.8, 1e-4


def test_defaults_are_the_released_constants():
    r = MaskRule()
    assert (r.threshold, r.eps, r.beta_init, r.beta_max) == (0.8, 1e-4, 0.8002, 0.802)
    m = NodeMask(5)
    assert torch.allclose(m.beta, torch.full((5,), 0.8002)) and torch.equal(m.alpha, torch.ones(5))


def test_hysteresis_table():
    beta = torch.tensor([0.8002, 0.80011, 0.8001, 0.80005, 0.8, 0.79999, 0.5])
    # on above T+eps, off below T, unchanged in the dead band [T, T+eps]
    from_on = hysteresis(torch.ones(7), beta, T, EPS)
    from_off = hysteresis(torch.zeros(7), beta, T, EPS)
    assert from_on.tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert from_off.tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_forward_clamps_and_switches_with_memory():
    m = NodeMask(3)
    with torch.no_grad():
        m.beta.copy_(torch.tensor([1.5, -0.3, 0.79]))
    x = torch.ones(2, 3)
    y = m(x)
    assert torch.allclose(m.beta, torch.tensor([0.802, 0.0, 0.79]))
    assert y.tolist() == [[1, 0, 0], [1, 0, 0]]
    with torch.no_grad():  # into the dead band: node 0 stays on, node 2 stays off
        m.beta.copy_(torch.tensor([0.80005, 0.0, 0.80005]))
    assert m(x)[0].tolist() == [1, 0, 0]
    with torch.no_grad():
        m.beta[2] = 0.8002
    assert m(x)[0].tolist() == [1, 0, 1]


def test_straight_through_gradients_conv():
    torch.manual_seed(0)
    m = NodeMask(3)
    with torch.no_grad():
        m.beta[1] = 0.5  # node 1 off
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    y = m(x)
    assert torch.equal(y[:, 1], torch.zeros(2, 4, 4)) and torch.equal(y[:, 0], x[:, 0])
    y.backward(g)
    alpha = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(x.grad, g * alpha)
    # beta's gradient ignores alpha: the off node still learns whether it is needed
    assert torch.allclose(m.beta.grad, (g * x.detach()).sum(dim=(0, 2, 3)))
    assert m.beta.grad[1] != 0


def test_straight_through_gradient_fc_by_hand():
    m = NodeMask(2)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    (m(x) * torch.tensor([[1.0, 10.0], [2.0, 20.0]])).sum().backward()
    assert m.beta.grad.tolist() == [1 * 1 + 3 * 2, 2 * 10 + (-1) * 20]
    assert x.grad.tolist() == [[1.0, 10.0], [2.0, 20.0]]


def test_penalty_uses_optimizer_lr_and_mask_params_get_no_weight_decay():
    pruner = prepare(build_model("lenet-300-100"), PruneConfig(node=NodeConfig()))
    groups = pruner.param_groups(weight_decay=1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(pruner.masks["fc1"].beta), id(pruner.masks["fc2"].beta)}
    opt = torch.optim.SGD(groups, lr=0.5)
    opt.param_groups[1]["lr"] = 0.25
    pruner.set_lambda({"fc1": 2e-3, "fc2": 4e-3})
    pruner.step(opt)  # no gradients yet: only the L1 step moves beta
    assert torch.allclose(pruner.masks["fc1"].beta, torch.full((300,), 0.8002 - 2e-3 * 0.25))
    assert torch.allclose(pruner.masks["fc2"].beta, torch.full((100,), 0.8002 - 4e-3 * 0.25))
    pruner.step(lr=1.0)
    assert torch.allclose(pruner.masks["fc2"].beta, torch.full((100,), 0.8002 - 4e-3 * 1.25))
    with pytest.raises(TrainingError, match="param_groups"):
        pruner.step(torch.optim.SGD(pruner.model.fc3.parameters(), lr=0.1))


def test_penalty_drives_unused_nodes_off_within_expected_steps():
    pruner = prepare(build_model("lenet-300-100"), PruneConfig(node=NodeConfig(min_kept=0)))
    pruner.set_lambda(1e-3)
    # beta = 0.8002 - n * 1e-3 * 0.01: after 19 steps 0.80001 (dead band, still on), after 21 below T
    for _ in range(19):
        pruner.step(lr=0.01)
    pruner.model(torch.zeros(1, 1, 28, 28))
    assert int(pruner.masks["fc1"].alpha.sum()) == 300
    assert float(pruner.masks["fc1"].beta.detach()[0]) == pytest.approx(0.80001, abs=1e-6)
    pruner.step(lr=0.01)
    pruner.step(lr=0.01)
    pruner.model(torch.zeros(1, 1, 28, 28))
    assert int(pruner.masks["fc1"].alpha.sum()) == 0


def test_freeze_stops_rule_and_gradient():
    m = NodeMask(4)
    with torch.no_grad():
        m.beta[0] = 0.1
    m.freeze()
    assert m.alpha.tolist() == [0, 1, 1, 1] and not m.beta.requires_grad
    with torch.no_grad():
        m.beta.fill_(0.0)
    m.penalize(1.0)
    assert m(torch.ones(1, 4)).tolist() == [[0, 1, 1, 1]] and float(m.beta.sum()) == 0.0


def test_balance_groups_and_round_to():
    alpha = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0.0])
    beta = torch.tensor([0.9, 0.3, 0.7, 0.5, 0.9, 0.9, 0.9, 0.1])
    # group 0 keeps 1, group 1 keeps 3 → both keep 3: group 0 adds its best betas (idx 2, then 3)
    assert balance(alpha, beta, groups=2).tolist() == [1, 0, 1, 1, 1, 1, 1, 0]
    # one group, 4 kept → rounded up to 6 by beta order (ties broken by lower index)
    assert balance(alpha, beta, groups=1, round_to=3).tolist() == [1, 0, 1, 1, 1, 1, 1, 0]
    assert balance(torch.zeros(4), torch.tensor([0.1, 0.4, 0.2, 0.4]), min_kept=1).tolist() == [0, 1, 0, 0]
    with pytest.raises(TrainingError, match="equal groups"):
        balance(torch.ones(5), torch.ones(5), groups=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.79, 0.803), min_size=4, max_size=24).filter(lambda v: len(v) % 2 == 0),
       st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]))
def test_balance_properties(betas, groups, round_to):
    beta = torch.tensor(betas)
    alpha = hysteresis(torch.ones_like(beta), beta, T, EPS)
    out = balance(alpha, beta, groups=groups, round_to=round_to)
    per = out.view(groups, -1).sum(1)
    size = beta.numel() // groups
    assert (per == per[0]).all()  # balanced
    assert int(per[0]) % round_to == 0 or int(per[0]) == size  # a multiple unless the group is full
    assert ((out - alpha) >= 0).all()  # never prunes a node the rule kept


def test_rule_validation():
    with pytest.raises(TrainingError, match="T < T \\+ eps <= beta_max"):
        MaskRule(threshold=0.8, eps=0.01, beta_max=0.805)
    with pytest.raises(TrainingError, match="expected input with 3 nodes"):
        NodeMask(3)(torch.ones(2, 4))
