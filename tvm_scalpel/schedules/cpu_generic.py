"""A schedule for the PrimFuncs TVM legalizes around our layer kernels (bias adds, activations,
pooling, reshapes): inline injective producers, then per remaining block fuse its spatial loops,
vectorise by the target's lanes and run those with enough work in parallel (the kernels' threshold).
TVM's default CPU pipeline leaves these as naive scalar loops.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from ..target import HardwareSpec
from .cpu import PARALLEL_MIN_MACS

logger = logging.getLogger(__name__)

SCHEDULED = "tir.is_scheduled"


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _schedule_block(sch: s_tir.Schedule, block, lanes: int) -> None:
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return  # not the simple one-loop-per-axis nest legalization produces: leave it
    spatial = []
    for loop, iv in zip(loops, iters):
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        spatial.append(loop)
    if not spatial:
        return
    per_output = 1  # a reduction's work per output element (a pooling window, ...)
    for loop in loops[len(spatial):]:
        per_output *= _extent(sch, loop) or 1
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    total = _extent(sch, fused)
    if total is None:
        return
    # Parallel by work, as our kernels: LeNet-5's 2x2 max-pools (1152 and 208 outputs) ran in parallel
    # and each launch cost more than the pruned model's kernels together (with sleeping pool threads:
    # 79 -> 18 us per inference once serial)
    parallel = total * per_output >= PARALLEL_MIN_MACS
    if len(spatial) == len(loops) and total % lanes == 0 and total >= lanes:
        outer, inner = sch.split(fused, [None, lanes])
        sch.vectorize(inner)
        if parallel:
            sch.parallel(outer)
    elif parallel:
        sch.parallel(fused)


def schedule_generic(func: tirx.PrimFunc, spec: HardwareSpec) -> tirx.PrimFunc:
    """A scheduled copy of ``func`` (marked ``tir.is_scheduled``); ``func`` itself is not changed."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 (TVM raises ScheduleError subclasses; not inlinable → keep it)
            logger.debug("schedule_generic: block %s stays", sch.get(block).name_hint)
    for block in sch.get_child_blocks(root):
        _schedule_block(sch, block, spec.lanes("float32"))
    return sch.mod["main"].with_attr(SCHEDULED, True)
