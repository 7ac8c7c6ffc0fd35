"""AlexNet as released in Caffe (``bvlc_alexnet``): two-group conv2/4/5 and cross-channel LRN."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .base import NodePoint, ScalpelModel, chain_points


class AlexNet(ScalpelModel):
    """conv1 96×11×11/4, LRN, pool; conv2 256 g2, LRN, pool; conv3 384; conv4 384 g2; conv5 256 g2,
    pool; fc6 4096, fc7 4096 (dropout 0.5); fc8. Input 227×227.

    Node masks of conv1/conv2 sit after ReLU, before the cross-channel LRN: there a pruned channel
    would still shape its neighbours' normalisation, and zeroing its filter would not match the mask.
    """

    beta_max = 0.81

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 96, 11, stride=4)), ("relu1", nn.ReLU()),
            ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
            ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", nn.ReLU()),
            ("norm2", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
            ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", nn.ReLU()),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", nn.ReLU()),
            ("pool5", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("flatten", nn.Flatten()),
            ("fc6", nn.Linear(256 * 6 * 6, 4096)), ("relu6", nn.ReLU()), ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU()), ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(4096, num_classes)),
        ]))
        self.input_shape = (in_channels, 227, 227)
        self.num_classes = num_classes

    def node_points(self) -> tuple[NodePoint, ...]:
        return chain_points(
            [("conv1", "relu1"), ("conv2", "relu2"), ("conv3", "relu3"), ("conv4", "relu4"),
             ("conv5", "pool5"), ("fc6", "relu6"), ("fc7", "relu7")],
            "fc8", dropout={"fc6": "drop6", "fc7": "drop7"},
        )
