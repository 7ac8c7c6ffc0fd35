"""Scalpel on an emulated Cortex-M4 (QEMU mps2-an386) or Cortex-M55 (mps3-an547): executed instructions,
flash, RAM, accuracy.

    python benchmarks/micro.py                         # LeNet-300-100 and LeNet-5, full recipes (trains if needed)
    python benchmarks/micro.py --board cortex-m55 --models lenet-300-100 --no-train   # Helium, w = 8
    python benchmarks/micro.py --quick                 # the quick recipes (minutes)
    python benchmarks/micro.py --models lenet-300-100 --no-train
    python benchmarks/micro.py --models lenet-300-100 lenet-5 convnet --quick-models lenet-5 convnet
    python benchmarks/micro.py --models lenet-5 --quick --epochs 4 --subset 0 --group-stages 5   # shortened full
    python benchmarks/micro.py --models convnet --no-train --layer-variant   # + SIMD groups on magnitude's schedule

Per model, three int16 builds by the same flow (tvm_scalpel.micro: TVM-generated C, arm-none-eabi-gcc
-O2 -funroll-loops, the same driver):
- dense:       the dense architecture, every weight, the board's SIMD MAC (the baseline): SMLAD on int16
               pairs (M4) or VMLADAVA on eight int16 (M55);
- traditional: the magnitude-pruned model (Han et al.), CSR: an index per weight, no SIMD;
- Scalpel:     the SIMD-aware pruned model (MCU recipe, w = hardware_spec(board).lanes('int16'): 2 on the
               M4, 8 on the M55, whose schedule is train_recipes.py's MODEL/simd-w8), one index per kept
               group, one SIMD MAC per group; per layer group-sparse or dense, whichever runs fewer
               instructions when the layer is built alone and run on the board (micro.measure_layers);
- with --layer-variant (M4), "scalpel-layer": the same groups, kernels and choice, trained by MODEL/mcu-layer,
               i.e. traditional pruning's schedule (50/70/80/90 % of each layer) pruning the lowest-RMS
               pairs within each layer instead of the paper's global threshold: it differs from
               "traditional" only in structure (aligned pairs, one index each, SMLAD).
Each variant is built under every code-shape setting of micro.GRID (explicit unroll 1/4/8, USAT/SSAT or
compare-and-select saturation) and keeps its fewest instructions; all counts are recorded. Every build
runs the first test images on QEMU; outputs must equal the numpy int16 reference bit for
bit, and the Scalpel build runs twice to show the count is deterministic. Accuracy of the int16 models
is the numpy reference on the whole test set (it is the board's arithmetic, checked above). The metric
is instructions executed between cost_begin()/cost_end() (a QEMU TCG plugin), not cycles.
Writes benchmarks/results/micro.{json,md}, replacing the measured (model, board) entries, keeping the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from tvm_scalpel import bench, micro  # noqa: E402
from tvm_scalpel.micro import measure  # noqa: E402
from tvm_scalpel.micro import Method  # noqa: E402
from tvm_scalpel.models import build_model  # noqa: E402
from tvm_scalpel.report import PAPER_MCU, PAPER_TRADITIONAL_MCU_MEAN  # noqa: E402
from tvm_scalpel.target import hardware_spec  # noqa: E402
from tvm_scalpel.training import run_recipe  # noqa: E402
from tvm_scalpel.training.loop import (CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, load_data,  # noqa: E402
                                       recipe_fingerprint)
from tvm_scalpel.training.recipes import Recipe  # noqa: E402
from train_recipes import resolve, unpark  # noqa: E402  (same folder)

RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINTS = RESULTS / "tmp" / "training"
# The SIMD-aware recipe per board: the MCU schedule at the board's int16 lanes. The M55's w = 8 is the
# simd-w8 schedule's (checked in run_model), so its checkpoints are shared with the issue-3 run.
SCALPEL_RECIPE = {"cortex-m4": "mcu", "cortex-m55": "simd-w8"}

logger = logging.getLogger("micro")


@dataclass
class Trained:
    recipe: str
    model: torch.nn.Module
    dense_accuracy: float | None
    fingerprint: str


@dataclass(frozen=True)
class QuickSettings:
    """train_recipes.py's quick knobs: epochs per stage, training examples (0 = all), group stages."""

    epochs: int = 1
    subset: int = 12000
    group_stages: int = 2

    @property
    def tag(self) -> str:
        return f"e{self.epochs}-s{self.subset}-g{self.group_stages}"


def _trained(name: str, quick: QuickSettings | None, train: bool) -> tuple[Recipe, Trained]:
    """The recipe as benchmarks/train_recipes.py runs it, so its checkpoints are reused. A finished run is
    loaded from its final weights even if the recipe definition changed since (its fingerprint is kept
    in the results); an unfinished one is trained or resumed."""
    recipe = resolve(name, quick is not None, **(vars(quick) if quick else {}))
    name = name + ("/quick" if quick else "")
    # Quick runs keep their own checkpoints, per setting: train_recipes.py --quick may have run others.
    folder = RESULTS / "tmp" / "micro" / f"training-{quick.tag}" if quick else CHECKPOINTS
    ckpt = folder / name.replace("/", "__")
    if not quick:
        unpark(CHECKPOINTS)  # committed checkpoints: trained models, or runs to continue
    final = ckpt / FINAL_WEIGHTS_NAME
    if not final.is_file():
        if not train:
            raise SystemExit(f"{name}: not trained yet ({ckpt}); run without --no-train or "
                             f"python benchmarks/train_recipes.py --recipes {name.removesuffix('/quick')}")
        run_recipe(recipe, checkpoint_dir=ckpt, share_from=folder)
    ck = torch.load(ckpt / CHECKPOINT_NAME, weights_only=False)
    if ck["fingerprint"] != recipe_fingerprint(recipe):
        logger.warning("%s: trained under another revision of the recipe definition (%s)", name, ck["fingerprint"])
    model = build_model(recipe.model)
    model.load_state_dict(torch.load(final, weights_only=True))
    return recipe, Trained(ck["recipe"], model.eval(), ck["dense_accuracy"], ck["fingerprint"])


def _relax(model: torch.nn.Module, x: torch.Tensor):
    return from_exported_program(torch.export.export(model.eval(), (x[:1],)))


def _accuracy_fp32(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1).numpy() == labels).mean())


def run_model(model_name: str, quick: QuickSettings | None, train: bool, images: int, out: Path,
              target: str = "cortex-m4", layer_variant: bool = False) -> dict:
    recipe, scalpel = _trained(f"{model_name}/{SCALPEL_RECIPE[target]}", quick, train)
    lanes = hardware_spec(target).lanes("int16")
    if recipe.group_width() != lanes:
        raise SystemExit(f"{recipe.name}: prunes groups of {recipe.group_width()}, {target} has {lanes} int16 lanes")
    _, traditional = _trained(f"{model_name}/magnitude", quick, train)
    layer = _trained(f"{model_name}/mcu-layer", quick, train)[1] if layer_variant else None
    train_set, test_set = load_data(recipe)
    calib = measure.calibration_images(train_set)
    x_test = test_set.transform(test_set.images)
    labels = test_set.labels.numpy()
    xs, board = x_test.numpy(), x_test[:images].numpy()
    dense_arch = build_model(model_name)

    builds = [measure.Variant("dense", _relax(dense_arch, x_test), Method.DENSE, evaluate=False),
              measure.Variant("traditional", _relax(traditional.model, x_test), Method.CSR),
              measure.Variant("scalpel", _relax(scalpel.model, x_test), "measured", repeat=2)]
    trained = {"traditional": traditional, "scalpel": scalpel}
    if layer is not None:
        builds.append(measure.Variant("scalpel-layer", _relax(layer.model, x_test), "measured", repeat=2))
        trained["scalpel-layer"] = layer

    def finish(variant: str, row: dict) -> None:
        result = trained.get(variant)
        row["recipe"] = None if result is None else result.recipe
        row["recipe_fingerprint"] = None if result is None else result.fingerprint
        logger.info("%s %s: %d instructions, flash %d B, RAM %d B", model_name, variant, row["instructions"],
                    row["flash_bytes"], row["ram_bytes"])
        if result is not None:
            row["accuracy_fp32"] = _accuracy_fp32(result.model, x_test, labels)
            logger.info("  int16 %.2f %% (fp32 %.2f %%)", 100 * row["accuracy_int16"], 100 * row["accuracy_fp32"])

    rows = measure.measure_all(builds, target, out / f"{target}-{model_name}", calib, board,
                               (xs, labels), on_variant=finish)
    rows["dense"]["note"] = ("the dense architecture; instruction counts do not depend on weight values, and "
                             "its accuracy is that of untrained weights, not reported")
    return {"model": model_name, "dataset": recipe.data.name, "quick": None if quick is None else vars(quick),
            "recipes": {"scalpel": scalpel.recipe, "traditional": traditional.recipe,
                        **({"scalpel-layer": layer.recipe} if layer else {})},
            "dense_fp32_accuracy": scalpel.dense_accuracy,
            "board": f"{target} (QEMU {micro.BOARDS[target].machine})", "target": target, "group_width": lanes,
            "variants": rows, "paper": {"scalpel_speedup": PAPER_MCU[model_name][0],
                                        "scalpel_size_percent": PAPER_MCU[model_name][1],
                                        "traditional_mean_speedup": PAPER_TRADITIONAL_MCU_MEAN}}


def _target(r: dict) -> str:
    return r.get("target", "cortex-m4")  # entries written before the M55 existed


def markdown(results: list[dict]) -> str:
    lines = ["# Scalpel on microcontrollers (QEMU), int16", "",
             "Instructions executed per inference (QEMU TCG plugin; instructions, not cycles: an MVE instruction "
             "takes 2 beats on the M55). Speedup and size (weights + indices + row pointers, bytes) are relative "
             "to the dense int16 build of the same flow on the same board (SMLAD on the M4, VMLADAVA on the M55). "
             "Accuracy: int16 model on the whole test set (numpy reference, bit-exact with the board). The "
             "paper's column is its Cortex-M4 result."]
    if any("scalpel-layer" in r["variants"] for r in results):
        lines += ["", ("scalpel-layer: Scalpel's SIMD-aware groups, kernels and per-layer kernel choice, trained "
                       "on traditional pruning's schedule (each layer's lowest-RMS pairs pruned to 50/70/80/90 %, "
                       "recipe MODEL/mcu-layer) instead of the paper's global RMS threshold (scalpel): it differs "
                       "from traditional only in structure.")]
    for target in dict.fromkeys(_target(r) for r in results):
        rows = [r for r in results if _target(r) == target]
        lines += ["", f"## {rows[0]['board']}, SIMD groups of {rows[0].get('group_width', 2)}", "",
                  "| model | variant | instructions | speedup | size | flash B | RAM B | acc int16 | acc fp32 | paper |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            p = r["paper"]
            for name, v in r["variants"].items():
                paper = {"scalpel": f"{p['scalpel_speedup']}x ({p['scalpel_size_percent']} %)",
                         "traditional": f"mean {p['traditional_mean_speedup']}x"}.get(name, "")
                acc = (f"{100 * v['accuracy_int16']:.2f} %", f"{100 * v['accuracy_fp32']:.2f} %") \
                    if "accuracy_int16" in v else ("-", "-")
                quick = f" (quick {r['quick']['epochs']} ep/stage)" if r["quick"] else ""
                lines.append(f"| {r['model']}{quick} | {name} | {v['instructions']:,} | "
                             f"{v['speedup']:.2f}x | {v['size_percent']:.2f} % | {v['flash_bytes']:,} | "
                             f"{v['ram_bytes']:,} | {acc[0]} | {acc[1]} | {paper if target == 'cortex-m4' else ''} |")
            lines.append(f"| | dense fp32 (training) | | | | | | | {100 * (r['dense_fp32_accuracy'] or 0):.2f} % | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    ap.add_argument("--board", choices=sorted(SCALPEL_RECIPE), default="cortex-m4")
    ap.add_argument("--quick", action="store_true", help="the quick recipes for every model")
    ap.add_argument("--quick-models", nargs="*", default=[], help="models that use their quick recipes (full ones "
                    "not trained yet); their rows say (quick)")
    ap.add_argument("--epochs", type=int, default=1, help="quick recipes: epochs per stage")
    ap.add_argument("--subset", type=int, default=12000, help="quick recipes: training examples (0 = all)")
    ap.add_argument("--group-stages", type=int, default=2, help="quick recipes: pruning stages kept")
    ap.add_argument("--no-train", action="store_true", help="fail instead of training a missing recipe")
    ap.add_argument("--images", type=int, default=4, help="test images run on the board")
    ap.add_argument("--layer-variant", action="store_true", help="also build MODEL/mcu-layer (SIMD groups on "
                    "magnitude pruning's per-layer schedule) as 'scalpel-layer' (cortex-m4)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results, "
                    "or benchmarks/results/quick with --quick)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    micro.check_toolchain()
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    build_dir = RESULTS / "tmp" / "micro"
    quick = QuickSettings(args.epochs, args.subset, args.group_stages)
    if args.layer_variant and args.board != "cortex-m4":
        raise SystemExit(f"--layer-variant: the mcu-layer recipes prune pairs for the cortex-m4, not {args.board}")
    results = [run_model(m, quick if args.quick or m in args.quick_models else None, not args.no_train, args.images,
                         build_dir, args.board, args.layer_variant) for m in args.models]
    out.mkdir(parents=True, exist_ok=True)
    # One file for every (model, board): a run replaces its entries and keeps the others (each entry has
    # its own provenance), so models trained on different schedules can be measured separately.
    path = out / "micro.json"
    previous = json.loads(path.read_text())["results"] if path.is_file() else []
    prov = bench.provenance({"kind": args.board, "machine": micro.BOARDS[args.board].machine})
    for r in results:
        r["provenance"] = prov
    names = {(r["model"], _target(r)) for r in results}
    merged = [r for r in previous if (r["model"], _target(r)) not in names] + results
    order = {m: i for i, m in enumerate(PAPER_MCU)}
    merged.sort(key=lambda r: (sorted(SCALPEL_RECIPE).index(_target(r)), order.get(r["model"], len(order))))
    bench.write_json(path, {"results": merged})
    (out / "micro.md").write_text(markdown(merged))
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
