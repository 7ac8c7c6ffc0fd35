"""Hardware profiling: crossover logic, real measurement structure, and the JSON cache."""

from pathlib import Path

import pytest

from tvm_scalpel import PlanError
from tvm_scalpel.profiling import (KERNEL_VERSION, HardwareProfile, LayerProfile, LayerShape, cache_path,
                                   measure_layer, profile)


def _lp(dense, sparse, sparsities=(0.0, 0.5, 0.7, 0.9)):
    return LayerProfile(shape=LayerShape("linear", 8, 16, 1), w=16, sparsities=sparsities, dense_us=dense,
                        sparse_us=tuple(sparse))


def test_crossover_is_where_sparse_wins_for_good():
    assert _lp(10, [12, 8, 6, 3]).crossover == 0.5
    assert _lp(10, [12, 8, 11, 3]).crossover == 0.9  # a loss at 70 % moves it up
    assert _lp(10, [12, 9.5, 6, 3]).crossover == 0.7  # 5 % faster is within noise: not a win
    assert _lp(10, [12, 11, 11, 10.5]).crossover is None
    assert _lp(10, [5, 4, 3, 2]).crossover == 0.0


def test_measure_layer_real_kernels(host_spec):
    prof = measure_layer(LayerShape("linear", 64, 256, 1), host_spec, sparsities=(0.0, 0.9),
                         number=5, repeat=3)
    assert prof.w == host_spec.lanes() and prof.dense_us > 0 and len(prof.sparse_us) == 2
    assert all(t > 0 for t in prof.sparse_us)
    conv = measure_layer(LayerShape("conv2d", 16, 75, 64), host_spec, sparsities=(0.5,), number=5, repeat=3)
    assert conv.dense_us > 0 and conv.sparse_us[0] > 0


def test_cache_round_trip_and_reuse(host_spec, tmp_path):
    calls = []

    def fake_measure(shape, spec, **kw):
        calls.append(shape)
        return LayerProfile(shape=shape, w=spec.lanes(), sparsities=(0.0, 0.9), dense_us=10.0,
                            sparse_us=(12.0, 2.0))

    a, b = LayerShape("linear", 300, 784, 1), LayerShape("conv2d", 50, 500, 64)
    first = profile(host_spec, [a, b, a], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.9))
    assert calls == [a, b] and [lp.shape for lp in first.layers] == [a, b]
    again = profile(host_spec, [b], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.9))
    assert calls == [a, b]  # served from the cache
    assert again.for_shape(b).crossover == 0.9
    text = cache_path(host_spec, tmp_path).read_text()
    assert HardwareProfile.from_json(text).kernel_version == KERNEL_VERSION
    with pytest.raises(PlanError, match="no profile"):
        again.for_shape(a)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(PlanError, match="expected kind"):
        LayerShape("pool", 1, 1, 1)


def test_layer_shapes_of_an_imported_model():
    import torch

    from test_pass_rewrite_group_sparse import ConvNet, _import
    from tvm_scalpel.profiling import layer_shapes

    shapes = layer_shapes(_import(ConvNet().eval(), torch.randn(2, 1, 28, 28), "export"))
    assert shapes == [LayerShape("conv2d", 20, 25, 2 * 24 * 24, "conv2d:20x1x5x5"),
                      LayerShape("conv2d", 50, 500, 2 * 8 * 8, "conv2d:50x20x5x5"),
                      LayerShape("conv2d", 32, 450, 2 * 2 * 2, "conv2d:32x50x3x3"),
                      LayerShape("linear", 10, 128, 2, "linear:10x128")]


def test_profiling_over_rpc_gives_the_local_decisions(host_spec):
    """A TVM RPC tracker and server on 127.0.0.1; a pruned LeNet-300-100 profiled through them and
    locally must get the same per-layer decisions."""
    import torch
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    from test_pass_rewrite_group_sparse import MLP, _group_prune, _import
    from tvm_scalpel.plan import decide
    from tvm_scalpel.profiling import RPCRunner, layer_shapes

    # fc1, fc2 at ~95 % zero groups (as a pruned LeNet-300-100); the sweep reaches 90 %, where the sparse
    # kernel is ~3x faster: at 80 % it was only 1.2-2x on this 2-core machine, and a loaded run flipped fc1
    # to dense. The decisions must not hinge on noise at a grid point. fc3 stays dense.
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.05)
    mod = _import(model, torch.randn(1, 784), "export")
    shapes = layer_shapes(mod)
    kw = dict(sparsities=(0.0, 0.5, 0.9), number=5, repeat=3)
    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    server = Server("127.0.0.1", port=9300, port_end=9400, key="scalpel-test",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        runner = RPCRunner("127.0.0.1", tracker.port, "scalpel-test")
        remote = profile(host_spec, shapes, runner=runner, **kw)
    finally:
        server.terminate()
        tracker.terminate()
    local = profile(host_spec, shapes, **kw)
    assert [lp.shape for lp in remote.layers] == shapes
    remote_plan, local_plan = decide(mod, host_spec, remote), decide(mod, host_spec, local)
    assert [d.method for d in remote_plan.layers] == [d.method for d in local_plan.layers]
    assert [d.method.value for d in remote_plan.layers] == ["group", "group", "dense"]


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_child_runner_times_with_deployed_pools_and_gives_the_local_decisions(host_spec, monkeypatch):
    """`scalpel`'s own process keeps TVM's pool asleep; its profiles are timed in a child whose pool spins
    as deployed (no TVM_THREAD_POOL_SPIN_COUNT in its environment), with the same decisions here."""
    import torch
    from test_pass_rewrite_group_sparse import MLP, _group_prune, _import

    from tvm_scalpel.plan import decide
    from tvm_scalpel.profiling import ChildRunner, layer_shapes

    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "0")
    model = _group_prune(MLP().eval(), host_spec.lanes(), 0.05)
    mod = _import(model, torch.randn(1, 784), "export")
    shapes = layer_shapes(mod)
    kw = {"sparsities": (0.0, 0.5, 0.9), "number": 5, "repeat": 3}
    runner = ChildRunner()
    try:
        pid = runner._server.pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"TVM_THREAD_POOL_SPIN_COUNT=") for e in environ)
        # TVM's rpc_server serves from a PopenWorker child; a SIGTERM to the server alone left it running.
        workers = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert workers
        child = profile(host_spec, shapes, runner=runner, **kw)
    finally:
        runner.close()
    assert runner._server.poll() is not None  # closed: the child is gone, and the worker it started
    assert not [w for w in workers if _running(w)]
    assert [lp.shape for lp in child.layers] == shapes
    assert [d.method.value for d in decide(mod, host_spec, child).layers] == ["group", "group", "dense"]


def test_cache_is_not_reused_for_another_grid_or_width(host_spec, tmp_path):
    calls = []

    def fake_measure(shape, spec, sparsities=(0.0, 0.9), w=None, **kw):
        calls.append((sparsities, w))
        return LayerProfile(shape=shape, w=w or spec.lanes(), sparsities=tuple(sparsities), dense_us=10.0,
                            sparse_us=tuple(5.0 for _ in sparsities))

    a = LayerShape("linear", 300, 784, 1)
    profile(host_spec, [a], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.9))
    profile(host_spec, [a], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.9))
    assert len(calls) == 1
    profile(host_spec, [a], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.5, 0.9))
    profile(host_spec, [a], cache_dir=tmp_path, measure=fake_measure, sparsities=(0.0, 0.9), w=4)
    assert len(calls) == 3


def test_child_runner_that_does_not_come_up_is_a_clear_error():
    """No time to start (the server imports TVM for seconds): a PlanError naming the child, and it is gone."""
    from tvm_scalpel.profiling import ChildRunner

    with pytest.raises(PlanError, match=r"profiling: the timing child \(python -m tvm.exec.rpc_server on "
                                        r"127\.0\.0\.1:\d+\) did not come up"):
        ChildRunner(timeout_s=0.0)


def test_child_runner_interrupted_while_starting_stops_its_child(monkeypatch):
    """Ctrl-C while the child starts: the child runs in its own session (no terminal SIGINT reaches it),
    so the runner must stop it before the interrupt goes on."""
    from tvm_scalpel import profiling

    started = []

    def start(*args, **kw):
        started.append(real_start(*args, **kw))
        return started[-1]

    def interrupted(self, port, timeout_s):
        raise KeyboardInterrupt

    real_start = profiling.start_rpc_process
    monkeypatch.setattr(profiling, "start_rpc_process", start)
    monkeypatch.setattr(profiling.ChildRunner, "_connect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profiling.ChildRunner()
    assert started[0].poll() is not None


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a container's PID 1 may never reap them)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_timing_child_ends_when_its_parent_is_killed(tmp_path):
    """A parent killed outright (SIGKILL: no close(), no finally) must not leave the timing child, a TVM
    rpc_server and its PopenWorker in a session of their own, running forever."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text("import time\nfrom tvm_scalpel.profiling import ChildRunner\n"
                      "r = ChildRunner()\nprint(r._server.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(parent.stdout.readline())  # the server leads its own group
        assert _live_members(pgid), "the timing child is not running"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_members(pgid), f"orphans of the killed parent still run: {_live_members(pgid)}"


def test_parent_guard_says_how_to_call_it():
    from tvm_scalpel import parent_guard

    with pytest.raises(SystemExit, match="PARENT_PID MODULE"):
        parent_guard.main(["tvm.exec.rpc_server"])
