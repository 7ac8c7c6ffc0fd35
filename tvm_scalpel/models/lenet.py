"""LeNet-300-100 and LeNet-5 as in Caffe's MNIST examples (the paper's MCU/CPU benchmarks)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .base import NodePoint, ScalpelModel, caffe_xavier_, chain_points


class LeNet300100(ScalpelModel):
    """784-300-100-10 fully connected net (Caffe ``lenet_300_100``), Caffe xavier init."""

    def __init__(self, num_classes: int = 10, in_features: int = 28 * 28) -> None:
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, 300)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(100, num_classes)),
        ]))
        self.input_shape = (1, 28, 28)
        self.num_classes = num_classes
        caffe_xavier_(self)

    def node_points(self) -> tuple[NodePoint, ...]:
        return chain_points([("fc1", "relu1"), ("fc2", "relu2")], "fc3")


class LeNet5(ScalpelModel):
    """Caffe LeNet: conv5×5 20, maxpool, conv5×5 50, maxpool, FC 500, ReLU, FC 10.

    As in Caffe there is no activation after the convolutions (their masks sit after pooling), and
    weights start from Caffe's xavier filler.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 20, 5)), ("pool1", nn.MaxPool2d(2, 2)),
            ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2, 2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(50 * 4 * 4, 500)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(500, num_classes)),
        ]))
        self.input_shape = (in_channels, 28, 28)
        self.num_classes = num_classes
        caffe_xavier_(self)

    def node_points(self) -> tuple[NodePoint, ...]:
        return chain_points([("conv1", "pool1"), ("conv2", "pool2"), ("fc1", "relu1")], "fc2")
