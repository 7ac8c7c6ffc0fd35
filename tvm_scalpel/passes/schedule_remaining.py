"""ScheduleRemaining: every PrimFunc that is not one of our kernels gets a CPU schedule, so no naive
legalized loop is left in a compiled model."""

from __future__ import annotations

import tvm

from ..schedules.cpu_generic import SCHEDULED, schedule_generic
from ..target import HardwareSpec


@tvm.transform.module_pass(opt_level=0, name="ScheduleRemaining")
class ScheduleRemaining:
    def __init__(self, spec: HardwareSpec):
        self.spec = spec

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get(SCHEDULED, False):
                updates[gv] = schedule_generic(func, self.spec)
        if not updates:
            return mod
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in updates.items():
            out[gv] = func
        return out
