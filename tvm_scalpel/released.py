"""Structure-only models: the paper's released pruned structure on randomly initialised weights.

NIN (CIFAR-10) and AlexNet (ImageNet) cannot be trained here (no such data offline), but latency and
size depend on the structure, not on the values. So ``scalpel run nin|alexnet`` times models built
from what the paper released, and claims no accuracy:

- **AlexNet**: fc6 and fc7 keep 3001 and 3029 of 4096 neurons (released); SIMD-aware groups (w from
  ``hardware_spec``) on fc6/fc7/fc8 (the CPU recipe's layers), the same fraction of groups pruned in
  each, chosen so the size including indices is the paper's CPU size, 13.06 % of dense. Convs dense.
- **NIN**: no node counts were released, only its size, 81.16 % of dense (node pruning only: NIN has
  no FC layer). Every prunable layer keeps the same fraction of its channels, chosen to give that size.

Which nodes and groups go follows the training rules on the random values (smallest filter norm for
nodes, lowest RMS for groups, the last group of each row kept). Traditional pruning for comparison:
magnitude pruning of the dense random weights to the same number of nonzero weights per layer as the
Scalpel model (an equal parameter budget, since no accuracy can say what it would have reached).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import formats
from .errors import ScalpelError
from .models import build_model, canonical_name

# Nodes kept by the released Scalpel code (scalpel-algorithms.md §2), by layer name of our models (NIN:
# none released), and the paper's CPU sizes (§5), % of dense incl. indices.
RELEASED_NODES = {
    "lenet-5": {"conv1": 9, "conv2": 18, "fc1": 65},
    "convnet": {"conv1": 28, "conv2": 22, "conv3": 40},
    "alexnet": {"fc6": 3001, "fc7": 3029},
}
PAPER_CPU_SIZE = {"alexnet": 13.06, "nin": 81.16}
GROUP_LAYERS = {"alexnet": ("fc6", "fc7", "fc8"), "nin": ()}


class StructureError(ScalpelError, ValueError):
    """A model without a released structure, or a structure that cannot reach the paper's size."""


@dataclass(frozen=True)
class ReleasedStructure:
    """What ``apply_structure`` builds: kept nodes per layer, group-pruned layers and their fraction."""

    model: str
    kept_nodes: dict[str, int]
    group_width: int
    group_layers: tuple[str, ...] = ()
    group_sparsity: float = 0.0  # fraction of prunable groups (all but each row's last) removed
    size_percent: float = 100.0  # as constructed: values + indices + row pointers over dense
    notes: tuple[str, ...] = field(default=())


def has_released_structure(model: str) -> bool:
    return canonical_name(model) in PAPER_CPU_SIZE


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _producers(model) -> dict[str, str]:
    """consumer layer → the node-pruned layer feeding it."""
    return {c: p.layer for p in model.node_points() for c in p.consumers}


def _live_inputs(model, name: str, live_rows: dict[str, np.ndarray]) -> np.ndarray:
    """Which columns of ``name``'s per-filter-flattened weight survive its producer's node pruning."""
    layer = _layers(model)[name]
    k = int(np.prod(layer.weight.shape[1:]))
    producer = _producers(model).get(name)
    if producer is None or producer not in live_rows or getattr(layer, "groups", 1) != 1:
        return np.ones(k, bool)  # (a grouped conv's inputs are never folded: SplitGroupedConv reads them all)
    live = live_rows[producer]
    return np.repeat(live, k // len(live))  # conv: kh·kw per channel; FC after flatten: H·W per channel


def _group_bytes(rows: int, cols: int, w: int, sparsity: float) -> int:
    groups_per_row = -(-cols // w)
    kept = rows * groups_per_row - int(sparsity * rows * (groups_per_row - 1))
    return kept * (w + 1) * 4 + (rows + 1) * 4


def _kept_counts(model, fraction: float, released: dict[str, int]) -> dict[str, int]:
    if released:
        return dict(released)
    return {p.layer: max(1, round(fraction * _layers(model)[p.layer].weight.shape[0])) for p in model.node_points()}


def _size_percent(model, kept: dict[str, int], w: int, group_layers, sparsity: float) -> float:
    layers = _layers(model)
    live = {n: np.arange(layers[n].weight.shape[0]) < c for n, c in kept.items()}  # counts only matter here
    dense = total = 0
    for name, layer in layers.items():
        k = int(np.prod(layer.weight.shape[1:]))
        rows = int(live[name].sum()) if name in live else layer.weight.shape[0]
        cols = int(_live_inputs(model, name, live).sum())
        dense += layer.weight.shape[0] * k * 4
        total += _group_bytes(rows, cols, w, sparsity) if name in group_layers else rows * cols * 4
    return 100.0 * total / dense


def _bisect(f, lo: float, hi: float, target: float, increasing: bool) -> float:
    for _ in range(50):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def released_structure(model_name: str, w: int) -> ReleasedStructure:
    """The released structure of ``model_name`` at group width ``w``, sized to the paper's CPU size."""
    name = canonical_name(model_name)
    if name not in PAPER_CPU_SIZE:
        raise StructureError(f"{model_name}: no released structure; expected one of {sorted(PAPER_CPU_SIZE)} "
                             "(the other reference models are trained with their recipes)")
    model, target = build_model(name), PAPER_CPU_SIZE[name]
    released, group_layers = RELEASED_NODES.get(name, {}), GROUP_LAYERS[name]
    if group_layers:
        kept = _kept_counts(model, 1.0, released)
        sparsity = _bisect(lambda s: _size_percent(model, kept, w, group_layers, s), 0.0, 1.0, target, False)
        notes = (f"released kept neurons {released}; groups of {w} on {', '.join(group_layers)} with "
                 f"{sparsity:.1%} of each layer's prunable groups removed, chosen to give the paper's size",)
    else:
        fraction = _bisect(lambda f: _size_percent(model, _kept_counts(model, f, {}), w, (), 0.0),
                           0.0, 1.0, target, True)
        kept, sparsity = _kept_counts(model, fraction, {}), 0.0
        notes = (f"no node counts were released: every prunable layer keeps {fraction:.1%} of its nodes, "
                 "chosen to give the paper's size (node pruning only)",)
    size = _size_percent(model, kept, w, group_layers, sparsity)
    if abs(size - target) > 1.0:
        raise StructureError(f"{name}: the structure reaches {size:.2f} % of dense, expected the paper's {target} %")
    return ReleasedStructure(name, kept, w, group_layers, sparsity, size, notes)


def apply_structure(model: nn.Module, structure: ReleasedStructure) -> nn.Module:
    """A copy of ``model`` with the structure's pruned nodes (weight rows and biases) and groups zeroed."""
    model = copy.deepcopy(model)
    layers = _layers(model)
    live: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, count in structure.kept_nodes.items():
            weight = layers[name].weight
            norms = weight.detach().flatten(1).norm(dim=1).numpy()
            live[name] = np.zeros(len(norms), bool)
            live[name][np.argsort(-norms, kind="stable")[:count]] = True
            dead = torch.from_numpy(~live[name])
            weight[dead] = 0.0
            if layers[name].bias is not None:
                layers[name].bias[dead] = 0.0
        for name in structure.group_layers:
            _prune_groups(model, name, live, structure)
    return model


def _prune_groups(model, name: str, live: dict[str, np.ndarray], structure: ReleasedStructure) -> None:
    """Zero the lowest-RMS groups of the layer as the compiler sees it (dead rows and columns removed)."""
    layer = _layers(model)[name]
    w2 = layer.weight.detach().numpy().reshape(layer.weight.shape[0], -1)  # a view: writes reach the layer
    rows = np.flatnonzero(live.get(name, np.ones(w2.shape[0], bool)))
    cols = np.flatnonzero(_live_inputs(model, name, live))
    folded = w2[np.ix_(rows, cols)]
    rms = formats.group_rms(folded, structure.group_width)[:, :-1]  # the last group of a row is kept
    n_prune = int(structure.group_sparsity * rms.size)
    pruned = np.zeros(rms.size, bool)
    pruned[np.argsort(rms, axis=None, kind="stable")[:n_prune]] = True
    keep = np.ones((folded.shape[0], rms.shape[1] + 1), bool)
    keep[:, :-1] = ~pruned.reshape(rms.shape)
    mask = np.repeat(keep, structure.group_width, axis=1)[:, :folded.shape[1]]
    w2[np.ix_(rows, cols)] = folded * mask


def magnitude_like(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """Traditional pruning of ``dense`` with, per layer, as many nonzero weights as ``pruned`` keeps
    once dead nodes are folded (its zero rows and their consumers' columns do not count)."""
    out = copy.deepcopy(dense)
    pruned_layers, live = _layers(pruned), {}
    for point in pruned.node_points():
        rows = pruned_layers[point.layer].weight.detach().flatten(1).abs().sum(1).numpy() > 0
        if not rows.all():
            live[point.layer] = rows
    with torch.no_grad():
        for name, layer in _layers(out).items():
            w2 = pruned_layers[name].weight.detach().numpy().reshape(layer.weight.shape[0], -1)
            cols = _live_inputs(pruned, name, live)
            nnz = int(np.count_nonzero(w2[:, cols]))
            flat = layer.weight.view(-1)
            if nnz < flat.numel():
                drop = torch.argsort(flat.abs(), stable=True)[:flat.numel() - nnz]
                flat[drop] = 0.0
    return out
