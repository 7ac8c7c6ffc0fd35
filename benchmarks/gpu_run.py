"""The device half of benchmarks/gpu.py: runs on a GPU machine with runtime-only TVM, numpy and torch.

It never imports tvm_scalpel (whose compiler half is not there); the tile encoding comes from
tvm_scalpel/formats.py, loaded by path (numpy only). For every layer kernel of the manifest it draws a
random weight per tile sparsity, encodes it, checks our kernel against torch in float64, then times:
ours, dense cuBLAS (torch.mm / F.linear, TF32 off), unstructured CSR (cuSPARSE through torch) at the same
weights, and 2:4 semi-structured (torch.sparse.to_sparse_semi_structured) at 50 %. Whole models: the
compiled dense and node-pruned executables, checked against the outputs computed at build time.

    python3 benchmarks/gpu_run.py --dir .gpu --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _formats():
    """tvm_scalpel.formats without importing the package (its __init__ needs TVM's compiler)."""
    pkg = types.ModuleType("tvm_scalpel")
    pkg.__path__ = [str(REPO / "tvm_scalpel")]
    sys.modules.setdefault("tvm_scalpel", pkg)
    spec = importlib.util.spec_from_file_location("tvm_scalpel.formats", REPO / "tvm_scalpel" / "formats.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tvm_scalpel.formats"] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_cuda_runtime(tvm) -> None:
    """Register TVM's CUDA module loader: runtime-only TVM (TVM_USE_RUNTIME_LIB=1) skips the backend
    autoload that loads libtvm_runtime_cuda.so, so exported CUDA libraries would not load."""
    import ctypes

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _events_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _tvm_ms(module, name: str, dev, args) -> float:
    timer = module.time_evaluator(name, dev, number=20, repeat=30, min_repeat_ms=0)
    return 1e3 * float(np.median(timer(*args).results))


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights along K."""
    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(w.shape)


def _peer_semi_structured(wd: torch.Tensor, a: torch.Tensor, layout: str) -> dict:
    """2:4 at 50 %: fp32 if torch takes it, else fp16 against dense fp16; a reason when unsupported."""
    w24 = _two_four(wd)
    for dtype in (torch.float32, torch.float16):
        try:
            ws = torch.sparse.to_sparse_semi_structured(w24.to(dtype))
            ad = a.to(dtype)
            if layout == "kn":
                run_sparse, run_dense = (lambda: torch.mm(ws, ad)), (lambda: torch.mm(w24.to(dtype), ad))
            else:
                run_sparse = lambda: torch.nn.functional.linear(ad, ws)  # noqa: E731
                run_dense = lambda: torch.nn.functional.linear(ad, w24.to(dtype))  # noqa: E731
            run_sparse()
            return {"dtype": str(dtype).split(".")[-1], "ms": _events_ms(run_sparse),
                    "dense_same_dtype_ms": _events_ms(run_dense)}
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return {"unsupported": reason}


def run_layers(root: Path, manifest: dict, fmt, dev, tvm) -> list[dict]:
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for case in manifest["layers"]:
        module = tvm.runtime.load_module(str(root / case["so"]))
        m, k, n, layout = case["m"], case["k"], case["n"], case["layout"]
        rng = np.random.default_rng(case["seed"])
        a = rng.standard_normal((n, k) if layout == "nk" else (k, n)).astype("float32")
        a_t = torch.from_numpy(a).cuda()
        for sparsity in manifest["sparsities"]:
            w = rng.standard_normal((m, k)).astype("float32")
            keep = rng.random(fmt.tile_mask(w, *case["tile"]).shape) >= sparsity
            t = fmt.encode_tiles(w, *case["tile"], keep=keep)
            wd = t.to_dense()
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in (t.values, t.col_idx, t.row_ptr, a)]
            out = tvm.runtime.tensor(np.full((n, m) if layout == "nk" else (m, n), np.nan, "float32"), dev)
            module[case["symbol"]](*args, out)
            ref = (a.astype(np.float64) @ wd.T.astype(np.float64) if layout == "nk"
                   else wd.astype(np.float64) @ a.astype(np.float64))
            row = {**{k_: case[k_] for k_ in ("model", "layer", "m", "k", "n", "layout", "batch")},
                   "tile_sparsity": float(1 - t.tile_density), "weight_density": float(np.count_nonzero(wd) / wd.size),
                   "rel_err": _rel_err(out.numpy(), ref), "ours_ms": _tvm_ms(module, case["symbol"], dev, [*args, out])}
            wd_t = torch.from_numpy(wd).cuda()
            if layout == "kn":
                dense = lambda: torch.mm(wd_t, a_t)  # noqa: E731
            else:
                dense = lambda: torch.nn.functional.linear(a_t, wd_t)  # noqa: E731
            row["cublas_ms"] = _events_ms(dense)
            if sparsity > 0:
                csr, rhs = wd_t.to_sparse_csr(), a_t if layout == "kn" else a_t.T.contiguous()
                spmm = lambda: torch.mm(csr, rhs)  # noqa: E731  (nk: W·Aᵀ, the same products)
                row["csr_ms"] = _events_ms(spmm)
            if abs(sparsity - 0.5) < 1e-9:
                row["semi_structured_2_4"] = _peer_semi_structured(torch.from_numpy(w).cuda(), a_t, layout)
            rows.append(row)
            print(f"{case['model']:>8} {case['layer']:<9} b{case['batch']:<3} tiles {row['tile_sparsity']:.2f} "
                  f"ours {row['ours_ms']:.4f} ms cuBLAS {row['cublas_ms']:.4f} ms "
                  f"csr {row.get('csr_ms', float('nan')):.4f} ms err {row['rel_err']:.1e}", flush=True)
    return rows


def run_models(root: Path, manifest: dict, dev, tvm) -> list[dict]:
    from tvm.runtime import vm as rvm

    rows = []
    for case in manifest["models"]:
        ex = tvm.runtime.load_module(str(root / case["so"]))
        machine = rvm.VirtualMachine(ex, dev)
        if "input" in case:
            x = np.load(root / case["input"])
        else:
            x = np.random.default_rng(0).standard_normal(case["input_shape"]).astype("float32")
        xt = tvm.runtime.tensor(x, dev)
        out = machine["main"](xt)
        out = (out if hasattr(out, "numpy") else out[0]).numpy()
        err = _rel_err(out, np.load(root / case["expected"]).astype(np.float64)) if "expected" in case else None
        timer = machine.time_evaluator("main", dev, number=20, repeat=30)
        ms = 1e3 * float(np.median(timer(xt).results))
        rows.append({**{k: case[k] for k in ("model", "variant", "batch", "structure")}, "rel_err": err, "ms": ms})
        print(f"{case['model']:>8} {case['variant']:<12} b{case['batch']:<3} {ms:.4f} ms err {err}", flush=True)
    return rows


def gpu_facts() -> dict:
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        smi = f"nvidia-smi failed: {err}"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
            "nvidia_smi": dict(zip(query.split(","), (s.strip() for s in smi.split(",")))), "date": time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".gpu", help="what benchmarks/gpu.py prepare wrote")
    ap.add_argument("--out", required=True, help="folder for gpu_results.json")
    args = ap.parse_args()
    import tvm

    _load_cuda_runtime(tvm)
    root = Path(args.dir)
    manifest = json.loads((root / "manifest.json").read_text())
    dev = tvm.cuda(0)
    if not dev.exist or not torch.cuda.is_available():
        print("no CUDA GPU here (tvm.cuda(0).exist / torch.cuda.is_available() false)", file=sys.stderr)
        return 2
    result = {"facts": gpu_facts(), "manifest_provenance": manifest["provenance"]}
    result["models"] = run_models(root, manifest, dev, tvm)
    result["layers"] = run_layers(root, manifest, _formats(), dev, tvm)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
