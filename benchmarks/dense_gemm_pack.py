"""Our dense conv GEMM with and without packing D's column block (cpu.dense_gemm_packs decides).

`dense_gemm` walks a block of 48 columns of D[k, n] for every tile of 8 weight rows. D's row stride is n
floats; at a multiple of 1 KiB (NIN's 1024 and 256 pixels) the block's rows share a few cache sets and
evict each other, and packing the block into a contiguous scratch first avoids that, at the price of one copy
per block. This times both variants on the conv GEMM shapes of the reference models (batch 1 and a few
of batch 16), interleaved for ``--rounds`` rounds in a timing child with TVM's pool spinning as deployed
(profiling.ChildRunner), and writes results/dense_gemm_pack.{json,md}: per shape the medians, the
per-round ratio unpacked / packed (median, p10-p90) and what the rule chose.

    python benchmarks/dense_gemm_pack.py [--rounds 7]
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_scalpel import hardware_spec
from tvm_scalpel.profiling import ChildRunner
from tvm_scalpel.schedules import CompiledKernel, cpu

# (model and layer, m, k, n): the conv GEMMs O[m, n] = W[m, k] · im2col[k, n].
SHAPES = (
    ("NIN conv1 b1", 192, 75, 1024), ("NIN cccp1 b1", 160, 192, 1024), ("NIN conv2 b1", 192, 2400, 256),
    ("NIN cccp3 b1", 192, 192, 256), ("NIN conv3 b1", 192, 1728, 64), ("NIN pruned conv2 b1", 173, 2150, 256),
    ("NIN pruned conv3 b16", 173, 1557, 1024), ("NIN pruned conv2 b16", 173, 2150, 4096),
    ("AlexNet conv1 b1", 96, 363, 3025), ("AlexNet conv2 (a group) b1", 128, 1200, 729),
    ("AlexNet conv3 b1", 384, 2304, 169), ("AlexNet conv4 (a group) b1", 192, 1728, 169),
    ("AlexNet conv5 (a group) b1", 128, 1728, 169), ("ConvNet conv1 b1", 32, 75, 1024),
    ("ConvNet conv2 b1", 32, 800, 256), ("ConvNet conv3 b1", 64, 800, 64), ("LeNet-5 conv1 b1", 20, 25, 576),
    ("LeNet-5 conv2 b1", 50, 500, 64),
)


def _time(runner, kernel, args, macs: int) -> float:
    return runner.time_us(kernel, args, number=5 if macs > 1e8 else 20, repeat=3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    spec = hardware_spec("host")
    rng = np.random.default_rng(0)
    child = ChildRunner()
    rows = []
    try:
        for name, m, k, n in SHAPES:
            arrays = (rng.standard_normal((m, k), dtype="float32"), rng.standard_normal((k, n), dtype="float32"),
                      np.zeros((m, n), "float32"))
            kernels = {p: CompiledKernel(cpu.dense_gemm(m, k, n, spec, pack=p), spec) for p in (False, True)}
            plain, packed = [], []
            for _ in range(args.rounds):
                plain.append(_time(child, kernels[False], arrays, m * k * n))
                packed.append(_time(child, kernels[True], arrays, m * k * n))
            ratio = np.array(plain) / np.array(packed)
            rows.append({"layer": name, "m": m, "k": k, "n": n, "packs": cpu.dense_gemm_packs(m, k, n),
                         "plain_us": float(np.median(plain)), "packed_us": float(np.median(packed)),
                         "ratio_median": float(np.median(ratio)), "ratio_p10": float(np.percentile(ratio, 10)),
                         "ratio_p90": float(np.percentile(ratio, 90))})
            r = rows[-1]
            print(f"{name:>28} {m}x{k}·{k}x{n}: plain {r['plain_us']:8.0f} us, packed {r['packed_us']:8.0f} us, "
                  f"x{r['ratio_median']:.2f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}), rule packs: {r['packs']}",
                  flush=True)
    finally:
        child.close()
    H.write_json(H.RESULTS / "dense_gemm_pack.json", {
        "what": "cpu.dense_gemm with pack=False / pack=True, interleaved per round in a ChildRunner (pool spinning); "
                "ratio = plain / packed time per round (> 1: packing is faster)",
        "rounds": args.rounds, "rule": {"min_k": cpu.PACK_MIN_K, "min_rows": cpu.PACK_MIN_ROWS,
                                        "min_cols": cpu.PACK_MIN_COLS},
        "provenance": H.provenance(spec.to_dict()["target"]), "rows": rows})
    lines = ["# dense_gemm: packing D's column block or not", "",
             (f"`python benchmarks/dense_gemm_pack.py --rounds {args.rounds}`; ratio = unpacked / packed time, "
              "per round (> 1: packing is faster). The rule (`cpu.dense_gemm_packs`) packs from "
              f"k ≥ {cpu.PACK_MIN_K}, m ≥ {cpu.PACK_MIN_ROWS}, n ≥ {cpu.PACK_MIN_COLS}."), "",
             "| layer | m×k · k×n | unpacked µs | packed µs | ratio (p10-p90) | rule packs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['m']}×{r['k']} · {r['k']}×{r['n']} | {r['plain_us']:.0f} | {r['packed_us']:.0f} | "
              f"{r['ratio_median']:.2f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}) | {'yes' if r['packs'] else 'no'} |"
              for r in rows]
    (H.RESULTS / "dense_gemm_pack.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
