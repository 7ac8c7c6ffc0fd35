"""The torch.ao-style lifecycle: ``prepare`` a copy of the model → ``step`` in your own loop → ``finalize``.

``prepare`` never touches the caller's model or optimizer: it deep-copies the model, wraps each node
point's anchor with a :class:`NodeMask`, and keeps weight masks on the side, on the model's device
(move the model with ``.to(device)`` *before* ``prepare``). After every
``optimizer.step()`` the loop calls ``pruner.step(optimizer)``, which applies the L1 penalty to the
mask betas (with the optimizer's current lr) and re-applies the weight masks. ``finalize`` folds
everything into a plain ``nn.Module`` (zeros in the weights) plus a :class:`TrainingPlan`.
"""

from __future__ import annotations

import copy
import enum
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .. import formats
from ..errors import TargetError
from ..models.base import NodePoint
from ..target import TargetLike, hardware_spec
from . import rules
from .errors import TrainingError
from .mask import MaskRule, NodeMask
from .plan import LayerPlan, PackedMask, TrainingPlan

logger = logging.getLogger(__name__)

MASK_GROUP_TAG = "scalpel_node_masks"


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"


class DropoutRescale(str, enum.Enum):
    """How a Dropout on node-pruned FC outputs is rescaled when masks freeze."""

    NONE = "none"
    LINEAR = "linear"  # p · kept/total (the released code's "fraction of surviving nodes")
    SQRT = "sqrt"  # p · sqrt(kept/total) (Han et al.'s connection-count rule)


class MagnitudeCriterion(str, enum.Enum):
    SPARSITY = "sparsity"  # stage value = fraction of each layer's weights pruned
    STD = "std"  # stage value = quality q, prune |w| < q · std(w)


class GroupCriterion(str, enum.Enum):
    THRESHOLD = "threshold"  # stage value = RMS threshold, the same for every layer (the paper's rule)
    LAYER_SPARSITY = "layer-sparsity"  # stage value = fraction of each layer's groups pruned, lowest RMS first


@dataclass(frozen=True)
class NodeConfig:
    """Node pruning. ``rule=None`` uses the model's own ``beta_max`` (0.802, NIN 0.82, AlexNet 0.81).

    ``round_to`` rounds each group's kept count up to a hardware multiple; ``min_kept`` stops a layer
    from dying entirely (the released code has no such floor; 0 disables it).
    """

    rule: MaskRule | None = None
    layers: tuple[str, ...] | None = None
    round_to: int = 1
    min_kept: int = 1
    dropout_rescale: DropoutRescale = DropoutRescale.LINEAR


@dataclass(frozen=True)
class GroupConfig:
    """SIMD-aware weight pruning at group width ``width`` (= SIMD lanes; see :meth:`for_target`).
    ``criterion``: what a stage's value means (the paper's global RMS threshold by default)."""

    width: int
    layers: tuple[str, ...] | None = None
    kinds: tuple[LayerKind, ...] = (LayerKind.LINEAR, LayerKind.CONV2D)
    criterion: GroupCriterion = GroupCriterion.THRESHOLD

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or self.width < 1:
            raise TrainingError(f"group width: expected a positive int (SIMD lanes), found {self.width!r}")

    @classmethod
    def for_target(cls, target: TargetLike, dtype: str = "float32", **kw: Any) -> "GroupConfig":
        """Width from the target's SIMD lanes for ``dtype`` (the one source of that fact)."""
        return cls(width=hardware_spec(target).lanes(dtype), **kw)


@dataclass(frozen=True)
class TileConfig:
    """GPU-aware fine-grain pruning in ``rows`` × ``k`` tiles of the compacted 2-D weight (the unit our
    CUDA kernels skip; see :meth:`for_target`).

    Left dense by default: a first layer that is a Conv2d (it reads the raw 1-3 input channels, so its
    K is tiny, its share of the MACs small and its accuracy cost high) and the classifier (10 rows fill
    a third of one 32-row block, and a pruned tile there cuts an input off from every class). Whatever
    the selection, a layer whose compacted K spans fewer than two tile columns stays dense: losing its
    only tile column would zero every output of the row block. ``layers`` names the layers explicitly
    (the two defaults then do not apply).
    """

    rows: int
    k: int
    layers: tuple[str, ...] | None = None
    kinds: tuple[LayerKind, ...] = (LayerKind.LINEAR, LayerKind.CONV2D)
    dense_first_conv: bool = True
    dense_classifier: bool = True

    def __post_init__(self) -> None:
        for what, v in (("rows", self.rows), ("k", self.k)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainingError(f"tile {what}: expected a positive int (from hardware_spec(target).tile), "
                                    f"found {v!r}")

    @classmethod
    def for_target(cls, target: TargetLike, **kw: Any) -> "TileConfig":
        """The tile from ``hardware_spec(target).tile`` (the one source of that fact): a CUDA target."""
        spec = hardware_spec(target)
        try:
            rows, k = spec.tile
        except TargetError:
            raise TrainingError(f"tile pruning needs a GPU target with a pruning tile; found a "
                                f"{spec.hardware_class.value} target ({spec.cpu}); pass e.g. 'cuda' or "
                                "'nvidia/nvidia-h100'") from None
        return cls(rows=rows, k=k, **kw)


@dataclass(frozen=True)
class MagnitudeConfig:
    """Traditional unstructured magnitude pruning (the paper's baseline)."""

    layers: tuple[str, ...] | None = None
    kinds: tuple[LayerKind, ...] = (LayerKind.LINEAR, LayerKind.CONV2D)
    criterion: MagnitudeCriterion = MagnitudeCriterion.SPARSITY


@dataclass(frozen=True)
class PruneConfig:
    """What to prune. ``node_points`` overrides the model's own ``node_points()`` (for user models)."""

    node: NodeConfig | None = None
    group: GroupConfig | None = None
    magnitude: MagnitudeConfig | None = None
    node_points: tuple[NodePoint, ...] | None = None
    tile: TileConfig | None = None

    def __post_init__(self) -> None:
        chosen = [n for n in ("group", "tile", "magnitude") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise TrainingError(f"PruneConfig: choose one weight pruning method (SIMD-aware group, GPU tile or "
                                f"magnitude), found {' and '.join(chosen)}; not both")

    @property
    def weight(self) -> GroupConfig | TileConfig | MagnitudeConfig | None:
        """The one weight-pruning config, if any."""
        return self.group or self.tile or self.magnitude


class _Masked(nn.Module):
    """An anchor module followed by its node mask (unwrapped again by ``finalize``)."""

    def __init__(self, inner: nn.Module, mask: NodeMask) -> None:
        super().__init__()
        self.inner = inner
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(self.inner(x))


def _kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Conv2d):
        return LayerKind.CONV2D
    return None


def _num_nodes(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def input_keep_mask(consumer: nn.Module, keep_nodes: torch.Tensor) -> torch.Tensor:
    """Bool mask shaped like ``consumer.weight``: True where a weight reads a kept input node.

    A conv channel feeding a Linear through flatten maps to H·W consecutive inputs; a grouped conv
    sees only its group's channels.
    """
    n = keep_nodes.numel()
    w = consumer.weight
    keep_nodes = keep_nodes.to(w.device)
    if isinstance(consumer, nn.Linear):
        if consumer.in_features % n:
            raise TrainingError(
                f"consumer Linear has {consumer.in_features} inputs, not a multiple of the producer's {n} nodes"
            )
        cols = keep_nodes.repeat_interleave(consumer.in_features // n)
        return cols.unsqueeze(0).expand_as(w).clone()
    if isinstance(consumer, nn.Conv2d):
        g = consumer.groups
        if consumer.in_channels != n:
            raise TrainingError(f"consumer Conv2d has {consumer.in_channels} input channels, producer {n} nodes")
        per_in, per_out = n // g, consumer.out_channels // g
        m = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        for i in range(g):
            m[i * per_out:(i + 1) * per_out] = keep_nodes[i * per_in:(i + 1) * per_in].view(1, -1, 1, 1)
        return m
    raise TrainingError(f"consumer must be nn.Linear or nn.Conv2d, found {type(consumer).__name__}")


class Pruner:
    """Holds a prepared copy of a model and the pruning state; see the module docstring for the loop."""

    def __init__(self, model: nn.Module, config: PruneConfig, *, name: str | None = None) -> None:
        self.config = config
        self.model_name = name or getattr(model, "model_name", None) or type(model).__name__
        self.model = copy.deepcopy(model)
        self.layers: dict[str, nn.Module] = {
            n: m for n, m in self.model.named_modules() if _kind(m) is not None
        }
        self.masks: dict[str, NodeMask] = {}
        self.points: dict[str, NodePoint] = {}
        self.lambdas: dict[str, float] = {}
        self.weight_masks: dict[str, torch.Tensor] = {}
        self.group_threshold: float | None = None
        #: The last tile stage's sparsity (one float, or {layer: sparsity}).
        self.tile_sparsity_target: float | dict[str, float] | None = None
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._dropout_p0: dict[str, float] = {}
        if config.node is not None:
            self._prepare_nodes(model, config.node)
        self._weight_layers = self._select(config.weight)

    # ---------------------------------------------------------------- preparation
    def _select(self, cfg: GroupConfig | TileConfig | MagnitudeConfig | None) -> tuple[str, ...]:
        if cfg is None:
            return ()
        if cfg.layers is not None:
            missing = [n for n in cfg.layers if n not in self.layers]
            if missing:
                raise TrainingError(f"weight pruning layers {missing} are not Conv2d/Linear layers of the "
                                    f"model; expected some of {list(self.layers)}")
            return tuple(cfg.layers)
        names = list(self.layers)
        dense: set[str] = set()
        if isinstance(cfg, TileConfig) and names:
            if cfg.dense_first_conv and _kind(self.layers[names[0]]) is LayerKind.CONV2D:
                dense.add(names[0])
            if cfg.dense_classifier:
                dense.add(names[-1])
        return tuple(n for n in names if _kind(self.layers[n]) in cfg.kinds and n not in dense)

    def _prepare_nodes(self, original: nn.Module, cfg: NodeConfig) -> None:
        points = self.config.node_points
        if points is None:
            if not hasattr(original, "node_points"):
                raise TrainingError(
                    f"{type(original).__name__} has no node_points(); pass PruneConfig(node_points=...) "
                    "naming each prunable layer and the module its mask follows"
                )
            points = tuple(original.node_points())
        if cfg.layers is not None:
            known = {p.layer for p in points}
            unknown = [n for n in cfg.layers if n not in known]
            if unknown:
                raise TrainingError(f"node layers {unknown} have no node point; expected some of {sorted(known)}")
            points = tuple(p for p in points if p.layer in cfg.layers)
        rule = cfg.rule or MaskRule(beta_max=float(getattr(original, "beta_max", MaskRule.beta_max)))
        modules = dict(self.model.named_modules())
        for p in points:
            for ref in (p.layer, p.anchor, *p.consumers, *p.affine, *([p.dropout] if p.dropout else [])):
                if ref not in modules:
                    raise TrainingError(f"node point {p.layer!r} names {ref!r}, which the model does not have")
            layer = modules[p.layer]
            if _kind(layer) is None:
                raise TrainingError(f"node point {p.layer!r}: expected nn.Linear or nn.Conv2d, "
                                    f"found {type(layer).__name__}")
            groups = int(np.lcm.reduce([getattr(modules[c], "groups", 1) for c in p.consumers]
                                       + [getattr(layer, "groups", 1)]))
            mask = NodeMask(_num_nodes(layer), rule, groups=groups, round_to=cfg.round_to,
                            min_kept=cfg.min_kept).to(self.device)
            _set_submodule(self.model, p.anchor, _Masked(modules[p.anchor], mask))
            self.masks[p.layer] = mask
            self.points[p.layer] = p
            self.lambdas[p.layer] = 0.0
            if p.dropout:
                self._dropout_p0[p.dropout] = float(modules[p.dropout].p)
        logger.debug("prepared %d node masks: %s", len(self.masks), list(self.masks))

    # ---------------------------------------------------------------- optimizer side
    def mask_parameters(self) -> list[nn.Parameter]:
        return [m.beta for m in self.masks.values()]

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the model's weights with ``weight_decay``, mask betas without."""
        betas = {id(p) for p in self.mask_parameters()}
        weights = [p for p in self.model.parameters() if id(p) not in betas and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": weights, "weight_decay": weight_decay}]
        live = [p for p in self.mask_parameters() if p.requires_grad]
        if live:
            groups.append({"params": live, "weight_decay": 0.0, MASK_GROUP_TAG: True})
        return groups

    def set_lambda(self, value: float | Mapping[str, float]) -> None:
        """L1 strength: one value for every node layer, or a {layer: lambda} mapping (missing → 0)."""
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.masks)
            if unknown:
                raise TrainingError(f"lambda for {sorted(unknown)}: no such node layers; have {list(self.masks)}")
            self.lambdas = {n: float(value.get(n, 0.0)) for n in self.masks}
        else:
            self.lambdas = {n: float(value) for n in self.masks}

    def _mask_lr(self, optimizer: torch.optim.Optimizer) -> float:
        betas = {id(p) for p in self.mask_parameters()}
        for group in optimizer.param_groups:
            if any(id(p) in betas for p in group["params"]):
                return float(group["lr"])
        raise TrainingError("the optimizer does not hold the node-mask betas; build it from "
                            "pruner.param_groups(weight_decay) so the L1 step uses their lr")

    def step(self, optimizer: torch.optim.Optimizer | None = None, lr: float | None = None) -> None:
        """Call after every ``optimizer.step()``: L1 penalty ``beta -= lambda · lr``, then weight masks."""
        live = [n for n, m in self.masks.items() if not bool(m.frozen) and self.lambdas[n]]
        if live:
            if lr is None:
                if optimizer is None:
                    raise TrainingError("Pruner.step: pass the optimizer (or lr) so the L1 penalty knows its lr")
                lr = self._mask_lr(optimizer)
            for n in live:
                self.masks[n].penalize(self.lambdas[n] * lr)
        self.apply_weight_masks()

    @torch.no_grad()
    def apply_weight_masks(self) -> None:
        for name, mask in self.weight_masks.items():
            self.layers[name].weight.mul_(mask)

    # ---------------------------------------------------------------- stages
    def freeze_nodes(self) -> None:
        """End node pruning: fix every alpha and rescale dropouts on the pruned FC outputs."""
        rescale = self.config.node.dropout_rescale if self.config.node else DropoutRescale.NONE
        for name, mask in self.masks.items():
            mask.freeze()
            p = self.points[name]
            if p.dropout and rescale is not DropoutRescale.NONE:
                frac = int(mask.alpha.sum()) / mask.num_nodes
                scale = frac if rescale is DropoutRescale.LINEAR else frac ** 0.5
                self.model.get_submodule(p.dropout).p = self._dropout_p0[p.dropout] * scale
        logger.info("node masks frozen: %s", self.kept_summary())

    @property
    def nodes_frozen(self) -> bool:
        return all(bool(m.frozen) for m in self.masks.values())

    def _producer_of(self) -> dict[str, NodePoint]:
        return {c: p for p in self.points.values() for c in p.consumers}

    def _geometry(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Kept rows and, per kept row, the kept flattened input columns (rows × Kc) of a layer."""
        layer = self.layers[name]
        out = layer.weight.shape[0]
        k = int(np.prod(layer.weight.shape[1:]))
        rows = (self.masks[name].kept().cpu().numpy() if name in self.masks else np.arange(out))
        producer = self._producer_of().get(name)
        if producer is None:
            return rows, np.broadcast_to(np.arange(k), (len(rows), k))
        keep_in = input_keep_mask(layer, self.masks[producer.layer].alpha > 0.5).reshape(out, k).cpu().numpy()
        keep_in = keep_in[rows]
        counts = keep_in.sum(axis=1)
        if len(rows) and (counts != counts[0]).any():
            raise TrainingError(f"{name}: kept inputs differ between rows ({sorted(set(counts))}); "
                                "the producer's node groups are not balanced")
        cols = np.nonzero(keep_in)[1].reshape(len(rows), -1) if len(rows) else np.zeros((0, 0), int)
        return rows, cols

    def _compact(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = self._geometry(name)
        w2 = self.layers[name].weight.detach().cpu().numpy().reshape(self.layers[name].weight.shape[0], -1)
        return w2[rows[:, None], cols] if len(rows) else np.zeros((0, cols.shape[1])), rows, cols

    def _scatter(self, name: str, keep: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """A compacted (kept rows × kept inputs) element mask → full weight-shaped mask on the device."""
        layer = self.layers[name]
        full = np.zeros((layer.weight.shape[0], int(np.prod(layer.weight.shape[1:]))), dtype=bool)
        if len(rows):
            full[rows[:, None], cols] = keep
        return torch.from_numpy(full.reshape(layer.weight.shape)).to(self.device)

    def _compact_mask(self, name: str, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The layer's weight mask in compacted coordinates (all True without one)."""
        if name not in self.weight_masks:
            return np.ones(shape, dtype=bool)
        m2 = self.weight_masks[name].reshape(self.layers[name].weight.shape[0], -1).cpu().numpy()
        return m2[rows[:, None], cols] if len(rows) else np.zeros(shape, bool)

    def prune_groups(self, threshold: float) -> None:
        """Start a SIMD-aware stage: recompute the group masks at ``threshold`` and apply them. Under
        ``GroupCriterion.LAYER_SPARSITY`` the value is the fraction of each layer's groups to prune.

        Groups are cut in the compacted weight (pruned nodes and their inputs removed), the matrix the
        compiler will encode, so they stay aligned after shrinking.
        """
        cfg = self.config.group
        if cfg is None:
            raise TrainingError("prune_groups: the pruner was prepared without GroupConfig")
        if self.masks and not self.nodes_frozen:
            raise TrainingError("prune_groups: freeze the node masks first (freeze_nodes()); "
                                "groups are cut in the node-pruned weight")
        self.group_threshold = float(threshold)
        for name in self._weight_layers:
            wc, rows, cols = self._compact(name)
            rule = rules.simd_group_keep if cfg.criterion is GroupCriterion.THRESHOLD \
                else rules.simd_group_keep_sparsity
            keep = rules.expand_groups(rule(wc, cfg.width, threshold), wc.shape[1], cfg.width)
            self.weight_masks[name] = self._scatter(name, keep, rows, cols)
        self.apply_weight_masks()
        logger.info("group %s %.4g (w=%d): weight density %.4f", cfg.criterion.value, threshold, cfg.width,
                    self.weight_density())

    def tile_layers(self) -> tuple[str, ...]:
        """The layers tile stages prune: the selection, less those whose compacted K spans fewer than
        two tile columns (see :class:`TileConfig`)."""
        cfg = self.config.tile
        if cfg is None:
            return ()
        out = []
        for name in self._weight_layers:
            rows, cols = self._geometry(name)
            if len(rows) and -(-cols.shape[1] // cfg.k) >= 2:
                out.append(name)
            else:
                logger.debug("%s stays dense: compacted K=%d spans fewer than two %d-wide tile columns",
                             name, cols.shape[1], cfg.k)
        return tuple(out)

    def prune_tiles(self, sparsity: float | Mapping[str, float]) -> None:
        """Start a GPU tile stage: in each tile layer, prune the ``sparsity`` fraction of rows×k tiles
        with the lowest RMS (one float for every tile layer, or {layer: sparsity} for some of them).

        Tiles are cut in the compacted weight (the matrix the compiler encodes after node pruning).
        Cumulative: tiles pruned by an earlier stage stay pruned.
        """
        cfg = self.config.tile
        if cfg is None:
            raise TrainingError("prune_tiles: the pruner was prepared without TileConfig")
        if self.masks and not self.nodes_frozen:
            raise TrainingError("prune_tiles: freeze the node masks first (freeze_nodes()); "
                                "tiles are cut in the node-pruned weight")
        layers = self.tile_layers()
        per_layer = ({n: float(v) for n, v in sparsity.items()} if isinstance(sparsity, Mapping)
                     else {n: float(sparsity) for n in layers})
        # every check before any mask changes
        if not all(0.0 <= v < 1.0 for v in (per_layer.values() if isinstance(sparsity, Mapping) else [sparsity])):
            raise TrainingError(f"tile sparsity: expected a fraction in [0, 1) per layer, found {sparsity}")
        unknown = sorted(set(per_layer) - set(layers))
        if unknown:
            raise TrainingError(f"tile sparsity for {unknown}: not tile-pruned layers; expected some of "
                                f"{list(layers)} (first conv, classifier and layers under two tile "
                                "columns stay dense)")
        for name, value in per_layer.items():
            wc, rows, cols = self._compact(name)
            keep = rules.tile_keep(wc, cfg.rows, cfg.k, value)
            mask = self._scatter(name, rules.expand_tiles(keep, wc.shape, cfg.rows, cfg.k), rows, cols)
            if name in self.weight_masks:
                mask &= self.weight_masks[name]
            self.weight_masks[name] = mask
        self.tile_sparsity_target = dict(per_layer) if isinstance(sparsity, Mapping) else float(sparsity)
        self.apply_weight_masks()
        logger.info("tile sparsity %s (%dx%d): %.4f of the tiles pruned, weight density %.4f",
                    sparsity, cfg.rows, cfg.k, self.tile_sparsity() or 0.0, self.weight_density())

    def prune_magnitude(self, value: float) -> None:
        """Start a traditional pruning stage (cumulative: pruned weights stay pruned)."""
        cfg = self.config.magnitude
        if cfg is None:
            raise TrainingError("prune_magnitude: the pruner was prepared without MagnitudeConfig")
        for name in self._weight_layers:
            w = self.layers[name].weight.detach().cpu().numpy()
            if cfg.criterion is MagnitudeCriterion.SPARSITY:
                keep = rules.magnitude_keep(w, value)
            else:
                keep = rules.magnitude_keep_std(w, value)
            keep = torch.from_numpy(keep).to(self.device)
            if name in self.weight_masks:
                keep &= self.weight_masks[name]
            self.weight_masks[name] = keep
        self.apply_weight_masks()
        logger.info("magnitude %s %.4g: weight density %.4f", cfg.criterion.value, value, self.weight_density())

    # ---------------------------------------------------------------- reporting
    def kept_summary(self) -> dict[str, str]:
        return {n: f"{int(m.alpha.sum())}/{m.num_nodes}" for n, m in self.masks.items()}

    def _kept_tiles(self, name: str, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The tile mask as decided (kept tiles whose weights all trained to zero still count)."""
        t = self.config.tile
        return formats.tile_mask(self._compact_mask(name, shape, rows, cols).astype(np.float32), t.rows, t.k)

    def tile_sparsity(self) -> float | None:
        """Pruned tiles / all tiles of the tile-masked layers (None before the first tile stage)."""
        if self.config.tile is None:
            return None
        pruned = total = 0
        for name in self._weight_layers:
            if name not in self.weight_masks:
                continue
            rows, cols = self._geometry(name)
            if not len(rows) or not cols.shape[1]:
                continue
            kept = self._kept_tiles(name, (len(rows), cols.shape[1]), rows, cols)
            pruned += int(kept.size - kept.sum())
            total += kept.size
        return pruned / total if total else None

    @torch.no_grad()
    def weight_density(self) -> float:
        """Fraction of Conv2d/Linear weights that are live: node masks and weight masks together."""
        live = total = 0
        for name, layer in self.layers.items():
            keep = torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device)
            if name in self.weight_masks:
                keep &= self.weight_masks[name]
            if name in self.masks:
                rows = self.masks[name].alpha > 0.5
                keep &= rows.view(-1, *([1] * (layer.weight.dim() - 1)))
            producer = self._producer_of().get(name)
            if producer is not None:
                keep &= input_keep_mask(layer, self.masks[producer.layer].alpha > 0.5)
            live += int(keep.sum())
            total += keep.numel()
        return live / total if total else 1.0

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "weight_masks": {k: v.clone() for k, v in self.weight_masks.items()},
            "lambdas": dict(self.lambdas),
            "group_threshold": self.group_threshold,
            "tile_sparsity": self.tile_sparsity_target,
            "dropout_p": {d: float(self.model.get_submodule(d).p) for d in self._dropout_p0},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.weight_masks = {k: v.clone().bool().to(self.device) for k, v in state["weight_masks"].items()}
        self.lambdas = dict(state["lambdas"])
        self.group_threshold = state["group_threshold"]
        self.tile_sparsity_target = state.get("tile_sparsity")  # absent in checkpoints before tile pruning
        for d, p in state["dropout_p"].items():
            self.model.get_submodule(d).p = p
        for m in self.masks.values():
            m.beta.requires_grad_(not bool(m.frozen))

    # ---------------------------------------------------------------- finalize
    @torch.no_grad()
    def finalize(self, *, recipe: str | None = None, hardware: Mapping[str, Any] | None = None,
                 value_bytes: int = 4, index_bytes: int = 4) -> tuple[nn.Module, TrainingPlan]:
        """A plain ``nn.Module`` (eval mode) with every mask folded into zeros, and the plan.

        The prepared model is left as it is (its weight masks re-applied), so training can go on.
        """
        self.apply_weight_masks()
        plans = [self._layer_plan(n, value_bytes, index_bytes) for n in self.layers]
        out = copy.deepcopy(self.model)
        for name, p in self.points.items():
            wrapper = out.get_submodule(p.anchor)
            _set_submodule(out, p.anchor, wrapper.inner)
            keep = self.masks[name].alpha > 0.5
            dead = ~keep
            layer = out.get_submodule(name)
            layer.weight[dead] = 0
            if layer.bias is not None:
                layer.bias[dead] = 0
            for a in p.affine:
                bn = out.get_submodule(a)
                if getattr(bn, "weight", None) is not None:
                    bn.weight[dead] = 0
                if getattr(bn, "bias", None) is not None:
                    bn.bias[dead] = 0
            for c in p.consumers:
                consumer = out.get_submodule(c)
                consumer.weight.mul_(input_keep_mask(consumer, keep))
        for name, mask in self.weight_masks.items():
            out.get_submodule(name).weight.mul_(mask)
        plan = TrainingPlan(model=self.model_name, layers=tuple(plans), recipe=recipe,
                            hardware=dict(hardware) if hardware else None,
                            value_bytes=value_bytes, index_bytes=index_bytes)
        return out.eval(), plan

    def _layer_plan(self, name: str, vb: int, ib: int) -> LayerPlan:
        layer = self.layers[name]
        wc, rows, cols = self._compact(name)
        if name in self.weight_masks:
            wc = wc * self._compact_mask(name, wc.shape, rows, cols)
        producer = self._producer_of().get(name)
        kept_inputs = None
        if producer is not None:
            keep_in = (self.masks[producer.layer].alpha > 0.5)
            if isinstance(layer, nn.Linear):
                keep_in = keep_in.repeat_interleave(layer.in_features // keep_in.numel())
            kept_inputs = tuple(int(i) for i in torch.nonzero(keep_in).flatten())
        n_bias = len(rows) if layer.bias is not None else 0
        dense = (layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)) * vb
        group_width = group_mask = tile = tile_mask = None
        unstructured = False
        idx_bytes = 0
        cfg = self.config.group
        if cfg is not None and name in self.weight_masks and wc.size:
            group_width = cfg.width
            gmask = self._kept_groups(name, wc.shape, rows, cols)
            group_mask = PackedMask.from_array(gmask)
            rep = formats.encode(wc, cfg.width, keep=gmask).sizes(vb, ib)
            stored, idx_bytes = rep.total, rep.indices + rep.row_pointers
        elif self.config.tile is not None and name in self.weight_masks and wc.size:
            t = self.config.tile
            tile = (t.rows, t.k)
            tmask = self._kept_tiles(name, wc.shape, rows, cols)
            tile_mask = PackedMask.from_array(tmask)
            rep = formats.encode_tiles(wc, t.rows, t.k, keep=tmask).sizes(vb, ib)
            stored, idx_bytes = rep.total, rep.indices + rep.row_pointers
        elif self.config.magnitude is not None and name in self.weight_masks and wc.size:
            unstructured = True
            rep = formats.encode_csr(wc).sizes(vb, ib)
            stored, idx_bytes = rep.total, rep.indices + rep.row_pointers
        else:
            stored = wc.size * vb
        return LayerPlan(
            name=name, kind=_kind(layer).value, weight_shape=tuple(layer.weight.shape),
            conv_groups=int(getattr(layer, "groups", 1)), num_nodes=_num_nodes(layer),
            kept_nodes=tuple(int(r) for r in rows), kept_inputs=kept_inputs,
            group_width=group_width, group_mask=group_mask, unstructured=unstructured, tile=tile, tile_mask=tile_mask,
            nonzero_weights=int(np.count_nonzero(wc)), total_weights=int(layer.weight.numel()),
            dense_bytes=dense, stored_bytes=int(stored + n_bias * vb), index_bytes=int(idx_bytes),
        )

    def _kept_groups(self, name: str, shape: tuple[int, int], rows: np.ndarray,
                     cols: np.ndarray) -> np.ndarray:
        """The group mask as decided (kept groups whose weights all trained to zero still count)."""
        mc = self._compact_mask(name, shape, rows, cols)
        return formats.padded_groups(mc.astype(np.float32), self.config.group.width).any(axis=2)


def prepare(model: nn.Module, config: PruneConfig, *, name: str | None = None) -> Pruner:
    """Prepare a deep copy of ``model`` for pruning; the caller's model is never modified.

    Train ``pruner.model`` with an optimizer built from ``pruner.param_groups(weight_decay)``, call
    ``pruner.step(optimizer)`` after each ``optimizer.step()``, then ``pruner.finalize()``.
    """
    return Pruner(model, config, name=name)
