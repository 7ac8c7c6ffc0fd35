"""The ``scalpel`` command: hardware-aware pruning, compiled and measured, from one command line.

examples:
  scalpel run lenet-300-100 --target host --quick      # everything below in one go, prints the table
  scalpel run lenet-5 --target host                    # the paper's full recipes (hours on 2 cores)
  scalpel train lenet-300-100 --quick                  # dense training only (recipe MODEL/dense)
  scalpel prune lenet-300-100 --quick --method scalpel # the target's recipe; writes a pruned .onnx
  scalpel prune lenet-300-100 --quick --method traditional   # Han et al. magnitude pruning
  scalpel profile lenet-300-100 --target host          # dense vs group-sparse crossover per layer shape
  scalpel compile lenet-300-100 --quick -o net.so      # deployable artefact (.so via export_library)
  scalpel compile pruned.onnx --method traditional     # from an ONNX file's weights alone
  scalpel prune lenet-300-100 --target cortex-m4 --quick   # SIMD-aware pairs (w = 2, int16 SMLAD)
  scalpel compile lenet-300-100 --target cortex-m4 --quick # int16 C project + Makefile, run on QEMU
  scalpel run lenet-300-100 --target cortex-m4 --quick     # every variant int16 on QEMU: instructions, size
  scalpel compile lenet-300-100 --target cortex-m55 --quick # Helium: groups of 8, VMLADAVA (mps3-an547)
  scalpel prune convnet --target cortex-m4 --method scalpel-layer  # pairs pruned to each layer's fraction
  scalpel prune vgg16 --target cuda --method fine --device cuda  # GPU tile pruning (Choi & Yang), on a GPU
  scalpel compile vgg16 --target cuda --method fine        # .so whose kernels skip the pruned 32x8 tiles
  scalpel bench lenet-300-100 --quick                  # time the pruned models already in --out
  scalpel bench my_net.py --batches 1 8                # a Python file defining model() and data()
  scalpel report scalpel-out other-out                 # re-render report.md + PNGs from report.json

MODEL is a reference name (lenet-300-100, lenet-5, convnet, ...), a Python file that defines
``model()`` (a torch.nn.Module) and ``data()`` ((train, test), each an ImageSet or (inputs, labels)
tensors), or an ONNX file of an (already pruned) model (see tvm_scalpel.sources).

The three compiled variants: "dense" (our scheduled dense kernels, the baseline of every speedup),
"traditional" (unstructured magnitude pruning, CSR kernels: an index per weight), "scalpel" (node
pruning + SIMD-aware groups where the hardware profile says they pay). ``run`` = train/resume both
pruning recipes, profile, decide, compile, verify against PyTorch, time every variant interleaved in
one process (plus PyTorch eager dense and pruned), and write report.md / report.json / PNG plots. On a
microcontroller target (cortex-m4, cortex-m55) ``run``/``bench`` count instructions per inference of
int16 builds on QEMU instead (Scalpel's layers each measured there, dense or groups), plus a
"scalpel-layer" column (SIMD groups on the per-layer schedule, recipe MODEL/mcu-layer).
Checkpoints in OUT/checkpoints/<recipe slug> are resumed (benchmarks/train_recipes.py writes the same
layout). Seeds: --seed sets the recipes' seed, the data order and the timing order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .bench import QUIET_POOLS
from .report import PAPER_CPU  # noqa: F401 (re-exported: the paper's numbers live in report.py)

logger = logging.getLogger("scalpel")

METHODS = ("dense", "traditional", "scalpel")
#: Pruning methods for one hardware class only: method -> (class, what it does, the targets it expects).
CLASS_METHODS = {
    "fine": ("gpu", "prunes whole weight tiles that a GPU kernel skips", "a CUDA target (--target cuda)"),
    "scalpel-layer": ("mcu", "prunes SIMD groups to a fraction of each layer's groups for the DSP's int16 pairs "
                      "(recipe MODEL/mcu-layer)", "a microcontroller target (--target cortex-m4 or cortex-m55)"),
}
#: The recipe kind each method trains (besides "scalpel": the target's hardware class).
_METHOD_KINDS = {"traditional": "magnitude", "dense": "dense", "fine": "gpu-fine", "scalpel-layer": "mcu-layer"}


def _quiet_pools_or_reexec(argv: list[str]) -> None:
    """Thread pools must sleep when idle (see tvm_scalpel.bench), which they read when they load:
    numpy/torch/tvm are loaded already here, so re-execute once with the variables in place."""
    if all(os.environ.get(k) == v for k, v in QUIET_POOLS.items()) or os.environ.get("SCALPEL_NO_REEXEC"):
        return
    env = dict(os.environ, **QUIET_POOLS, SCALPEL_NO_REEXEC="1")
    env.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    os.execve(sys.executable, [sys.executable, "-m", "tvm_scalpel.cli", *argv], env)


# ------------------------------------------------------------------------------------------- arguments
def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="scalpel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="reference name, model .py file (model(), data()) or .onnx file")
    common.add_argument("--target", default="host", help="'host', a TVM tag, or a target dict as JSON (default host)")
    common.add_argument("--quick", action="store_true", help="the quick recipes and a short profile (minutes)")
    common.add_argument("--out", default="scalpel-out", help="folder for checkpoints, profiles, artefacts, reports")
    common.add_argument("--seed", type=int, default=0, help="recipe seed, data order and timing order")
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--batches", type=int, nargs="+", default=None, help="CPU: batch sizes (default 1 16)")
    timing.add_argument("--rounds", type=int, default=None, help="CPU: interleaved timing rounds (default 15)")
    timing.add_argument("--rpc", default=None, metavar="HOST:PORT:KEY",
                        help="profile kernels on the device registered under KEY with the TVM RPC tracker at "
                             "HOST:PORT (python -m tvm.exec.rpc_tracker / rpc_server); default: this machine")
    calib = argparse.ArgumentParser(add_help=False)
    calib.add_argument("--calibration", default=None, help="microcontrollers: float32 .npy inputs for the int16 "
                       "scales (default: 512 random training images of the model's data)")
    user = argparse.ArgumentParser(add_help=False)
    user.add_argument("--epochs", type=int, default=2, help="epochs for a Python-file model (recipes set their own)")
    user.add_argument("--lr", type=float, default=0.01, help="SGD learning rate for a Python-file model")
    user.add_argument("--device", default="cpu", help="torch device for training reference recipes, e.g. cuda")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name, helptext, example, parents):
        return sub.add_parser(name, help=helptext, description=f"{helptext}\n\nexample:\n  {example}",
                              parents=parents, formatter_class=fmt)

    add("run", "train/resume, prune (traditional and Scalpel), profile, compile, verify, time, report "
        "(a microcontroller target: instructions per inference on QEMU instead of time)",
        "scalpel run lenet-300-100 --target host --quick\n  scalpel run lenet-300-100 --target cortex-m4 --quick",
        [common, timing, calib])
    add("profile", "dense vs group-sparse crossover for the model's layer shapes on the target",
        "scalpel profile lenet-300-100 --target host", [common, timing])
    c = add("train", "train the dense model (reference: recipe MODEL/dense, or --recipe KIND)",
            "scalpel train lenet-300-100 --quick", [common, user])
    c.add_argument("--recipe", default="dense", help="recipe kind: dense, cpu, gpu, mcu, magnitude, "
                   "gpu-fine (GPU tile pruning; with --target cuda), mcu-layer (SIMD groups on magnitude's "
                   "per-layer schedule)")
    c = add("prune", "prune with the target's Scalpel recipe or traditional magnitude pruning; writes OUT/<model>-<method>.onnx",
            "scalpel prune lenet-300-100 --quick --method traditional", [common, user])
    c.add_argument("--method", choices=("scalpel", "traditional", *CLASS_METHODS), default="scalpel",
                   help="scalpel: the target's recipe; traditional: magnitude pruning; fine: GPU-aware "
                        "fine-grain (tile) pruning, with --target cuda; scalpel-layer: SIMD groups pruned to "
                        "--sparsity of each layer's groups (reference models: traditional pruning's schedule, "
                        "recipe MODEL/mcu-layer), with a microcontroller target")
    c.add_argument("--sparsity", type=float, default=0.9, help="zero fraction to reach (Python-file models)")
    c = add("compile", "compile the pruned model for the target; writes the deployable artefact",
            "scalpel compile lenet-300-100 --quick -o lenet.so", [common, calib])
    c.add_argument("--method", choices=(*METHODS, *CLASS_METHODS), default="scalpel",
                   help="fine: the tile-pruned model (prune --method fine), with --target cuda; scalpel-layer: "
                        "the model of prune --method scalpel-layer, with a microcontroller target")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--fast", action="store_true", help="microcontrollers: build under the default code "
                   "shape only, not the one of micro.GRID's six with the fewest instructions (a sixth of the "
                   "builds; each Scalpel layer's kernel is still measured)")
    c.add_argument("-o", "--output", default=None, help="artefact path (default OUT/<model>-<method>-b<batch>.so; "
                   "a folder OUT/<model>-<method>-<cpu> for a microcontroller)")
    add("bench", "time dense / traditional / Scalpel compiled and PyTorch eager, interleaved; write the report "
        "(a microcontroller target: count instructions on QEMU)",
        "scalpel bench lenet-300-100 --quick --batches 1 16", [common, timing, calib])
    c = sub.add_parser("report", help="re-render report.md and the PNG plots from report.json files",
                       description="re-render report.md and the PNG plots from report.json files\n\n"
                                   "example:\n  scalpel report scalpel-out lenet5-out --to results/", formatter_class=fmt)
    c.add_argument("dirs", nargs="+", help="folders holding a report.json (from run or bench)")
    c.add_argument("--to", default=None, help="where to write report.md and PNGs (default: the first folder)")
    return p


def _target(text: str):
    return json.loads(text) if text.strip().startswith("{") else text


def _spec(args):
    from . import hardware_spec

    return hardware_spec(_target(args.target))


# ------------------------------------------------------------------------------------- model variants
@dataclass
class _Variant:
    """One compiled variant's model: a torch model (None for ONNX), its Relax import, its accuracy."""

    method: str
    relax: Callable[[int], Any]  # batch → IRModule
    torch: Any = None
    accuracy: float | None = None
    trained: bool = True  # False: random weights, timing only (no compiled accuracy)
    source: str = ""


def _slug(recipe_name: str) -> str:
    return recipe_name.replace("/", "__")


def _recipe_name(model: str, method: str, spec, quick: bool) -> str:
    kind = spec.hardware_class.value if method == "scalpel" else _METHOD_KINDS[method]
    return f"{model}/{kind}" + ("/quick" if quick else "")


def _recipe_result(args, name: str, train: bool):
    """Train or resume a recipe in OUT/checkpoints/<slug>; without ``train`` it must be finished."""
    from .errors import ScalpelError
    from .released import has_released_structure
    from .training import run_recipe
    from .training.loop import is_finished

    model = name.split("/")[0]
    if has_released_structure(model):
        raise ScalpelError(f"{model} has no training recipe here (its dataset is not available offline); "
                           f"`scalpel run|bench|compile {model}` use the paper's released structure on random "
                           "weights (tvm_scalpel.released): latency and size, no accuracy")
    recipe = _recipe(args, name)  # first: says which models have recipes
    ckpt = _checkpoints(args, name)
    if not train and not is_finished(ckpt, recipe):
        kind = name.split("/")[1]
        method = next((m for m, k in _METHOD_KINDS.items() if k == kind), "scalpel")
        target = "" if args.target == "host" else f" --target {args.target}"
        what = ("was trained under another definition of that recipe (the checkpoint's fingerprint is not "
                "this recipe's: its stages, schedule or seed changed)" if is_finished(ckpt)
                else f"has no finished recipe {name!r}")
        raise ScalpelError(f"{ckpt} {what}; run `scalpel prune {args.model} --method {method}{target}"
                           f"{' --quick' if args.quick else ''} --out {args.out}` first (or `scalpel run`), "
                           "which continues or retrains it")
    logger.info("recipe %s (checkpoints %s)", name, ckpt)
    with _bar(recipe.total_epochs, f"train {recipe.name}", "epoch") as bar:
        def on_epoch(rec):  # a resumed or shared run starts part-way: place the bar, then advance it
            bar.update(_epochs_done(recipe, rec) - bar.n)
            bar.set_postfix_str(f"{rec.stage_label} test {100 * rec.test_accuracy:.2f}%")

        result = run_recipe(recipe, checkpoint_dir=ckpt, device=getattr(args, "device", "cpu"),
                            share_from=ckpt.parent,  # the model's other recipes' dense stages are reused
                            on_epoch=on_epoch)
    return recipe, result


def _recipe(args, name: str):
    """The recipe ``name`` for --target (where w comes from) at --seed."""
    from .training import get_recipe

    recipe = get_recipe(name, target=_target(args.target))
    return recipe if recipe.seed == args.seed else replace(recipe, seed=args.seed)


def _checkpoints(args, name: str) -> Path:
    return Path(args.out) / "checkpoints" / _slug(name)


def _trained(args, name: str) -> bool:
    """Whether OUT/checkpoints holds a finished run of recipe ``name`` as it is defined now."""
    from .training.loop import is_finished

    return is_finished(_checkpoints(args, name), _recipe(args, name))


def _epochs_done(recipe, rec) -> int:
    """Epochs of ``recipe`` done once the epoch ``rec`` reports has run."""
    return sum(s.epochs for s in recipe.stages[:rec.stage]) + rec.epoch


def _bar(total: int, desc: str, unit: str):
    """A progress bar on stderr when it is a terminal (tqdm hides itself otherwise: logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def _user_file(args, source, method: str) -> Path:
    return Path(args.out) / f"{source.name}-{method}.pt"


def _user_weights(args, source, method: str) -> Path | None:
    """The weights `scalpel train`/`prune` saved for ``method``, else the dense ones, else None."""
    return next((p for p in (_user_file(args, source, method), _user_file(args, source, "dense")) if p.is_file()),
                None)


def _user_model(args, source, method: str):
    """A Python-file model with the weights of ``_user_weights`` (its initial weights without any)."""
    import torch

    model = source.torch_model()
    path = _user_weights(args, source, method)
    if path is not None:
        model.load_state_dict(torch.load(path, weights_only=True))
        logger.info("%s: weights from %s", method, path)
    return model.eval()


def _variants(args, spec, source, methods, train: bool):
    """(variants by method, test set or None, input shape without batch, dense weight bytes)."""
    import numpy as np
    import torch

    from .training import get_recipe
    from .training.loop import evaluate, load_data

    if source.kind == "onnx":
        name, dims = source.onnx_input()
        rel = source.relax
        variants = {m: _Variant(m, rel, source=str(source.path)) for m in methods}
        import onnx
        from onnx import numpy_helper

        dense_bytes = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(source.path)).graph.initializer
                          if len(t.dims) in (2, 4))
        return variants, None, tuple(dims), int(dense_bytes)

    def wrap(method, model, acc, trained=True, origin=""):
        model = model.eval()
        return _Variant(method, lambda b, m=model: source.relax(b, m, shape), model, acc, trained, origin)

    variants = {}
    if source.kind == "python":
        _, test = source.data()
        shape = tuple(next(iter(test.batches(1)))[0].shape[1:])
        for m in methods:
            model, path = _user_model(args, source, m), _user_weights(args, source, m)
            # Said in the report: a method not pruned yet runs the dense (or initial) weights.
            origin = f"{source.path}, " + (f"weights {path}" if path else "its initial weights (none saved)")
            variants[m] = wrap(m, model, evaluate(model, test)[1], origin=origin)
    elif _structure_only(source):
        shape = tuple(source.torch_model().input_shape)
        variants, test = _structure_variants(args, spec, source, methods, wrap), None
    else:
        shape = tuple(source.torch_model().input_shape)
        results = {m: _recipe_result(args, _recipe_name(source.name, m, spec, args.quick), train)
                   for m in methods if m != "dense"}
        for m, (recipe, res) in results.items():
            variants[m] = wrap(m, res.model, res.final_accuracy, origin=recipe.name)
        any_recipe = next(iter(results.values()), (None,))[0] or get_recipe(
            _recipe_name(source.name, "dense", spec, args.quick))
        test = load_data(any_recipe)[1]
        if "dense" in methods:
            dense_name = _recipe_name(source.name, "dense", spec, args.quick)
            if _trained(args, dense_name):
                recipe, res = _recipe_result(args, dense_name, train=False)
                variants["dense"] = wrap("dense", res.model, res.final_accuracy, origin=recipe.name)
            else:  # latency does not depend on the weights; accuracy from the pruning recipe's dense stage
                torch.manual_seed(args.seed)
                acc = next((r.dense_accuracy for _, r in results.values() if r.dense_accuracy), None)
                variants["dense"] = wrap("dense", source.torch_model(), acc, trained=False,
                                         origin="untrained weights (time and instruction counts do not depend "
                                                "on them); accuracy of the recipe's dense stage")
    dense_bytes = int(sum(np.prod(p.weight.shape) * 4 for p in source.torch_model().modules()
                          if isinstance(p, (torch.nn.Linear, torch.nn.Conv2d))))
    return {m: variants[m] for m in methods}, test, shape, dense_bytes


def _structure_only(source) -> bool:
    from .released import has_released_structure

    return source.kind == "reference" and has_released_structure(source.name)


def _structure_variants(args, spec, source, methods, wrap) -> dict:
    """NIN / AlexNet: the paper's released structure on random weights (tvm_scalpel.released); timing
    and size only, no accuracy."""
    import torch

    from .released import apply_structure, magnitude_like, released_structure
    from .target import HardwareClass

    torch.manual_seed(args.seed)
    dense = source.torch_model()
    structure = released_structure(source.name, spec.lanes("int16" if spec.hardware_class is HardwareClass.MCU
                                                           else "float32"))
    scalpel = apply_structure(dense, structure)
    models = {"dense": dense, "scalpel": scalpel, "traditional": magnitude_like(dense, scalpel)}
    origin = {"dense": "random weights", "scalpel": "released structure on random weights: " + "; ".join(structure.notes),
              "traditional": "magnitude pruning of the random dense weights to the Scalpel model's nonzero count per layer"}
    logger.info("%s: structure only (no data to train on here): %s", source.name, origin["scalpel"])
    return {m: wrap(m, models[m], None, trained=False, origin=origin[m]) for m in methods}


def _plan_for(args, method: str, mod, spec):
    from .plan import all_dense, decide, traditional
    from .target import HardwareClass

    if method == "dense":
        return all_dense(mod, spec)
    if method == "traditional":
        return traditional(mod, spec)
    if spec.hardware_class is HardwareClass.CPU:
        return decide(mod, spec, _profile(args, spec, mod))
    return decide(mod, spec)


def _profile(args, spec, mod):
    from .profiling import layer_shapes, profile

    sparsities = (0.0, 0.5, 0.7, 0.9) if args.quick else (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
    from .profiling import measure_layer

    runner, where = _rpc_runner(args)
    shapes = layer_shapes(mod)
    with _bar(len(set(shapes)), "profile layer shapes", "shape") as bar:
        def measure(*a, **kw):  # called for the shapes the cache does not hold
            out = measure_layer(*a, **kw, runner=runner or _child_runner(args))
            bar.update()
            return out

        return profile(spec, shapes, cache_dir=os.path.join(args.out, where), measure=measure,
                       sparsities=sparsities, number=10 if args.quick else 20, repeat=5)


def _child_runner(args):
    """This machine's kernels are timed in a child process with TVM's pool as deployed (one per command,
    started when the profile cache first misses): see profiling.ChildRunner."""
    from .profiling import ChildRunner

    if getattr(args, "_child_runner", None) is None:
        args._child_runner = ChildRunner()
    return args._child_runner


_TRACKER_CONNECT_S = 10  # seconds to wait for the tracker's port to accept a connection


def _rpc_runner(args):
    """(runner, profile cache folder): the RPC device named by --rpc (one session per command), or None
    and 'profiles' for this machine. A remote device's profiles are cached apart from local ones."""
    import socket

    from .errors import TargetError
    from .profiling import RPCRunner

    if not getattr(args, "rpc", None):
        return None, "profiles"
    if getattr(args, "_rpc_runner", None) is None:
        host, port, key = ([""] * 3 + args.rpc.rsplit(":", 2))[-3:]
        if not host or not port.isdigit() or not key:
            raise TargetError(f"--rpc: expected HOST:PORT:KEY (the tracker's address and the device key), "
                              f"found {args.rpc!r}")
        try:
            # TVM retries an unreachable tracker for 60 s: a closed port is an error at once
            socket.create_connection((host, int(port)), timeout=_TRACKER_CONNECT_S).close()
            args._rpc_runner = RPCRunner(host, int(port), key)
        except Exception as err:  # tvm raises TVMError/RuntimeError/OSError for an unreachable tracker
            raise TargetError(f"--rpc {args.rpc}: no device {key!r} from the tracker at {host}:{port} ({err}); "
                              "start one with `python -m tvm.exec.rpc_tracker --port PORT` and "
                              "`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`") from None
        logger.info("profiling on the RPC device %r (tracker %s:%s)", key, host, port)
    return args._rpc_runner, "profiles-rpc-" + args.rpc.rsplit(":", 1)[-1]


# ------------------------------------------------------------------------------------------ measuring
def _inputs(test, shape, batch: int, seed: int):
    import numpy as np

    if test is not None:
        x = next(iter(test.batches(batch)))[0].numpy()
        if len(x) == batch:
            return np.ascontiguousarray(x)
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype("float32")


def _vm_out(vm, xt):
    out = vm["main"](xt)
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _check(method: str, got, ref, what: str) -> None:
    import numpy as np

    from .errors import VerificationError

    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    if not np.allclose(got, ref, rtol=1e-4, atol=tol):
        raise VerificationError(f"{method}: the compiled output differs from {what} by up to {err:.3g} "
                                f"(tolerance {tol:.3g}); expected equal outputs. This is a compiler bug: "
                                "please report it with the model")


def _compiled_accuracy(vm, test, batch: int) -> float | None:
    import numpy as np
    import tvm

    correct = n = 0
    for x, y in test.batches(batch):
        if len(y) != batch:
            break
        pred = _vm_out(vm, tvm.runtime.tensor(np.ascontiguousarray(x.numpy()))).argmax(1)
        correct += int((pred == y.numpy()).sum())
        n += batch
    return correct / n if n else None


def _measure(args, spec, source, variants, test, shape, dense_bytes) -> dict:
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from . import bench, build
    from .plan import stored_weight_bytes

    timed, libs, torch_threads = [], [], {}
    out = {m: {"latency": {}, "speedup_vs_dense": {}, "speedup_vs_torch": {}} for m in variants}
    vms = {}
    lib_dir = Path(tempfile.mkdtemp(prefix="scalpel-libs-"))
    eager = [m for m in ("dense", "scalpel") if m in variants and variants[m].torch is not None]
    for batch in args.batches:
        x = _inputs(test, shape, batch, args.seed)
        xt = tvm.runtime.tensor(x)
        outputs = {}
        for m, v in variants.items():
            mod = v.relax(batch)
            plan = _plan_for(args, m, mod, spec)
            logger.info("compile %s batch %d: %s", m, batch, "; ".join(d.reason for d in plan.layers))
            ex = build(mod, spec.target, plan.compile_plan())
            vm = relax.VirtualMachine(ex, tvm.cpu())
            outputs[m] = _vm_out(vm, xt)
            if v.torch is not None:
                with torch.no_grad():
                    _check(m, outputs[m], v.torch(torch.from_numpy(x)).numpy(), f"its PyTorch model ({v.source})")
            elif m != "dense" and "dense" in outputs:  # ONNX: same weights, so every kernel must agree
                _check(m, outputs[m], outputs["dense"], "the dense kernels on the same weights")
            if batch == args.batches[0]:
                out[m]["decisions"] = [{"key": d.key, "method": d.method.value, "reached_sparsity": d.reached_sparsity,
                                        "crossover": d.crossover, "reason": d.reason} for d in plan.layers]
                out[m]["size_percent"] = 100.0 * stored_weight_bytes(mod, plan) / dense_bytes
            vms[(m, batch)] = vm
            # The function is looked up once, as a serving loop does: `vm["main"]` costs ~0.9 us here, more
            # than a whole pruned LeNet-300-100 layer.
            timed.append(bench.Variant(key=(m, batch), fn=lambda f=vm["main"], xt=xt: f(xt)))
            ex.export_library(str(lib_dir / f"{m}-b{batch}.so"))
            libs.append(bench.TimedLibrary((m, batch), lib_dir / f"{m}-b{batch}.so", x, outputs[m]))
        xtorch = torch.from_numpy(x)
        if eager:
            torch_threads[batch] = _best_torch_threads(variants[eager[0]].torch, xtorch)
        for m in eager:
            timed.append(bench.Variant(key=(f"torch-{m}", batch),
                                       fn=lambda f=variants[m].torch, x=xtorch, n=torch_threads[batch]:
                                       _eager(f, x, n)))
    try:
        med, med_eager = _time_groups(libs, timed, args)
    finally:
        shutil.rmtree(lib_dir, ignore_errors=True)
    rows = []
    names = [*variants] + [f"torch-{m}" for m in eager]
    for name in names:
        row = out.get(name, {"latency": {}, "speedup_vs_dense": {}, "speedup_vs_torch": {}})
        base = variants.get(name.removeprefix("torch-"))
        row.update(name=name, accuracy=base.accuracy if base else None, origin=base.source if base else "")
        if name.startswith("torch-"):
            row["size_percent"] = 100.0  # eager PyTorch stores every weight dense, zeros included
        group = med_eager if name.startswith("torch-") else med  # (a torch row's ratios: in its own group)
        for b in args.batches:
            s = group[(name, b)]
            row["latency"][str(b)] = s
            if ("dense", b) in group:
                row["speedup_vs_dense"][str(b)] = group[("dense", b)]["median_us"] / s["median_us"]
            if ("torch-dense", b) in med_eager:
                row["speedup_vs_torch"][str(b)] = (med_eager[("torch-dense", b)]["median_us"]
                                                   / med_eager[(name, b)]["median_us"])
            if not name.startswith("torch-") and med_eager:
                row.setdefault("latency_interleaved_with_torch", {})[str(b)] = med_eager[(name, b)]
        if name in variants and variants[name].trained and test is not None:
            row["compiled_accuracy"] = _compiled_accuracy(vms[(name, max(args.batches))], test, max(args.batches))
        rows.append(row)
    notes = [f"{m} weights: {v.source}" for m, v in variants.items() if v.source]
    if source.kind == "onnx":
        notes.append("ONNX model: every variant compiles the same weights (dense = dense kernels, dead nodes "
                     "folded); no data, so no accuracy and no PyTorch eager columns")
    if _structure_only(source):
        notes.append("structure only: random weights with the paper's released pruned structure; timing and size "
                     "are measured, no accuracy is claimed (the model's dataset is not available here)")
    notes.append("compiled models are timed as `f(x)` with `f = vm['main']` looked up once (the lookup is not "
                 "part of the model)")
    notes.append("timing: our compiled models interleaved among themselves in a child process with TVM's thread "
                 "pool as deployed (workers spin when idle, the default): latency, speedup vs our dense")
    if med_eager:
        notes.append("vs torch: PyTorch eager interleaved with the compiled models again in this process, every pool "
                     "sleeping when idle (report.json: latency_interleaved_with_torch). There PyTorch's threads "
                     "slow small compiled models, and each parallel TVM kernel pays a worker wake-up. PyTorch runs "
                     "at its faster thread count per batch, measured first: " +
                     ", ".join(f"batch {b}: {n}" for b, n in torch_threads.items()))
    if test is not None and source.kind == "reference":
        notes.append(f"data: {test.name} test split, {len(test)} images")
    return {"model": source.name, "source": source.kind, "target": spec.cpu, "quick": bool(args.quick),
            "batches": list(args.batches), "rounds": args.rounds, "seed": args.seed,
            "torch_threads": {str(b): n for b, n in torch_threads.items()}, "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
            "provenance": bench.provenance(spec.to_dict()["target"]), "notes": notes, "variants": rows}


def _time_groups(libs: list, timed: list, args) -> tuple[dict, dict]:
    """Medians by key: the compiled libraries interleaved among themselves in a child process with TVM's
    pool as deployed (bench.time_libraries), then PyTorch eager interleaved here with the compiled
    variants again (the vs-torch ratios). Separate groups because PyTorch's threads slow what runs between
    its calls: the pruned LeNet-300-100 went from 3.7 to 6.0 us per call interleaved with eager PyTorch
    (2.5 ms samples of back-to-back calls); and here every pool must sleep when idle, so each parallel
    TVM kernel pays a wake-up that a deployed model does not."""
    from . import bench

    eager = [v for v in timed if str(v.key[0]).startswith("torch-")]
    logger.info("timing %d compiled variants x %d rounds, interleaved, in a child process", len(libs), args.rounds)
    with _bar(args.rounds, "time compiled variants", "round") as bar:
        med = bench.time_libraries(libs, args.rounds, seed=args.seed, on_round=lambda r: bar.update())
    if not eager:
        return med, {}
    again = [v for v in timed if not str(v.key[0]).startswith("torch-")] + eager
    logger.info("timing PyTorch eager with the compiled variants: %d x %d rounds, interleaved", len(again),
                args.rounds)
    with _bar(args.rounds, "time with PyTorch eager", "round") as bar:
        bench.run_interleaved(again, args.rounds, cold=False, seed=args.seed, on_round=lambda r: bar.update())
    return med, {v.key: bench.stats_us(v.warm) for v in again}


def _eager(model, x, threads: int):
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return model(x)


def _best_torch_threads(model, x, calls: int = 100, rounds: int = 5) -> int:
    """PyTorch eager's faster thread count for this input, from 1 up to the cores: with pools that sleep
    when idle, 2 threads took LeNet-300-100 at batch 1 from 54 to 245 us per call here, while large
    batches gain from the second core. Alternating rounds, the best round of each counts (3 rounds of 30
    calls once picked 2 threads at batch 1 on a busy moment)."""
    import time

    best = {}
    for _ in range(rounds):
        for n in range(1, (os.cpu_count() or 1) + 1):
            _eager(model, x, n)
            t0 = time.perf_counter()
            for _ in range(calls):
                _eager(model, x, n)
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
    return min(best, key=best.get)


def _write_report(out_dir: Path, reports: list[dict], write_json: bool = True) -> str:
    from . import bench
    from .report import plot, render_all

    out_dir.mkdir(parents=True, exist_ok=True)
    if write_json:
        bench.write_json(out_dir / "report.json", reports[0])
    text = render_all(reports)
    (out_dir / "report.md").write_text(text + "\n")
    for p in plot(reports, out_dir):
        logger.info("wrote %s", p)
    return text


# ------------------------------------------------------------------------------------------- commands
def cmd_profile(args) -> int:
    from .sources import resolve

    source, spec = resolve(args.model), _spec(args)
    shape = None if source.kind == "onnx" else (
        tuple(source.torch_model().input_shape) if source.kind == "reference"
        else tuple(next(iter(source.data()[1].batches(1)))[0].shape[1:]))
    for batch in args.batches or [1, 16]:
        prof = _profile(args, spec, source.relax(batch, input_shape=shape))
        for lp in prof.layers:
            print(f"{source.name} batch {batch} {lp.shape.key or lp.shape}: dense {lp.dense_us:.1f} us, "
                  f"sparse wins from {lp.crossover}")
    return 0


def _measure_and_report(args, train: bool) -> int:
    from .sources import resolve
    from .target import HardwareClass

    source, spec = resolve(args.model), _spec(args)
    if spec.hardware_class is HardwareClass.MCU:
        report = _measure_micro(args, spec, source, train)
    else:
        _require_cpu(spec, args.cmd)
        args.batches, args.rounds = args.batches or [1, 16], args.rounds or 15
        variants, test, shape, dense_bytes = _variants(args, spec, source, METHODS, train)
        report = _measure(args, spec, source, variants, test, shape, dense_bytes)
    print(_write_report(Path(args.out), [report]))
    return 0


def _require_cpu(spec, cmd: str) -> None:
    from .errors import TargetError

    if spec.hardware_class.value != "cpu":
        raise TargetError(f"scalpel {cmd}: measures on the host CPU or an emulated microcontroller (--target "
                          f"cortex-m4, cortex-m55), found a {spec.hardware_class.value} target ({spec.cpu}); use "
                          "`scalpel compile` for it (benchmarks/gpu.py times CUDA builds on a GPU)")


# ------------------------------------------------------------------------------------ microcontrollers
def _calibration(args, spec, source):
    """Float32 inputs [N, *input shape] that choose an int16 build's fixed-point scales: --calibration,
    else 512 random training images of the model's data (seed 0, as benchmarks/micro.py)."""
    import numpy as np

    from .errors import PlanError
    from .micro.measure import calibration_images
    from .training import get_recipe
    from .training.loop import load_data

    if args.calibration:
        return np.load(args.calibration).astype("float32")
    if source.kind == "onnx":
        raise PlanError(f"{args.model}: int16 scales need calibration inputs and an ONNX model brings no data; "
                        "pass --calibration FILE.npy (float32 [N, *input shape])")
    if source.kind == "python":
        train = source.data()[0]
    else:
        train = load_data(get_recipe(_recipe_name(source.name, "dense", spec, args.quick)))[0]
    return calibration_images(train)


#: Test images compiled into each QEMU build and checked bit for bit against the int16 reference.
_BOARD_IMAGES = 4
#: The kernel of every layer for the variants that do not measure it (Scalpel's variants: each layer
#: built alone dense and group-sparse on the board, the fewer instructions kept).
_MCU_KERNELS = {"dense": "dense", "traditional": "csr"}


def _has_layer_variant(args, spec, source, train: bool) -> bool:
    """Whether `run`/`bench` on a microcontroller add the scalpel-layer column: `run` on a reference model
    with an mcu-layer recipe (trained if needed), `bench` where that recipe has finished in OUT, or a
    Python-file model that `scalpel prune --method scalpel-layer` has pruned."""
    from .training import recipe_names

    if source.kind == "reference":
        name = _recipe_name(source.name, "scalpel-layer", spec, args.quick)
        return name.removesuffix("/quick") in recipe_names() and (train or _trained(args, name))
    return source.kind == "python" and _user_file(args, source, "scalpel-layer").is_file()


def _check_micro_args(args, source, spec) -> None:
    from .errors import PlanError

    if args.batches not in (None, [1]):
        raise PlanError(f"--batches {' '.join(map(str, args.batches))}: a microcontroller runs one image at a "
                        "time; expected --batches 1 or none")
    if args.rounds is not None or args.rpc:
        raise PlanError(f"{'--rounds' if args.rounds is not None else '--rpc'} applies to CPU timing; on "
                        f"{spec.cpu} instructions are counted on QEMU (deterministic, one run each) and each "
                        "Scalpel layer's kernel is chosen by running it there")
    if _structure_only(source):
        raise PlanError(f"{source.name}: the released structure on random weights is measured on CPUs (and "
                        f"CUDA): its weights do not fit a microcontroller's memory; expected lenet-300-100, "
                        "lenet-5 or convnet, a Python-file or an ONNX model")


def _test_arrays(test):
    import numpy as np

    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in test.batches(1000)))
    return np.concatenate(xs), np.concatenate(ys)


def _measure_micro(args, spec, source, train: bool) -> dict:
    """Every variant as an int16 build on the emulated board (tvm_scalpel.micro.measure): instructions
    per inference, flash, RAM, size, and the int16 model's accuracy on the test split."""
    from . import bench
    from .micro import board_for, check_toolchain
    from .micro import measure as mcu

    board = board_for(_target(args.target))
    _check_micro_args(args, source, spec)
    check_toolchain()
    methods = METHODS + (("scalpel-layer",) if _has_layer_variant(args, spec, source, train) else ())
    variants, test, _, _ = _variants(args, spec, source, methods, train)
    calibration = _calibration(args, spec, source)
    test_xy = None if test is None else _test_arrays(test)
    inputs = (calibration if test_xy is None else test_xy[0])[:_BOARD_IMAGES]
    builds = [mcu.Variant(m, v.relax(1), _MCU_KERNELS.get(m, "measured"), repeat=1 if m in _MCU_KERNELS else 2,
                          evaluate=v.trained) for m, v in variants.items()]
    with _bar(len(builds), f"build and run on {board.machine}", "variant") as bar:
        def measured(name, row):
            logger.info("%s: %s instructions on %s, flash %s B, RAM %s B", name, f"{row['instructions']:,}",
                        board.machine, f"{row['flash_bytes']:,}", f"{row['ram_bytes']:,}")
            bar.update()

        rows = mcu.measure_all(builds, _target(args.target), Path(args.out) / f"{source.name}-{spec.cpu}-builds",
                               calibration, inputs, test_xy, on_variant=measured)
    out = []
    for m, v in variants.items():
        row = rows[m]
        out.append({**row, "name": m, "speedup_vs_dense": {"1": row["speedup"]}, "accuracy": v.accuracy,
                    "compiled_accuracy": row.get("accuracy_int16"), "origin": v.source, "decisions": row["kernels"]})
    return {"kind": "mcu", "model": source.name, "source": source.kind, "target": spec.cpu,
            "board": f"{spec.cpu} (QEMU {board.machine})", "group_width": board.group_width,
            "quick": bool(args.quick), "batches": [1], "seed": args.seed,
            "provenance": bench.provenance({"kind": spec.cpu, "machine": board.machine}),
            "notes": _micro_notes(args, source, board, variants, len(inputs), len(calibration)), "variants": out}


def _micro_notes(args, source, board, variants, board_images: int, calibration_images: int) -> list[str]:
    notes = [f"{m} weights: {v.source}" for m, v in variants.items() if v.source]
    notes += [f"int16 builds of one flow (TVM-generated C, arm-none-eabi-gcc, the same driver) run on QEMU "
              f"{board.machine}; instructions executed per inference (a TCG plugin), not cycles",
              f"every variant built under each code shape of micro.GRID, its fewest instructions kept; the board's "
              f"outputs for {board_images} images bit-exact with the numpy int16 reference, the Scalpel builds run "
              "twice (same count)",
              "kernels: dense = the board's SIMD MAC on every weight; traditional = CSR (an index per weight); "
              f"Scalpel = groups of {board.group_width} (one index per group) or dense per layer, whichever runs "
              "fewer instructions built alone on the board",
              "accuracy: PyTorch fp32 / the int16 model (numpy reference, the board's arithmetic) on the whole "
              "test split; int16 scales from " + (args.calibration or f"{calibration_images} random training images")]
    if source.kind == "onnx":
        notes.append("ONNX model: every variant compiles the same weights (dense = dense kernels, dead nodes "
                     "folded; traditional = CSR); no data, so no accuracy")
    if "scalpel-layer" in variants:
        notes.append("scalpel-layer: the same groups and kernels, pruned to a fraction of each layer's groups "
                     "(traditional pruning's per-layer schedule) instead of the paper's global RMS threshold")
    return notes


def cmd_run(args) -> int:
    return _measure_and_report(args, train=True)


def cmd_bench(args) -> int:
    return _measure_and_report(args, train=False)


def cmd_report(args) -> int:
    reports = [json.loads((Path(d) / "report.json").read_text()) for d in args.dirs]
    print(_write_report(Path(args.to or args.dirs[0]), reports, write_json=False))
    return 0


def cmd_train(args) -> int:
    from .sources import resolve

    source, spec = resolve(args.model), _spec(args)
    if source.kind == "reference":
        name = _recipe_name(source.name, args.recipe, spec, args.quick) if args.recipe in METHODS else \
            f"{source.name}/{args.recipe}" + ("/quick" if args.quick else "")
        _, res = _recipe_result(args, name, train=True)
        print(f"{name}: accuracy {100 * res.final_accuracy:.2f} %, size {100 * res.plan.size_ratio:.2f} % of dense, "
              f"checkpoints in {_checkpoints(args, name)}")
        return 0
    _, acc = _fit_user_model(args, source, pruner=None)
    print(f"{source.name}: dense accuracy {100 * acc:.2f} %, weights in {_user_file(args, source, 'dense')}")
    return 0


def _fit_user_model(args, source, pruner):
    """``--epochs`` of SGD on a Python-file model (through ``pruner`` when pruning); returns
    (trained model, test accuracy) and saves the weights in OUT."""
    import torch

    from .training import evaluate, train_epoch

    torch.manual_seed(args.seed)
    train, test = source.data()
    net = pruner.model if pruner is not None else _user_model(args, source, "dense")
    params = pruner.param_groups(1e-4) if pruner is not None else [{"params": list(net.parameters()), "weight_decay": 1e-4}]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        loss, acc = train_epoch(net, opt, train, 64, gen, pruner)
        logger.info("%s epoch %d/%d: loss %.4f, train accuracy %.2f %%", source.name, epoch + 1, args.epochs,
                    loss, 100 * acc)
    final = pruner.finalize()[0] if pruner is not None else net
    Path(args.out).mkdir(parents=True, exist_ok=True)
    method = "dense" if pruner is None else args.method
    torch.save(final.state_dict(), _user_file(args, source, method))
    return final.eval(), evaluate(final, test)[1]


def cmd_prune(args) -> int:
    import numpy as np

    from . import formats
    from .sources import export_onnx, resolve
    from .training import GroupConfig, GroupCriterion, MagnitudeConfig, PruneConfig, prepare

    source, spec = resolve(args.model), _spec(args)
    _check_method(args, spec, source)
    if source.kind == "onnx":
        raise _source_error(f"{args.model}: an ONNX model is taken as already pruned; `scalpel compile` or "
                            "`scalpel bench` it, or prune its PyTorch model (reference name or Python file)")
    if source.kind == "reference":
        recipe, res = _recipe_result(args, _recipe_name(source.name, args.method, spec, args.quick), train=True)
        model, acc, shape = res.model, res.final_accuracy, tuple(source.torch_model().input_shape)
        detail = f"recipe {recipe.name}, size {100 * res.plan.size_ratio:.2f} % of dense (training plan)"
    else:
        if not 0 < args.sparsity < 1:
            raise _source_error(f"--sparsity: expected a fraction in (0, 1), found {args.sparsity}")
        base = _user_model(args, source, "dense")
        w = spec.lanes("int16" if spec.hardware_class.value == "mcu" else "float32")
        if args.method == "traditional":
            pruner = prepare(base, PruneConfig(magnitude=MagnitudeConfig()))
            pruner.prune_magnitude(args.sparsity)
        elif args.method == "scalpel-layer":  # the lowest-RMS groups of each layer, --sparsity of them
            pruner = prepare(base, PruneConfig(group=GroupConfig(width=w, criterion=GroupCriterion.LAYER_SPARSITY)))
            pruner.prune_groups(args.sparsity)
        else:
            pruner = prepare(base, PruneConfig(group=GroupConfig(width=w)))
            rms = np.concatenate([formats.group_rms(formats.flatten_per_filter(
                layer.weight.detach().numpy()), w).ravel() for layer in pruner.layers.values()])
            pruner.prune_groups(float(np.quantile(rms, args.sparsity)))
        model, acc = _fit_user_model(args, source, pruner)
        shape = tuple(next(iter(source.data()[1].batches(1)))[0].shape[1:])
        detail = f"{args.method} at {args.sparsity:.0%}, {args.epochs} fine-tuning epochs"
    path = export_onnx(model, shape, Path(args.out) / f"{source.name}-{args.method}.onnx")
    print(f"{source.name} pruned ({detail}): accuracy {100 * acc:.2f} %; ONNX in {path}")
    return 0


def _source_error(msg: str):
    from .sources import SourceError

    return SourceError(msg)


def _compile_shared_library(args, spec, source, variant, batch: int) -> Path:
    """CPU and CUDA: build with tvm_scalpel.build and write a shared library (``export_library``)."""
    from . import build

    mod = variant.relax(batch)
    plan = _plan_for(args, variant.method, mod, spec)
    ex = build(mod, spec.target, plan.compile_plan())
    path = Path(args.output or Path(args.out) / f"{source.name}-{variant.method}-b{batch}.so")
    path.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(path))
    path.with_suffix(".plan.json").write_text(plan.to_json() + "\n")
    for d in plan.layers:
        print(f"  {d.reason}")
    return path


def _compile_micro(args, spec, source, variant, batch: int) -> Path:
    """Cortex-M: the int16 project (TVM-generated C, driver, Makefile). With the ARM toolchain and QEMU
    here, the project is the one ``scalpel run`` measures: built under every code shape of micro.GRID and
    the fewest instructions kept (``--fast``: the default shape only), Scalpel's layers each with the
    kernel that ran fewer instructions alone on the board; it is run on QEMU and checked against the int16
    reference. Without them: the default code shape and the paper's MCU rule (SIMD groups on every layer),
    said so, not built."""
    import dataclasses
    import tempfile

    import numpy as np

    from . import build, micro
    from .errors import PlanError
    from .micro import measure as mcu

    if batch != 1:
        raise PlanError(f"scalpel compile: a microcontroller runs one inference at a time; expected --batch 1, "
                        f"found {batch}")
    calibration = _calibration(args, spec, source)
    mod = variant.relax(1)
    path = Path(args.output or Path(args.out) / f"{source.name}-{variant.method}-{spec.cpu}")
    inputs = calibration[:_BOARD_IMAGES]
    if micro.missing_tools():
        plan = _plan_for(args, variant.method, mod, spec)
        build(mod, spec.target, plan.compile_plan(), out_dir=path, calibration=calibration, inputs=inputs)
        _write_plan(path, plan)
        print(f"  (not built: {', '.join(micro.missing_tools())} missing; install with: {micro.runner.INSTALL}; "
              "without them each layer's kernel is not measured: the paper's MCU rule, groups everywhere)")
        return path
    method = _MCU_KERNELS.get(variant.method, "measured")
    shapes = (micro.KernelConfig(),) if args.fast else micro.GRID
    with tempfile.TemporaryDirectory(prefix="scalpel-grid-") as tmp:
        best, best_run, grid = mcu.best_build(mod, _target(args.target), Path(tmp), calibration, method,
                                              inputs, shapes)
        shutil.copytree(best.path, path, dirs_exist_ok=True)  # the project holds no absolute path
    project = dataclasses.replace(best, path=path)
    _write_plan(path, _micro_plan(spec, best.board.group_width, mcu.layer_kernels(project)))
    result = micro.build_and_run(project)
    mcu.check_runs(project, result)
    if result.instructions != best_run.instructions:
        raise PlanError(f"{path}: {result.instructions[0]:,} instructions, its measured build "
                        f"{best_run.instructions[0]:,}; expected the same program")
    print(f"  QEMU {project.board.machine}: {result.instructions[0]:,} instructions per inference, outputs "
          f"bit-exact with the int16 reference; flash {result.flash_bytes:,} B, RAM {result.ram_bytes:,} B; "
          f"code shape {vars(best.config)} " + ("(the default: --fast)" if args.fast
                                                 else f"(fewest of {len(grid)})"))
    return path


def _micro_plan(spec, width: int, kernels: list[dict]):
    """The PruningPlan of a microcontroller build whose kernels were measured (micro.measure.layer_kernels)."""
    from .plan import LayerDecision, Method, PruningPlan

    return PruningPlan(spec.hardware_class, spec.cpu, tuple(
        LayerDecision(k["key"], Method(k["method"]), width if k["method"] == Method.GROUP.value else None,
                      k["reached_sparsity"], None, k["reason"]) for k in kernels))


def _write_plan(path: Path, plan) -> None:
    (path / "plan.json").write_text(plan.to_json() + "\n")
    for d in plan.layers:
        print(f"  {d.reason}")


def _check_method(args, spec, source) -> None:
    """A method of CLASS_METHODS needs its hardware class; --method fine also a reference model (it
    trains the gpu-fine recipes)."""
    from .errors import TargetError

    if args.method not in CLASS_METHODS:
        return
    hw_class, what, expected = CLASS_METHODS[args.method]
    if spec.hardware_class.value != hw_class:
        raise TargetError(f"--method {args.method} {what}; expected {expected}, found "
                          f"{spec.hardware_class.value} ({spec.cpu})")
    if args.method == "fine" and source.kind != "reference":
        raise _source_error(f"--method fine trains the reference models' gpu-fine recipes; {args.model} is a "
                            f"{source.kind} model (use --method scalpel or traditional)")


def cmd_compile(args) -> int:
    from .sources import resolve
    from .target import HardwareClass

    source, spec = resolve(args.model), _spec(args)
    _check_method(args, spec, source)
    if args.fast and spec.hardware_class is not HardwareClass.MCU:
        from .errors import PlanError

        raise PlanError(f"scalpel compile --fast: a microcontroller option (one code shape instead of the "
                        f"best of micro.GRID); {spec.cpu} builds have no such search, drop --fast")
    compilers = {HardwareClass.CPU: _compile_shared_library, HardwareClass.GPU: _compile_shared_library,
                 HardwareClass.MCU: _compile_micro}
    compile_fn = compilers[spec.hardware_class]
    variants, _, _, _ = _variants(args, spec, source, (args.method,), train=False)
    if spec.hardware_class is HardwareClass.MCU:
        path = compile_fn(args, spec, source, variants[args.method], args.batch)
        print(f"wrote {path}/ ({args.method}, {spec.cpu}): C sources, Makefile (make -C {path} run)")
        return 0
    path = compile_fn(args, spec, source, variants[args.method], args.batch)
    print(f"wrote {path} ({args.method}, batch {args.batch}, {spec.cpu}) and {path.with_suffix('.plan.json')}")
    return 0


COMMANDS = {"run": cmd_run, "profile": cmd_profile, "train": cmd_train, "prune": cmd_prune,
            "compile": cmd_compile, "bench": cmd_bench, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_pools_or_reexec(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    from .errors import ScalpelError

    try:
        return COMMANDS[args.cmd](args)
    except ScalpelError as err:
        print(f"scalpel {args.cmd}: {err}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "_child_runner", None) is not None:
            args._child_runner.close()


if __name__ == "__main__":
    sys.exit(main())
