"""The microcontroller path: int16 fixed point, TVM-generated plain C per layer, a generated driver,
arm-none-eabi-gcc and QEMU with an instruction-count plugin. See ``build``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np
import tvm

from .. import formats
from ..errors import PlanError, TargetError
from ..passes.fold_node_masks import FoldConfig, FoldNodeMasks
from ..target import HardwareClass, TargetLike, hardware_spec
from .decide import LayerChoice, measure_layers
from .graph import WEIGHTED, Graph, read_graph
from .kernels import GRID, KernelConfig
from .project import BOARDS, Board, Method, Project, generate
from .quantize import QuantizedModel, forward_float, quantize
from .runner import RunResult, ToolchainMissing, build_and_run, check_toolchain, missing_tools

__all__ = ["BOARDS", "GRID", "Board", "Graph", "KernelConfig", "LayerChoice", "Method", "Project", "QuantizedModel",
           "RunResult", "ToolchainMissing", "board_for", "build", "build_and_run", "check_toolchain", "forward_float",
           "measure_layers", "methods_from_plan", "missing_tools", "quantize", "read_graph"]


def board_for(target: TargetLike) -> Board:
    spec = hardware_spec(target)
    if spec.hardware_class is not HardwareClass.MCU:
        raise TargetError(f"expected a microcontroller target ({sorted(BOARDS)}), found {spec.hardware_class.value} "
                          f"({spec.cpu})")
    if spec.cpu not in BOARDS:
        raise TargetError(f"no emulated board for {spec.cpu!r} yet; expected one of {sorted(BOARDS)}")
    board = BOARDS[spec.cpu]
    if spec.lanes("int16") != board.group_width:
        raise TargetError(f"{spec.cpu}: the hardware model gives {spec.lanes('int16')} int16 lanes, the kernels "
                          f"for {board.machine} use {board.group_width}")
    return board


def methods_from_plan(graph: Graph, plan, width: int) -> dict[str, Method]:
    """Per-layer kernels from a ``CompilePlan``: CSR for its ``csr_layers``; group-sparse where the
    layer's fraction of zero groups (of ``width``, the board's) reaches its threshold (default 0:
    SIMD-aware everywhere, Scalpel's MCU decision); dense below it. Keys that match no layer are a
    PlanError, as on the CPU."""
    weighted = [layer for layer in graph.layers if isinstance(layer, WEIGHTED)]
    keys = {layer.key for layer in weighted}
    unknown = sorted((set(plan.layer_thresholds) | set(plan.csr_layers)) - keys)
    if unknown:
        raise PlanError(f"microcontroller build: per-layer settings for {unknown} match no layer; the model has "
                        f"{sorted(keys)}")
    methods = {}
    for layer in weighted:
        zero_groups = 1.0 - float(formats.group_mask(layer.weight, width).mean())
        if layer.key in plan.csr_layers:
            methods[layer.key] = Method.CSR
        else:
            methods[layer.key] = Method.GROUP if zero_groups >= plan.layer_thresholds.get(layer.key, 0.0) \
                else Method.DENSE
    return methods


def build(mod: tvm.IRModule, target: TargetLike, out_dir: str | Path, calibration: np.ndarray,
          methods: Mapping[str, Method | str] | Method | str | None = None, inputs: np.ndarray | None = None,
          round_to: int = 1, plan=None, config: KernelConfig = KernelConfig()) -> Project:
    """Quantise a (pruned) Relax model to int16 and write its microcontroller project to ``out_dir``.

    ``calibration``: float inputs [N, *input shape] that choose the fixed-point scales. ``methods``:
    the kernel of every weighted layer (``group``: Scalpel's SIMD-aware format; ``dense``; ``csr``:
    traditional pruning), one for all or per layer key, or ``"measured"`` (each layer built alone both
    ways and run on the board; see ``measure_layers``); default: from ``plan`` (a ``CompilePlan``, see
    ``methods_from_plan``), else group-sparse everywhere. ``inputs``: float inputs compiled into the QEMU
    harness (default: the first calibration input). ``config``: code-shape knobs (``KernelConfig``).
    Dead nodes are folded first, so a node-pruned model gets physically smaller layers. The input
    module is not modified.
    """
    board = board_for(target)
    round_to = plan.round_to if plan is not None else round_to
    graph = read_graph(FoldNodeMasks(FoldConfig(round_to=round_to))(mod))
    if methods is None:
        methods = methods_from_plan(graph, plan, board.group_width) if plan is not None else Method.GROUP
    model = quantize(graph, calibration, align=board.group_width)
    xs = np.asarray(calibration[:1] if inputs is None else inputs, np.float32)
    xq = np.stack([model.quantize_input(x) for x in xs])
    if methods == "measured":  # per layer, the kernel with fewer instructions on the board
        choices = measure_layers(model, board, config)
        project = generate(model, board, {c.key: c.method for c in choices}, Path(out_dir), xq, config)
        return dataclasses.replace(project, decisions=tuple(c.reason for c in choices))
    if isinstance(methods, str):
        methods = Method(methods)
    return generate(model, board, methods, Path(out_dir), xq, config)
