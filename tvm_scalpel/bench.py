"""Honest timing: interleaved variants, medians with p10-p90, cache flushing, provenance.

The caller must make thread pools sleep when idle before numpy/torch/tvm load (``QUIET_POOLS``): on a
2-core machine three spinning pools (OpenBLAS, torch's OpenMP, TVM) double every interleaved timing.
"""

from __future__ import annotations

import datetime
import os
import json
import platform
import subprocess
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
