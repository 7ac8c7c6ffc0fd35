"""The per-call floor of a compiled model: what `f(x)` costs from Python when the model does almost nothing.

A Relax model of one tiny op (relu of 1x10, returned in a tuple as torch.export's models are), built with
the bytecode VM and with the compiled VM (relax.build exec_mode="compiled", what tvm_scalpel.build uses on
the CPU), plus LeNet-300-100 dense (random weights: timing depends on shapes only) both ways, and any
libraries given with --lib (e.g. from `scalpel compile`). Timed as `scalpel bench` times compiled models:
exported libraries interleaved in a child process with TVM's pool spinning (tvm_scalpel.bench).

    python benchmarks/call_floor.py [--lib NAME=PATH ...] [--out call_floor.json]   # in benchmarks/results/
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_scalpel import bench, hardware_spec  # noqa: E402
from tvm_scalpel.models import build_model  # noqa: E402
from tvm_scalpel.pipeline import pipeline  # noqa: E402

MODES = ("bytecode", "compiled")


def _one_op() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 10), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.nn.relu(x))
        bb.emit_func_output(relax.Tuple([out]))
    return bb.get()


def _lenet_dense() -> tvm.IRModule:
    model = build_model("lenet-300-100").eval()
    return from_exported_program(torch.export.export(model, (model.example_input(1),)))


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    out = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", default=[], metavar="NAME=PATH",
                    help="an exported Relax library taking one [1, 1, 28, 28] input (repeatable)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="child processes, each with its own interleaved rounds")
    ap.add_argument("--out", default="call_floor.json", help="file name in benchmarks/results/")
    args = ap.parse_args(argv)
    spec = hardware_spec("host")
    rng = np.random.default_rng(0)
    inputs = {"one-op": rng.standard_normal((1, 10)).astype("float32"),
              "lenet-300-100-dense": rng.standard_normal((1, 1, 28, 28)).astype("float32")}
    items = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, mod in (("one-op", _one_op()), ("lenet-300-100-dense", _lenet_dense())):
            for mode in MODES:
                path = Path(tmp) / f"{name}-{mode}.so"
                relax.build(mod, spec.target, relax_pipeline=pipeline(spec.target), exec_mode=mode).export_library(
                    str(path))
                items.append(bench.TimedLibrary((name, mode), path, inputs[name], _outputs(path, inputs[name])))
        for entry in args.lib:
            name, _, path = entry.partition("=")
            x = inputs["lenet-300-100-dense"]
            items.append(bench.TimedLibrary((name, "given"), Path(path), x, _outputs(Path(path), x)))
        runs = [bench.time_libraries(items, args.rounds, seed=r) for r in range(args.repeats)]
    rows = [{"library": k[0], "vm": k[1], "median_us": [run[k]["median_us"] for run in runs],
             "p10_us": [run[k]["p10_us"] for run in runs], "p90_us": [run[k]["p90_us"] for run in runs]}
            for k in runs[0]]
    for row in rows:
        print(f"{row['library']:>24} {row['vm']:>8}: " + ", ".join(f"{m:.2f}" for m in row["median_us"]) + " us")
    H.write_json(H.RESULTS / args.out, {
        "what": "per-call time of compiled Relax models from Python, f = vm['main'] looked up once; medians per "
                "child process (TVM pool spinning), libraries interleaved",
        "rounds": args.rounds, "provenance": bench.provenance(spec.to_dict()["target"]), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
