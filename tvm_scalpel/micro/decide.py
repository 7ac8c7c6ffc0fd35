"""Per-layer kernel choice for a microcontroller by measuring it: Scalpel's MCU decision is SIMD-aware
groups everywhere, but a layer whose pairs are mostly kept runs slower group-sparse than dense (an index
load and a gather per pair). Each weighted layer is built alone, dense and group-sparse, from its real
int16 weights, and run on the emulated board; the layer keeps the kernel with fewer instructions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import formats
from .graph import Graph
from .kernels import KernelConfig
from .project import Board, Method, generate
from .quantize import QuantizedModel
from .runner import build_and_run


@dataclass(frozen=True)
class LayerChoice:
    key: str
    method: Method
    instructions: dict  # method value -> instructions of the layer alone
    reason: str


def _alone(model: QuantizedModel, index: int) -> QuantizedModel:
    q = model.layers[index]
    return QuantizedModel(Graph(q.layer.in_shape, (q.layer,)), q.frac_in, (q,))


def measure_layers(model: QuantizedModel, board: Board, config: KernelConfig = KernelConfig(),
                   candidates: tuple[Method, ...] = (Method.DENSE, Method.GROUP)) -> list[LayerChoice]:
    """Build every weighted layer alone under each candidate kernel, run it once, keep the cheapest."""
    choices = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="scalpel-mcu-layer-") as tmp:
        for i, q in enumerate(model.layers):
            if q.weight is None:
                continue
            one = _alone(model, i)
            x = rng.integers(-(1 << 12), 1 << 12, size=(1, *one.graph.in_shape)).astype(np.int16)
            counts = {}
            for method in candidates:
                project = generate(one, board, method, Path(tmp) / f"l{i}-{method.value}", x, config)
                counts[method.value] = build_and_run(project).instructions[0]
            best = min(candidates, key=lambda m: counts[m.value])
            zero = 1.0 - float(formats.group_mask(q.weight, board.group_width).mean())
            detail = ", ".join(f"{m} {n:,}" for m, n in counts.items())
            choices.append(LayerChoice(q.layer.key, best, counts,
                                       f"{q.layer.key}: {zero:.0%} zero groups of {board.group_width}; "
                                       f"instructions alone: {detail} -> {best.value}"))
    return choices
