"""Shared pieces of the reference models: where node masks go, and the Caffe layers torch lacks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ScalpelError


class ModelError(ScalpelError, ValueError):
    """A model name or model argument that tvm_scalpel cannot build."""


@dataclass(frozen=True)
class NodePoint:
    """Where one prunable layer's node mask sits, and what must be zeroed when the mask is folded.

    ``layer`` is the Conv2d/Linear whose output nodes (neurons or channels) are masked. ``anchor`` is
    the module whose output the mask multiplies: after the activation, and after pooling for conv
    (before a cross-channel LRN, so that zeroing the filter reproduces the mask exactly).
    ``affine`` lists per-channel layers between the two (BatchNorm) that are zeroed on folding,
    ``consumers`` the next layers whose input columns are zeroed, ``dropout`` a Dropout on these nodes
    whose ``p`` is rescaled by the fraction of surviving nodes.
    """

    layer: str
    anchor: str
    consumers: tuple[str, ...] = ()
    affine: tuple[str, ...] = ()
    dropout: str | None = None


class LRNWithinChannel(nn.Module):
    """Caffe's LRN with ``norm_region: WITHIN_CHANNEL`` (cifar10_full), which torch does not have.

    y = x / (1 + alpha · mean_{k×k}(x²))^beta with zero padding counted in the mean, as Caffe builds it
    from an AVE pooling layer. Per channel, so a zero channel stays zero (node masks fold exactly).
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        if size % 2 != 1:
            raise ModelError(f"LRNWithinChannel: expected an odd local size, found {size}")
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x * (1.0 + self.alpha * sq).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class ScalpelModel(nn.Sequential):
    """A named-layer Sequential that knows its input shape and where its node masks go."""

    input_shape: tuple[int, int, int]
    num_classes: int
    #: The registry name (set by build_model), used to label plans and results.
    model_name: str = ""
    #: Caffe's beta clamp for this net's mask layers (0.802 by default; 0.82 NIN, 0.81 AlexNet).
    beta_max: float = 0.802

    def node_points(self) -> tuple[NodePoint, ...]:
        raise NotImplementedError

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A deterministic input of the right shape, for export and tests."""
        g = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.input_shape), generator=g)


def caffe_xavier_(model: nn.Module) -> nn.Module:
    """Caffe's ``xavier`` filler (uniform ±sqrt(3/fan_in), zero bias), as in Caffe's LeNets.

    The paper's absolute group thresholds were tuned at this weight scale; torch's default is √3 smaller.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound = math.sqrt(3.0 / m.weight[0].numel())
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def chain_points(names: list[tuple[str, str]], last_consumer: str,
                 affine: dict[str, str] | None = None,
                 dropout: dict[str, str] | None = None) -> tuple[NodePoint, ...]:
    """Node points of a plain chain: each (layer, anchor) feeds the next layer; the last feeds ``last_consumer``."""
    affine = affine or {}
    dropout = dropout or {}
    points = []
    for i, (layer, anchor) in enumerate(names):
        consumer = names[i + 1][0] if i + 1 < len(names) else last_consumer
        points.append(NodePoint(
            layer=layer, anchor=anchor, consumers=(consumer,),
            affine=(affine[layer],) if layer in affine else (), dropout=dropout.get(layer),
        ))
    return tuple(points)
