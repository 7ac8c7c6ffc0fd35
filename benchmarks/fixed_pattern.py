"""Is a group-sparse kernel specialised to one fixed pattern (indices baked in) faster on this CPU?

The library's group_sparse_nt takes col_idx/row_ptr as runtime buffers. This script generates the
alternative — every kept group unrolled, its column a constant in the code — and times both,
interleaved, warm and cold. Result on znver4 (benchmarks/results/fixed_pattern.json): no faster —
equal within noise warm (9.9 vs 10.0 us for 100x304, 14.7 vs 15.2 us for 300x784 at 10 % groups), a
little slower cold — while the build takes 19 s for 1.5k groups (13 min for 6.5k) and the code grows with
the number of groups. The index loads are not the bottleneck; the values' memory traffic is. So the
library ships only the buffer-indexed kernel.

    python benchmarks/fixed_pattern.py
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import sys
import time
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_scalpel import formats as F  # noqa: E402
from tvm_scalpel import hardware_spec  # noqa: E402
from tvm_scalpel.schedules import CompiledKernel, cpu  # noqa: E402

ROWS_PER_TASK = 8


def fixed_pattern_source(g: F.GroupSparseMatrix) -> str:
    """TVMScript text of Y[1, m] = x · Wᵀ with g's pattern unrolled; only the values stay a buffer."""
    m, k = g.shape
    w = g.w
    slots = max(1, w * 4 // 16)
    out = [
        "@T.prim_func",
        f"def fixed(X: T.Buffer((1, {k}), 'float32'), V: T.Buffer(({max(g.n_groups, 1)}, {w}), 'float32'),"
        f" Y: T.Buffer((1, {m}), 'float32')):",
        "    T.func_attr({'global_symbol': 'fixed', 'tir.noalias': True})",
        f"    for c in T.parallel({-(-m // ROWS_PER_TASK)}):",
    ]
    for c in range(-(-m // ROWS_PER_TASK)):
        out += [f"        if c == {c}:",
                f"            p: T.let[T.handle] = T.tvm_stack_alloca('tvm_ffi_any', {slots})",
                f"            acc = T.decl_buffer(({w},), 'float32', data=p)"]
        for r in range(c * ROWS_PER_TASK, min(m, (c + 1) * ROWS_PER_TASK)):
            out += [f"            for l in T.vectorized({w}):", "                acc[l] = T.float32(0)"]
            for j in range(g.row_ptr[r], g.row_ptr[r + 1]):
                out += [f"            for l in T.vectorized({w}):",
                        f"                acc[l] = acc[l] + V[{j}, l] * X[0, {int(g.col_idx[j]) * w} + l]"]
            out.append(f"            Y[0, {r}] = " + " + ".join(f"acc[{i}]" for i in range(w)))
    return "\n".join(out)


def main() -> int:
    spec = hardware_spec("host")
    w = spec.lanes("float32")
    rng = np.random.default_rng(0)
    rows = []
    for m, k in ((100, 304), (300, 784)):
        weight = rng.standard_normal((m, k)).astype("float32")
        g = F.encode(weight, w, keep=rng.random((m, -(-k // w))) < 0.1)
        x = rng.standard_normal((1, k)).astype("float32")
        t0 = time.perf_counter()
        fixed = CompiledKernel(tvm.script.from_source(fixed_pattern_source(g)), spec)
        build_s = time.perf_counter() - t0
        general = CompiledKernel(cpu.group_sparse_nt(m, k, w, 1, spec), spec)
        ref = x @ g.to_dense().T
        np.testing.assert_allclose(fixed(x, g.values, out_shape=(1, m)), ref, rtol=1e-4, atol=1e-4)
        a1 = fixed.device_args(x, g.values, np.zeros((1, m), "float32"))
        a2 = general.device_args(x, g.values, g.col_idx, g.row_ptr, np.zeros((1, m), "float32"))
        variants = [H.Variant(key=("fixed_pattern",), fn=lambda: fixed.raw(*a1)),
                    H.Variant(key=("index_buffers",), fn=lambda: general.raw(*a2))]
        H.run_interleaved(variants, 20, cold=True)
        for v in variants:
            row = {"m": m, "k": k, "w": w, "groups": g.n_groups, "kernel": v.key[0],
                   "build_s": build_s if v.key[0] == "fixed_pattern" else None,
                   "warm": H.stats_us(v.warm), "cold": H.stats_us(v.cold)}
            rows.append(row)
            print(row, flush=True)
    H.write_json(H.RESULTS / "fixed_pattern.json",
                 {"provenance": H.provenance(spec.to_dict()["target"]), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
