"""Honest timing: interleaved variants, medians with p10-p90, cache flushing, provenance.

The caller must make thread pools sleep when idle before numpy/torch/tvm load (``QUIET_POOLS``): on a
2-core machine three spinning pools (OpenBLAS, torch's OpenMP, TVM) double every interleaved timing.

Compiled models alone are timed in a child process with TVM's thread pool as deployed (spinning, the
default; ``time_libraries``). TVM reads its spin count once per process, and with sleeping workers every
parallel kernel pays a wake-up (about 20 us on a 2-vCPU VM), which only the dense models pay often.
"""

from __future__ import annotations

import datetime
import os
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# Environment that makes OpenBLAS, torch's OpenMP and TVM sleep as soon as they are idle.
QUIET_POOLS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4", "TVM_THREAD_POOL_SPIN_COUNT": "0"}
_FLUSH_BYTES = 96 << 20  # 3x a 32 MiB L3


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(target: dict | None = None) -> dict:
    """Machine, software and load facts recorded with every result."""
    import torch
    import tvm

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "git_sha": _git_sha(),
        "target": target,
        "threads": {k: os.environ.get(k) for k in
                    ("TVM_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT",
                     "TVM_THREAD_POOL_SPIN_COUNT")},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": torch.__version__, "tvm": tvm.__version__},
    }


class CacheFlusher:
    """Evicts caches between cold calls by *reading* a buffer three times the L3.

    Reading, not writing: a written buffer leaves up to an L3 (32 MiB) of dirty lines whose write-back
    is then charged to the timed call. Measured here (4096x4096 matvec, 90 % groups): 732 us cold
    after a write-flush, 364 us after a read-flush, while the dense 64 MiB matvec was unchanged.
    """

    def __init__(self, nbytes: int = _FLUSH_BYTES):
        self._buf = np.ones(nbytes // 8, dtype=np.float64)

    def __call__(self) -> float:
        return float(self._buf.sum())


@dataclass
class Variant:
    """One thing to time: ``fn`` runs it once."""

    key: tuple
    fn: Callable[[], object]
    number: int = 1
    warm: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)

    def calibrate(self, target_s: float = 2e-3) -> None:
        self.fn()
        t0 = time.perf_counter()
        self.fn()
        once = max(time.perf_counter() - t0, 1e-7)
        self.number = max(1, min(200, int(target_s / once)))


def run_interleaved(variants: list[Variant], rounds: int, cold: bool, seed: int = 0,
                    on_round: Callable[[int], object] | None = None) -> None:
    """Time every variant once per round, in a shuffled order each round (A B C, C A B, ...);
    ``on_round(done)`` after each round (progress)."""
    flush = CacheFlusher() if cold else None
    rng = np.random.default_rng(seed)
    for v in variants:
        v.calibrate()
    for r in range(rounds):
        for i in rng.permutation(len(variants)):
            v = variants[i]
            v.fn()
            t0 = time.perf_counter()
            for _ in range(v.number):
                v.fn()
            v.warm.append((time.perf_counter() - t0) / v.number)
            if flush is not None:
                flush()
                t0 = time.perf_counter()
                v.fn()
                v.cold.append(time.perf_counter() - t0)
        if on_round is not None:
            on_round(r + 1)


def stats_us(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e6
    return {"median_us": float(np.median(a)), "p10_us": float(np.percentile(a, 10)),
            "p90_us": float(np.percentile(a, 90)), "n": int(a.size)}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------ compiled models in a child
@dataclass(frozen=True)
class TimedLibrary:
    """An exported Relax VM library to time: its ``main`` on ``x`` must give ``expected`` exactly (the
    outputs the caller verified in-process), so the child times what was checked."""

    key: tuple
    library: Path
    x: np.ndarray
    expected: np.ndarray


def deployed_pool_env() -> dict[str, str]:
    """This process's environment with TVM's spin count back at its default (workers spin when idle)."""
    return {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}


def time_libraries(items: list[TimedLibrary], rounds: int, seed: int = 0, env: dict[str, str] | None = None,
                   on_round: Callable[[int], object] | None = None) -> dict[tuple, dict]:
    """Medians (``stats_us``) by key of the libraries' ``main``, interleaved in one child process run
    with ``env`` (default ``deployed_pool_env()``)."""
    with tempfile.TemporaryDirectory(prefix="scalpel-timing-") as tmp:
        tmp = Path(tmp)
        spec = {"rounds": rounds, "seed": seed, "result": str(tmp / "result.json"), "items": []}
        for i, it in enumerate(items):
            np.save(tmp / f"x{i}.npy", it.x)
            np.save(tmp / f"y{i}.npy", it.expected)
            spec["items"].append({"key": list(it.key), "library": str(it.library),
                                  "x": str(tmp / f"x{i}.npy"), "expected": str(tmp / f"y{i}.npy")})
        (tmp / "spec.json").write_text(json.dumps(spec))
        # stderr to a file: a pipe read only after stdout would block a child that fills it
        with open(tmp / "stderr.txt", "w") as err_file:
            proc = subprocess.Popen([sys.executable, "-m", "tvm_scalpel.bench", str(tmp / "spec.json")],
                                    env=deployed_pool_env() if env is None else env, stdout=subprocess.PIPE,
                                    stderr=err_file, text=True)
            for line in proc.stdout:
                if line.startswith("round ") and on_round is not None:
                    on_round(int(line.split()[1]))
            code = proc.wait()
        if code != 0:
            err = (tmp / "stderr.txt").read_text()
            raise RuntimeError(f"timing child process failed (exit {code}):\n{err[-3000:]}")
        result = json.loads(Path(spec["result"]).read_text())
    return {tuple(r["key"]): r["stats"] for r in result}


def _child_main(spec_path: str) -> int:
    import tvm
    from tvm import relax

    spec = json.loads(Path(spec_path).read_text())
    variants = []
    for it in spec["items"]:
        f = relax.VirtualMachine(tvm.runtime.load_module(it["library"]), tvm.cpu())["main"]
        xt = tvm.runtime.tensor(np.load(it["x"]))
        out = f(xt)
        got, want = (out if hasattr(out, "numpy") else out[0]).numpy(), np.load(it["expected"])
        if got.shape != want.shape or not np.array_equal(got, want):
            diff = np.abs(got - want).max() if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
            sys.exit(f"{it['library']}: its outputs differ from the ones verified before timing (max |diff| {diff})")
        variants.append(Variant(key=tuple(it["key"]), fn=lambda f=f, xt=xt: f(xt)))
    run_interleaved(variants, spec["rounds"], cold=False, seed=spec["seed"],
                    on_round=lambda r: print(f"round {r}", flush=True))
    write_json(Path(spec["result"]), [{"key": list(v.key), "stats": stats_us(v.warm)} for v in variants])
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
