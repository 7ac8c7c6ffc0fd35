"""Reference networks of the Scalpel paper and its seeds, buildable by name.

Every model is a named-layer ``nn.Sequential`` that knows its input shape and where its node masks
go (``node_points()``), so the training side needs no per-model code.
"""

from __future__ import annotations

from typing import Any, Callable

from .alexnet import AlexNet
from .base import LRNWithinChannel, ModelError, NodePoint, ScalpelModel
from .convnet import ConvNet
from .lenet import LeNet5, LeNet300100
from .nin import NIN
from .vgg import VGG16

MODELS: dict[str, Callable[..., ScalpelModel]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "convnet": ConvNet,
    "nin": NIN,
    "alexnet": AlexNet,
    "vgg16": VGG16,
}
_ALIASES = {"lenet300100": "lenet-300-100", "lenet300": "lenet-300-100", "lenet5": "lenet-5",
            "cifar10-full": "convnet", "vgg16-small": "vgg16"}

#: The dataset each model is trained on here (CIFAR-10/ImageNet are not available offline).
DEFAULT_DATASET = {
    "lenet-300-100": "mnist", "lenet-5": "mnist", "convnet": "fashion-mnist",
    "nin": None, "alexnet": None, "vgg16": "fashion-mnist",
}


def canonical_name(name: str) -> str:
    """'LeNet_5' → 'lenet-5'; raises ModelError listing the known names."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), _ALIASES.get(key, key))
    if key not in MODELS:
        raise ModelError(f"unknown model {name!r}: expected one of {sorted(MODELS)}")
    return key


def build_model(name: str, **kwargs: Any) -> ScalpelModel:
    """Build a reference model by name, e.g. ``build_model('convnet', in_channels=1)``."""
    key = canonical_name(name)
    try:
        model = MODELS[key](**kwargs)
    except TypeError as err:
        raise ModelError(f"build_model({name!r}): bad arguments {sorted(kwargs)} ({err})") from None
    model.model_name = key
    return model


__all__ = [
    "AlexNet", "ConvNet", "DEFAULT_DATASET", "LRNWithinChannel", "LeNet300100", "LeNet5", "MODELS",
    "ModelError", "NIN", "NodePoint", "ScalpelModel", "VGG16", "build_model", "canonical_name",
]
