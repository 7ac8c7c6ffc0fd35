"""Network-in-Network for CIFAR-10 (Lin et al.; the Caffe model-zoo net the paper prunes on CPU/GPU)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .base import NodePoint, ScalpelModel, chain_points

# (name, out channels, kernel, padding) of each conv/cccp, in order; pooling after cccp2 and cccp4.
_LAYERS = (
    ("conv1", 192, 5, 2), ("cccp1", 160, 1, 0), ("cccp2", 96, 1, 0),
    ("conv2", 192, 5, 2), ("cccp3", 192, 1, 0), ("cccp4", 192, 1, 0),
    ("conv3", 192, 3, 1), ("cccp5", 192, 1, 0), ("cccp6", None, 1, 0),
)


class NIN(ScalpelModel):
    """conv5×5 192, cccp 160, 96, maxpool, dropout; conv5×5 192, cccp 192, 192, avgpool, dropout;
    conv3×3 192, cccp 192, cccp 10, global avgpool. Input 32×32."""

    beta_max = 0.82

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        layers: list[tuple[str, nn.Module]] = []
        cin = in_channels
        for i, (name, cout, k, pad) in enumerate(_LAYERS):
            cout = cout or num_classes
            layers.append((name, nn.Conv2d(cin, cout, k, padding=pad)))
            layers.append((f"relu_{name}", nn.ReLU()))
            cin = cout
            if name == "cccp2":
                layers += [("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("drop1", nn.Dropout(dropout))]
            elif name == "cccp4":
                layers += [("pool2", nn.AvgPool2d(3, 2, ceil_mode=True)), ("drop2", nn.Dropout(dropout))]
        layers += [("pool3", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        super().__init__(OrderedDict(layers))
        self.input_shape = (in_channels, 32, 32)
        self.num_classes = num_classes

    def node_points(self) -> tuple[NodePoint, ...]:
        anchors = {"cccp2": "pool1", "cccp4": "pool2"}
        names = [n for n, *_ in _LAYERS[:-1]]
        return chain_points([(n, anchors.get(n, f"relu_{n}")) for n in names], "cccp6")
