"""Measuring compiled variants of one model on an emulated microcontroller, the way ``scalpel run
--target cortex-m4`` and ``benchmarks/micro.py`` report them.

Each variant is built under every code shape of ``GRID`` (gcc's code shape swings counts by up to 25 %,
so every variant, the dense baseline too, keeps its fewest instructions), run on QEMU, and checked bit
for bit against the numpy int16 reference. Accuracy of an int16 model is that reference on a test set
(the board's arithmetic, checked above). Speedup and size are relative to the variant named "dense".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm

from .. import formats
from ..errors import PlanError, VerificationError
from .kernels import GRID, KernelConfig
from .project import Method, Project
from .runner import RunResult, build_and_run

#: Test images per numpy reference call (the reference's im2col of 10k ConvNet images is GBs).
_CHUNK = 250
#: Training images that choose the int16 scales by default.
CALIBRATION_IMAGES = 512


def calibration_images(train, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """``n`` random training inputs (float32 [n, *input shape]) of a set with ``batches`` (ImageSet, ...)."""
    import torch

    batches = train.batches(n, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return np.ascontiguousarray(next(iter(batches))[0].numpy())


@dataclass(frozen=True)
class Variant:
    """One build to measure: its (pruned) Relax module and the kernel choice (a ``Method`` for every
    layer, or ``"measured"``: per layer, whichever runs fewer instructions alone on the board)."""

    name: str
    mod: tvm.IRModule
    method: Method | str
    repeat: int = 1  # > 1: run again and check the count does not change
    evaluate: bool = True  # False: untrained weights (counts do not depend on values), no accuracy


def best_build(mod: tvm.IRModule, target, out: Path, calibration: np.ndarray, method: Method | str,
               inputs: np.ndarray, grid: Sequence[KernelConfig] = GRID
               ) -> tuple[Project, RunResult, dict[str, int]]:
    """The build with the fewest instructions over ``grid`` (default ``GRID``), its first run, and every
    config's count."""
    from . import build

    counts, best = {}, None
    for cfg in grid:
        tag = f"u{cfg.unroll}-{cfg.saturate}"
        project = build(mod, target, Path(out) / tag, calibration, methods=method, inputs=inputs, config=cfg)
        run = build_and_run(project)
        counts[tag] = run.instructions[0]
        if best is None or run.instructions[0] < best[1].instructions[0]:
            best = (project, run)
    return best[0], best[1], counts


def int16_accuracy(project: Project, images: np.ndarray, labels: np.ndarray) -> float:
    """The int16 model's accuracy on float ``images`` [N, *input shape]."""
    model = project.model
    pred = np.concatenate([model.run(model.quantize_input(images[i:i + _CHUNK])).argmax(1)
                           for i in range(0, len(images), _CHUNK)])
    return float((pred == labels).mean())


def check_runs(project: Project, first: RunResult, repeat: int = 1) -> list[RunResult]:
    """``first`` and ``repeat`` - 1 more runs; the board's outputs must equal the int16 reference and the
    instruction count must be the same for every input and run."""
    runs = [first] + [build_and_run(project) for _ in range(repeat - 1)]
    if not np.array_equal(runs[0].outputs, project.model.run(project.inputs)):
        raise VerificationError(f"{project.path}: the board's outputs differ from the numpy int16 reference; "
                                "expected them bit-exact. This is a compiler bug: please report it with the model")
    counts = [r.instructions for r in runs]
    if len({c for run in counts for c in run}) != 1:
        raise VerificationError(f"{project.path}: instruction counts differ between inputs or runs: {counts}; "
                                "expected one count (QEMU's TCG counts are deterministic)")
    return runs


def layer_kernels(project: Project) -> list[dict]:
    """The kernel of every weighted layer, in the keys of a CPU plan's decisions (``reached_sparsity``: its
    fraction of zero groups of the board's width; no profiled crossover on a board)."""
    w = project.board.group_width
    weighted = [q for q in project.model.layers if q.weight is not None]
    methods = [m for m in project.methods if m in {x.value for x in Method}]
    reasons = list(project.decisions) or [None] * len(weighted)
    if not len(weighted) == len(methods) == len(reasons):
        raise PlanError(f"{project.path}: {len(weighted)} weighted layers, {len(methods)} kernels, "
                        f"{len(reasons)} decisions; expected one of each per layer")
    rows = []
    for q, method, reason in zip(weighted, methods, reasons):
        if method == Method.CSR.value:  # an index per weight: its zeros are weights, not groups
            zero = float((q.weight == 0).mean())
            default = f"{q.layer.key}: {zero:.0%} zero weights, CSR"
        else:
            zero = 1.0 - float(formats.group_mask(q.weight, w).mean())
            default = f"{q.layer.key}: {zero:.0%} zero groups of {w}, {method} kernel"
        rows.append({"key": q.layer.key, "method": method, "reached_sparsity": zero, "crossover": None,
                     "reason": reason or default})
    return rows


def measure(variant: Variant, target, out: Path, calibration: np.ndarray, inputs: np.ndarray,
            test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One variant's figures: instructions (and per config), flash, RAM, weight bytes per layer, kernel
    per layer, and the int16 accuracy on ``test`` = (images, labels) when given."""
    project, first, grid = best_build(variant.mod, target, Path(out) / variant.name, calibration,
                                      variant.method, inputs)
    runs = check_runs(project, first, variant.repeat)
    weights = {k: sum(v[p] for p in ("values", "indices", "row_pointers")) for k, v in project.weight_bytes.items()}
    row = {"instructions": runs[0].instructions[0], "runs": len(runs), "board_images": len(project.inputs),
           "bit_exact": True, "flash_bytes": runs[0].flash_bytes, "ram_bytes": runs[0].ram_bytes,
           "fits_board": runs[0].flash_bytes + runs[0].ram_bytes <= project.board.memory_bytes,
           "weight_bytes": sum(weights.values()), "weight_bytes_by_layer": weights,
           "layers": list(project.methods), "kernel_config": vars(project.config),
           "decisions": list(project.decisions), "kernels": layer_kernels(project),
           "instructions_by_config": grid}
    if test is not None and variant.evaluate:
        row["accuracy_int16"] = int16_accuracy(project, *test)
    return row


def relative_to_dense(rows: dict[str, dict]) -> None:
    """Adds ``speedup`` (dense instructions / the variant's) and ``size_percent`` to every row."""
    if "dense" not in rows:
        raise PlanError(f"speedups are relative to a variant named 'dense'; found {sorted(rows)}")
    dense = rows["dense"]
    for row in rows.values():
        row["speedup"] = dense["instructions"] / row["instructions"]
        row["size_percent"] = 100 * row["weight_bytes"] / dense["weight_bytes"]


def measure_all(variants: Sequence[Variant], target, out: Path, calibration: np.ndarray, inputs: np.ndarray,
                test: tuple[np.ndarray, np.ndarray] | None = None, on_variant=None) -> dict[str, dict]:
    """``measure`` for every variant (``on_variant(name, row)`` after each), then ``relative_to_dense``."""
    rows = {}
    for v in variants:
        rows[v.name] = measure(v, target, out, calibration, inputs, test)
        if on_variant is not None:
            on_variant(v.name, rows[v.name])
    relative_to_dense(rows)
    return rows
