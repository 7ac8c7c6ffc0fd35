"""bench.time_libraries: compiled models timed in a child process with TVM's pool as deployed."""

import os

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_scalpel import bench, build, hardware_spec


@pytest.fixture(scope="module")
def matmul_library(tmp_path_factory):
    """A 64x256 @ 256x128 Relax model through our pipeline, exported as a shared library."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 256), "float32"))
    w = np.random.default_rng(0).standard_normal((256, 128)).astype("float32")
    with bb.function("main", [x]):
        out = bb.emit(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    path = tmp_path_factory.mktemp("lib") / "matmul.so"
    build(bb.get(), hardware_spec("host").target).export_library(str(path))
    xv = np.random.default_rng(1).standard_normal((64, 256)).astype("float32")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    return path, xv, vm["main"](tvm.runtime.tensor(xv)).numpy(), xv @ w


def test_child_times_every_library_and_checks_its_outputs(matmul_library):
    path, x, out, ref = matmul_library
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    rounds = []
    items = [bench.TimedLibrary(("a", 1), path, x, out), bench.TimedLibrary(("b", 1), path, x, out)]
    med = bench.time_libraries(items, rounds=3, on_round=rounds.append)
    assert rounds == [1, 2, 3]  # progress streamed from the child
    assert set(med) == {("a", 1), ("b", 1)}
    for s in med.values():
        assert s["n"] == 3 and 0 < s["p10_us"] <= s["median_us"] <= s["p90_us"]


def test_child_refuses_a_library_that_gives_other_outputs(matmul_library):
    path, x, out, _ = matmul_library
    wrong = out.copy()
    wrong[0, 0] += 1.0
    with pytest.raises(RuntimeError, match=r"matmul.so: its outputs differ from the ones verified before timing "
                                           r"\(max \|diff\| 1\.0"):
        bench.time_libraries([bench.TimedLibrary(("a", 1), path, x, wrong)], rounds=1)


def test_deployed_pools_spin(monkeypatch):
    """The child runs without the quiet-pools spin count of 0, so TVM's workers spin as deployed."""
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "0")
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    env = bench.deployed_pool_env()
    assert "TVM_THREAD_POOL_SPIN_COUNT" not in env and env["TVM_NUM_THREADS"] == "2"
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "0"  # this process unchanged
