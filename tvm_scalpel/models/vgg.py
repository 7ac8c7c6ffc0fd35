"""VGG16 for small (32×32) images: the net of the GPU fine-grain and partition-pruning seeds."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .base import ModelError, NodePoint, ScalpelModel, chain_points

# Output channels of the 13 convs per stage; a 2×2 max pool closes each stage.
_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(ScalpelModel):
    """13 conv3×3 (+BatchNorm) + ReLU in 5 stages with max pooling, then FC 512-512-classes with dropout.

    ``width`` scales every channel count (e.g. 0.25 for a quick "TinyVGG16").
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 batch_norm: bool = True, width: float = 1.0, fc_width: int = 512,
                 dropout: float = 0.5) -> None:
        if image_size % 32 or image_size < 32:
            raise ModelError(f"VGG16: expected an image size that is a multiple of 32 (five 2×2 pools), "
                             f"found {image_size}")
        layers: list[tuple[str, nn.Module]] = []
        cin = in_channels
        chain: list[tuple[str, str]] = []
        affine: dict[str, str] = {}
        for s, stage in enumerate(_STAGES, start=1):
            for i, c in enumerate(stage, start=1):
                cout = max(1, int(round(c * width)))
                name = f"conv{s}_{i}"
                layers.append((name, nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)))
                if batch_norm:
                    layers.append((f"bn{s}_{i}", nn.BatchNorm2d(cout)))
                    affine[name] = f"bn{s}_{i}"
                layers.append((f"relu{s}_{i}", nn.ReLU()))
                cin = cout
                last = i == len(stage)
                if last:
                    layers.append((f"pool{s}", nn.MaxPool2d(2, 2)))
                chain.append((name, f"pool{s}" if last else f"relu{s}_{i}"))
        spatial = image_size // 32
        layers += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(cin * spatial * spatial, fc_width)), ("relu_fc1", nn.ReLU()),
            ("drop1", nn.Dropout(dropout)),
            ("fc2", nn.Linear(fc_width, fc_width)), ("relu_fc2", nn.ReLU()), ("drop2", nn.Dropout(dropout)),
            ("fc3", nn.Linear(fc_width, num_classes)),
        ]
        super().__init__(OrderedDict(layers))
        self._chain = tuple(chain) + (("fc1", "relu_fc1"), ("fc2", "relu_fc2"))
        self._affine = affine
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes

    def node_points(self) -> tuple[NodePoint, ...]:
        return chain_points(list(self._chain), "fc3", affine=self._affine,
                            dropout={"fc1": "drop1", "fc2": "drop2"})
