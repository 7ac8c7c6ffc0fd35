"""The MCU path's data-movement kernels (pad, im2col, pools, LRN) compiled with the host's C compiler
and compared, bit for bit, with the numpy int16 reference on edge-case shapes: strides above and below
the window, windows larger than the image, ceil-mode edges, LRN windows wider than the image. These
kernels use no ARM intrinsics, so this runs without the ARM toolchain; guard words around every buffer
catch writes outside it."""

import ctypes
import importlib
import shutil
import subprocess

import numpy as np
import pytest

from tvm_scalpel import KernelError
from tvm_scalpel.micro import codegen, kernels
from tvm_scalpel.micro.graph import LRN, AvgPool, Conv, MaxPool

quantize = importlib.import_module("tvm_scalpel.micro.quantize")  # the package exports a function of that name

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a host C compiler (apt-get install gcc)")

GUARD = 64  # int16 words before and after every buffer
PRELUDE = ("#include <stdint.h>\n#include <stdbool.h>\n#include <string.h>\n"
           "static inline void scalpel_copy2(int16_t *d, const int16_t *s) { memcpy(d, s, 4); }\n#define TVM_DLL\n")

CONVS = [  # C, H, W, K, stride, pad
    (2, 5, 7, 3, 2, 1), (1, 3, 3, 5, 1, 2), (3, 4, 5, 5, 3, 2), (2, 6, 6, 3, 1, 0), (1, 7, 4, 4, 2, 3),
    (1, 1, 1, 3, 1, 1), (1, 2, 3, 5, 4, 2)]
POOLS = [  # C, H, W, K, stride
    (2, 7, 9, 3, 2), (1, 2, 2, 3, 2), (1, 5, 6, 2, 3), (2, 9, 8, 3, 3), (1, 4, 4, 2, 2), (1, 3, 8, 5, 1),
    (1, 1, 5, 3, 2)]
LRNS = [(2, 6, 6, 3), (1, 2, 2, 3), (1, 1, 7, 5), (2, 4, 3, 5), (1, 7, 1, 3), (1, 3, 9, 7)]  # C, H, W, n


def _kp(c: int, k: int) -> int:
    """The im2col row length used here: c·k·k rounded up to a multiple of 4, so most cases have a pad column."""
    return -(-c * k * k // 4) * 4


def _pool_out(size: int, k: int, s: int) -> int:
    """Ceil mode without padding: the last window starts inside the input."""
    o = -(-(size - k) // s) + 1 if size >= k else 1
    return o - 1 if (o - 1) * s >= size else o


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    funcs = {}
    for i, (c, h, w, k, s, p) in enumerate(CONVS):
        layer = Conv(np.zeros((3, c, k, k), np.float32), np.zeros(3, np.float32), (c, h, w), s, p)
        oh, ow = layer.out_hw
        if p:
            funcs[f"pad{i}"] = kernels.pad(c, h, w, p)
        funcs[f"im2col{i}"] = kernels.im2col(c, h + 2 * p, w + 2 * p, k, k, s, oh, ow, _kp(c, k))
    for i, (c, h, w, k, s) in enumerate(POOLS):
        oh, ow = _pool_out(h, k, s), _pool_out(w, k, s)
        for relu in (False, True):
            funcs[f"max{i}_{relu:d}"] = kernels.max_pool(c, h, w, k, s, oh, ow, relu)
            funcs[f"avg{i}_{relu:d}"] = kernels.avg_pool(c, h, w, k, s, oh, ow, relu)
    for i, (c, h, w, n) in enumerate(LRNS):
        q = quantize._quantize_lrn(LRN(n, 0.5, 1.0, 0.75, (c, h, w)), 10)
        funcs[f"lrn{i}"] = kernels.lrn(c, h, w, n, q.sq_shift, q.lut_shift, len(q.lut))
    d = tmp_path_factory.mktemp("host-kernels")
    (d / "k.c").write_text(PRELUDE + codegen.to_c(funcs).split("#define TVM_DLL", 1)[1])
    subprocess.run([CC, "-O1", "-shared", "-fPIC", "-o", str(d / "k.so"), str(d / "k.c")], check=True)
    return ctypes.CDLL(str(d / "k.so"))


class Buffers:
    """int16/uint16 arrays with random guard words around them, passed to C by their first element."""

    def __init__(self, rng):
        self.rng, self.held = rng, []

    def __call__(self, data: np.ndarray) -> ctypes.c_void_p:
        g = self.rng.integers(0, 1 << 16, data.size + 2 * GUARD).astype(np.uint16).view(data.dtype)
        g[GUARD:GUARD + data.size] = data.reshape(-1)
        self.held.append((g, g.copy()))
        return ctypes.c_void_p(g.ctypes.data + GUARD * g.itemsize)

    def body(self, i: int, n: int) -> np.ndarray:
        g, before = self.held[i]
        assert np.array_equal(g[:GUARD], before[:GUARD]) and np.array_equal(g[GUARD + n:], before[GUARD + n:])
        return g[GUARD:GUARD + n]


def _x(rng, *shape) -> np.ndarray:
    return rng.integers(-32768, 32768, shape, dtype=np.int16)


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_pad_and_im2col_match_numpy(lib, i):
    c, h, w, k, s, p = CONVS[i]
    layer = Conv(np.zeros((3, c, k, k), np.float32), np.zeros(3, np.float32), (c, h, w), s, p)
    oh, ow = layer.out_hw
    kp = _kp(c, k)
    rng = np.random.default_rng(i)
    x = _x(rng, c, h, w)
    buf = Buffers(rng)
    src = buf(x)
    if p:  # into an "arena" holding garbage: every border word must be rewritten
        padded = buf(_x(rng, c * (h + 2 * p) * (w + 2 * p)))
        getattr(lib, f"pad{i}")(src, padded)
        src = padded
    getattr(lib, f"im2col{i}")(src, buf(_x(rng, oh * ow * kp)))
    want = np.zeros((oh * ow, kp), np.int16)
    want[:, :c * k * k] = quantize.im2col(x, layer)
    np.testing.assert_array_equal(buf.body(len(buf.held) - 1, oh * ow * kp).reshape(oh * ow, kp), want)


@pytest.mark.parametrize("i", range(len(POOLS)))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pools_match_numpy(lib, i, relu, kind):
    c, h, w, k, s = POOLS[i]
    oh, ow = _pool_out(h, k, s), _pool_out(w, k, s)
    layer = (MaxPool if kind == "max" else AvgPool)(k, s, (c, h, w), (c, oh, ow), relu)
    rng = np.random.default_rng(i)
    x = _x(rng, c, h, w)
    buf = Buffers(rng)
    getattr(lib, f"{kind}{i}_{relu:d}")(buf(x), buf(np.zeros(c * oh * ow, np.int16)))
    want = quantize._max_pool_int(x, layer) if kind == "max" else quantize._avg_pool_int(x, layer)
    np.testing.assert_array_equal(buf.body(1, c * oh * ow), (np.maximum(want, 0) if relu else want).reshape(-1))


@pytest.mark.parametrize("i", range(len(LRNS)))
@pytest.mark.parametrize("extreme", [False, True])
def test_lrn_matches_numpy(lib, i, extreme):
    c, h, w, n = LRNS[i]
    q = quantize._quantize_lrn(LRN(n, 0.5, 1.0, 0.75, (c, h, w)), 10)
    rng = np.random.default_rng(i)
    x = np.full((c, h, w), -32768, np.int16) if extreme else _x(rng, c, h, w)
    buf = Buffers(rng)
    getattr(lib, f"lrn{i}")(buf(x), buf(np.ascontiguousarray(q.lut, np.uint16)), buf(np.zeros(c * h * w, np.int16)))
    np.testing.assert_array_equal(buf.body(2, c * h * w), quantize._lrn_int(x, q).reshape(-1))


def test_kernel_shapes_are_checked():
    with pytest.raises(KernelError, match="stride: expected an int >= 1, found 0"):
        kernels.max_pool(1, 4, 4, 2, 0, 2, 2, False)
    with pytest.raises(KernelError, match=r"im2col: 3x3 windows of 3x3 at stride 1 need an input of at least 5x5"):
        kernels.im2col(1, 4, 4, 3, 3, 1, 3, 3, 12)
