"""ConvNet: Caffe's ``cifar10_full`` (the paper's third MCU/CPU/GPU benchmark)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .base import LRNWithinChannel, NodePoint, ScalpelModel, chain_points


class ConvNet(ScalpelModel):
    """conv5×5 32 → maxpool3/2 → ReLU → LRN; conv5×5 32 → ReLU → avgpool3/2 → LRN;
    conv5×5 64 → ReLU → avgpool3/2; FC 1024 → 10, on 32×32 inputs.

    Pooling uses Caffe's ceil mode (32 → 16 → 8 → 4) and LRN is Caffe's WITHIN_CHANNEL kind.
    Here it runs on Fashion-MNIST padded to 32×32 (CIFAR-10 is not available offline).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 5, padding=2)),
            ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("relu1", nn.ReLU()),
            ("norm1", LRNWithinChannel(3, 5e-5, 0.75)),
            ("conv2", nn.Conv2d(32, 32, 5, padding=2)), ("relu2", nn.ReLU()),
            ("pool2", nn.AvgPool2d(3, 2, ceil_mode=True)),
            ("norm2", LRNWithinChannel(3, 5e-5, 0.75)),
            ("conv3", nn.Conv2d(32, 64, 5, padding=2)), ("relu3", nn.ReLU()),
            ("pool3", nn.AvgPool2d(3, 2, ceil_mode=True)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 4 * 4, num_classes)),
        ]))
        self.input_shape = (in_channels, 32, 32)
        self.num_classes = num_classes

    def node_points(self) -> tuple[NodePoint, ...]:
        return chain_points([("conv1", "norm1"), ("conv2", "norm2"), ("conv3", "pool3")], "fc1")
