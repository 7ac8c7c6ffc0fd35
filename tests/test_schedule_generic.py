"""schedule_generic (ScheduleRemaining's schedule for TVM's legalized ops): parallel only with enough work."""

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_scalpel import hardware_spec
from tvm_scalpel.schedules.cpu import PARALLEL_MIN_MACS
from tvm_scalpel.schedules.cpu_generic import SCHEDULED, schedule_generic


def _legalized_max_pool(channels: int, size: int) -> tvm.tirx.PrimFunc:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, size, size), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


@pytest.mark.parametrize("channels, size", [(8, 24), (13, 8), (64, 128)])
def test_pooling_runs_in_parallel_only_with_enough_work(channels, size):
    """A LeNet-5 pool (8x24x24 -> 1152 outputs of 4 reads) stays on one thread: a parallel launch cost
    more than the whole pruned model; a large one (64x128x128) runs in parallel. Results unchanged."""
    spec = hardware_spec("host")
    func = _legalized_max_pool(channels, size)
    sched = schedule_generic(func, spec)
    assert sched.attrs[SCHEDULED]
    work = channels * (size // 2) ** 2 * 4
    assert ("T.parallel" in sched.script()) == (work >= PARALLEL_MIN_MACS), (channels, size, work)
    x = np.random.default_rng(0).standard_normal((1, channels, size, size)).astype("float32")
    ref = x.reshape(1, channels, size // 2, 2, size // 2, 2).max(axis=(3, 5))
    lib = tvm.compile(tvm.IRModule({"pool": sched.with_attr("global_symbol", "pool")}), spec.target)
    out = tvm.runtime.tensor(np.zeros_like(ref))
    lib["pool"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), ref)
