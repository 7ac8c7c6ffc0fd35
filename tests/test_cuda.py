"""The CUDA path without a GPU: tile kernels (CPU emulation of the same per-thread code) against numpy,
proof that pruned tiles are never read, whole models through RewriteTileSparse against torch, every
reference model's CUDA code through nvcc to PTX, and GPU plans. On a machine with a GPU the `gpu`-marked
tests run the built model there."""

import re
import shutil

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_scalpel
from tvm_scalpel import compat
from tvm_scalpel import formats as F
from tvm_scalpel.errors import KernelError, PlanError, TargetError
from tvm_scalpel.models import MODELS, build_model
from tvm_scalpel.passes.fold_node_masks import FoldConfig, FoldNodeMasks
from tvm_scalpel.passes.rewrite_tile_sparse import RewriteTileSparse, TileSparseConfig
from tvm_scalpel.pipeline import CompilePlan
from tvm_scalpel.plan import Method, all_dense, decide, stored_weight_bytes
from tvm_scalpel.schedules import cuda

from test_pass_rewrite_group_sparse import _import

SPEC = tvm_scalpel.hardware_spec("cuda")
TILE = SPEC.tile
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit needed)")


def _has_gpu() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # a TVM runtime built without CUDA
        return False


def _tile_pruned(shape, sparsity, rng):
    """A random weight with a random ``sparsity`` fraction of its tiles zero."""
    w = rng.standard_normal(shape).astype("float32")
    keep = rng.random(F.tile_mask(w, *TILE).shape) >= sparsity
    return F.encode_tiles(w, *TILE, keep=keep)


def _run_emulated(func, *arrays, out_shape):
    ex = compat.compile_prim_func(func, tvm.target.Target("llvm"))
    out = np.zeros(out_shape, "float32")
    args = compat.to_device([*arrays, out])
    ex[str(func.attrs["global_symbol"])](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("m,k,n,layout", [
    (70, 27, 1, "nk"), (100, 300, 3, "nk"), (10, 84, 8, "kn"),  # gemv: ragged rows, ragged k
    (64, 75, 9, "nk"), (33, 130, 100, "nk"), (70, 27, 200, "kn"), (16, 400, 64, "kn"),  # gemm: tn = 1, 2, 4
])
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_tile_kernels_match_numpy(m, k, n, layout, sparsity):
    rng = np.random.default_rng(m * k + n)
    t = _tile_pruned((m, k), sparsity, rng)
    a = rng.standard_normal((n, k) if layout == "nk" else (k, n)).astype("float32")
    ref = a @ t.to_dense().T if layout == "nk" else t.to_dense() @ a
    func, name = cuda.tile_matmul(m, k, n, TILE, layout, emulate=True)
    assert name.startswith("tile_gemv" if n <= cuda.GEMV_MAX_N else "tile_gemm")
    out = _run_emulated(func, t.values, t.col_idx, t.row_ptr, a, out_shape=ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n,layout", [(2, "nk"), (40, "kn"), (150, "nk")])
def test_pruned_tiles_are_never_read(n, layout):
    """K-slices whose tiles are pruned in every row block get NaN activations: any read of them (even
    times a zero weight) would poison the output. A row block with no tile at all gives exact zeros."""
    m, k = 96, 80
    rng = np.random.default_rng(n)
    w = rng.standard_normal((m, k)).astype("float32")
    keep = rng.random(F.tile_mask(w, *TILE).shape) >= 0.4
    dead_cols = [2, 5, 9]
    keep[:, dead_cols] = False
    keep[1, :] = False  # row block 1: nothing kept
    t = F.encode_tiles(w, *TILE, keep=keep)
    a = rng.standard_normal((n, k) if layout == "nk" else (k, n)).astype("float32")
    for c in dead_cols:
        sl = slice(c * TILE[1], (c + 1) * TILE[1])
        if layout == "nk":
            a[:, sl] = np.nan
        else:
            a[sl, :] = np.nan
    clean = np.nan_to_num(a)
    ref = clean @ t.to_dense().T if layout == "nk" else t.to_dense() @ clean
    func, _ = cuda.tile_matmul(m, k, n, TILE, layout, emulate=True)
    out = _run_emulated(func, t.values, t.col_idx, t.row_ptr, a, out_shape=ref.shape)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    rows_b1 = slice(TILE[0], 2 * TILE[0])
    assert not (out[:, rows_b1] if layout == "nk" else out[rows_b1]).any()


def _gpu_source(func) -> str:
    target = tvm.target.Target(SPEC.target, host={"kind": "llvm"})
    compat.ensure_cuda_compiler()
    (src,) = compat.cuda_sources(tvm.compile(func, target))
    return src


@needs_nvcc
@pytest.mark.parametrize("n", [1, 256])
def test_gpu_kernel_walks_the_tile_list_and_compiles_to_ptx(n):
    func, name = cuda.tile_matmul(128, 576, n, TILE, "kn")
    src = _gpu_source(func)
    kernel = name.split("_kn")[0]
    # The reduction loop runs over the row block's kept tiles only: its bound is the row-pointer difference.
    assert re.search(r"for \(int j = 0; j < \(P_ptr\[\(\(\(int\)blockIdx\.[xy]\) \+ 1\)\] - P_ptr\[", src), src
    assert "I_ptr[" in src  # one index per tile, read per step
    assert src.count("__syncthreads()") == (2 if kernel == "tile_gemm" else 1)
    if kernel == "tile_gemm":
        assert "__shared__ alignas(64) float Ws_ptr[256]" in src  # the 32x8 tile staged per step
        assert re.search(r"float acc_ptr\[16\]", src)  # 4x4 register tile per thread
    ptx = compat.compile_ptx(src, SPEC.target)
    assert f".entry {kernel}_kernel".encode() in ptx


def _prune_tiles(model, sparsity, seed):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]:
            w2 = F.flatten_per_filter(layer.weight.numpy())
            keep = rng.random(F.tile_mask(w2, *TILE).shape) >= sparsity
            dense = F.encode_tiles(w2, *TILE, keep=keep).to_dense()
            layer.weight.copy_(torch.from_numpy(dense.reshape(layer.weight.shape)))
    return model


@pytest.mark.parametrize("name,batch", [("lenet-300-100", 1), ("lenet-300-100", 12), ("lenet-5", 2),
                                        ("convnet", 1), ("nin", 1)])
def test_models_through_tile_kernels_equal_torch(name, batch):
    """The CUDA lowering (FoldNodeMasks → RewriteTileSparse) with the kernels emulated on the CPU."""
    model = _prune_tiles(build_model(name).eval(), 0.6, seed=batch)
    x = model.example_input(batch)
    mod = _import(model, x, "export")
    config = TileSparseConfig(SPEC, fc_min_sparsity=0.0, emulate=True)
    mod = tvm.transform.Sequential([FoldNodeMasks(FoldConfig()), RewriteTileSparse(config)])(mod)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    calls = _calls(mod)
    assert sum(c.startswith("tile_") for c in calls) == len(layers)  # every layer on a tile kernel
    assert "relax.nn.conv2d" not in calls and "relax.matmul" not in calls
    out = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_nvcc
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_reference_model_compiles_to_ptx(name):
    """tvm_scalpel.build(mod, 'cuda') on every reference model (tile-pruned), and nvcc accepts the CUDA
    source as PTX; every conv runs a tile kernel, every kernel is an entry of the PTX."""
    model = _prune_tiles(build_model(name).eval(), 0.5, seed=len(name))
    mod = _import(model, model.example_input(1), "export")
    ex = tvm_scalpel.build(mod, "cuda", decide(mod, SPEC).compile_plan())
    (src,) = compat.cuda_sources(ex)
    ptx = compat.compile_ptx(src, SPEC.target)
    entries = set(re.findall(rb"\.entry (\w+)\(", ptx))
    assert entries == {e.encode() for e in re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(',
                                                         src)}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    tile_kernels = {e for e in entries if e.startswith((b"tile_gemm", b"tile_gemv"))}
    assert tile_kernels  # the tile-pruned layers run our kernels
    assert any(e.startswith(b"im2col") for e in entries) == (convs > 0)


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10)).eval()


def test_gpu_plan_skips_tiles_only_where_they_are_zero():
    model = _conv_net()
    with torch.no_grad():
        w2 = model[2].weight.view(64, -1)
        w2[:32, : 8 * 40] = 0  # 40 of 72 tiles of row block 0 → 40/144 zero tiles
    mod = _import(model, torch.randn(1, 3, 8, 8), "export")
    plan = decide(mod, SPEC)
    by_key = {d.key: d for d in plan.layers}
    pruned = by_key["conv2d:64x64x3x3"]
    assert pruned.method is Method.TILE and pruned.tile == TILE
    assert pruned.reached_sparsity == pytest.approx(40 / 144)
    assert by_key["conv2d:64x3x3x3"].method is Method.DENSE
    assert by_key["linear:10x4096"].method is Method.DENSE
    weight = model[2].weight.detach().numpy()
    dense_rest = sum(p.numel() * 4 for n, p in model.named_parameters() if n in ("0.weight", "5.weight"))
    assert stored_weight_bytes(mod, plan) == dense_rest + F.encode_tiles(weight, *TILE).sizes().total
    assert type(plan).from_json(plan.to_json()) == plan
    # Dense plan: the same kernel walks every tile (the fair dense baseline); tile plan: 104 of 144.
    for p, tiles in ((all_dense(mod, SPEC), 144), (plan, 104)):
        config = TileSparseConfig(SPEC, layers=p.compile_plan().layer_thresholds)
        lowered = tvm.transform.Sequential([FoldNodeMasks(FoldConfig()), RewriteTileSparse(config)])(mod)
        shapes = [c.shape for c in _constants(lowered) if c.ndim == 3]
        assert (tiles, *TILE) in shapes


def _visit_main(mod, keep):
    found = []

    def visit(e):
        item = keep(e)
        if item is not None:
            found.append(item)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _constants(mod):
    """numpy values of every tensor constant in main."""
    return _visit_main(mod, compat.constant_array)


def _calls(mod):
    """Op names and call_tir callee names of every call in main."""
    def name(e):
        if not isinstance(e, relax.Call):
            return None
        if e.op == tvm.ir.Op.get("relax.call_tir"):
            return e.args[0].name_hint
        return e.op.name if isinstance(e.op, tvm.ir.Op) else None

    return _visit_main(mod, name)


def test_cuda_errors_are_clear():
    with pytest.raises(TargetError, match="expected a CUDA target"):
        TileSparseConfig(tvm_scalpel.hardware_spec("host"))
    with pytest.raises(TargetError, match="needs a CUDA target"):
        tvm_scalpel.hardware_spec("host").tile
    with pytest.raises(PlanError, match="prunes in tiles"):
        tvm_scalpel.pipeline("cuda", CompilePlan(group_width=4))
    with pytest.raises(KernelError, match="n ≤ 8"):
        cuda.tile_gemv(64, 64, 9, TILE)
    with pytest.raises(KernelError, match="layout"):
        cuda.tile_gemm(64, 64, 64, TILE, "mk")
    with pytest.raises(KernelError, match="multiple of 4"):
        cuda.tile_gemm(64, 64, 64, (30, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine (tvm.cuda(0).exist is False)")
@pytest.mark.parametrize("batch", [1, 16])
def test_built_model_runs_on_the_gpu(batch):
    model = _prune_tiles(build_model("lenet-5").eval(), 0.6, seed=3)
    x = model.example_input(batch)
    mod = _import(model, x, "export")
    ex = tvm_scalpel.build(mod, "cuda", decide(mod, SPEC).compile_plan())
    dev = tvm.cuda(0)
    out = relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(x.numpy(), dev))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
