"""GPU benchmarks (issue 7): compile here, run on a lent GPU with runtime-only TVM, report here.

    python benchmarks/gpu.py prepare            # builds .gpu/: kernels, models, runtime-only TVM, manifest
    # device tool: run(command="bash benchmarks/gpu_device.sh", carry=[".gpu"])  → $OUT/gpu_results.json
    python benchmarks/gpu.py report RESULTS.json  # → benchmarks/results/gpu.{json,md}

Layers: the GEMM of every conv (m = out channels, k = in·kh·kw, n = batch·pixels, layout "kn") and
Linear (n = batch, layout "nk") of VGG16 (32×32) and the reference models, at batch 1 and 64; the tile
kernel does not depend on the weights, so one kernel per shape serves every tile sparsity of the sweep
(the weights are drawn on the GPU machine). Models: node pruning, dense vs node-pruned with the node
counts the released Scalpel code reached (scalpel-algorithms.md §2; random weights: latency depends on
the structure only), compiled with tvm_scalpel.build for CUDA, at batch 1 and 64; NIN with the structure
of tvm_scalpel.released (no counts were released: every layer keeps the fraction that gives the paper's
81.16 % size). AlexNet is left out: its 244 MB of weights do not fit the 64 MiB that travels to the GPU
machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)
BATCHES = (1, 64)
LAYER_MODELS = ("vgg16", "lenet-5", "convnet", "nin", "alexnet")


def _gemm_shapes(name: str, batch: int) -> list[dict]:
    """(layer key, m, k, n, layout) of every layer RewriteTileSparse puts on a tile kernel, at ``batch``
    (profiling.layers_with_weights: the layers the passes see after node folding)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_scalpel.models import build_model
    from tvm_scalpel.profiling import layers_with_weights

    model = build_model(name).eval()
    mod = from_exported_program(torch.export.export(model, (model.example_input(batch),)))
    return [dict(layer=shape.key, m=shape.m, k=shape.k, n=shape.n, layout="kn" if shape.kind == "conv2d" else "nk")
            for shape, _ in layers_with_weights(mod)]


def _export_kernels(out: Path, spec) -> list[dict]:
    import tvm

    from tvm_scalpel.compat import ensure_cuda_compiler
    from tvm_scalpel.schedules import cuda

    ensure_cuda_compiler()
    target = tvm.target.Target(spec.target, host={"kind": "llvm"})
    cases, built = [], {}
    for model in LAYER_MODELS:
        for batch in BATCHES:
            for s in _gemm_shapes(model, batch):
                if model == "alexnet" and s["layout"] == "nk":
                    continue  # fc6/fc7 weights: the sweep draws them on the GPU machine, but 4096×9216 × 5 is slow
                func, name = cuda.tile_matmul(s["m"], s["k"], s["n"], spec.tile, s["layout"])
                if name not in built:
                    so = out / "kernels" / f"{name}.so"
                    tvm.compile(func, target).export_library(str(so))
                    built[name] = so.relative_to(out).as_posix()
                cases.append({**s, "model": model, "batch": batch, "so": built[name], "tile": list(spec.tile),
                              "symbol": str(func.attrs["global_symbol"]), "seed": len(cases)})
                print(f"kernel {name} ({model} {s['layer']}, batch {batch})", flush=True)
    return cases


def _node_pruned(model, kept: dict[str, int]):
    """Zero the weights and biases of all but the first ``kept[layer]`` nodes (FoldNodeMasks removes them)."""
    import torch

    with torch.no_grad():
        for lname, n in kept.items():
            layer = dict(model.named_modules())[lname]
            layer.weight[n:] = 0
            if layer.bias is not None:
                layer.bias[n:] = 0
    return model


def _export_models(out: Path, spec) -> list[dict]:
    import torch

    import tvm_scalpel
    from tvm_scalpel.models import build_model
    from tvm_scalpel.plan import decide
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_scalpel.released import RELEASED_NODES, released_structure

    cases = []
    nodes = {m: RELEASED_NODES[m] for m in ("lenet-5", "convnet")}  # AlexNet: too big to carry (docstring)
    nodes["nin"] = released_structure("nin", 1).kept_nodes  # none released: the fraction giving the paper's size
    for name, kept in nodes.items():
        for variant in ("dense", "node-pruned"):
            for batch in BATCHES:
                torch.manual_seed(0)
                model = build_model(name).eval()
                if variant == "node-pruned":
                    _node_pruned(model, kept)
                x = model.example_input(batch)
                mod = from_exported_program(torch.export.export(model, (x,)))
                ex = tvm_scalpel.build(mod, spec.target, decide(mod, spec).compile_plan())
                stem = f"{name}-{variant}-b{batch}"
                ex.export_library(str(out / "models" / f"{stem}.so"))
                case = {"model": name, "variant": variant, "batch": batch, "so": f"models/{stem}.so",
                        "structure": kept if variant == "node-pruned" else "dense",
                        "input_shape": list(x.shape)}
                if batch == 1:
                    np.save(out / "models" / f"{stem}.x.npy", x.numpy())
                    with torch.no_grad():
                        np.save(out / "models" / f"{stem}.y.npy", model(x).numpy())
                    case.update(input=f"models/{stem}.x.npy", expected=f"models/{stem}.y.npy")
                cases.append(case)
                print(f"model {stem}", flush=True)
    return cases


def _bundle_runtime(out: Path) -> None:
    """Runtime-only TVM (the installed package without libtvm_compiler.so and 3rdparty/) as a tar.xz,
    and the cp312 tvm_ffi wheel (the GPU machine runs Python 3.12)."""
    import tvm

    pkg = Path(tvm.__file__).parent
    with tarfile.open(out / "tvm_runtime.tar.xz", "w:xz") as tar:
        tar.add(pkg, arcname="tvm", filter=lambda ti: None if ti.name.endswith("libtvm_compiler.so")
                or "/3rdparty" in ti.name or "__pycache__" in ti.name else ti)
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(wheels), "apache-tvm-ffi==0.1.14.post1"], check=True)


def prepare(out: Path) -> None:
    import tvm_scalpel

    spec = tvm_scalpel.hardware_spec("cuda")
    if out.exists():
        shutil.rmtree(out)
    (out / "kernels").mkdir(parents=True)
    (out / "models").mkdir()
    manifest = {"provenance": {**provenance(spec.to_dict()["target"]), "command": " ".join(sys.argv)},
                "sparsities": list(SPARSITIES), "models": _export_models(out, spec),
                "layers": _export_kernels(out, spec)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _bundle_runtime(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/ ({size / 2**20:.1f} MiB; the device tool carries at most 64 MiB)")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _speedups(rows: list[dict]) -> list[str]:
    lines = ["| model | layer | batch | m×k×n | tile sparsity | ours ms | cuBLAS ms | ours vs cuBLAS | CSR ms | "
             "2:4 ms (dtype) | err |", "|---" * 11 + "|"]
    for r in rows:
        semi = r.get("semi_structured_2_4") or {}
        semi_s = (f"{semi['ms']:.4f} ({semi['dtype']}, dense {semi['dense_same_dtype_ms']:.4f})" if "ms" in semi
                  else semi.get("unsupported", "")[:40])
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['m']}×{r['k']}×{r['n']} | "
                     f"{r['tile_sparsity']:.2f} | {r['ours_ms']:.4f} | {r['cublas_ms']:.4f} | "
                     f"{r['cublas_ms'] / r['ours_ms']:.2f}× | {r.get('csr_ms', float('nan')):.4f} | {semi_s} | "
                     f"{r['rel_err']:.1e} |")
    return lines


def _model_table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch | dense ms | node-pruned ms | speedup | err (b1) |", "|---|---|---|---|---|---|"]
    by = {(r["model"], r["variant"], r["batch"]): r for r in rows}
    for (model, variant, batch), r in sorted(by.items()):
        if variant != "node-pruned":
            continue
        d = by[(model, "dense", batch)]
        lines.append(f"| {model} | {batch} | {d['ms']:.4f} | {r['ms']:.4f} | {d['ms'] / r['ms']:.2f}× | "
                     f"{r['rel_err'] if r['rel_err'] is None else format(r['rel_err'], '.1e')} |")
    return lines


def report(results: Path) -> None:
    res = json.loads(results.read_text())
    facts = res["facts"]
    md = [f"# GPU results — {facts['device']}", "",
          f"Measured {facts['date']} with torch {facts['torch']} (CUDA {facts['cuda']}); nvidia-smi: "
          f"{facts['nvidia_smi']}. Built here at {res['manifest_provenance'].get('git_sha')}. Times are medians "
          "(TVM time_evaluator, CUDA events for torch); fp32, TF32 off.", "",
          "## Node pruning (whole models, compiled dense vs node-pruned)", "", *_model_table(res["models"]), "",
          "## Layers: tile-sparse kernel vs cuBLAS, CSR (cuSPARSE) and 2:4", "", *_speedups(res["layers"])]
    (RESULTS / "gpu.md").write_text("\n".join(md) + "\n")
    shutil.copy(results, RESULTS / "gpu.json")
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the kernels and models for CUDA and bundle runtime-only TVM")
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    r = sub.add_parser("report", help="tables from the GPU machine's gpu_results.json")
    r.add_argument("results")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out))
    else:
        report(Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
