"""Scalpel Figures 13 and 14 on this CPU: relative execution time vs weight sparsity.

fc:   matrix-vector, W 4096×4096 · x (batch 1)            (Figure 13)
conv: GEMM, W 128×1200 · D 1200×729 (a conv after im2col) (Figure 14)

Formats: the best dense we can get (numpy/OpenBLAS, torch at 1 and 2 threads, our TVM dense kernel),
CSR of an unstructured mask (torch, scipy, our TVM CSR kernel) and our group-sparse kernel at
w = 4, 8, 16 and the target's lanes. Variants are interleaved in one process; medians with p10-p90;
warm (back to back) and cold (caches flushed before each call). Ratios are against the best dense
median of the same run and mode.

    python benchmarks/kernels.py            # full sweep, writes benchmarks/results/kernels.{json,csv,png}
    python benchmarks/kernels.py --quick    # < 60 s; one JSON object per line on stdout
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tvm_scalpel import formats as F  # noqa: E402
from tvm_scalpel import hardware_spec  # noqa: E402
from tvm_scalpel.schedules import CompiledKernel, cpu  # noqa: E402

DENSE = ("numpy", "torch_1t", "torch_2t", "tvm_dense")
CSR = ("torch_csr", "scipy_csr", "tvm_csr")


@dataclass(frozen=True)
class Workload:
    name: str
    m: int
    k: int
    n: int  # columns of the dense operand (1 = matrix-vector)


FC = Workload("fc", 4096, 4096, 1)
CONV = Workload("conv", 128, 1200, 729)


def _torch_fn(a, b, threads):
    def run():
        torch.set_num_threads(threads)
        return a @ b
    return run


def _unstructured(weight, sparsity, rng):
    return weight * (rng.random(weight.shape) >= sparsity)


def _grouped(weight, sparsity, w, rng):
    keep = rng.random((weight.shape[0], -(-weight.shape[1] // w))) >= sparsity
    return F.encode(weight, w, keep=keep)


def build_variants(wl: Workload, sparsities, widths, spec, quick: bool, seed: int = 0):
    """Every (format, w, sparsity) of one workload, each checked against numpy before timing."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((wl.m, wl.k)).astype("float32")
    fc = wl.n == 1
    rhs = rng.standard_normal((wl.k,) if fc else (wl.k, wl.n)).astype("float32")
    out_shape = (1, wl.m) if fc else (wl.m, wl.n)
    variants = []

    def add(fmt, w, s, fn, dense_ref, result_of):
        got = np.asarray(result_of()).reshape(-1)
        ref = (dense_ref @ rhs).reshape(-1)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
        variants.append(H.Variant(key=(wl.name, fmt, w, s), fn=fn))

    def tvm_variant(fmt, w, s, func, inputs, dense_ref):
        kern = CompiledKernel(func, spec)
        args = kern.device_args(*inputs, np.zeros(out_shape, "float32"))
        add(fmt, w, s, lambda: kern.raw(*args), dense_ref, lambda: (kern.raw(*args), args[-1].numpy())[1])

    wt, rt = torch.from_numpy(weight), torch.from_numpy(rhs)
    dense_fmts = ("numpy", "torch_2t", "tvm_dense") if quick else DENSE
    for fmt in dense_fmts:
        if fmt == "numpy":
            add(fmt, None, 0.0, lambda: weight @ rhs, weight, lambda: weight @ rhs)
        elif fmt.startswith("torch"):
            fn = _torch_fn(wt, rt, int(fmt[-2]))
            add(fmt, None, 0.0, fn, weight, fn)
        elif fc:
            tvm_variant(fmt, None, 0.0, cpu.dense_nt(wl.m, wl.k, 1, spec), [rhs[None], weight], weight)
        else:
            tvm_variant(fmt, None, 0.0, cpu.dense_gemm(wl.m, wl.k, wl.n, spec), [weight, rhs], weight)

    csr_fmts = ("torch_csr",) if quick else CSR
    for s in sparsities:
        unstructured = _unstructured(weight, s, rng)
        for fmt in csr_fmts:
            if fmt == "torch_csr":
                a = torch.from_numpy(unstructured).to_sparse_csr()
                fn = _torch_fn(a, rt, 2)
                add(fmt, None, s, fn, unstructured, fn)
            elif fmt == "scipy_csr":
                a = scipy.sparse.csr_matrix(unstructured)
                add(fmt, None, s, lambda a=a: a @ rhs, unstructured, lambda a=a: a @ rhs)
            else:
                c = F.encode_csr(unstructured)
                if fc:
                    func = cpu.csr_nt(wl.m, wl.k, 1, spec)
                    tvm_variant(fmt, None, s, func, [rhs[None], c.values, c.col_idx, c.row_ptr], unstructured)
                else:  # CSR SpMM = the group kernel at w = 1 (one index per nonzero)
                    g = F.encode(unstructured, 1)
                    func = cpu.group_sparse_gemm(wl.m, wl.k, 1, wl.n, spec)
                    tvm_variant(fmt, None, s, func, [g.values, g.col_idx, g.row_ptr, rhs], unstructured)
        for w in widths:
            g = _grouped(weight, s, w, rng)
            if fc:
                func = cpu.group_sparse_nt(wl.m, wl.k, w, 1, spec)
                inputs = [rhs[None], g.values, g.col_idx, g.row_ptr]
            else:
                func = cpu.group_sparse_gemm(wl.m, wl.k, w, wl.n, spec)
                inputs = [g.values, g.col_idx, g.row_ptr, rhs]
            tvm_variant("tvm_group", w, s, func, inputs, g.to_dense())
    return variants


def summarise(variants, lanes: int, modes) -> list[dict]:
    rows = []
    for mode in modes:
        best = min(np.median(v.__dict__[mode]) for v in variants if v.key[1] in DENSE)
        for v in variants:
            wl, fmt, w, s = v.key
            st = H.stats_us(v.__dict__[mode])
            rows.append({"workload": wl, "format": fmt, "w": w, "lanes": w == lanes if w else None,
                         "sparsity": s, "mode": mode, **st,
                         "speedup_vs_best_dense": best * 1e6 / st["median_us"]})
    return rows


def markdown_table(rows, lanes: int) -> str:
    """Speedup over the best dense, per workload, mode and sparsity (the README's table)."""
    sparse = [("tvm_group", w) for w in sorted({r["w"] for r in rows if r["w"]})] + [(f, None) for f in CSR]
    sparse = [c for c in sparse if any((r["format"], r["w"]) == c for r in rows)]
    names = [f"group w={w}" + (" (lanes)" if w == lanes else "") if w else f for f, w in sparse]
    lines = ["| workload | mode | best dense (us) | sparsity | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for wl in ("fc", "conv"):
        for mode in ("warm", "cold"):
            sel = [r for r in rows if r["workload"] == wl and r["mode"] == mode]
            if not sel:
                continue
            best = min(r["median_us"] for r in sel if r["format"] in DENSE)
            for s in sorted({r["sparsity"] for r in sel if r["format"] not in DENSE}):
                cells = []
                for fmt, w in sparse:
                    hit = [r for r in sel if (r["format"], r["w"], r["sparsity"]) == (fmt, w, s)]
                    cells.append(f"{hit[0]['speedup_vs_best_dense']:.2f}x" if hit else "")
                lines.append(f"| {wl} | {mode} | {best:.0f} | {s:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, lanes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for i, wl in enumerate(("fc", "conv")):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["workload"] == wl and r["mode"] == mode]
            for fmt, w in sorted({(r["format"], r["w"]) for r in sel}, key=str):
                pts = sorted((r["sparsity"], 1 / r["speedup_vs_best_dense"]) for r in sel
                             if r["format"] == fmt and r["w"] == w)
                label = fmt + (f" w={w}" + (" (lanes)" if w == lanes else "") if w else "")
                style = "-" if fmt == "tvm_group" else "--" if fmt in CSR else ":"
                if fmt in DENSE:
                    ax.axhline(pts[0][1], linestyle=":", linewidth=1, label=label)
                else:
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, marker="o", label=label)
            ax.set_yscale("log")
            ax.set_xlabel("weight sparsity (%)")
            ax.set_ylabel("execution time / best dense")
            title = "matrix-vector 4096x4096" if wl == "fc" else "GEMM 128x1200 x 1200x729"
            ax.set_title(f"{title} ({mode})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a < 60 s subset; JSON lines on stdout")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per mode")
    ap.add_argument("--workloads", nargs="+", choices=("fc", "conv"), default=("fc", "conv"))
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    spec = hardware_spec("host")
    lanes = spec.lanes("float32")
    if args.quick:
        sparsities, widths, modes = (0.5, 0.9), (lanes,), ("warm",)
        rounds = args.rounds or 5
        out = args.out or H.RESULTS / "quick"
    else:
        sparsities = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
        widths = tuple(sorted({4, 8, 16, lanes}))
        modes, rounds, out = ("warm", "cold"), args.rounds or 15, args.out or H.RESULTS

    rows = []
    for wl in ({"fc": FC, "conv": CONV}[name] for name in args.workloads):
        variants = build_variants(wl, sparsities, widths, spec, args.quick)
        H.run_interleaved(variants, rounds, cold="cold" in modes)
        rows += summarise(variants, lanes, modes)
        for r in rows:
            if args.quick and r["workload"] == wl.name:
                print(json.dumps(r), flush=True)

    name = "kernels_quick" if args.quick else "kernels"
    H.write_json(out / f"{name}.json", {"provenance": H.provenance(spec.to_dict()["target"]),
                                        "lanes_float32": lanes, "rounds": rounds, "results": rows})
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / f"{name}.png", lanes)
    (out / f"{name}.md").write_text(markdown_table(rows, lanes))
    if not args.quick:
        print(f"wrote {out / name}.json, .csv, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
