"""Train the paper's recipes on real data and record accuracy, kept nodes, sparsity, size and wall time.

    python benchmarks/train_recipes.py                 # every full recipe (hours each for LeNet-5 and ConvNet on 1 core)
    python benchmarks/train_recipes.py --park --recipes lenet-5/cpu   # commit-able checkpoint: continue it elsewhere
    python benchmarks/train_recipes.py --quick         # the quick variants (about a minute each)
    python benchmarks/train_recipes.py --recipes lenet-300-100/cpu lenet-5/simd-w8
    python benchmarks/train_recipes.py --recipes vgg16/gpu-fine --device cuda      # GPU tile pruning
    python benchmarks/train_recipes.py --recipes vgg16-tiny/gpu-fine --scale 0.3   # TinyVGG16, 0.3× the epochs

Writes benchmarks/results/training/<recipe>.json (result, plan summary, history, provenance),
<recipe>.plan.json, and summary.csv; checkpoints go to benchmarks/results/tmp/training/ so an
interrupted run resumes. ``MODEL/simd-w8`` is the MCU schedule with w from an AVX2 target (8 fp32
lanes), the width of the issue's SIMD bars. ConvNet runs on Fashion-MNIST padded to 32×32
(CIFAR-10 is not available offline) and every record says so. ``vgg16-tiny`` is VGG16 at width 0.25.

Recipes with GPU tile stages (``MODEL/gpu-fine``) also write <model>_<kind>.{json,md}: accuracy, tile
sparsity and size after every stage, and the highest tile sparsity within 0.5 points of dense.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm_scalpel.target import hardware_spec  # noqa: E402
from tvm_scalpel.training import TrainingPlan, get_recipe, quick, run_recipe, scale_schedule  # noqa: E402
from tvm_scalpel.training.loop import (CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, PLAN_NAME, STAGES_DIR,  # noqa: E402
                                       STATE_SUFFIX)
from tvm_scalpel.training.recipes import Recipe, StageKind, paper_recipe  # noqa: E402

logger = logging.getLogger("train_recipes")

AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # 8 fp32 lanes: the paper's w = 8

# The bars: dense accuracy, and for pruned recipes the max kept fraction / size and accuracy loss.
BARS = {
    "lenet-300-100": {"dense": 0.982, "simd_weights": 0.08, "node_hidden": 0.60, "cpu_size": 0.0708, "loss": 0.002},
    "lenet-5": {"dense": 0.990, "simd_weights": 0.04, "node_conv": 0.50, "cpu_size": 0.0520, "loss": 0.002},
    "convnet": {"dense": 0.90, "cpu_size": 0.4428, "loss": 0.005},
}
#: GPU tile pruning: the stage to deploy is the sparsest one within this accuracy loss of dense.
TILE_LOSS_BUDGET = 0.005
#: Models the script knows under a second name: (registry model, extra model kwargs).
VARIANTS = {"vgg16-tiny": ("vgg16", (("width", 0.25),))}
DEFAULT = [f"{m}/{k}" for m in ("lenet-300-100", "lenet-5", "convnet")
           for k in ("simd-w8", "mcu", "gpu", "cpu", "magnitude")]


#: Committed checkpoints (``--park``): a recipe longer than one working session continues in a new checkout
#: from here, and a finished one's trained model stays usable (micro.py, scalpel run) without retraining.
PARKED = ROOT / "benchmarks" / "results" / "checkpoints"
PARK_FILES = (CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, PLAN_NAME)


def park(slug: str, checkpoints: Path) -> Path:
    """Copy a recipe's checkpoint (and final model when finished; dense stage ends other recipes can
    share; every stage's plan) from ``checkpoints`` into :data:`PARKED`."""
    src, dst = checkpoints / slug, PARKED / slug
    if not (src / CHECKPOINT_NAME).is_file():
        raise SystemExit(f"{slug}: no checkpoint to park in {src}")
    shutil.rmtree(dst, ignore_errors=True)
    (dst / STAGES_DIR).mkdir(parents=True)
    for name in PARK_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    for state in (src / STAGES_DIR).glob(f"*{STATE_SUFFIX}"):  # the shareable dense stage ends
        shutil.copyfile(state, dst / STAGES_DIR / state.name)
        weights = state.name.removesuffix(STATE_SUFFIX) + ".pt"
        shutil.copyfile(src / STAGES_DIR / weights, dst / STAGES_DIR / weights)
    for plan in (src / STAGES_DIR).glob("*.plan.json"):  # small: what each stage left (node_phase reads one)
        shutil.copyfile(plan, dst / STAGES_DIR / plan.name)
    return dst


def unpark(checkpoints: Path) -> list[str]:
    """Copy every parked recipe that ``checkpoints`` lacks into it, so training resumes (and shares)
    from there; returns the slugs copied."""
    copied = []
    for src in sorted(PARKED.glob(f"*/{CHECKPOINT_NAME}")):
        dst = checkpoints / src.parent.name
        if not (dst / CHECKPOINT_NAME).is_file():
            shutil.copytree(src.parent, dst, dirs_exist_ok=True)
            copied.append(src.parent.name)
    return copied


def resolve(name: str, is_quick: bool, epochs: int = 1, subset: int | None = 12000,
            group_stages: int = 2, scale: float | None = None) -> Recipe:
    model, kind = name.split("/")[:2]
    if kind == "simd-w8":
        r = paper_recipe(model, "mcu", target=AVX2)
        r = replace(r, name=f"{model}/simd-w8", group_dtype="float32")
    elif model in VARIANTS:
        base, kwargs = VARIANTS[model]
        r = get_recipe(f"{base}/{kind}")
        r = replace(r, name=f"{model}/{kind}", model_kwargs=r.model_kwargs + kwargs)
    else:
        r = get_recipe(f"{model}/{kind}")
    if scale is not None:
        r = scale_schedule(r, scale)
    if not is_quick:
        return r
    return quick(r, epochs=epochs, train_subset=subset or None, test_subset=min(subset, 2000) if subset else None,
                 max_group_stages=group_stages)


def provenance() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(), "host_target": hardware_spec("host").to_dict(),
    }


def bars_check(recipe: Recipe, res) -> dict:
    """Which of the issue's bars this run meets (reported as measured, never tuned to pass)."""
    b = BARS.get(recipe.model, {})
    out: dict = {}
    plan = res.plan
    if res.dense_accuracy is not None and "dense" in b:
        out["dense_accuracy>=bar"] = res.dense_accuracy >= b["dense"]
        out["accuracy_loss<=bar"] = res.dense_accuracy - res.final_accuracy <= b["loss"]
    kind = recipe.name.split("/")[1]
    if kind == "simd-w8" and "simd_weights" in b:
        out["weights_kept<=bar"] = plan.weight_density <= b["simd_weights"]
    if kind == "gpu":
        out.update(node_bars(recipe.model, plan))
    if kind == "cpu" and "cpu_size" in b:
        out["size<=bar"] = plan.size_ratio <= b["cpu_size"]
    return out


def epochs_by_threads(history) -> dict[str, int]:
    """How many epochs ran at each torch thread count. A recipe resumed across invocations may have run
    at several (``--threads`` in ``command`` is only the last one's); "unrecorded": epochs from before
    EpochRecord.threads existed."""
    counts = Counter("unrecorded" if h.threads is None else str(h.threads) for h in history)
    return dict(sorted(counts.items()))


def kept_nodes(plan: TrainingPlan) -> dict[str, list[int]]:
    """Per layer: [kept nodes, nodes]."""
    return {lp.name: [len(lp.kept_nodes), lp.num_nodes] for lp in plan.layers}


def node_bars(model: str, plan: TrainingPlan) -> dict:
    """The node-pruning bars: hidden nodes kept (LeNet-300-100), conv channels kept (LeNet-5)."""
    b = BARS.get(model, {})
    hidden = plan.layers[:-1]  # the classifier's outputs are never pruned
    out: dict = {}
    if model == "lenet-300-100" and "node_hidden" in b:
        out["hidden_nodes_kept"] = sum(len(lp.kept_nodes) for lp in hidden) / sum(lp.num_nodes for lp in hidden)
        out["hidden_nodes_kept<=bar"] = out["hidden_nodes_kept"] <= b["node_hidden"]
    if model == "lenet-5" and "node_conv" in b:
        convs = [lp for lp in plan.layers if lp.kind == "conv2d"]
        out["conv_channels_kept"] = sum(len(lp.kept_nodes) for lp in convs) / sum(lp.num_nodes for lp in convs)
        out["conv_channels_kept<=bar"] = out["conv_channels_kept"] <= b["node_conv"]
    return out


def node_phase(recipe: Recipe, history: list[dict], dense_accuracy: float | None, stages_dir: Path) -> dict | None:
    """Where a CPU recipe's node phase ends (its last retrain stage, before the group stages): the GPU
    recipe's stages, trained as the first part of this one. None until that stage has ended."""
    groups = next((i for i, s in enumerate(recipe.stages) if s.kind is StageKind.GROUP), len(recipe.stages))
    retrain = [i for i, s in enumerate(recipe.stages[:groups]) if s.kind is StageKind.RETRAIN]
    if not retrain:
        return None
    last = retrain[-1]
    plan_path = stages_dir / f"stage-{last + 1:02d}.plan.json"
    ends = [h for h in history if h["stage"] == last and h["epoch"] == h["epochs"]]
    if not plan_path.is_file() or not ends:
        return None
    plan = TrainingPlan.from_json(plan_path.read_text())
    acc = ends[-1]["test_accuracy"]
    loss = None if dense_accuracy is None else dense_accuracy - acc
    bars = node_bars(recipe.model, plan)
    if loss is not None and "loss" in BARS.get(recipe.model, {}):
        bars["accuracy_loss<=bar"] = loss <= BARS[recipe.model]["loss"]
    return {"stage": last, "label": ends[-1]["stage_label"], "plan": str(plan_path.relative_to(ROOT)),
            "dense_accuracy": dense_accuracy, "test_accuracy": acc, "accuracy_loss": loss,
            "kept_nodes": kept_nodes(plan),
            "weight_density": plan.weight_density, "size_ratio": plan.size_ratio, "bars": bars}


def tile_report(recipe: Recipe, res, ckpt_dir: Path, record: dict) -> dict:
    """Per stage: accuracy, loss against dense, tile sparsity and size (from the stage's own plan); and
    the sparsest tile stage within TILE_LOSS_BUDGET of dense."""
    stages = res.stages()
    for row in stages:
        plan_path = ckpt_dir / STAGES_DIR / f"stage-{row['stage'] + 1:02d}.plan.json"
        row["size_ratio"] = TrainingPlan.from_json(plan_path.read_text()).size_ratio if plan_path.is_file() else 1.0
        row["weights"] = str(ckpt_dir / STAGES_DIR / f"stage-{row['stage'] + 1:02d}.pt")
        row["within_budget"] = row["accuracy_loss"] is not None and row["accuracy_loss"] <= TILE_LOSS_BUDGET
    tiles = [r for r in stages if r["label"].startswith("tile") and r["within_budget"]]
    chosen = max(tiles, key=lambda r: r["tile_sparsity"] or 0.0) if tiles else None
    return {
        "recipe": recipe.name, "model": recipe.model, "model_kwargs": dict(recipe.model_kwargs),
        "dataset": f"{recipe.data.name}, padded to {recipe.data.pad_to}x{recipe.data.pad_to}, "
                   f"{recipe.data.channels} channel(s)",
        "train_subset": recipe.data.train_subset, "test_subset": recipe.data.test_subset,
        "tile": list(recipe.tile() or ()), "target": recipe.target, "batch_size": recipe.batch_size,
        "schedule": [{"label": s.label, "epochs": s.epochs, "lr": s.optim.lr, "lr_step": s.optim.lr_step,
                      "lr_gamma": s.optim.lr_gamma, "momentum": s.optim.momentum,
                      "weight_decay": s.optim.weight_decay, "batch_size": recipe.stage_batch_size(s)}
                     for s in recipe.stages],
        "dense_accuracy": res.dense_accuracy, "loss_budget": TILE_LOSS_BUDGET, "stages": stages,
        "chosen_stage": chosen, "final_accuracy": res.final_accuracy,
        "final_plan_size_ratio": res.plan.size_ratio, "final_tile_sparsity": res.plan.tile_sparsity,
        "final_weights": str(ckpt_dir / FINAL_WEIGHTS_NAME), "wall_seconds": res.wall_seconds,
        "command": record["command"], "device": record["device"], "provenance": record["provenance"],
    }


def tile_markdown(r: dict) -> str:
    p = r["provenance"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    lines = [
        f"# {r['recipe']}: GPU tile pruning, accuracy after every stage", "",
        f"Model `{r['model']}` {r['model_kwargs']}, tile {r['tile'][0]}×{r['tile'][1]} (rows × k, "
        f"from `hardware_spec({r['target']!r}).tile`), data {r['dataset']} "
        f"(train subset {r['train_subset'] or 'all'}, test subset {r['test_subset'] or 'all'}).", "",
        f"Command: `python {r['command']}` on {r['device']}, {p['torch_threads']} torch thread(s), {p['cpu']}; "
        f"git {p['git_sha'][:12]}{' (dirty tree)' if p['git_dirty'] else ''}, started {p['date']}, "
        f"wall {r['wall_seconds'] / 60:.1f} min.", "",
        "| stage | epochs | test accuracy | loss vs dense | tile sparsity (pruned layers) | weights kept | size vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        loss = "-" if s["accuracy_loss"] is None else f"{100 * s['accuracy_loss']:+.2f} pt"
        lines.append(f"| {s['label']} | {s['epochs']} | {pct(s['test_accuracy'])} | {loss} | "
                     f"{pct(s['tile_sparsity'])} | {pct(s['weight_density'])} | {pct(s['size_ratio'])} |")
    c = r["chosen_stage"]
    lines += ["", (f"Highest tile sparsity within {100 * r['loss_budget']:.1f} points of dense "
                   f"({pct(r['dense_accuracy'])}): **{c['label']}**, {pct(c['test_accuracy'])}, "
                   f"{pct(c['tile_sparsity'])} of the tiles pruned, size {pct(c['size_ratio'])} of dense "
                   f"(weights: `{c['weights']}`)." if c else
                   f"No tile stage stays within {100 * r['loss_budget']:.1f} points of dense "
                   f"({pct(r['dense_accuracy'])})."), "",
              "Schedule (SGD, momentum; lr × gamma every lr_step epochs):", "",
              "| stage | epochs | lr | lr_step | weight decay | batch |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['label']} | {s['epochs']} | {s['lr']:g} | {s['lr_step'] or '-'} | {s['weight_decay']:g} | "
              f"{s['batch_size']} |" for s in r["schedule"]]
    return "\n".join(lines) + "\n"


def report_node_phase(args: argparse.Namespace) -> int:
    """``--node-phase``: the node phase of (possibly unfinished) CPU recipes, read from their checkpoints."""
    missing = 0
    for name in args.recipes:
        recipe = resolve(name, args.quick, args.epochs, args.subset, args.group_stages, args.scale)
        slug = recipe.name.replace("/", "__")
        ckpt = args.checkpoints / slug / CHECKPOINT_NAME
        if not ckpt.is_file():
            logger.error("%s: no checkpoint at %s; train it first", name, ckpt)
            missing += 1
            continue
        ck = torch.load(ckpt, weights_only=False, map_location="cpu")
        report = node_phase(recipe, ck["history"], ck["dense_accuracy"], ckpt.parent / STAGES_DIR)
        if report is None:
            logger.info("%s: its node phase has not ended yet (stage %d, epoch %d)", name, ck["stage"], ck["epoch"])
            missing += 1
            continue
        report.update(recipe=recipe.name, command=" ".join(sys.argv), provenance=provenance())
        out = args.out / f"{slug}.node_phase.json"
        out.write_text(json.dumps(report, indent=1, default=str))
        logger.info("%s: node phase %s", name, {k: report[k] for k in ("test_accuracy", "accuracy_loss", "bars")})
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="run the quick variants")
    ap.add_argument("--recipes", nargs="*", default=DEFAULT, help=f"default: {' '.join(DEFAULT)}")
    ap.add_argument("--epochs", type=int, default=1, help="quick: epochs per stage")
    ap.add_argument("--subset", type=int, default=12000, help="quick: training examples (0 = all, full test set)")
    ap.add_argument("--group-stages", type=int, default=2, help="quick: how many group/magnitude stages to keep")
    ap.add_argument("--scale", type=float, default=None, help="scale every stage's epochs and lr step (e.g. 0.3)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training")
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "benchmarks" / "results" / "tmp" / "training")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--park", action="store_true",
                    help=f"train nothing: copy the recipes' checkpoints to {PARKED.relative_to(ROOT)} (committed)")
    ap.add_argument("--node-phase", action="store_true",
                    help="train nothing: report where each CPU recipe's node phase ended, from its checkpoint "
                         "(also while the group stages still run) -> <recipe>.node_phase.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.park:
        for name in args.recipes:
            slug = resolve(name, args.quick, args.epochs, args.subset, args.group_stages, args.scale).name
            logger.info("parked %s", park(slug.replace("/", "__"), args.checkpoints))
        return 0
    if args.node_phase:
        return report_node_phase(args)
    if not args.no_resume:
        for slug in unpark(args.checkpoints):
            logger.info("%s: continuing from its parked checkpoint (%s)", slug, PARKED.relative_to(ROOT))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.recipes:
        recipe = resolve(name, args.quick, args.epochs, args.subset, args.group_stages, args.scale)
        slug = recipe.name.replace("/", "__")
        t0 = time.perf_counter()
        prov = provenance()  # at the start: the code that trains is the code checked out now
        res = run_recipe(recipe, checkpoint_dir=args.checkpoints / slug, resume=not args.no_resume,
                         device=args.device, share_from=args.checkpoints)  # a model's recipes share dense stages
        prov["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        prov["loadavg_end"] = os.getloadavg()
        plan = res.plan
        record = {
            "recipe": recipe.to_dict(), "quick": args.quick, "command": " ".join(sys.argv),
            "dataset": recipe.data.name + (" (CIFAR-10 not available offline)" if recipe.data.name == "fashion-mnist"
                                           and recipe.model in ("convnet", "vgg16") else ""),
            "dense_accuracy": res.dense_accuracy, "final_accuracy": res.final_accuracy,
            "accuracy_loss": None if res.dense_accuracy is None else res.dense_accuracy - res.final_accuracy,
            "kept_nodes": kept_nodes(plan),
            "sparsity": {lp.name: lp.sparsity for lp in plan.layers},
            "weight_density": plan.weight_density, "size_ratio": plan.size_ratio,
            "dense_bytes": plan.dense_bytes, "stored_bytes": plan.stored_bytes,
            "group_width": recipe.group_width(),
            "wall_seconds": res.wall_seconds, "this_process_seconds": time.perf_counter() - t0,
            "epochs_by_threads": epochs_by_threads(res.history),
            "bars": bars_check(recipe, res) if not args.quick else "not checked (quick run)",
            "node_phase": node_phase(recipe, res.to_dict()["history"], res.dense_accuracy,
                                     args.checkpoints / slug / STAGES_DIR),
            "device": args.device, "provenance": prov,
            "history": res.to_dict()["history"],
        }
        (args.out / f"{slug}.json").write_text(json.dumps(record, indent=1, default=str))
        (args.out / f"{slug}.plan.json").write_text(plan.to_json())
        if any(s.kind is StageKind.TILE for s in recipe.stages):
            stem = args.out / "_".join(name.split("/")[:2])
            report = tile_report(recipe, res, args.checkpoints / slug, record)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
            stem.with_suffix(".md").write_text(tile_markdown(report))
            logger.info("wrote %s.{json,md}", stem)
        rows.append({
            "recipe": recipe.name, "dataset": record["dataset"], "w": record["group_width"],
            "dense_acc": res.dense_accuracy, "final_acc": res.final_accuracy,
            "kept_nodes": " ".join(f"{k}:{a}/{b}" for k, (a, b) in record["kept_nodes"].items()),
            "weight_density": round(plan.weight_density, 5), "size_ratio": round(plan.size_ratio, 5),
            "tile_sparsity": "" if plan.tile_sparsity is None else round(plan.tile_sparsity, 5),
            "wall_s": round(res.wall_seconds, 1),
        })
        logger.info("%s → %s", recipe.name, rows[-1])
    # One row per recipe: rows from earlier invocations stay unless this run replaced them.
    summary = args.out / ("summary_quick.csv" if args.quick else "summary.csv")
    merged = {}
    if summary.is_file():
        with summary.open(newline="") as f:
            merged = {r["recipe"]: r for r in csv.DictReader(f)}
    merged.update({r["recipe"]: r for r in rows})
    with summary.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(merged[k] for k in sorted(merged))
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
