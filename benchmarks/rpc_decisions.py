"""Profiling through TVM RPC gives the same per-layer decisions as profiling in this process.

    python benchmarks/rpc_decisions.py            # the full CPU-recipe LeNet-300-100, batches 1 and 16

Starts a TVM RPC tracker and server as separate processes on 127.0.0.1 (as on a remote board: the
kernels are compiled here, exported, uploaded and timed by the server), profiles the layer shapes of
the Scalpel-pruned LeNet-300-100 (the finished ``lenet-300-100/cpu`` recipe in
benchmarks/results/tmp/training/, see train_recipes.py) both ways with the CLI's full sparsity grid and
no cache, decides, and writes results/rpc_decisions.{json,md}: both profiles, both plans, equal or not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _harness import RESULTS, provenance, write_json

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = RESULTS / "tmp" / "training"
GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)  # as `scalpel run` (not --quick)


def _start(args: list[str]) -> subprocess.Popen:
    from tvm_scalpel.profiling import start_rpc_process

    return start_rpc_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _connect(port: int, key: str, timeout_s: float = 60.0):
    from tvm_scalpel.profiling import RPCRunner

    deadline = time.time() + timeout_s
    while True:
        try:
            return RPCRunner("127.0.0.1", port, key)
        except Exception:  # the server registers with the tracker a moment after it starts
            if time.time() > deadline:
                raise
            time.sleep(1.0)


def _pruned_module(batch: int):
    from tvm_scalpel.sources import resolve
    from tvm_scalpel.training import get_recipe, run_recipe
    from tvm_scalpel.training.loop import is_finished

    recipe = get_recipe("lenet-300-100/cpu")
    ckpt = CHECKPOINTS / "lenet-300-100__cpu"
    if not is_finished(ckpt):
        sys.exit(f"{ckpt} holds no finished recipe: run `python benchmarks/train_recipes.py --threads 1 "
                 "--recipes lenet-300-100/cpu` first (about 30 min)")
    model = run_recipe(recipe, checkpoint_dir=ckpt).model.eval()
    return resolve("lenet-300-100").relax(batch, model, (1, 28, 28)), recipe.name


def main() -> int:
    from tvm_scalpel import hardware_spec
    from tvm_scalpel.plan import decide
    from tvm_scalpel.profiling import layer_shapes, profile, stop_rpc_process

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--port", type=int, default=9190)
    args = p.parse_args()
    spec, key = hardware_spec("host"), "scalpel-bench"
    rows, same, children = [], True, []
    try:  # whatever has started is stopped, even if the next start or an interrupt fails in between
        children.append(_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(args.port),
                                "--port-end", str(args.port + 1)]))
        children.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--tracker",
                                f"127.0.0.1:{args.port}", "--key", key]))
        runner = _connect(args.port, key)
        for batch in args.batches:
            mod, recipe = _pruned_module(batch)
            shapes = layer_shapes(mod)
            kw = dict(sparsities=GRID, number=20, repeat=5)
            local, remote = profile(spec, shapes, **kw), profile(spec, shapes, runner=runner, **kw)
            plans = {"local": decide(mod, spec, local), "rpc": decide(mod, spec, remote)}
            equal = [d.method for d in plans["local"].layers] == [d.method for d in plans["rpc"].layers]
            same &= equal
            rows.append({"batch": batch, "recipe": recipe, "same_decisions": equal,
                         "layers": [{"key": ld.key, "reached": ld.reached_sparsity,
                                     "local": {"method": ld.method.value, "crossover": ld.crossover,
                                               "dense_us": lp.dense_us, "sparse_us": lp.sparse_us},
                                     "rpc": {"method": rd.method.value, "crossover": rd.crossover,
                                             "dense_us": rp.dense_us, "sparse_us": rp.sparse_us}}
                                    for ld, rd, lp, rp in zip(plans["local"].layers, plans["rpc"].layers,
                                                              local.layers, remote.layers)]})
    finally:
        for child in reversed(children):  # the server first, then its tracker
            stop_rpc_process(child)
    result = {"model": "lenet-300-100", "sparsities": GRID, "same_decisions": same, "batches": rows,
              "provenance": provenance(spec.to_dict()["target"])}
    write_json(RESULTS / "rpc_decisions.json", result)
    lines = ["# Profiling over TVM RPC vs in process: per-layer decisions", "",
             f"LeNet-300-100, recipe `lenet-300-100/cpu` (full), target {spec.cpu}; tracker and server as separate "
             f"processes on 127.0.0.1. Sparsity grid {list(GRID)}; crossover = lowest grid point from which the "
             "group-sparse kernel is ≥ 10 % faster at every higher one. `python benchmarks/rpc_decisions.py`.", "",
             f"**Same decisions: {'yes' if same else 'NO'}**", "",
             "| batch | layer | zeros reached | local: dense us / crossover / method | RPC: dense us / crossover / method |",
             "|---|---|---|---|---|"]
    for r in rows:
        for lay in r["layers"]:
            cells = [f"{lay[s]['dense_us']:.1f} / {lay[s]['crossover']} / {lay[s]['method']}" for s in ("local", "rpc")]
            lines.append(f"| {r['batch']} | {lay['key']} | {lay['reached']:.1%} | {cells[0]} | {cells[1]} |")
    (RESULTS / "rpc_decisions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
