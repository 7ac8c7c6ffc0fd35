"""The microcontroller path: int16 fixed point, TVM-generated plain C per layer, a generated driver,
arm-none-eabi-gcc and QEMU with an instruction-count plugin. See ``build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import tvm

from ..errors import TargetError
from ..passes.fold_node_masks import FoldConfig, FoldNodeMasks
from ..target import HardwareClass, TargetLike, hardware_spec
from .graph import Graph, read_graph
from .project import BOARDS, Board, Method, Project, generate
from .quantize import QuantizedModel, forward_float, quantize
from .runner import RunResult, ToolchainMissing, build_and_run, check_toolchain, missing_tools

__all__ = ["BOARDS", "Board", "Graph", "Method", "Project", "QuantizedModel", "RunResult", "ToolchainMissing",
           "board_for", "build", "build_and_run", "check_toolchain", "forward_float", "missing_tools",
           "quantize", "read_graph"]


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


def build(mod: tvm.IRModule, target: TargetLike, out_dir: str | Path, calibration: np.ndarray,
          methods: Mapping[str, Method | str] | Method | str = Method.GROUP, inputs: np.ndarray | None = None,
          round_to: int = 1) -> Project:
    """Quantise a (pruned) Relax model to int16 and write its microcontroller project to ``out_dir``.

    ``calibration``: float inputs [N, *input shape] that choose the fixed-point scales. ``methods``:
    the kernel of every weighted layer (``group``: Scalpel's SIMD-aware format; ``dense``; ``csr``:
    traditional pruning), one for all or per layer key. ``inputs``: float inputs compiled into the QEMU
    harness (default: the first calibration input). Dead nodes are folded first, so a node-pruned
    model gets physically smaller layers. The input module is not modified.
    """
    board = board_for(target)
    graph = read_graph(FoldNodeMasks(FoldConfig(round_to=round_to))(mod))
    model = quantize(graph, calibration)
    xs = np.asarray(calibration[:1] if inputs is None else inputs, np.float32)
    xq = np.stack([model.quantize_input(x) for x in xs])
    if isinstance(methods, str):
        methods = Method(methods)
    return generate(model, board, methods, Path(out_dir), xq)
