"""CPU kernels against numpy (and torch for conv): odd sizes, ragged groups, empty and dense rows."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_scalpel import KernelError, hardware_spec
from tvm_scalpel import formats as F
from tvm_scalpel.schedules import CompiledKernel, cpu

RTOL = 1e-4
SETTINGS = settings(max_examples=15, deadline=None)


def _close(got, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale)


def _vector_widths(func) -> set[int]:
    return {int(v) for v in re.findall(r"T\.vectorized\((\d+)\)", func.script())}


def _group_pruned(seed, m, k, w, density):
    """A weight pruned at group width w, with an empty first row and a fully dense last row."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((m, k)).astype("float32")
    keep = rng.random((m, -(-k // w))) < density
    keep[0] = False
    keep[-1] = True
    g = F.encode(weight, w, keep=keep)
    return g, g.to_dense(), rng


dims = dict(m=st.integers(1, 70), k=st.integers(1, 90), n=st.integers(1, 64))


@SETTINGS
@given(**dims, seed=st.integers(0, 9999))
def test_dense_nt(host_spec, m, k, n, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, k)).astype("float32")
    X = rng.standard_normal((n, k)).astype("float32")
    y = CompiledKernel(cpu.dense_nt(m, k, n, host_spec), host_spec)(X, W, out_shape=(n, m))
    _close(y, X @ W.T)


@SETTINGS
@given(**dims, seed=st.integers(0, 9999), tile=st.sampled_from([(8, 3), (4, 2), (1, 1), (3, 5)]), pack=st.booleans())
def test_dense_gemm(host_spec, m, k, n, seed, tile, pack):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, k)).astype("float32")
    D = rng.standard_normal((k, n)).astype("float32")
    o = CompiledKernel(cpu.dense_gemm(m, k, n, host_spec, tile=tile, pack=pack), host_spec)(W, D, out_shape=(m, n))
    _close(o, W @ D)


def test_dense_gemm_packs_d_only_for_long_blocks_that_many_row_tiles_read(host_spec):
    """NIN's conv2 (192 rows, k = 2400) reads a packed copy of D's block; ConvNet's conv2 (32 rows), short
    rows (k = 192) and NIN's conv3 (n = 64) read D in place. The packed kernel equals numpy."""
    def scratch(func):
        return [line.strip() for line in func.script().splitlines() if "T.alloc_buffer" in line]

    nin = cpu.dense_gemm(192, 2400, 256, host_spec)
    assert scratch(nin) == [f"S = T.alloc_buffer((2400, 3, {host_spec.lanes('float32')}))"]  # k × 3 vectors
    assert cpu.dense_gemm_packs(128, 1200, 729)  # AlexNet's conv2 (one group)
    for m, k, n in ((32, 800, 256), (192, 192, 1024), (192, 1728, 64), (64, 2400, 256)):
        assert not cpu.dense_gemm_packs(m, k, n) and scratch(cpu.dense_gemm(m, k, n, host_spec)) == []
    rng = np.random.default_rng(0)
    # NIN's shape, and one with a ragged last row tile and a ragged last column vector (both clamped)
    for func, (m, k, n) in ((nin, (192, 2400, 256)), (cpu.dense_gemm(130, 1030, 130, host_spec), (130, 1030, 130))):
        assert scratch(func)
        W = rng.standard_normal((m, k)).astype("float32")
        D = rng.standard_normal((k, n)).astype("float32")
        _close(CompiledKernel(func, host_spec)(W, D, out_shape=(m, n)), W @ D)


@SETTINGS
@given(**dims, w=st.sampled_from([2, 3, 4, 8, 16]), density=st.floats(0, 1), seed=st.integers(0, 9999))
def test_group_sparse_nt(host_spec, m, k, n, w, density, seed):
    g, Wm, rng = _group_pruned(seed, m, k, w, density)
    X = rng.standard_normal((n, k)).astype("float32")
    kern = CompiledKernel(cpu.group_sparse_nt(m, k, w, n, host_spec), host_spec)
    _close(kern(X, g.values, g.col_idx, g.row_ptr, out_shape=(n, m)), X @ Wm.T)


@pytest.mark.parametrize(("k", "overlap"), [(45, True), (16, False), (11, False)])
@pytest.mark.parametrize("n", [1, 6])
def test_dense_nt_ragged_tail(host_spec, k, overlap, n):
    """k % lanes columns left over: with k ≥ lanes one vector FMA over W's last lanes columns against a copy
    of X's with the already-counted columns zeroed; k < lanes (nothing to overlap) stays scalar."""
    lanes = host_spec.lanes("float32")
    k = k if k != 45 else 2 * lanes + 13
    rng = np.random.default_rng(k + n)
    W = rng.standard_normal((6, k)).astype("float32")
    X = rng.standard_normal((n, k)).astype("float32")
    func = cpu.dense_nt(6, k, n, host_spec)
    assert ("XT = T.decl_buffer" in func.script()) == overlap
    _close(CompiledKernel(func, host_spec)(X, W, out_shape=(n, 6)), X @ W.T)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("copy", [True, False])
def test_group_sparse_nt_ragged_group(host_spec, monkeypatch, n, copy):
    """k = 2·16 + 13: the ragged last group reads a zero-padded copy of X's last 13 columns, or (when the
    copy would not fit the stack) takes the scalar path; both exact, NaN/inf-free padding."""
    if not copy:
        monkeypatch.setattr(cpu, "TAIL_COPY_MAX_BYTES", 0)
    g, Wm, rng = _group_pruned(3, 7, 45, 16, 1.0)
    X = rng.standard_normal((n, 45)).astype("float32")
    func = cpu.group_sparse_nt(7, 45, 16, n, host_spec)
    assert ("XT = T.decl_buffer" in func.script()) == copy
    _close(CompiledKernel(func, host_spec)(X, g.values, g.col_idx, g.row_ptr, out_shape=(n, 7)), X @ Wm.T)


@pytest.mark.parametrize("w", [2, 3, 16])
def test_row_sums_fold_by_halves_for_power_of_two_widths(host_spec, w):
    """A row's w-lane accumulator is summed by halves (one vector add per level) when w is a power of two;
    other widths keep the pairwise expression. Both exact, batch 1 and a batch tile of 4."""
    func = cpu.group_sparse_nt(9, 5 * w + 1, w, 5, host_spec)
    halves = _vector_widths(func)
    assert halves == ({16, 8, 4, 2} if w == 16 else {w}), halves  # w = 2: one scalar add, no vector
    g, Wm, rng = _group_pruned(w, 9, 5 * w + 1, w, 0.6)
    X = rng.standard_normal((5, 5 * w + 1)).astype("float32")
    _close(CompiledKernel(func, host_spec)(X, g.values, g.col_idx, g.row_ptr, out_shape=(5, 9)), X @ Wm.T)


@SETTINGS
@given(**dims, w=st.sampled_from([1, 2, 4, 8, 16]), density=st.floats(0, 1), seed=st.integers(0, 9999),
       pack=st.booleans(), nv=st.integers(1, 8))
def test_group_sparse_gemm(host_spec, m, k, n, w, density, seed, pack, nv):
    g, Wm, rng = _group_pruned(seed, m, k, w, density)
    D = rng.standard_normal((k, n)).astype("float32")
    kern = CompiledKernel(cpu.group_sparse_gemm(m, k, w, n, host_spec, nv=nv, pack=pack), host_spec)
    _close(kern(g.values, g.col_idx, g.row_ptr, D, out_shape=(m, n)), Wm @ D)


@SETTINGS
@given(**dims, density=st.floats(0, 1), seed=st.integers(0, 9999))
def test_csr_nt(host_spec, m, k, n, density, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, k)).astype("float32") * (rng.random((m, k)) < density)
    c = F.encode_csr(W)
    X = rng.standard_normal((n, k)).astype("float32")
    kern = CompiledKernel(cpu.csr_nt(m, k, n, host_spec), host_spec)
    _close(kern(X, c.values.reshape(-1, 1), c.col_idx, c.row_ptr, out_shape=(n, m)), X @ W.T)


def _epilogue_ref(y, bias, ep, axis):
    """numpy reference of ``ep`` on y: + bias along ``axis`` (the output-channel axis), then ReLU."""
    if ep.bias:
        y = y + (bias[None, :] if axis == 1 else bias[:, None])
    return np.maximum(y, 0) if ep.relu else y


EPILOGUES = st.sampled_from([cpu.Epilogue(bias=True), cpu.Epilogue(relu=True), cpu.Epilogue(bias=True, relu=True)])


@SETTINGS
@given(**dims, w=st.sampled_from([1, 4, 16]), density=st.floats(0, 1), seed=st.integers(0, 9999), ep=EPILOGUES)
def test_epilogues(host_spec, m, k, n, w, density, seed, ep):
    """Every layer kernel adds B[row] and applies ReLU before its store, and takes B only with a bias."""
    g, Wm, rng = _group_pruned(seed, m, k, w, density)
    X = rng.standard_normal((n, k)).astype("float32")
    D = rng.standard_normal((k, n)).astype("float32")
    bias = rng.standard_normal(m).astype("float32")
    B = [bias] if ep.bias else []
    c = F.encode_csr(Wm)
    cases = [
        (cpu.dense_nt(m, k, n, host_spec, ep), [X, Wm, *B], (n, m), _epilogue_ref(X @ Wm.T, bias, ep, 1)),
        (cpu.group_sparse_nt(m, k, w, n, host_spec, ep), [X, g.values, g.col_idx, g.row_ptr, *B], (n, m),
         _epilogue_ref(X @ Wm.T, bias, ep, 1)),
        (cpu.csr_nt(m, k, n, host_spec, ep), [X, c.values.reshape(-1, 1), c.col_idx, c.row_ptr, *B], (n, m),
         _epilogue_ref(X @ Wm.T, bias, ep, 1)),
        (cpu.dense_gemm(m, k, n, host_spec, epilogue=ep), [Wm, D, *B], (m, n), _epilogue_ref(Wm @ D, bias, ep, 0)),
        (cpu.group_sparse_gemm(m, k, w, n, host_spec, epilogue=ep), [g.values, g.col_idx, g.row_ptr, D, *B], (m, n),
         _epilogue_ref(Wm @ D, bias, ep, 0)),
    ]
    for func, args, shape, ref in cases:
        assert len(func.params) == len(args) + 1, func.attrs["global_symbol"]
        _close(CompiledKernel(func, host_spec)(*args, out_shape=shape), ref)


def test_one_kernel_serves_any_pattern_of_its_shape(host_spec):
    m, k, w = 40, 100, 8
    kern = CompiledKernel(cpu.group_sparse_nt(m, k, w, 1, host_spec), host_spec)
    for seed, density in [(1, 0.05), (2, 0.5), (3, 1.0)]:
        g, Wm, rng = _group_pruned(seed, m, k, w, density)
        x = rng.standard_normal((1, k)).astype("float32")
        _close(kern(x, g.values, g.col_idx, g.row_ptr, out_shape=(1, m)), x @ Wm.T)


def test_benchmark_shapes_are_exact(host_spec):
    """The Figure 13/14 shapes, 90 % group sparsity at the host's lanes."""
    w = host_spec.lanes("float32")
    g, Wm, rng = _group_pruned(0, 4096, 4096, w, 0.1)
    x = rng.standard_normal((1, 4096)).astype("float32")
    kern = CompiledKernel(cpu.group_sparse_nt(4096, 4096, w, 1, host_spec), host_spec)
    _close(kern(x, g.values, g.col_idx, g.row_ptr, out_shape=(1, 4096)), x @ Wm.T)
    g, Wm, rng = _group_pruned(0, 128, 1200, w, 0.1)
    D = rng.standard_normal((1200, 729)).astype("float32")
    kern = CompiledKernel(cpu.group_sparse_gemm(128, 1200, w, 729, host_spec), host_spec)
    _close(kern(g.values, g.col_idx, g.row_ptr, D, out_shape=(128, 729)), Wm @ D)


@pytest.mark.parametrize("b, c, h, oc, kh, stride, pad", [(1, 3, 32, 32, 5, (1, 1), (2, 2)),
                                                      (1, 20, 12, 50, 5, (1, 1), (0, 0)),
                                                      (3, 4, 9, 6, 3, (2, 1), (1, 0))])
def test_conv_via_im2col_matches_torch(host_spec, b, c, h, oc, kh, stride, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, c, h, h)).astype("float32")
    weight = rng.standard_normal((oc, c, kh, kh)).astype("float32")
    oh, ow = (cpu.conv_out_size(h, kh, s, p) for s, p in zip(stride, pad))
    npix = b * oh * ow
    cols = CompiledKernel(cpu.im2col(b, c, h, h, kh, kh, stride, pad), host_spec)(
        x, out_shape=(c * kh * kh, npix))

    def conv_ref(wt):
        return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=stride,
                                          padding=pad).numpy()

    def as_nchw(o):  # O[oc, b, oh, ow] -> [b, oc, oh, ow]
        return o.reshape(oc, b, oh, ow).transpose(1, 0, 2, 3)

    w2 = F.flatten_per_filter(weight)
    dense = CompiledKernel(cpu.dense_gemm(oc, c * kh * kh, npix, host_spec), host_spec)
    _close(as_nchw(dense(w2, cols, out_shape=(oc, npix))), conv_ref(weight))
    # The same conv with a group-pruned weight through the sparse kernel.
    w = host_spec.lanes("float32")
    keep = rng.random((oc, -(-w2.shape[1] // w))) < 0.3
    g = F.encode(w2, w, keep=keep)
    sparse = CompiledKernel(cpu.group_sparse_gemm(oc, w2.shape[1], w, npix, host_spec), host_spec)
    got = sparse(g.values, g.col_idx, g.row_ptr, cols, out_shape=(oc, npix))
    _close(as_nchw(got), conv_ref(g.to_dense().reshape(weight.shape)))


def test_vector_width_follows_target_lanes():
    """Vector width comes from the hardware model, not a literal: AVX2 gives 8, AVX-512 gives 16."""
    for cpu_name, lanes in (("haswell", 8), ("skylake-avx512", 16)):
        spec = hardware_spec({"kind": "llvm", "mcpu": cpu_name})
        for func in (cpu.dense_nt(8, 64, 1, spec), cpu.dense_gemm(8, 64, 40, spec)):
            widths = _vector_widths(func)
            # the widest vectors are the target's (narrower ones: the row sums' folds by halves)
            assert max(widths) == lanes, (cpu_name, widths)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_shapes_are_clear_errors(host_spec, bad):
    with pytest.raises(KernelError, match="positive int"):
        cpu.dense_nt(4, bad, 1, host_spec)


def test_wrong_argument_shape_is_a_clear_error(host_spec):
    kern = CompiledKernel(cpu.dense_nt(4, 8, 1, host_spec), host_spec)
    with pytest.raises(KernelError, match="dense_nt"):
        kern(np.ones((1, 9), "float32"), np.ones((4, 8), "float32"), out_shape=(1, 4))
