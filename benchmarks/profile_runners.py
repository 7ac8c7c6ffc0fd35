"""Profiling in scalpel's own process vs in a timing child (profiling.ChildRunner), for the same layer.

`scalpel` keeps TVM's thread pool asleep in its own process (so that PyTorch can be timed beside it);
a deployed model's pool spins. A parallel kernel timed with sleeping workers pays their wake-up on every
call, which moves the dense/sparse crossover. This script profiles the layer shapes of pruned
LeNet-300-100's fc1 (145 kept of 300 nodes, 784 inputs) at batches 1 and 16 with both runners, the CLI's
full sparsity grid, alternating runners for ``--repeats`` rounds, and writes
results/profile_runners.json: dense and sparse times and the crossover per runner and round.

    python benchmarks/profile_runners.py [--repeats 3]
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_scalpel import hardware_spec  # noqa: E402
from tvm_scalpel.profiling import ChildRunner, LayerShape, LocalRunner, measure_layer  # noqa: E402

GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)  # as `scalpel run` (not --quick)
SHAPES = (LayerShape("linear", 145, 784, 1), LayerShape("linear", 145, 784, 16))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    spec = hardware_spec("host")
    child = ChildRunner()
    rows = []
    try:
        for r in range(args.repeats):
            for shape in SHAPES:
                for name, runner in (("in-process (sleeping pool)", LocalRunner()), ("child (spinning pool)", child)):
                    p = measure_layer(shape, spec, sparsities=GRID, seed=r, runner=runner)
                    rows.append({"round": r, "runner": name, "shape": asdict(shape), "w": p.w,
                                 "dense_us": p.dense_us, "sparse_us": dict(zip(map(str, GRID), p.sparse_us)),
                                 "crossover": p.crossover})
                    print(f"round {r} n={shape.n:>2} {name:>27}: dense {p.dense_us:6.1f} us, sparse at 50 % "
                          f"{p.sparse_us[GRID.index(0.5)]:6.1f} us, crossover {p.crossover}")
    finally:
        child.close()
    H.write_json(H.RESULTS / "profile_runners.json", {
        "what": "profiling.measure_layer of one layer shape with LocalRunner (this process; TVM pool asleep, as in "
                "scalpel's own process) and ChildRunner (an RPC server child whose pool spins, as deployed); "
                "medians of time_evaluator repeats in microseconds",
        "grid": GRID, "provenance": H.provenance(spec.to_dict()["target"]), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
