"""The ``scalpel`` report: the paper's table layout in Markdown, and PNG plots, from report dicts.

A report dict (what ``scalpel run``/``bench`` write as ``report.json``) holds one model's variants —
our dense compiled model, traditional pruning compiled (CSR), Scalpel compiled, PyTorch eager dense
and pruned — each with latency per batch (median, p10, p90 in one interleaved run), speedups against
our dense compiled model and against PyTorch eager dense, relative size (values + indices + row
pointers of the weights, over the dense weights), accuracy, and the per-layer decisions.

A microcontroller report (``"kind": "mcu"``) has instructions per inference on the emulated board
instead of latency (one image at a time, so ``speedup_vs_dense`` holds batch 1 only), flash and RAM,
and the int16 model's accuracy beside the PyTorch model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# Scalpel's CPU results (speedup, size %): Yu et al., ISCA 2017, Table "CPU" (Intel Core i7-6700, MKL).
PAPER_CPU = {
    "lenet-300-100": (6.86, 7.08), "lenet-5": (4.15, 5.20), "convnet": (1.58, 44.28),
    "nin": (1.22, 81.16), "alexnet": (2.20, 13.06),
}
#: Traditional pruning on the paper's CPU: the mean speedup over its five models (no per-model numbers).
PAPER_TRADITIONAL_CPU_MEAN = 1.06
# Scalpel's microcontroller results (speedup, size %): the same paper, ARM Cortex-M4.
PAPER_MCU = {"lenet-300-100": (9.17, 6.93), "lenet-5": (3.51, 6.72), "convnet": (1.38, 40.95)}
PAPER_TRADITIONAL_MCU_MEAN = 1.90

VARIANT_LABELS = {
    "dense": "dense compiled (ours)",
    "traditional": "traditional pruning compiled (CSR)",
    "scalpel": "Scalpel compiled",
    "torch-dense": "PyTorch eager, dense",
    "torch-scalpel": "PyTorch eager, Scalpel-pruned",
    "torch-traditional": "PyTorch eager, traditional-pruned",
    "scalpel-layer": "Scalpel groups, per-layer schedule",
}


def _is_mcu(report: dict[str, Any]) -> bool:
    return report.get("kind") == "mcu"


def _paper(report: dict[str, Any]) -> tuple[dict, float | None]:
    """The paper's (per-model table, traditional mean) for the report's hardware: CPU, or the Cortex-M4
    (the only microcontroller it measured; none for the M55)."""
    if not _is_mcu(report):
        return PAPER_CPU, PAPER_TRADITIONAL_CPU_MEAN
    return (PAPER_MCU, PAPER_TRADITIONAL_MCU_MEAN) if report.get("target") == "cortex-m4" else ({}, None)


def paper_reference(report: dict[str, Any], variant: str) -> str:
    table, mean = _paper(report)
    model = report["model"]
    if variant == "scalpel" and model in table:
        s, size = table[model]
        return f"{s:.2f}x, {size:.2f} %"
    if variant == "traditional" and mean is not None:
        return f"{mean:.2f}x (mean of {'3' if _is_mcu(report) else '5'} models)"
    return ""


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _decisions(report: dict[str, Any], which: str) -> list[str]:
    lines = []
    for v in report["variants"]:
        if v.get("decisions"):
            lines += ["", f"{VARIANT_LABELS.get(v['name'], v['name'])}, per layer ({which}):"]
            lines += [f"- {d['reason']}" for d in v["decisions"]]
    return lines


def render_mcu(report: dict[str, Any]) -> str:
    """One model on a microcontroller: instructions per inference, size, flash/RAM, accuracy."""
    head = ["variant", "instructions", "vs our dense", "size (incl. indices)", "flash / RAM (B)",
            "accuracy (torch fp32 / int16 compiled)", "paper (Cortex-M4)"]
    lines = [f"## {report['model']} on {report['board']}" + (" (quick recipe)" if report.get("quick") else ""), ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        lines.append("| " + " | ".join([
            VARIANT_LABELS.get(v["name"], v["name"]), f"{v['instructions']:,}", _x(v["speedup_vs_dense"].get("1")),
            f"{v['size_percent']:.2f} %", f"{v['flash_bytes']:,} / {v['ram_bytes']:,}",
            f"{_pct(v.get('accuracy'))} / {_pct(v.get('compiled_accuracy'))}",
            paper_reference(report, v["name"])]) + " |")
    return "\n".join(lines + _decisions(report, "kernel with fewer instructions where measured"))


def render(report: dict[str, Any]) -> str:
    """One model's table (the paper's layout, one row per variant) plus its per-layer decisions."""
    if _is_mcu(report):
        return render_mcu(report)
    batches = [str(b) for b in report["batches"]]
    head = ["variant"]
    for b in batches:
        head += [f"batch {b} (us, p10-p90)", f"vs our dense b{b}", f"vs torch eager b{b}"]
    head += ["size (incl. indices)", "accuracy (torch / compiled)", "paper CPU"]
    lines = [f"## {report['model']} on {report['target']}" + (" (quick recipe)" if report.get("quick") else ""), ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        cells = [VARIANT_LABELS.get(v["name"], v["name"])]
        for b in batches:
            lat = v["latency"].get(b)
            cells.append("—" if lat is None else
                         f"{lat['median_us']:.1f} ({lat['p10_us']:.1f}-{lat['p90_us']:.1f})")
            cells += [_x(v["speedup_vs_dense"].get(b)), _x(v["speedup_vs_torch"].get(b))]
        size = v.get("size_percent")
        cells.append("—" if size is None else f"{size:.2f} %")
        cells.append(f"{_pct(v.get('accuracy'))} / {_pct(v.get('compiled_accuracy'))}")
        cells.append(paper_reference(report, v["name"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _decisions(report, f"batch {batches[0]}"))


def render_all(reports: Sequence[dict[str, Any]]) -> str:
    prov = reports[0].get("provenance", {}) if reports else {}
    intro = ["# scalpel report", "",
             f"Machine: {prov.get('cpu_model', '?')}, {prov.get('cpu_count', '?')} cores, load "
             f"{prov.get('load_average', '?')}, git {prov.get('git_sha', '?')}, {prov.get('date', '?')}. "
             + ("Latencies: medians of interleaved rounds in one process; speedups are ratios of medians. "
                if not all(_is_mcu(r) for r in reports) else "")
             + ("Microcontrollers: instructions executed per inference on QEMU (deterministic; instructions, "
                "not cycles), speedups are ratios of instruction counts. " if any(_is_mcu(r) for r in reports)
                else "")
             + "Size: weight values + indices + row pointers over the dense weights (biases excluded).", ""]
    return "\n".join(intro + [render(r) + "\n" for r in reports])


def plot(reports: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """speedup_size.png (speedup vs our dense per variant and batch, size per variant, paper marks)
    and decisions.png (per-layer zero fraction, crossover and method of the compiled variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    n = len(reports)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n), squeeze=False)
    for row, rep in zip(axes, reports):
        names = [v["name"] for v in rep["variants"]]
        batches = [str(b) for b in rep["batches"]]
        width = 0.8 / max(1, len(batches))
        for i, b in enumerate(batches):
            vals = [v["speedup_vs_dense"].get(b) or 0.0 for v in rep["variants"]]
            row[0].bar([j + i * width for j in range(len(names))], vals, width, label=f"batch {b}")
        paper, paper_mean = _paper(rep)
        for j, name in enumerate(names):
            ref = paper.get(rep["model"], (None,))[0] if name == "scalpel" else (
                paper_mean if name == "traditional" else None)
            if ref:
                row[0].plot([j - 0.1, j + 0.9], [ref, ref], "k--", lw=1)
                row[0].annotate(f"paper {ref}x", (j, ref), fontsize=7, va="bottom")
        row[0].axhline(1.0, color="grey", lw=0.8)
        row[0].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20, fontsize=8)
        row[0].set_ylabel("speedup vs our dense compiled")
        row[0].set_title(f"{rep['model']}: " + (f"instructions on {rep['board']}" if _is_mcu(rep) else "latency"),
                         fontsize=9)
        row[0].legend(fontsize=7)
        sized = [v for v in rep["variants"] if v.get("size_percent") is not None]
        row[1].bar([v["name"] for v in sized], [v["size_percent"] for v in sized], color="tab:green")
        if rep["model"] in paper:
            row[1].axhline(paper[rep["model"]][1], color="k", ls="--", lw=1, label="paper Scalpel size")
            row[1].legend(fontsize=7)
        row[1].set_ylabel("size, % of dense (incl. indices)")
        row[1].set_title(f"{rep['model']}: model size", fontsize=9)
        row[1].tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    paths.append(out_dir / "speedup_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    compiled = [(rep, v) for rep in reports for v in rep["variants"] if v.get("decisions") and v["name"] != "dense"]
    fig, axes = plt.subplots(len(compiled) or 1, 1, figsize=(9, 2.8 * max(1, len(compiled))), squeeze=False)
    colors = {"group": "tab:blue", "csr": "tab:orange", "dense": "tab:grey"}
    for ax, (rep, v) in zip(axes[:, 0], compiled):
        ds = v["decisions"]
        ax.bar(range(len(ds)), [100 * d["reached_sparsity"] for d in ds],
               color=[colors.get(d["method"], "tab:grey") for d in ds])
        for i, d in enumerate(ds):
            if d.get("crossover") is not None:
                ax.plot([i - 0.4, i + 0.4], [100 * d["crossover"]] * 2, "k-", lw=2)
            ax.annotate(d["method"], (i, 100 * d["reached_sparsity"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ds)), [d["key"] for d in ds], fontsize=7)
        ax.set_ylim(0, 110)
        ax.set_ylabel("zeros reached, %")
        crossover = any(d.get("crossover") is not None for d in ds)
        ax.set_title(f"{rep['model']} {VARIANT_LABELS.get(v['name'], v['name'])}: per-layer method"
                     + (" (black bar: profiled crossover)" if crossover else ""), fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "decisions.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
