"""The ``scalpel`` command: hardware-aware pruning of a reference model, end to end, on the host CPU.

examples:
  scalpel run lenet-300-100 --target host --quick      # train, prune, profile, decide, compile, verify, time
  scalpel run lenet-5 --target host                    # the paper's full CPU recipe (hours on 2 cores)
  scalpel profile lenet-300-100 --target host          # dense vs group-sparse crossover per layer shape

``run`` trains (or resumes from checkpoints) the recipe of the target's hardware class, profiles the
pruned model's layer shapes on the target, decides per layer (group-sparse where profiling says it pays),
compiles with tvm_scalpel.build, checks the compiled outputs against the pruned PyTorch model on real test
images, and times the compiled dense model against the compiled Scalpel model, interleaved in one
process. Not yet here: traditional-pruning timings, PyTorch-eager columns, the train/prune/compile/bench/
report sub-commands, plots, MCU and GPU targets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .bench import QUIET_POOLS


def _quiet_pools_or_reexec(argv: list[str]) -> None:
    """Thread pools must sleep when idle (see tvm_scalpel.bench), which they read when they load:
    numpy/torch/tvm are loaded already here, so re-execute once with the variables in place."""
    if all(os.environ.get(k) == v for k, v in QUIET_POOLS.items()) or os.environ.get("SCALPEL_NO_REEXEC"):
        return
    env = dict(os.environ, **QUIET_POOLS, SCALPEL_NO_REEXEC="1")
    env.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    os.execve(sys.executable, [sys.executable, "-m", "tvm_scalpel.cli", *argv], env)


PAPER_CPU = {  # Scalpel's CPU results (speedup, size %): Yu et al., ISCA 2017, Table "CPU"
    "lenet-300-100": (6.86, 7.08), "lenet-5": (4.15, 5.20), "convnet": (1.58, 44.28),
    "nin": (1.22, 81.16), "alexnet": (2.20, 13.06),
}


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="scalpel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "train, prune, profile, compile, verify and time a model"),
                           ("profile", "profile the model's layer shapes on the target")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("model", help="a reference model: lenet-300-100, lenet-5, convnet")
        c.add_argument("--target", default="host", help="'host' or an llvm target dict as JSON (default host)")
        c.add_argument("--quick", action="store_true", help="the quick recipe and a short profile (minutes)")
        c.add_argument("--out", default="scalpel-out", help="folder for checkpoints, profiles and the report")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--batches", type=int, nargs="+", default=[1, 16])
        c.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    return p


def _target(text: str):
    import json

    return json.loads(text) if text.strip().startswith("{") else text


def _relax(model, x):
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(torch.export.export(model, (x,)))


def _profile(args, spec, mod):
    from .profiling import layer_shapes, profile

    sparsities = (0.0, 0.5, 0.7, 0.9) if args.quick else (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
    return profile(spec, layer_shapes(mod), cache_dir=os.path.join(args.out, "profiles"),
                   sparsities=sparsities, number=10 if args.quick else 20, repeat=5)


def cmd_profile(args) -> int:
    from . import hardware_spec
    from .models import build_model

    spec = hardware_spec(_target(args.target))
    model = build_model(args.model).eval()
    for batch in args.batches:
        prof = _profile(args, spec, _relax(model, model.example_input(batch)))
        for lp in prof.layers:
            print(f"{args.model} batch {batch} {lp.shape.key or lp.shape}: dense {lp.dense_us:.1f} us, "
                  f"sparse wins from {lp.crossover}")
    return 0


def cmd_run(args) -> int:
    import json

    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from . import bench, build, hardware_spec
    from .errors import TargetError
    from .models import build_model
    from .plan import decide
    from .training.loop import load_data, run_recipe
    from .training.recipes import get_recipe

    torch.manual_seed(args.seed)
    spec = hardware_spec(_target(args.target))
    if spec.hardware_class.value != "cpu":
        raise TargetError(f"scalpel run: only CPU targets are wired up yet, found {spec.hardware_class.value}")
    name = f"{args.model}/cpu" + ("/quick" if args.quick else "")
    recipe = get_recipe(name, target=_target(args.target))
    result = run_recipe(recipe, checkpoint_dir=os.path.join(args.out, "checkpoints", name.replace("/", "__")))
    pruned = result.model.eval()
    dense = build_model(args.model).eval()  # latency of the dense architecture; weights do not matter
    _, test = load_data(recipe)
    rows, variants = [], []
    for batch in args.batches:
        x = test.transform(test.images[:batch])
        mod = _relax(pruned, x)
        plan = decide(mod, spec, _profile(args, spec, mod))
        ex_s = build(mod, spec.target, plan.compile_plan())
        ex_d = build(_relax(dense, x), spec.target)
        vm_s, vm_d = relax.VirtualMachine(ex_s, tvm.cpu()), relax.VirtualMachine(ex_d, tvm.cpu())
        xt = tvm.runtime.tensor(x.numpy())
        with torch.no_grad():
            ref = pruned(x).numpy()
        got = vm_s["main"](xt)[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))

        variants += [bench.Variant(key=(batch, "dense"), fn=lambda vm=vm_d, xt=xt: vm["main"](xt)),
                     bench.Variant(key=(batch, "scalpel"), fn=lambda vm=vm_s, xt=xt: vm["main"](xt))]
        rows.append({"batch": batch, "decisions": [d.reason for d in plan.layers]})
    bench.run_interleaved(variants, args.rounds, cold=False, seed=args.seed)
    med = {v.key: bench.stats_us(v.warm)["median_us"] for v in variants}
    size = result.plan.size_ratio * 100
    paper = PAPER_CPU.get(args.model, (None, None))
    lines = [f"# scalpel run {args.model} --target {spec.cpu}" + (" --quick" if args.quick else ""),
             "", f"accuracy: dense {100 * (result.dense_accuracy or 0):.2f} % -> pruned "
             f"{100 * result.final_accuracy:.2f} % ({recipe.data.name})",
             f"size (values + indices + row pointers): {size:.2f} % of dense (paper: {paper[1]} %)", "",
             "| batch | dense compiled (us) | Scalpel compiled (us) | speedup | paper (batch 1) |",
             "|---|---|---|---|---|"]
    for r in rows:
        b = r["batch"]
        r.update({k: med[(b, k)] for k in ("dense", "scalpel")})
        r["speedup"] = r["dense"] / r["scalpel"]
        lines.append(f"| {b} | {r['dense']:.1f} | {r['scalpel']:.1f} | {r['speedup']:.2f}x | {paper[0]}x |")
    lines += ["", "decisions (batch 1):", *[f"- {d}" for d in rows[0]["decisions"]]]
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    bench.write_json(Path(args.out) / "report.json",
                     {"provenance": bench.provenance(spec.to_dict()["target"]), "model": args.model,
                      "recipe": recipe.name, "dense_accuracy": result.dense_accuracy,
                      "final_accuracy": result.final_accuracy, "size_percent": size, "rows": rows,
                      "plan": json.loads(result.plan.to_json())})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_pools_or_reexec(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    return {"run": cmd_run, "profile": cmd_profile}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
