"""Hardware profiling, Scalpel's first step: for each layer shape of a model, measure our dense kernel
against the group-sparse kernel over a sparsity sweep on the target, and record the sparsity from which
sparse wins. Results are cached as JSON keyed by the target and the kernel version.

Only the part that differs between the two is timed: the matrix-vector / GEMM kernel (a conv's im2col is
the same for both). Measurement runs in this process (``LocalRunner``), in a child process with TVM's
thread pool as deployed (``ChildRunner``, what ``scalpel`` uses on this machine), or on a remote device
through TVM's own RPC (``RPCRunner``: tracker + server). The last two compile kernels here, export and
upload them, and time them there with TVM's time evaluator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import tvm

from . import compat, formats
from .errors import PlanError
from .schedules import CompiledKernel, cpu
from .target import HardwareSpec

logger = logging.getLogger(__name__)

# Bump when a kernel changes: cached profiles of older kernels are then ignored.
KERNEL_VERSION = "cpu-6"  # cpu-5: timed with pools as deployed; cpu-6: dense_gemm packs long blocks of D
DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
# Sparse "wins" only when at least this much faster: near the crossover, timing noise would otherwise
# flip decisions from one profile to the next.
WIN_MARGIN = 0.10
# Each timed repeat runs at least this long (TVM raises ``number`` to fit): microsecond kernels are
# otherwise at the mercy of one context switch.
MIN_REPEAT_MS = 20


@dataclass(frozen=True)
class LayerShape:
    """A layer as its kernels see it: ``linear`` is Y[n, m] = X[n, k]·Wᵀ (n = batch), ``conv2d`` is the
    GEMM O[m, n] = W[m, k]·Cols[k, n] (n = batch · output pixels)."""

    kind: str
    m: int
    k: int
    n: int
    # The layer's key in the passes (passes._layers.layer_key) when taken from a model; not part of
    # equality: a profile measures kernel dimensions, whatever layer has them.
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv2d") or min(self.m, self.k, self.n) < 1:
            raise PlanError(f"LayerShape: expected kind 'linear'/'conv2d' and positive m, k, n; found {self}")


@dataclass(frozen=True)
class LayerProfile:
    shape: LayerShape
    w: int
    sparsities: tuple[float, ...]
    dense_us: float
    sparse_us: tuple[float, ...]

    @property
    def crossover(self) -> float | None:
        """The lowest swept sparsity from which the sparse kernel is faster (by ``WIN_MARGIN``) at every
        higher one."""
        wins = [s < self.dense_us * (1 - WIN_MARGIN) for s in self.sparse_us]
        for i in range(len(wins)):
            if all(wins[i:]):
                return self.sparsities[i]
        return None


@dataclass(frozen=True)
class HardwareProfile:
    target: str
    kernel_version: str
    layers: tuple[LayerProfile, ...]

    def for_shape(self, shape: LayerShape) -> LayerProfile:
        for lp in self.layers:
            if lp.shape == shape:
                return lp
        raise PlanError(f"no profile for {shape}; profiled: {[lp.shape for lp in self.layers]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        d = json.loads(text)
        layers = tuple(LayerProfile(shape=LayerShape(**lp["shape"]), w=lp["w"],
                                    sparsities=tuple(lp["sparsities"]), dense_us=lp["dense_us"],
                                    sparse_us=tuple(lp["sparse_us"])) for lp in d["layers"])
        return cls(target=d["target"], kernel_version=d["kernel_version"], layers=layers)


def _kernels(shape: LayerShape, w: int, spec: HardwareSpec):
    if shape.kind == "linear":
        return (cpu.dense_nt(shape.m, shape.k, shape.n, spec),
                cpu.group_sparse_nt(shape.m, shape.k, w, shape.n, spec))
    return (cpu.dense_gemm(shape.m, shape.k, shape.n, spec),
            cpu.group_sparse_gemm(shape.m, shape.k, w, shape.n, spec))


def _inputs(shape: LayerShape, rng) -> tuple[np.ndarray, np.ndarray]:
    weight = rng.standard_normal((shape.m, shape.k)).astype("float32")
    act = rng.standard_normal((shape.n, shape.k) if shape.kind == "linear" else (shape.k, shape.n))
    return weight, act.astype("float32")


class LocalRunner:
    """Times kernels in this process."""

    def time_us(self, kernel: CompiledKernel, arrays: Sequence[np.ndarray], number: int, repeat: int) -> float:
        args = kernel.device_args(*arrays)
        timer = compat.time_evaluator(kernel.executable, kernel.name, number=number, repeat=repeat,
                                      min_repeat_ms=MIN_REPEAT_MS)
        return float(np.median(timer(*args).results) * 1e6)


class RPCRunner:
    """Times kernels on a device registered with a TVM RPC tracker under ``key``."""

    def __init__(self, tracker_host: str, tracker_port: int, key: str, session_timeout: int = 600):
        from tvm import rpc

        self._attach(rpc.connect_tracker(tracker_host, tracker_port).request(
            key, priority=1, session_timeout=session_timeout))

    def _attach(self, remote) -> None:
        self._remote = remote
        self._loaded: dict[int, object] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="scalpel-rpc-")

    def _module(self, kernel: CompiledKernel):
        if id(kernel) not in self._loaded:
            name = f"{kernel.name}_{len(self._loaded)}.so"
            path = os.path.join(self._tmp.name, name)
            kernel.executable.export_library(path)
            self._remote.upload(path)
            self._loaded[id(kernel)] = (kernel, self._remote.load_module(name))
        return self._loaded[id(kernel)][1]

    def time_us(self, kernel: CompiledKernel, arrays: Sequence[np.ndarray], number: int, repeat: int) -> float:
        module = self._module(kernel)
        dev = self._remote.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        timer = module.time_evaluator(kernel.name, dev, number=number, repeat=repeat,
                                      min_repeat_ms=MIN_REPEAT_MS)
        return float(np.median(timer(*args).results) * 1e6)


def start_rpc_process(args: Sequence[str], **popen_kw) -> subprocess.Popen:
    """``python -m ARGS`` (TVM's rpc_server or rpc_tracker) in a process group of its own, so that
    ``stop_rpc_process`` can stop it with everything it starts; the group also ends itself if this
    process dies without stopping it (``tvm_scalpel.parent_guard``)."""
    return subprocess.Popen([sys.executable, "-m", "tvm_scalpel.parent_guard", str(os.getpid()), *args],
                            start_new_session=True, **popen_kw)


def stop_rpc_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop ``start_rpc_process``'s child and everything it started. TVM's rpc_server serves from a
    PopenWorker child that a SIGTERM to the server alone leaves running forever (400 MB, reparented to
    init), so the whole process group gets the signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever outlived the SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()  # a no-op once it has exited; ends a child that is not its group's leader
    proc.wait()


class ChildRunner(RPCRunner):
    """Times kernels in a child process (a TVM RPC server on 127.0.0.1, no tracker) whose thread pool
    spins when idle, as deployed (``bench.deployed_pool_env``). ``scalpel``'s own process keeps its pools
    asleep for timing PyTorch beside TVM, and there each parallel kernel would pay a worker wake-up (about
    20 us on a 2-vCPU VM) that a deployed model does not. ``close()`` stops the child."""

    def __init__(self, timeout_s: float = 60.0):
        from .bench import deployed_pool_env

        with socket.socket() as sock:  # a free port (the server binds it a moment later)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Its log goes to a file: an unread pipe would block the server once full.
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the child's lifetime; close() closes it)
        self._server = start_rpc_process(
            ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
            env=deployed_pool_env(), stdout=self._log, stderr=self._log)
        try:
            self._connect(port, timeout_s)
        except BaseException:  # Ctrl-C too: in its own session, the child does not get the terminal's SIGINT
            self.close()
            raise

    def _connect(self, port: int, timeout_s: float) -> None:
        from tvm import rpc

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._attach(rpc.connect("127.0.0.1", port, session_timeout=0))
                return
            except Exception as err:  # noqa: BLE001 (tvm raises TVMError/RuntimeError while it starts)
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    raise PlanError(f"profiling: the timing child (python -m tvm.exec.rpc_server on 127.0.0.1:"
                                    f"{port}) did not come up ({err}); its log:\n{self._log.read()[-2000:]}") from None
                time.sleep(0.2)

    def close(self) -> None:
        self._loaded, self._remote = {}, None
        if not self._log.closed:  # once: a second close must not signal a group id the system may reuse
            stop_rpc_process(self._server)
            self._log.close()


def measure_layer(shape: LayerShape, spec: HardwareSpec, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                  w: int | None = None, number: int = 20, repeat: int = 7, seed: int = 0,
                  runner: LocalRunner | RPCRunner | None = None) -> LayerProfile:
    """Time the dense kernel once and the group-sparse kernel at each sparsity (random group masks)."""
    w = w or spec.lanes("float32")
    runner = runner or LocalRunner()
    rng = np.random.default_rng(seed)
    weight, act = _inputs(shape, rng)
    dense_f, sparse_f = _kernels(shape, w, spec)
    dense, sparse = CompiledKernel(dense_f, spec), CompiledKernel(sparse_f, spec)
    out_shape = (shape.n, shape.m) if shape.kind == "linear" else (shape.m, shape.n)
    out = np.zeros(out_shape, "float32")
    dense_args = (act, weight, out) if shape.kind == "linear" else (weight, act, out)
    dense_us = runner.time_us(dense, dense_args, number, repeat)
    sparse_us = []
    for s in sparsities:
        keep = rng.random((shape.m, -(-shape.k // w))) >= s
        g = formats.encode(weight, w, keep=keep)
        enc = (g.values, g.col_idx, g.row_ptr)
        args = (act, *enc, out) if shape.kind == "linear" else (*enc, act, out)
        sparse_us.append(runner.time_us(sparse, args, number, repeat))
    prof = LayerProfile(shape=shape, w=w, sparsities=tuple(float(s) for s in sparsities),
                        dense_us=dense_us, sparse_us=tuple(sparse_us))
    logger.info("profile %s w=%d: dense %.1f us, sparse wins from %s", shape, w, dense_us, prof.crossover)
    return prof


def cache_path(spec: HardwareSpec, cache_dir: Path) -> Path:
    digest = hashlib.sha256((spec.target_json + KERNEL_VERSION).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"profile-{spec.cpu}-{digest}.json"


def profile(spec: HardwareSpec, shapes: Iterable[LayerShape], cache_dir: Path | None = None,
            measure: Callable[..., LayerProfile] = measure_layer, **kw) -> HardwareProfile:
    """Profiles for ``shapes`` on ``spec``'s target, reusing and extending the JSON cache if given."""
    cached: dict[LayerShape, LayerProfile] = {}
    path = cache_path(spec, cache_dir) if cache_dir else None
    if path is not None and path.exists():
        old = HardwareProfile.from_json(path.read_text())
        if old.kernel_version == KERNEL_VERSION and old.target == spec.target_json:
            cached = {lp.shape: lp for lp in old.layers}
    # A cached entry serves only a request for the same group width and sparsity grid.
    w = kw.get("w") or spec.lanes("float32")
    grid = tuple(float(s) for s in kw.get("sparsities", DEFAULT_SPARSITIES))
    layers = []
    for shape in dict.fromkeys(shapes):
        hit = cached.get(shape)
        usable = hit is not None and hit.w == w and hit.sparsities == grid
        layers.append(hit if usable else measure(shape, spec, **kw))
    result = HardwareProfile(target=spec.target_json, kernel_version=KERNEL_VERSION,
                             layers=tuple({**cached, **{lp.shape: lp for lp in layers}}.values()))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json())
    return HardwareProfile(target=result.target, kernel_version=result.kernel_version, layers=tuple(layers))


def layer_shapes(mod: tvm.IRModule, round_to: int = 1) -> list[LayerShape]:
    """The kernel shapes of every constant-weight Linear / Conv2d of a Relax module (in order), as the
    build will see them: after dead nodes are folded away."""
    return [shape for shape, _ in layers_with_weights(mod, round_to)]


def layers_with_weights(mod: tvm.IRModule, round_to: int = 1) -> list[tuple[LayerShape, np.ndarray]]:
    """(kernel shape, 2-D weight flattened per filter) of every constant-weight Linear / Conv2d, after
    SplitGroupedConv and FoldNodeMasks (the layers the kernels will run)."""
    from .passes._layers import Conv2d, LayerRewriter, Linear
    from .passes.fold_node_masks import FoldConfig, FoldNodeMasks
    from .passes.split_grouped_conv import SplitGroupedConv

    mod = FoldNodeMasks(FoldConfig(round_to=round_to))(SplitGroupedConv()(mod))

    found: list[LayerShape] = []
    weights: list[np.ndarray] = []

    @tvm.relax.expr_functor.mutator
    class _Collect(LayerRewriter):
        def rewrite_linear(self, layer: Linear):
            found.append(LayerShape("linear", layer.weight.shape[0], layer.weight.shape[1], layer.batch,
                                    layer.key))
            weights.append(layer.weight)

        def rewrite_conv2d(self, layer: Conv2d):
            oc = layer.weight.shape[0]
            k = int(np.prod(layer.weight.shape[1:]))
            found.append(LayerShape("conv2d", oc, k, layer.shape[0] * layer.out_hw[0] * layer.out_hw[1],
                                    layer.key))
            weights.append(formats.flatten_per_filter(layer.weight))

    collector = _Collect(mod)
    for _, func in mod.functions_items():
        if isinstance(func, tvm.relax.Function):
            collector.visit_expr(func)
    return list(zip(found, weights))
