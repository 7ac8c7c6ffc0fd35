"""The frozen, JSON-serialisable result of training-side pruning, handed to the compiler with the weights.

Coordinates: ``kept_nodes`` index the layer's output nodes; ``kept_inputs`` its input features
(Linear) or input channels (Conv2d); ``group_mask`` covers the *compacted* weight (kept rows ×
kept inputs, conv flattened per filter), which is the matrix the compiler encodes after removing
pruned nodes, so groups stay aligned after shrinking; so does ``tile_mask`` (row blocks × k blocks of
``tile`` = (rows, k), GPU tile pruning).

Version 2 added the tile fields; version 1 plans (no tiles) still load.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import TrainingError

PLAN_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class PackedMask:
    """A boolean matrix as shape + base64 of ``np.packbits`` (AlexNet's fc6 has 4.7 M groups)."""

    shape: tuple[int, int]
    bits: str

    @classmethod
    def from_array(cls, mask: np.ndarray) -> "PackedMask":
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise TrainingError(f"PackedMask: expected a 2-D mask, found shape {mask.shape}")
        return cls(tuple(int(s) for s in mask.shape), base64.b64encode(np.packbits(mask)).decode())

    def to_array(self) -> np.ndarray:
        n = self.shape[0] * self.shape[1]
        flat = np.unpackbits(np.frombuffer(base64.b64decode(self.bits), np.uint8), count=n)
        return flat.astype(bool).reshape(self.shape)


@dataclass(frozen=True)
class LayerPlan:
    """What training decided for one Conv2d/Linear layer, and what it costs to store."""

    name: str
    kind: str  # "linear" | "conv2d"
    weight_shape: tuple[int, ...]
    conv_groups: int
    num_nodes: int
    kept_nodes: tuple[int, ...]
    kept_inputs: tuple[int, ...] | None  # None: every input is kept
    group_width: int | None = None
    group_mask: PackedMask | None = None
    unstructured: bool = False
    tile: tuple[int, int] | None = None  # (rows, k) of GPU tile pruning
    tile_mask: PackedMask | None = None  # kept tiles of the compacted weight, (row blocks, k blocks)
    nonzero_weights: int = 0
    total_weights: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0
    index_bytes: int = 0

    @property
    def node_pruned(self) -> bool:
        return len(self.kept_nodes) < self.num_nodes

    @property
    def sparsity(self) -> float:
        """Fraction of the full weight that is zero."""
        return 1.0 - self.nonzero_weights / self.total_weights if self.total_weights else 0.0

    @property
    def method(self) -> str:
        """'group', 'tile', 'magnitude', 'node' or 'dense' (the first three may also be node-pruned)."""
        if self.group_width is not None:
            return "group"
        if self.tile is not None:
            return "tile"
        if self.unstructured:
            return "magnitude"
        return "node" if self.node_pruned or self.kept_inputs is not None else "dense"


@dataclass(frozen=True)
class TrainingPlan:
    """Per-layer decisions plus totals; ``to_json``/``from_json`` round-trip exactly."""

    model: str
    layers: tuple[LayerPlan, ...]
    recipe: str | None = None
    hardware: dict[str, Any] | None = field(default=None, compare=False)
    value_bytes: int = 4
    index_bytes: int = 4
    version: int = PLAN_VERSION

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise TrainingError(f"plan has no layer {name!r}; it has {[lp.name for lp in self.layers]}")

    @property
    def dense_bytes(self) -> int:
        return sum(lp.dense_bytes for lp in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(lp.stored_bytes for lp in self.layers)

    @property
    def size_ratio(self) -> float:
        """Stored size (values + indices + row pointers + kept biases) over dense size."""
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def weight_density(self) -> float:
        total = sum(lp.total_weights for lp in self.layers)
        return sum(lp.nonzero_weights for lp in self.layers) / total if total else 1.0

    @property
    def tile_sparsity(self) -> float | None:
        """Pruned tiles / all tiles of the tile-pruned layers (None: no tile pruning)."""
        masks = [lp.tile_mask.to_array() for lp in self.layers if lp.tile_mask is not None]
        total = sum(m.size for m in masks)
        return 1.0 - sum(int(m.sum()) for m in masks) / total if total else None

    def summary(self) -> dict[str, Any]:
        """Small human-oriented digest: kept nodes, sparsity per layer, size ratio."""
        return {
            "model": self.model, "recipe": self.recipe,
            "size_ratio": round(self.size_ratio, 5), "weight_density": round(self.weight_density, 5),
            "layers": {lp.name: {"method": lp.method, "kept_nodes": f"{len(lp.kept_nodes)}/{lp.num_nodes}",
                                 "sparsity": round(lp.sparsity, 4)} for lp in self.layers},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingPlan":
        if d.get("version") not in _READABLE_VERSIONS:
            raise TrainingError(f"plan version {d.get('version')!r}: expected one of {_READABLE_VERSIONS}; "
                                "a newer plan needs a newer tvm_scalpel")
        layers = []
        for ld in d["layers"]:
            ld = dict(ld)
            for key in ("group_mask", "tile_mask"):
                m = ld.get(key)
                ld[key] = PackedMask(tuple(m["shape"]), m["bits"]) if m else None
            if ld.get("tile") is not None:
                ld["tile"] = tuple(ld["tile"])
            ld["weight_shape"] = tuple(ld["weight_shape"])
            ld["kept_nodes"] = tuple(ld["kept_nodes"])
            if ld.get("kept_inputs") is not None:
                ld["kept_inputs"] = tuple(ld["kept_inputs"])
            layers.append(LayerPlan(**ld))
        rest = {k: v for k, v in d.items() if k not in ("layers", "version")}
        return cls(layers=tuple(layers), **rest)

    @classmethod
    def from_json(cls, text: str) -> "TrainingPlan":
        return cls.from_dict(json.loads(text))
