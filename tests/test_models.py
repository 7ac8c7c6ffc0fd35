"""Reference models: exact Caffe parameter counts, shapes through ceil-mode pooling, node points, errors."""

import pytest
import torch
from torch import nn

from tvm_scalpel.models import (MODELS, LRNWithinChannel, ModelError, build_model, canonical_name)

# Parameter counts of the Caffe prototxts (AlexNet: bvlc_alexnet with groups; ConvNet: cifar10_full).
PARAMS = {"lenet-300-100": 266_610, "lenet-5": 431_080, "convnet": 89_578, "nin": 966_986,
          "alexnet": 60_965_224}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_caffe_parameter_counts(name):
    m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]
    assert m.model_name == name


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5", "convnet", "nin"])
def test_forward_shape_and_node_points(name):
    m = build_model(name).eval()
    modules = dict(m.named_modules())
    seen = {}
    hooks = [modules[p.anchor].register_forward_hook(
        lambda mod, i, o, key=p.layer: seen.__setitem__(key, o.shape[1])) for p in m.node_points()]
    with torch.no_grad():
        y = m(m.example_input(2))
    for h in hooks:
        h.remove()
    assert y.shape == (2, m.num_classes)
    for p in m.node_points():
        layer = modules[p.layer]
        nodes = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        assert seen[p.layer] == nodes, f"{p.anchor} output does not carry {p.layer}'s nodes"
        for c in p.consumers:
            assert isinstance(modules[c], (nn.Linear, nn.Conv2d))


def test_convnet_caffe_ceil_pooling_shapes():
    m = build_model("convnet").eval()
    shapes = {}
    for n in ("pool1", "pool2", "pool3"):
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
    with torch.no_grad():
        m(torch.zeros(1, 3, 32, 32))
    assert shapes == {"pool1": (1, 32, 16, 16), "pool2": (1, 32, 8, 8), "pool3": (1, 64, 4, 4)}
    assert m.fc1.in_features == 1024


def test_alexnet_groups_and_lrn_before_mask():
    m = build_model("alexnet")
    assert [m.get_submodule(f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    anchors = {p.layer: p.anchor for p in m.node_points()}
    assert anchors["conv1"] == "relu1" and anchors["conv5"] == "pool5"
    assert {p.layer: p.dropout for p in m.node_points()}["fc6"] == "drop6"
    assert m.beta_max == 0.81 and build_model("nin").beta_max == 0.82
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 227, 227)).shape == (1, 1000)


def test_vgg16_small_images_bn_affine():
    m = build_model("vgg16", width=0.125).eval()
    with torch.no_grad():
        assert m(m.example_input(2)).shape == (2, 10)
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 13
    pts = {p.layer: p for p in m.node_points()}
    assert pts["conv1_1"].affine == ("bn1_1",) and pts["conv5_3"].consumers == ("fc1",)
    with pytest.raises(ModelError, match="multiple of 32"):
        build_model("vgg16", image_size=40)


def test_lrn_within_channel_matches_caffe_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5) * 30
    y = LRNWithinChannel(3, 5e-5, 0.75)(x)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    i, j = 2, 0  # an interior row and a border column: padding counts in the 9-cell mean
    window = xp[0, 1, i:i + 3, j:j + 3]
    expect = x[0, 1, i, j] / (1 + 5e-5 * (window ** 2).sum() / 9) ** 0.75
    assert torch.allclose(y[0, 1, i, j], expect, rtol=1e-6)
    assert torch.equal(LRNWithinChannel()(torch.zeros(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))


def test_names_aliases_and_errors():
    assert canonical_name("LeNet_5") == "lenet-5"
    assert canonical_name("lenet300100") == "lenet-300-100"
    assert set(MODELS) == {"lenet-300-100", "lenet-5", "convnet", "nin", "alexnet", "vgg16"}
    with pytest.raises(ModelError, match="unknown model 'resnet50'.*expected one of"):
        build_model("resnet50")
    with pytest.raises(ModelError, match="bad arguments"):
        build_model("lenet-5", no_such_arg=1)
    assert build_model("convnet", in_channels=1).conv1.in_channels == 1


def test_lenets_use_caffe_xavier_scale():
    torch.manual_seed(0)
    m = build_model("lenet-5")
    bound = (3 / 800) ** 0.5  # fc1 fan-in 800
    w = m.fc1.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert abs(float(w.pow(2).mean().sqrt()) - bound / 3 ** 0.5) < 1e-3  # RMS of U(-b, b) is b/√3
    assert float(m.fc1.bias.detach().abs().sum()) == 0.0
