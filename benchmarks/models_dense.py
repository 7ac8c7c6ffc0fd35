"""Dense reference models compiled by tvm_scalpel.build vs PyTorch eager, same input, one process.

The baseline of every model-level speedup is our compiled dense model, so it must not be a straw man:
this checks it is no slower than PyTorch eager (the better of 1 and 2 threads: with the idle pools made
to sleep, torch's many small ops pay a wake-up each at 2 threads) at batch 1 and 64, and records the
compile time.

    python benchmarks/models_dense.py            # writes benchmarks/results/models_dense.json
"""

from __future__ import annotations

import _harness as H  # noqa: I001  (sets thread-pool environment before numpy/torch/tvm load)

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tvm_scalpel  # noqa: E402
from tvm_scalpel.models import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    spec = tvm_scalpel.hardware_spec("host")
    rows, variants = [], []
    for name in args.models:
        model = build_model(name).eval()
        for batch in args.batches:
            x = model.example_input(batch)
            t0 = time.perf_counter()
            mod = from_exported_program(torch.export.export(model, (x,)))
            ex = tvm_scalpel.build(mod, "host")
            compile_s = time.perf_counter() - t0
            vm = relax.VirtualMachine(ex, tvm.cpu())
            xt = tvm.runtime.tensor(x.numpy())
            got = vm["main"](xt)[0].numpy()
            with torch.no_grad():
                ref = model(x).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
            tag = (name, batch)
            rows.append({"model": name, "batch": batch, "compile_s": compile_s})

            def eager(threads, model=model, x=x):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    return model(x)

            variants += [H.Variant(key=(*tag, "tvm_scalpel"), fn=lambda f=vm["main"], xt=xt: f(xt)),
                         H.Variant(key=(*tag, "torch_1t"), fn=lambda e=eager: e(1)),
                         H.Variant(key=(*tag, "torch_2t"), fn=lambda e=eager: e(2))]
    H.run_interleaved(variants, args.rounds, cold=False)
    stats = {v.key: H.stats_us(v.warm) for v in variants}
    for r in rows:
        ours = stats[(r["model"], r["batch"], "tvm_scalpel")]
        t1, t2 = (stats[(r["model"], r["batch"], k)] for k in ("torch_1t", "torch_2t"))
        best = min(t1["median_us"], t2["median_us"])
        r.update(tvm_scalpel=ours, torch_1t=t1, torch_2t=t2, speedup_vs_best_eager=best / ours["median_us"])
        print(f'{r["model"]:14s} batch {r["batch"]:3d}: ours {ours["median_us"]:8.1f} us, torch eager 1t '
              f'{t1["median_us"]:8.1f} / 2t {t2["median_us"]:8.1f} us, x{r["speedup_vs_best_eager"]:.2f} vs the '
              f'best, compile {r["compile_s"]:.1f} s')
    H.write_json(H.RESULTS / "models_dense.json",
                 {"provenance": H.provenance(spec.to_dict()["target"]), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
