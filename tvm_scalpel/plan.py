"""Per-layer decisions (Scalpel's "customizing" step) as a frozen, JSON-serialisable plan.

From the hardware class, the measured profile and the group sparsity each layer reached:
- MCU (low parallelism): SIMD-aware groups everywhere;
- GPU (high parallelism): node pruning (dense kernels on shrunk layers); where a layer also has all-zero
  weight tiles (GPU-aware fine-grain pruning, ``HardwareSpec.tile``) the tile kernel skips them;
- CPU (moderate): group-sparse kernels where the reached sparsity is at or above the profiled crossover,
  dense (node-pruned) elsewhere.
``traditional`` is the paper's baseline instead: CSR wherever a layer has zeros.
Every decision records why, e.g. ``linear:300x784: sparse wins from 50 %, reached 91 %``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

import numpy as np
import tvm

from . import formats
from .errors import PlanError
from .pipeline import CompilePlan
from .profiling import HardwareProfile, LayerShape, layers_with_weights
from .target import HardwareClass, HardwareSpec

# A threshold above 1 means "never group-sparse": the layer stays dense.
_NEVER = 2.0


class Method(str, enum.Enum):
    GROUP = "group"  # SIMD-aware weight pruning, group-sparse kernel
    DENSE = "dense"  # node pruning only, dense kernel on the shrunk layer
    CSR = "csr"  # traditional (unstructured) pruning: CSR kernel, one index per weight
    TILE = "tile"  # GPU-aware fine-grain pruning: tile kernel skipping all-zero weight tiles


@dataclass(frozen=True)
class LayerDecision:
    key: str
    method: Method
    group_width: int | None
    reached_sparsity: float
    crossover: float | None
    reason: str
    tile: tuple[int, int] | None = None  # Method.TILE: the (rows, k) pruning tile


@dataclass(frozen=True)
class PruningPlan:
    hardware_class: HardwareClass
    cpu: str
    layers: tuple[LayerDecision, ...]
    round_to: int = 1

    def compile_plan(self) -> CompilePlan:
        widths = {d.group_width for d in self.layers if d.group_width}
        if len(widths) > 1:
            raise PlanError(f"one group width per plan is supported, found {sorted(widths)}")
        return CompilePlan(group_width=widths.pop() if widths else None, round_to=self.round_to,
                           layer_thresholds={d.key: 0.0 if d.method in (Method.GROUP, Method.TILE) else _NEVER
                                             for d in self.layers if d.method is not Method.CSR},
                           csr_layers=frozenset(d.key for d in self.layers if d.method is Method.CSR))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        d = json.loads(text)
        layers = tuple(LayerDecision(**{**ld, "method": Method(ld["method"]),
                                        "tile": tuple(ld["tile"]) if ld.get("tile") else None})
                       for ld in d["layers"])
        return cls(hardware_class=HardwareClass(d["hardware_class"]), cpu=d["cpu"], layers=layers,
                   round_to=d.get("round_to", 1))


def _decide(spec: HardwareSpec, shape: LayerShape, reached: float, w: int,
            profile: HardwareProfile | None) -> LayerDecision:
    cls = spec.hardware_class
    if cls is HardwareClass.MCU:
        return LayerDecision(shape.key, Method.GROUP, w, reached, None,
                             f"{shape.key}: MCU, SIMD-aware groups of {w} (reached {reached:.0%})")
    if cls is HardwareClass.GPU:
        return _decide_gpu(shape, reached, spec.tile)
    if profile is None:
        raise PlanError("a CPU plan needs a hardware profile (tvm_scalpel.profiling.profile)")
    crossover = profile.for_shape(shape).crossover
    if crossover is None:
        return LayerDecision(shape.key, Method.DENSE, None, reached, None,
                             f"{shape.key}: sparse never wins in the profile, reached {reached:.0%}")
    if reached >= crossover and reached > 0:
        return LayerDecision(shape.key, Method.GROUP, w, reached, crossover,
                             f"{shape.key}: sparse wins from {crossover:.0%}, reached {reached:.0%}")
    return LayerDecision(shape.key, Method.DENSE, None, reached, crossover,
                         f"{shape.key}: sparse wins from {crossover:.0%}, reached only {reached:.0%}")


def _decide_gpu(shape: LayerShape, zero_tiles: float, tile: tuple[int, int]) -> LayerDecision:
    from .passes.rewrite_tile_sparse import DEFAULT_MIN_SPARSITY_CONV, DEFAULT_MIN_SPARSITY_FC

    threshold = DEFAULT_MIN_SPARSITY_CONV if shape.kind == "conv2d" else DEFAULT_MIN_SPARSITY_FC
    if zero_tiles > 0 and zero_tiles >= threshold:
        return LayerDecision(shape.key, Method.TILE, None, zero_tiles, threshold,
                             f"{shape.key}: GPU, tile kernel skips {zero_tiles:.0%} zero {tile[0]}x{tile[1]} tiles",
                             tile=tile)
    return LayerDecision(shape.key, Method.DENSE, None, zero_tiles, threshold,
                         f"{shape.key}: GPU, dense kernel ({zero_tiles:.0%} zero tiles)")


def traditional(mod: tvm.IRModule, spec: HardwareSpec, round_to: int = 1) -> PruningPlan:
    """The paper's baseline: every layer with a zero weight runs CSR (an index per weight), as
    traditional unstructured pruning deploys; a layer without zeros stays dense."""
    if spec.hardware_class is not HardwareClass.CPU:
        raise PlanError(f"traditional pruning compiles to CSR kernels on CPU targets only, found "
                        f"{spec.hardware_class.value} ({spec.cpu})")
    decisions = []
    for shape, weight in layers_with_weights(mod, round_to):
        zeros = 1.0 - np.count_nonzero(weight) / weight.size
        method = Method.CSR if zeros > 0 else Method.DENSE
        decisions.append(LayerDecision(shape.key, method, None, zeros, None,
                                       f"{shape.key}: traditional pruning, {zeros:.0%} zero weights, "
                                       + ("CSR" if method is Method.CSR else "no zeros: dense")))
    return PruningPlan(hardware_class=spec.hardware_class, cpu=spec.cpu, layers=tuple(decisions),
                       round_to=round_to)


def all_dense(mod: tvm.IRModule, spec: HardwareSpec) -> PruningPlan:
    """Every layer on our dense kernels, whatever zeros it has: the baseline the speedups divide by."""
    layers = []
    for shape, weight in layers_with_weights(mod):
        zeros = 1.0 - np.count_nonzero(weight) / weight.size
        layers.append(LayerDecision(shape.key, Method.DENSE, None, zeros, None,
                                    f"{shape.key}: dense kernel ({zeros:.0%} zero weights unused)"))
    return PruningPlan(hardware_class=spec.hardware_class, cpu=spec.cpu, layers=tuple(layers))


def decide(mod: tvm.IRModule, spec: HardwareSpec, profile: HardwareProfile | None = None,
           w: int | None = None, round_to: int = 1) -> PruningPlan:
    """Decisions for every constant-weight layer of a (pruned) Relax module, from its weights, after
    dead nodes are folded (keys and sparsities are those of the layers the build will compile)."""
    cls = spec.hardware_class
    w = w or spec.lanes("int16" if cls is HardwareClass.MCU else "float32")
    decisions = []
    for shape, weight in layers_with_weights(mod, round_to):
        kept = formats.tile_mask(weight, *spec.tile) if cls is HardwareClass.GPU else formats.group_mask(weight, w)
        decisions.append(_decide(spec, shape, float(1.0 - kept.mean()), w, profile))
    return PruningPlan(hardware_class=cls, cpu=spec.cpu, layers=tuple(decisions), round_to=round_to)


def stored_weight_bytes(mod: tvm.IRModule, plan: PruningPlan | None = None) -> int:
    """Bytes of every constant weight as ``plan`` compiles it (after dead nodes are folded): dense
    values, group-sparse values + one index per group + row pointers, tile values + one index per tile
    + row pointers, or CSR values + one index per weight + row pointers. Without a plan every layer is dense."""
    round_to = plan.round_to if plan is not None else 1
    layers = layers_with_weights(mod, round_to)
    decisions = plan.layers if plan is not None else (None,) * len(layers)
    if len(decisions) != len(layers):
        raise PlanError(f"the plan has {len(decisions)} layers, the module {len(layers)}: not the plan of this module")
    total = 0
    for (shape, weight), d in zip(layers, decisions):
        if d is not None and d.key != shape.key:
            raise PlanError(f"plan layer {d.key} does not match the module's layer {shape.key}")
        if d is None or d.method is Method.DENSE:
            total += formats.dense_bytes(weight)
        elif d.method is Method.CSR:
            total += formats.encode_csr(weight).sizes().total
        elif d.method is Method.TILE:
            total += formats.encode_tiles(weight, *d.tile).sizes().total
        else:
            total += formats.encode(weight, d.group_width).sizes().total
    return total
