"""The Cortex-M path: graph reading, int16 quantisation, TVM → plain C, and bit-exact runs on QEMU."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from tvm.relax.frontend.torch import from_exported_program

from tvm_scalpel import KernelError, TargetError, micro
from tvm_scalpel.micro import Method, codegen, kernels
from tvm_scalpel.models.base import LRNWithinChannel



def needs_toolchain(test):
    """Marked ``mcu``; skipped, naming the install command, where the toolchain is missing."""
    skip = pytest.mark.skipif(bool(micro.missing_tools()),
                              reason=f"needs the ARM toolchain and QEMU: {micro.runner.INSTALL}")
    return pytest.mark.mcu(skip(test))


class Small(nn.Module):
    """Every layer kind of the MCU path: padded conv, ceil-mode max-pool with a ReLU after it, Caffe's
    within-channel LRN (alpha large enough to matter), conv + ReLU, ceil-mode average pool, flatten,
    linear + ReLU, and odd reduction lengths (a ragged last pair)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm = LRNWithinChannel(3, 0.5, 0.75)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.avg = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.fc1 = nn.Linear(6 * 2 * 2, 21)
        self.fc2 = nn.Linear(21, 5)

    def forward(self, x):
        x = self.norm(torch.relu(self.pool(self.conv1(x))))
        x = self.avg(torch.relu(self.conv2(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _group_prune(model: nn.Module, zero_fraction: float, seed: int = 0, width: int = 2) -> nn.Module:
    """Zero random aligned groups of ``width`` along the reduction axis, the way SIMD-aware pruning
    leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.view(m.weight.shape[0], -1)
                drop = torch.rand(w.shape[0], -(-w.shape[1] // width), generator=g) < zero_fraction
                w[drop.repeat_interleave(width, 1)[:, :w.shape[1]]] = 0
    return model


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = _group_prune(Small().eval(), 0.7)
    x = torch.randn(16, 3, 12, 12)
    mod = from_exported_program(torch.export.export(model, (x[:1],)))
    return model, mod, x


def test_graph_reads_the_chain_and_matches_torch(small):
    model, mod, x = small
    graph = micro.read_graph(mod)
    kinds = [type(layer).__name__ for layer in graph.layers]
    assert kinds == ["Conv", "MaxPool", "LRN", "Conv", "AvgPool", "Linear", "Linear"]
    relu = [getattr(layer, "relu", None) for layer in graph.layers]
    assert relu == [False, True, None, True, False, True, False]
    with torch.no_grad():
        ref = model(x).numpy()
    got = np.stack([micro.forward_float(graph, xi) for xi in x.numpy()])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_unsupported_op_and_batch_are_clear_errors():
    class Sig(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)
    mod = from_exported_program(torch.export.export(Sig(), (torch.randn(1, 4),)))
    with pytest.raises(KernelError, match="unsupported op relax.sigmoid"):
        micro.read_graph(mod)
    mod2 = from_exported_program(torch.export.export(nn.Linear(4, 2), (torch.randn(2, 4),)))
    with pytest.raises(KernelError, match="expected batch 1"):
        micro.read_graph(mod2)


@pytest.mark.parametrize("align", [2, 8])
def test_quantisation_bound_and_accuracy(small, align):
    model, mod, x = small
    q = micro.quantize(micro.read_graph(mod), x.numpy(), align=align)
    for ql in q.layers:
        if ql.weight is not None:
            # The accumulator can never overflow, for any int16 input.
            bound = np.abs(ql.bias.astype(np.int64)) + np.abs(ql.weight.astype(np.int64)).sum(1) * 32768
            assert bound.max() < 2**31
            assert ql.shift >= 0
            k = int(np.prod(ql.layer.weight.shape[1:]))
            assert ql.weight.shape[1] == -(-k // align) * align  # whole SIMD groups, zero padded
            assert not ql.weight[:, k:].any()
    with torch.no_grad():
        ref = model(x).numpy()
    got = np.stack([q.dequantize(q.run(q.quantize_input(xi))) for xi in x.numpy()])
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    # The batched reference (accuracy on whole test sets) is the per-image one.
    np.testing.assert_array_equal(q.run(q.quantize_input(x.numpy())), [q.run(q.quantize_input(xi)) for xi in x.numpy()])


def test_calibration_shape_is_checked(small):
    _, mod, _ = small
    with pytest.raises(KernelError, match=r"calibration: expected inputs of shape \[N, 3, 12, 12\]"):
        micro.quantize(micro.read_graph(mod), np.zeros((4, 12, 12, 3), np.float32))


def test_generated_c_is_plain_and_uses_smlad_only_where_pairs_survive():
    unrolled = kernels.KernelConfig(unroll=4)
    src = codegen.to_c({"d": kernels.dense(4, 5, 1, 7, True, unrolled), "g": kernels.group(4, 5, 9, 1, 7, False),
                        "c": kernels.csr(4, 10, 13, 1, 7, False)})
    assert "tvm/" not in src and "__tvm_ffi" not in src and "TVMBackend" not in src
    bodies = dict(re.findall(r"void (\w)\(.*?\) \{(.*?)\n\}", src, re.S))
    assert bodies["d"].count("__smlad") == 4 + 1  # unrolled by 4, one tail word
    assert "__smlad" in bodies["g"] and "cp[" in bodies["g"]  # one index per pair
    assert "__smlad" not in bodies["c"]  # an index per weight breaks the pairs
    assert "__usat(" in bodies["d"] and "__ssat(" in bodies["g"]  # ReLU fused as the lower bound


def test_im2col_and_pad_copy_word_pairs_without_bounds_tests():
    """Each kernel row of KW = 5 inputs is two 32-bit pair copies and one int16, with no bounds test:
    a padded conv first copies its input into a zero-bordered image (``pad``), a row of W = 6 as three
    pairs. (Bit-exactness is checked on QEMU below.)"""
    src = codegen.to_c({"u": kernels.im2col(2, 6, 6, 5, 5, 1, 2, 2, 50), "p": kernels.pad(2, 6, 6, 1)})
    bodies = dict(re.findall(r"void (\w)\(.*?\) \{(.*?)\n\}", src, re.S))
    assert re.search(r"j < 2; \+\+j\) \{\s*scalpel_copy2\(", bodies["u"])  # two pairs a row
    assert re.search(r"j_1 < 3; \+\+j_1\) \{\s*scalpel_copy2\(", bodies["p"])  # three pairs an image row
    assert "if (" not in bodies["u"] and "if (" not in bodies["p"] and "?" not in bodies["u"]
    assert "memcpy(dst, src, 4)" in src.split("#define TVM_DLL")[0]
    with pytest.raises(KernelError, match=r"im2col: 4x4 windows of 5x5 at stride 1 need an input of at least "
                                          r"8x8, found 6x6"):
        kernels.im2col(2, 6, 6, 5, 5, 1, 4, 4, 50)


@needs_toolchain
def test_padded_convs_borrow_the_free_arena_and_run_bit_exact(tmp_path):
    """Three padded convs in a row (the last strided, writing the model's output): each zero-bordered
    input goes to the arena that does not hold the conv's input, which is free until the conv writes."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 5, padding=2), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, stride=2, padding=2)).eval()
    x = torch.randn(4, 3, 9, 9)
    mod = from_exported_program(torch.export.export(model, (x[:1],)))
    project = micro.build(mod, "cortex-m4", tmp_path, x.numpy(), methods=Method.DENSE, inputs=x.numpy()[:2])
    model_c = (tmp_path / "model.c").read_text()
    pads = re.findall(r"l\d_pad\(\(int16_t\*\)(\w+), \(int16_t\*\)(\w+)\);", model_c)
    assert pads == [("input", "arena0"), ("arena0", "arena1"), ("arena1", "arena0")]
    arena0 = int(re.search(r"static int32_t arena0\[(\d+)\];", model_c).group(1))
    assert 2 * arena0 >= 6 * 13 * 13  # the last conv's padded input (6 x 9+4 x 9+4) fits where it is put
    result = micro.build_and_run(project)
    np.testing.assert_array_equal(result.outputs, np.stack([project.model.run(xq) for xq in project.inputs]))


def test_helium_kernels_use_one_vector_mac_per_group_of_eight():
    """Cortex-M55: dense and group kernels call the MVE helper once per group of 8 int16 (one index per
    group in the group kernel); CSR stays scalar. The helper is defined in the prelude for MVE builds."""
    mve = kernels.MVE
    src = codegen.to_c({"d": kernels.dense(4, 3, 1, 7, True, simd=mve),
                        "g": kernels.group(4, 3, 9, 1, 7, False, simd=mve),
                        "c": kernels.csr(4, 24, 13, 1, 7, False)})
    assert "vmladavaq_s16(acc, vld1q_s16(w), vld1q_s16(x))" in src and "__ARM_FEATURE_MVE" in src
    bodies = dict(re.findall(r"void (\w)\(.*?\) \{(.*?)\n\}", src, re.S))
    assert bodies["d"].count("scalpel_dot8") == 1  # the loop over 3 groups of a row
    assert re.search(r"scalpel_dot8\(.*vp\[\(gi_ptr\[0\] \* 8\)\]", bodies["g"])  # group g at vals + 8g
    assert "cp[" in bodies["g"] and "scalpel_dot8" not in bodies["c"]
    assert "__smlad" not in src.split("#define TVM_DLL")[1]


def test_errors_for_non_mcu_targets(small, tmp_path):
    _, mod, x = small
    with pytest.raises(TargetError, match="expected a microcontroller target"):
        micro.build(mod, "host", tmp_path, x.numpy())
    with pytest.raises(TargetError, match="expected a microcontroller target"):
        micro.build(mod, "cuda", tmp_path, x.numpy())


@needs_toolchain
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_board_matches_numpy_bit_exactly_for_every_kernel(small, tmp_path, target):
    model, mod, x = small
    before = mod.script(show_meta=True)
    outs, counts = {}, {}
    for method in Method:
        project = micro.build(mod, target, tmp_path / method.value, x.numpy(), methods=method,
                              inputs=x.numpy()[:4])
        assert project.board.machine == {"cortex-m4": "mps2-an386", "cortex-m55": "mps3-an547"}[target]
        result = micro.build_and_run(project)
        ref = np.stack([project.model.run(xq) for xq in project.inputs])
        np.testing.assert_array_equal(result.outputs, ref)
        outs[method], counts[method] = result.outputs, result.instructions
        assert len(set(result.instructions)) == 1  # no data-dependent control flow
    # Same integers whatever the format: the accumulator never overflows, so order does not matter.
    np.testing.assert_array_equal(outs[Method.DENSE], outs[Method.GROUP])
    np.testing.assert_array_equal(outs[Method.DENSE], outs[Method.CSR])
    assert mod.script(show_meta=True) == before  # the user's module is untouched
    # Code-shape knobs change instructions, never results.
    other = micro.build(mod, target, tmp_path / "minmax", x.numpy(), methods=Method.GROUP, inputs=x.numpy()[:4],
                        config=micro.KernelConfig(unroll=4, saturate="minmax"))
    np.testing.assert_array_equal(micro.build_and_run(other).outputs, outs[Method.GROUP])


@needs_toolchain
def test_instruction_count_is_deterministic(small, tmp_path):
    _, mod, x = small
    project = micro.build(mod, "cortex-m4", tmp_path, x.numpy(), inputs=x.numpy()[:1])
    first = micro.build_and_run(project).instructions
    second = micro.build_and_run(project).instructions
    assert first == second and first[0] > 1000


@needs_toolchain
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_group_kernel_cost_scales_with_kept_groups(tmp_path, target):
    """A 64×256 layer at 25 % kept groups (of the board's w): a kept group costs the group kernel under
    twice what it costs the dense SIMD kernel (index load + gather), so it must run > 2× fewer instructions."""
    torch.manual_seed(1)
    layer = _group_prune(nn.Linear(256, 64).eval(), 0.75, width=micro.BOARDS[target].group_width)
    x = torch.randn(4, 256)
    mod = from_exported_program(torch.export.export(layer, (x[:1],)))
    runs = {m: micro.build_and_run(micro.build(mod, target, tmp_path / m.value, x.numpy(), methods=m,
                                               inputs=x.numpy()[:1])) for m in (Method.DENSE, Method.GROUP)}
    assert runs[Method.DENSE].instructions[0] / runs[Method.GROUP].instructions[0] > 2.0
    assert runs[Method.GROUP].flash_bytes < runs[Method.DENSE].flash_bytes / 2


@needs_toolchain
def test_build_entry_point_takes_the_plan(small, tmp_path):
    """tvm_scalpel.build(..., 'cortex-m4') is the same flow: CSR layers and thresholds come from the plan,
    unknown layer keys are an error, and the project runs bit-exactly."""
    import tvm_scalpel
    from tvm_scalpel import CompilePlan, PlanError

    from tvm_scalpel.passes.fold_node_masks import FoldNodeMasks

    _, mod, x = small
    graph = micro.read_graph(FoldNodeMasks()(mod))  # keys name the layers as built: dead nodes folded
    keys = [layer.key for layer in graph.layers if hasattr(layer, "weight")]
    plan = CompilePlan(layer_thresholds={keys[0]: 2.0}, csr_layers=frozenset({keys[-1]}))
    project = tvm_scalpel.build(mod, "cortex-m4", plan, out_dir=tmp_path, calibration=x.numpy(), inputs=x.numpy()[:2])
    assert project.methods[0] == "dense" and project.methods[-1] == "csr" and "group" in project.methods
    result = micro.build_and_run(project)
    np.testing.assert_array_equal(result.outputs, project.model.run(project.inputs))
    with pytest.raises(PlanError, match=r"linear:1x1.*match no layer"):
        tvm_scalpel.build(mod, "cortex-m4", CompilePlan(layer_thresholds={"linear:1x1": 0.5}), out_dir=tmp_path,
                          calibration=x.numpy())


@needs_toolchain
def test_scalpel_compile_for_cortex_m4_writes_a_project_that_runs(monkeypatch, capsys, tmp_path):
    """`scalpel prune/compile --target cortex-m4`: the MCU recipe (SIMD-aware pairs), then a C project
    that QEMU runs bit-exactly, with fewer instructions than the dense build of the same model."""
    from tvm_scalpel import cli

    monkeypatch.setenv("SCALPEL_NO_REEXEC", "1")
    common = ["lenet-300-100", "--target", "cortex-m4", "--quick", "--out", str(tmp_path)]
    assert cli.main(["prune", *common]) == 0
    counts = {}
    for method in ("scalpel", "dense"):
        capsys.readouterr()
        assert cli.main(["compile", *common, "--method", method]) == 0
        out = capsys.readouterr().out
        folder = tmp_path / f"lenet-300-100-{method}-cortex-m4"
        assert {"kernels.c", "model.c", "model.h", "Makefile", "plan.json"} <= {p.name for p in folder.iterdir()}
        counts[method] = int(re.search(r"([\d,]+) instructions per inference, outputs bit-exact", out)[1]
                             .replace(",", ""))
        if method == "scalpel":  # each layer's kernel measured on the board: fc1's pairs are mostly zero
            assert "linear:300x784:" in out and "instructions alone:" in out
            assert json.loads((folder / "plan.json").read_text())["layers"][0]["method"] == "group"
    assert counts["dense"] > 2 * counts["scalpel"]
    assert cli.main(["compile", *common, "--batch", "4"]) == 2  # a clear error, not a crash
    assert "expected --batch 1" in capsys.readouterr().err


@needs_toolchain
def test_measured_decisions_keep_dense_where_pairs_survive(tmp_path):
    """'measured': a 95 %-zero-pair layer goes group-sparse, an unpruned one stays dense, and the whole
    model then runs no more instructions than either uniform choice."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    _group_prune(net[0], 0.95)
    x = torch.randn(8, 128)
    mod = from_exported_program(torch.export.export(net, (x[:1],)))
    runs = {}
    for methods in ("measured", "group", "dense"):
        project = micro.build(mod, "cortex-m4", tmp_path / methods, x.numpy(), methods=methods, inputs=x.numpy()[:1])
        runs[methods] = (project, micro.build_and_run(project))
    project, measured = runs["measured"]
    assert project.methods == ("group", "dense")
    assert "group" in project.decisions[0] and project.decisions[1].endswith("-> dense")
    assert measured.instructions[0] <= min(runs[m][1].instructions[0] for m in ("group", "dense"))
    np.testing.assert_array_equal(measured.outputs, runs["dense"][1].outputs)
