"""Dense reference models compiled by tvm_scalpel.build vs PyTorch eager, same input, one process.

The baseline of every model-level speedup is our compiled dense model, so it must not be a straw man:
this checks it is no slower than PyTorch eager (torch at its default threads) at batch 1 and 64, and
records the compile time.

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

            def eager(model=model, x=x):
                with torch.no_grad():
                    return model(x)

            variants += [H.Variant(key=(*tag, "tvm_scalpel"), fn=lambda vm=vm, xt=xt: vm["main"](xt)),
                         H.Variant(key=(*tag, "torch_eager"), fn=eager)]
    H.run_interleaved(variants, args.rounds, cold=False)
    stats = {v.key: H.stats_us(v.warm) for v in variants}
    for r in rows:
        ours = stats[(r["model"], r["batch"], "tvm_scalpel")]
        eager = stats[(r["model"], r["batch"], "torch_eager")]
        r.update(tvm_scalpel=ours, torch_eager=eager, speedup_vs_eager=eager["median_us"] / ours["median_us"])
        print(f'{r["model"]:14s} batch {r["batch"]:3d}: ours {ours["median_us"]:8.1f} us, torch eager '
              f'{eager["median_us"]:8.1f} us, x{r["speedup_vs_eager"]:.2f}, compile {r["compile_s"]:.1f} s')
    H.write_json(H.RESULTS / "models_dense.json",
                 {"provenance": H.provenance(spec.to_dict()["target"]), "torch_threads": torch.get_num_threads(),
                  "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
