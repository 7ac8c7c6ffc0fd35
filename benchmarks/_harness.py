"""Benchmark scripts' entry: quiet thread pools before numpy/torch/tvm load, then the package's timing
helpers (tvm_scalpel.bench) and the results folder.
"""

from __future__ import annotations

import os
from pathlib import Path

# Same values as tvm_scalpel.bench.QUIET_POOLS, which cannot be imported before the pools load.
for _k, _v in (("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_THREAD_TIMEOUT", "4"),
               ("TVM_THREAD_POOL_SPIN_COUNT", "0")):
    os.environ.setdefault(_k, _v)
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from tvm_scalpel.bench import (CacheFlusher, Variant, provenance, run_interleaved,  # noqa: E402,F401
                               stats_us, write_json)

RESULTS = Path(__file__).resolve().parent / "results"
