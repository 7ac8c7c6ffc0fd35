"""The scalpel command: `run` end to end on real MNIST with the quick recipes (about a minute), then the
sub-commands on its output, on a Python-file model and on an ONNX file."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvm_scalpel import cli, formats, micro
from tvm_scalpel.data import is_available
from tvm_scalpel.models import build_model

needs_mnist = pytest.mark.skipif(not is_available("mnist"), reason="MNIST missing: python -m tvm_scalpel.data fetch")

TINY_NET = '''
"""A user model for scalpel: model() and data() (synthetic, 2 classes, 64 features)."""
import torch


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 64, generator=g)
    y = (x[:, :8].sum(1) > 0).long()
    return (x[:400], y[:400]), (x[400:], y[400:])
'''


@pytest.fixture
def scalpel(monkeypatch, capsys):
    """Run the command in this process (no re-exec: the quiet thread pools only matter for timing)."""
    monkeypatch.setenv("SCALPEL_NO_REEXEC", "1")

    def call(*argv):
        rc = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return call


@pytest.fixture
def tiny_net(tmp_path):
    path = tmp_path / "tiny_net.py"
    path.write_text(textwrap.dedent(TINY_NET))
    return path


def _load_vm(path):
    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())


def _vm_out(vm, x):
    out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def test_help_has_examples(capsys):
    out = subprocess.run([sys.executable, "-m", "tvm_scalpel.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "scalpel run lenet-300-100 --target host --quick" in out
    for cmd in ("train", "prune", "compile", "bench", "report", "profile"):
        assert f"scalpel {cmd} " in out
        with pytest.raises(SystemExit):
            cli._parser().parse_args([cmd, "--help"])
        sub = capsys.readouterr().out
        assert "example:" in sub and f"scalpel {cmd} " in sub


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    """`scalpel run lenet-300-100 --quick`, as the README runs it (re-exec with quiet pools included)."""
    if not is_available("mnist"):
        pytest.skip("MNIST missing: python -m tvm_scalpel.data fetch")
    out = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "tvm_scalpel.cli", "run", "lenet-300-100", "--target", "host", "--quick",
           "--out", str(out), "--batches", "1", "4", "--rounds", "3"]
    env = {k: v for k, v in os.environ.items() if k != "SCALPEL_NO_REEXEC"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@needs_mnist
def test_run_report_rows_and_numbers(run_out):
    out, stdout = run_out
    report = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert [v["name"] for v in report["variants"]] == ["dense", "traditional", "scalpel", "torch-dense", "torch-scalpel"]
    assert report["provenance"]["threads"]["OMP_WAIT_POLICY"] == "PASSIVE"  # re-executed with quiet pools
    # PyTorch eager runs at its faster thread count per batch (measured before timing), said in the notes.
    assert set(report["torch_threads"]) == {"1", "4"}
    assert all(1 <= n <= (os.cpu_count() or 1) for n in report["torch_threads"].values())
    assert any(f"batch 1: {report['torch_threads']['1']}" in n for n in report["notes"])
    # The compiled group runs in a child process with TVM's pool spinning, as deployed.
    assert any("child process with TVM's thread pool as deployed" in n for n in report["notes"])
    for b in ("1", "4"):
        # Two interleaved groups: compiled models alone (latency, vs our dense), then PyTorch eager with the
        # compiled models again (vs torch); every ratio is taken within one group.
        dense, torch_dense = rows["dense"]["latency"][b]["median_us"], rows["torch-dense"]["latency"][b]["median_us"]
        dense_with_torch = rows["dense"]["latency_interleaved_with_torch"][b]["median_us"]
        for name, v in rows.items():
            med = v["latency"][b]["median_us"]
            assert v["latency"][b]["p10_us"] <= med <= v["latency"][b]["p90_us"]
            if name.startswith("torch-"):
                assert "latency_interleaved_with_torch" not in v
                assert v["speedup_vs_dense"][b] == pytest.approx(dense_with_torch / med)
                assert v["speedup_vs_torch"][b] == pytest.approx(torch_dense / med)
            else:
                assert v["speedup_vs_dense"][b] == pytest.approx(dense / med)
                with_torch = v["latency_interleaved_with_torch"][b]["median_us"]
                assert v["speedup_vs_torch"][b] == pytest.approx(torch_dense / with_torch)
    # The compiled models classify the test images exactly as their PyTorch models do.
    for name in ("traditional", "scalpel"):
        assert rows[name]["compiled_accuracy"] == pytest.approx(rows[name]["accuracy"], abs=1e-3)
        assert rows[name]["accuracy"] > 0.9
    # Traditional pruning: CSR on every layer; its size is the CSR bytes of the magnitude recipe's weights.
    assert {d["method"] for d in rows["traditional"]["decisions"]} == {"csr"}
    net = build_model("lenet-300-100")
    net.load_state_dict(torch.load(out / "checkpoints" / "lenet-300-100__magnitude__quick" / "final_state_dict.pt"))
    weights = [m.weight.detach().numpy() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # The CSR bytes of the layers as compiled: dead nodes folded away (their rows, and the consumer
    # columns that only ever multiplied zeros) over the dense weights.
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_scalpel.profiling import layers_with_weights

    mod = from_exported_program(torch.export.export(net.eval(), (torch.zeros(1, 1, 28, 28),)))
    csr = sum(formats.encode_csr(w).sizes().total for _, w in layers_with_weights(mod))
    assert rows["traditional"]["size_percent"] == pytest.approx(100 * csr / sum(w.nbytes for w in weights), rel=1e-3)
    # Scalpel: group-sparse exactly where the reached sparsity meets the profiled crossover.
    for d in rows["scalpel"]["decisions"]:
        wins = d["crossover"] is not None and d["reached_sparsity"] >= d["crossover"] and d["reached_sparsity"] > 0
        assert d["method"] == ("group" if wins else "dense"), d
    assert 0 < rows["scalpel"]["size_percent"] < rows["traditional"]["size_percent"] < 100
    assert rows["dense"]["size_percent"] == 100.0
    # The printed table is report.md, with the paper's numbers beside ours.
    md = (out / "report.md").read_text()
    assert "| Scalpel compiled |" in stdout and "6.86x, 7.08 %" in md and "1.06x (mean of 5 models)" in md
    for png in ("speedup_size.png", "decisions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_mnist
def test_compile_writes_a_shared_library_equal_to_torch(run_out, scalpel, tmp_path):
    out, _ = run_out
    so = tmp_path / "lenet-traditional.so"
    rc, stdout, err = scalpel("compile", "lenet-300-100", "--quick", "--out", out, "--method", "traditional",
                              "--batch", "2", "-o", so)
    assert rc == 0, err
    plan = json.loads(so.with_suffix(".plan.json").read_text())
    assert {d["method"] for d in plan["layers"]} == {"csr"}
    net = build_model("lenet-300-100").eval()
    net.load_state_dict(torch.load(out / "checkpoints" / "lenet-300-100__magnitude__quick" / "final_state_dict.pt"))
    x = torch.randn(2, *net.input_shape)
    np.testing.assert_allclose(_vm_out(_load_vm(so), x.numpy()), net(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@needs_mnist
def test_report_rerenders_from_json(run_out, scalpel, tmp_path):
    out, _ = run_out
    rc, stdout, _ = scalpel("report", out, out, "--to", tmp_path)
    assert rc == 0
    assert stdout.count("## lenet-300-100 on") == 2  # one section per report.json given
    assert (tmp_path / "report.md").is_file() and (tmp_path / "decisions.png").is_file()


def _measured_choice(reason: str) -> str:
    """The kernel with fewer instructions in a measured decision's reason ('...; instructions alone:
    dense 1,658, group 2,432 -> dense')."""
    counts = reason.split("instructions alone: ")[1].split(" -> ")[0].split(", ")
    alone = {m: int(n.replace(",", "")) for m, n in (c.rsplit(" ", 1) for c in counts)}
    return min(alone, key=alone.get)


needs_arm = pytest.mark.skipif(bool(micro.missing_tools()), reason=f"needs the ARM toolchain and QEMU: "
                                                                  f"{micro.runner.INSTALL}")


@needs_mnist
@needs_arm
@pytest.mark.mcu
def test_run_on_the_m4_counts_instructions_and_compile_writes_that_build(run_out, scalpel, tmp_path):
    """`scalpel run --target cortex-m4`: every variant as an int16 build on QEMU (the quick recipes, the
    dense stage shared with the CPU run); instructions, sizes and accuracies in the report, and `compile`
    writes the very build that was counted."""
    out = tmp_path / "m4"
    out.mkdir()
    (out / "checkpoints").symlink_to(run_out[0] / "checkpoints")
    rc, stdout, err = scalpel("run", "lenet-300-100", "--target", "cortex-m4", "--quick", "--out", out)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "mcu" and report["board"] == "cortex-m4 (QEMU mps2-an386)" and report["batches"] == [1]
    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == ["dense", "traditional", "scalpel", "scalpel-layer"]
    dense = rows["dense"]
    assert dense["speedup"] == 1.0 and dense["size_percent"] == 100.0 and dense["compiled_accuracy"] is None
    assert [d["method"] for d in dense["decisions"]] == ["dense"] * 3
    assert [d["method"] for d in rows["traditional"]["decisions"]] == ["csr"] * 3
    for name, v in rows.items():
        assert v["speedup_vs_dense"]["1"] == pytest.approx(dense["instructions"] / v["instructions"])
        assert v["instructions"] == min(v["instructions_by_config"].values())  # its best code shape
        assert v["bit_exact"] and v["fits_board"]
        if name != "dense":
            # The int16 build classifies the test set as its PyTorch model does, to a few images.
            assert v["compiled_accuracy"] == pytest.approx(v["accuracy"], abs=3e-3) and v["accuracy"] > 0.9
            assert v["size_percent"] < 100 and v["speedup"] > 1.0
    for name in ("scalpel", "scalpel-layer"):
        assert rows[name]["runs"] == 2
        for d in rows[name]["decisions"]:  # each layer's kernel: the one that ran fewer instructions alone
            assert d["method"] == _measured_choice(d["reason"]), d
    assert rows["scalpel"]["instructions"] < rows["traditional"]["instructions"]
    md = (out / "report.md").read_text()
    assert "| Scalpel compiled |" in stdout and "9.17x, 6.93 %" in md and "1.90x (mean of 3 models)" in md
    assert (out / "speedup_size.png").read_bytes()[:4] == b"\x89PNG"

    rc, stdout, err = scalpel("compile", "lenet-300-100", "--target", "cortex-m4", "--quick", "--out", out)
    assert rc == 0, err
    assert f"{rows['scalpel']['instructions']:,} instructions per inference, outputs bit-exact" in stdout
    plan = json.loads((out / "lenet-300-100-scalpel-cortex-m4" / "plan.json").read_text())
    assert [d["method"] for d in plan["layers"]] == [d["method"] for d in rows["scalpel"]["decisions"]]
    # --fast: the default code shape only, the count bench measured for it
    rc, stdout, err = scalpel("compile", "lenet-300-100", "--target", "cortex-m4", "--quick", "--fast",
                              "--out", out, "-o", out / "fast")
    assert rc == 0, err
    default = rows["scalpel"]["instructions_by_config"]["u1-acle"]
    assert f"{default:,} instructions per inference" in stdout and "(the default: --fast)" in stdout


def test_mcu_report_puts_the_papers_m4_numbers_beside_the_m4_only(tmp_path):
    """A microcontroller report: instructions and speedups as measured, the paper's Cortex-M4 results on a
    cortex-m4 report and none on a cortex-m55 one (the paper measured no M55); PNGs from it too."""
    from tvm_scalpel.report import plot, render_all

    def variant(name, instructions, acc):
        return {"name": name, "instructions": instructions, "speedup_vs_dense": {"1": 1000 / instructions},
                "size_percent": 100.0 if name == "dense" else 10.0, "flash_bytes": 2048, "ram_bytes": 512,
                "accuracy": acc, "compiled_accuracy": None if name == "dense" else acc,
                "decisions": [{"key": "linear:10x64", "method": "group", "reached_sparsity": 0.9, "crossover": None,
                               "reason": "linear:10x64: 90% zero groups of 2; instructions alone: dense 9, group 3 "
                                         "-> group"}]}

    def report(target):
        return {"kind": "mcu", "model": "lenet-300-100", "target": target, "board": f"{target} (QEMU x)",
                "batches": [1], "notes": [], "variants": [variant("dense", 1000, 0.98), variant("traditional", 400, 0.97),
                                                          variant("scalpel", 125, 0.975)]}

    m4, m55 = render_all([report("cortex-m4")]), render_all([report("cortex-m55")])
    for md in (m4, m55):
        assert "| Scalpel compiled | 125 | 8.00x | 10.00 % | 2,048 / 512 | 97.50 % / 97.50 % |" in md
        assert "| dense compiled (ours) | 1,000 | 1.00x | 100.00 % | 2,048 / 512 | 98.00 % / — |" in md
        assert "instructions executed per inference on QEMU" in md and "Latencies" not in md
        assert "instructions alone: dense 9, group 3 -> group" in md
    assert "9.17x, 6.93 %" in m4 and "1.90x (mean of 3 models)" in m4
    assert "9.17x" not in m55 and "1.90x" not in m55
    assert [p.name for p in plot([report("cortex-m55")], tmp_path)] == ["speedup_size.png", "decisions.png"]


@pytest.mark.parametrize("argv, expected", [
    (("run", "lenet-300-100", "--target", "cortex-m4", "--batches", "1", "16"), "runs one image at a time"),
    (("bench", "lenet-300-100", "--target", "cortex-m4", "--rounds", "3"), "instructions are counted on QEMU"),
    (("run", "nin", "--target", "cortex-m4"), "do not fit a microcontroller"),
    (("bench", "lenet-300-100", "--target", "cuda"), "use `scalpel compile` for it"),
])
def test_run_and_bench_say_what_a_target_cannot_do(scalpel, tmp_path, argv, expected):
    rc, _, err = scalpel(*argv, "--out", tmp_path)
    assert rc == 2 and expected in err


@needs_mnist
def test_bench_does_not_train_a_run_of_an_earlier_recipe_definition(run_out, scalpel, tmp_path):
    """`bench` only measures: a finished run whose recipe has changed since (here its checkpoint's fingerprint)
    is an error naming what continues it, and the checkpoint is left as it was (run_recipe would train)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run_out[0] / "checkpoints", out / "checkpoints")
    ckpt = out / "checkpoints" / "lenet-300-100__cpu__quick" / "checkpoint.pt"
    ck = torch.load(ckpt, weights_only=False)
    ck["fingerprint"] = "0" * 16
    torch.save(ck, ckpt)
    before = ckpt.read_bytes()
    rc, _, err = scalpel("bench", "lenet-300-100", "--quick", "--out", out, "--batches", "1", "--rounds", "1")
    assert rc == 2 and "another definition of that recipe" in err and "scalpel prune lenet-300-100" in err
    assert ckpt.read_bytes() == before


def test_mcu_compile_without_a_pruned_model_says_what_to_run(scalpel, tmp_path):
    rc, _, err = scalpel("compile", "lenet-300-100", "--target", "cortex-m4", "--out", tmp_path)
    assert rc == 2 and "lenet-300-100/mcu" in err
    assert "scalpel prune lenet-300-100 --method scalpel --target cortex-m4" in err


def test_bench_without_pruned_models_says_what_to_run(scalpel, tmp_path):
    rc, _, err = scalpel("bench", "lenet-300-100", "--quick", "--out", tmp_path)
    assert rc == 2 and "scalpel prune lenet-300-100 --method" in err and "--quick" in err


def test_unknown_model_lists_the_accepted_forms(scalpel, tmp_path):
    rc, _, err = scalpel("bench", "resnet-9000", "--out", tmp_path)
    assert rc == 2 and "reference name" in err and "Python file" in err and ".onnx" in err


def test_python_file_train_prune_bench_and_onnx_compile(scalpel, tiny_net, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = scalpel("train", tiny_net, "--out", out, "--epochs", "2", "--seed", "3")
    assert rc == 0, err
    assert (out / "tiny_net-dense.pt").is_file() and "dense accuracy" in stdout
    rc, stdout, err = scalpel("prune", tiny_net, "--out", out, "--method", "traditional", "--sparsity", "0.8",
                              "--epochs", "1", "--seed", "3")
    assert rc == 0, err
    pruned = torch.load(out / "tiny_net-traditional.pt")
    assert (pruned["0.weight"] == 0).float().mean() == pytest.approx(0.8, abs=0.01)

    rc, stdout, err = scalpel("bench", tiny_net, "--out", out, "--quick", "--batches", "2", "--rounds", "2")
    assert rc == 0, err
    rows = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    for name in ("dense", "traditional", "scalpel"):
        assert rows[name]["compiled_accuracy"] == pytest.approx(rows[name]["accuracy"], abs=1e-9)
    # Dead neurons (zero row and bias, or a zero column in the next layer) are folded before deciding.
    w0, b0, w2 = pruned["0.weight"], pruned["0.bias"], pruned["2.weight"]
    alive = ((w0 != 0).any(1) | (b0 != 0)) & (w2 != 0).any(0)
    first = rows["traditional"]["decisions"][0]
    assert first["key"] == f"linear:{int(alive.sum())}x64" and first["method"] == "csr"
    assert first["reached_sparsity"] == pytest.approx(1 - (w0[alive] != 0).float().mean().item())

    # The pruned ONNX file compiles from its weights alone, to the same outputs as the pruned torch model.
    so = tmp_path / "tiny.so"
    rc, _, err = scalpel("compile", out / "tiny_net-traditional.onnx", "--out", out, "--method", "traditional",
                         "--batch", "3", "-o", so)
    assert rc == 0, err
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2)).eval()
    net.load_state_dict(pruned)
    x = torch.randn(3, 64)
    np.testing.assert_allclose(_vm_out(_load_vm(so), x.numpy()), net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_seed_makes_training_reproducible(scalpel, tiny_net, tmp_path):
    weights = []
    for run in ("a", "b", "c"):
        seed = "7" if run != "c" else "8"
        rc, _, err = scalpel("train", tiny_net, "--out", tmp_path / run, "--epochs", "1", "--seed", seed)
        assert rc == 0, err
        weights.append(torch.load(tmp_path / run / "tiny_net-dense.pt"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_structure_only_nin_compiles_the_released_structure(scalpel, tmp_path):
    """NIN has no data here: `compile` builds the paper's structure on random weights (seeded)."""
    from tvm_scalpel import hardware_spec
    from tvm_scalpel.released import apply_structure, released_structure

    so = tmp_path / "nin.so"
    rc, stdout, err = scalpel("compile", "nin", "--quick", "--out", tmp_path, "--seed", "3", "-o", so)
    assert rc == 0, err
    plan = json.loads(so.with_suffix(".plan.json").read_text())
    structure = released_structure("nin", hardware_spec("host").lanes())
    kept = list(structure.kept_nodes.values())
    assert [d["key"] for d in plan["layers"]][:2] == [f"conv2d:{kept[0]}x3x5x5", f"conv2d:{kept[1]}x{kept[0]}x1x1"]
    assert {d["method"] for d in plan["layers"]} == {"dense"}  # node pruning only: no zero groups left
    torch.manual_seed(3)
    net = apply_structure(build_model("nin").eval(), structure)
    x = torch.randn(1, 3, 32, 32)
    np.testing.assert_allclose(_vm_out(_load_vm(so), x.numpy()), net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_structure_only_models_cannot_be_trained(scalpel, tmp_path):
    for cmd in ("train", "prune"):
        rc, _, err = scalpel(cmd, "alexnet", "--out", tmp_path)
        assert rc == 2 and "alexnet has no training recipe" in err and "released structure" in err


@pytest.mark.parametrize("rpc, expected", [("nonsense", "expected HOST:PORT:KEY"),
                                           ("127.0.0.1:1:nokey", "rpc_server --tracker")])
def test_rpc_option_errors_say_what_is_expected(scalpel, tmp_path, rpc, expected):
    rc, _, err = scalpel("profile", "lenet-300-100", "--quick", "--batches", "1", "--out", tmp_path, "--rpc", rpc)
    assert rc == 2 and expected in err


def test_fine_grain_gpu_pruning_prunes_and_compiles_for_cuda(scalpel, tmp_path):
    """`prune --method fine` trains the gpu-fine recipe (quick: 32x8 tiles); `compile --method fine` builds
    a CUDA .so whose plan puts the tile kernel on the layers with zero tiles."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA build needs it (CUDA toolkit)")
    rc, out, err = scalpel("prune", "lenet-300-100", "--target", "cuda", "--method", "fine", "--quick", "--out", tmp_path)
    assert rc == 0, err
    assert "lenet-300-100/gpu-fine/quick" in out and (tmp_path / "lenet-300-100-fine.onnx").is_file()
    rc, out, err = scalpel("compile", "lenet-300-100", "--target", "cuda", "--method", "fine", "--quick", "--out", tmp_path)
    assert rc == 0, err
    plan = json.loads((tmp_path / "lenet-300-100-fine-b1.plan.json").read_text())
    methods = [d["method"] for d in plan["layers"]]
    assert methods[:2] == ["tile", "tile"] and all(d["tile"] == [32, 8] for d in plan["layers"][:2])
    assert all(d["reached_sparsity"] > 0.3 for d in plan["layers"][:2])
    assert (tmp_path / "lenet-300-100-fine-b1.so").stat().st_size > 0


@pytest.mark.parametrize("argv, expected", [
    (("prune", "lenet-300-100", "--method", "fine"), "expected a CUDA target"),
    (("compile", "lenet-300-100", "--method", "fine", "--target", "cortex-m4"), "expected a CUDA target"),
    (("prune", "lenet-300-100", "--method", "scalpel-layer"), "expected a microcontroller target"),
    (("compile", "lenet-300-100", "--method", "scalpel-layer", "--target", "cuda"), "expected a microcontroller"),
    (("compile", "lenet-300-100", "--method", "scalpel-layer", "--target", "cortex-m4"),
     "run `scalpel prune lenet-300-100 --method scalpel-layer --target cortex-m4"),
    (("compile", "lenet-300-100", "--fast"), "--fast: a microcontroller option"),
])
def test_target_specific_methods_say_what_they_need(scalpel, tmp_path, argv, expected):
    rc, _, err = scalpel(*argv, "--out", tmp_path)
    assert rc == 2 and expected in err


def test_python_file_scalpel_layer_prunes_each_layers_pairs_and_runs_on_the_m4(scalpel, tiny_net, tmp_path):
    """--method scalpel-layer prunes --sparsity of every layer's pairs (w = 2 on the M4; each row's last
    pair kept) and keeps them pruned through fine-tuning; compile measures each layer's kernel on QEMU and
    checks the board's outputs bit-exact against the int16 reference when the tools are here."""
    out = tmp_path / "out"
    rc, _, err = scalpel("prune", tiny_net, "--target", "cortex-m4", "--method", "scalpel-layer", "--sparsity",
                         "0.75", "--epochs", "1", "--out", out)
    assert rc == 0, err
    pruned = torch.load(out / "tiny_net-scalpel-layer.pt")
    for key, (rows, cols) in (("0.weight", (128, 64)), ("2.weight", (2, 128))):
        pairs = pruned[key].reshape(rows, cols // 2, 2)
        zero = (pairs == 0).all(-1)
        assert not zero[:, -1].any()  # the last pair of every row is kept
        assert zero.float().mean().item() == pytest.approx(0.75, abs=1 / zero.numel() + 1e-9), key
    rc, stdout, err = scalpel("compile", tiny_net, "--target", "cortex-m4", "--method", "scalpel-layer",
                              "--out", out)
    assert rc == 0, err
    plan = json.loads((out / "tiny_net-scalpel-layer-cortex-m4" / "plan.json").read_text())
    if micro.missing_tools():  # not measured: the paper's MCU rule, groups of 2 everywhere
        assert [(d["method"], d["group_width"]) for d in plan["layers"]] == [("group", 2)] * 2
        assert "bit-exact" not in stdout and "not built" in stdout
        return
    assert "bit-exact with the int16 reference" in stdout
    # Each layer's kernel ran fewer instructions alone: the 128x64 layer at 75 % zero pairs is group-sparse
    # (the 2x128 one is measured too; either kernel may win there).
    assert [d["method"] == _measured_choice(d["reason"]) for d in plan["layers"]] == [True, True]
    assert plan["layers"][0]["method"] == "group" and plan["layers"][0]["group_width"] == 2
    # bench on the M4 adds the scalpel-layer column for a model pruned that way and counts what compile built;
    # the methods not pruned yet run the initial weights, and the report says so.
    rc, stdout_bench, err = scalpel("bench", tiny_net, "--target", "cortex-m4", "--out", out)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == ["dense", "traditional", "scalpel", "scalpel-layer"]
    assert f"QEMU mps2-an386: {rows['scalpel-layer']['instructions']:,} instructions" in stdout
    assert rows["scalpel-layer"]["origin"].endswith("tiny_net-scalpel-layer.pt")
    assert rows["traditional"]["origin"].endswith("its initial weights (none saved)")
    assert rows["scalpel-layer"]["compiled_accuracy"] == pytest.approx(rows["scalpel-layer"]["accuracy"], abs=0.02)


def test_progress_bars_follow_rounds_and_epochs():
    """The CLI's bars: one tick per timing round; a resumed or shared run places the epoch bar part-way."""
    from tvm_scalpel import bench

    ticks = []
    variants = [bench.Variant(key=(k,), fn=lambda: None) for k in "ab"]
    bench.run_interleaved(variants, 4, cold=False, on_round=ticks.append)
    assert ticks == [1, 2, 3, 4] and all(len(v.warm) == 4 for v in variants)

    from types import SimpleNamespace

    from tvm_scalpel.training import get_recipe

    recipe = get_recipe("lenet-5/cpu")  # dense 60, then four node stages of 60: resumed in the second stage
    assert [cli._epochs_done(recipe, SimpleNamespace(stage=s, epoch=e)) for s, e in ((1, 3), (2, 1))] == [63, 121]
    assert cli._epochs_done(recipe, SimpleNamespace(stage=len(recipe.stages) - 1, epoch=60)) == recipe.total_epochs
