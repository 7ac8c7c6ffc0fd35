"""Cortex-M int16 kernels in TIR, specialised to each layer's shapes and requantisation shift.

Fixed point throughout: int16 activations and weights, int32 accumulators and biases; a layer's result
is ``clamp((acc + 2^(s-1)) >> s, lo, 32767)`` with ``lo = 0`` when a ReLU is fused. Three ways to
multiply a weight matrix [O, K] by P input vectors (P = 1 for a Linear layer, the output pixels of a
conv after im2col; inputs are pixel-major rows of Kp = K rounded up to whole groups of w int16):

- ``dense``: every weight, one SIMD multiply-accumulate per group of w weights;
- ``group``: Scalpel's SIMD-aware format: one index per kept group of w weights, one SIMD MAC per
  group. Index arrays are runtime buffers.
- ``csr``: traditional pruning's format, an index per weight; no SIMD (the group is broken), one MLA.

The SIMD MAC is the board's (``Simd``): on a Cortex-M4 (DSP extension) w = 2, int16 pairs travel as
int32 words and one ``SMLAD`` does two MACs; on a Cortex-M55 (Helium/MVE) w = 8, one ``VLDRH`` per
operand and one ``VMLADAVA`` do eight (``scalpel_dot8`` in the generated C's prelude).

Outputs are written [O, P] (channel-major, i.e. CHW for a conv).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from ..errors import KernelError

I16_MIN, I16_MAX = -32768, 32767
PIXEL_BLOCK = 4  # conv: pixels per pass over a weight row (4 was best for dense and sparse; 2 and 8 lose)


@dataclass(frozen=True)
class KernelConfig:
    """Code-shape knobs. gcc's unrolling and register allocation swing instruction counts by up to 25 %
    (LeNet-300-100 dense: 387k-486k over these settings), so benchmarks build every variant under a
    small grid and keep each variant's best; see benchmarks/micro.py.

    ``unroll``: explicit unrolling of the reduction loop (1: leave it to gcc's -funroll-loops);
    ``saturate``: 'acle' (one USAT/SSAT) or 'minmax' (compare-and-select)."""

    unroll: int = 1
    saturate: str = "acle"

    def __post_init__(self) -> None:
        if self.unroll < 1 or self.saturate not in ("acle", "minmax"):
            raise KernelError(f"KernelConfig: expected unroll >= 1 and saturate 'acle' or 'minmax', found {self}")


GRID = tuple(KernelConfig(u, s) for u in (1, 4, 8) for s in ("acle", "minmax"))


def _check(**dims: int) -> None:
    for name, value in dims.items():
        low = 1 if name == "stride" else 0
        if not isinstance(value, int) or value < low:
            raise KernelError(f"{name}: expected an int >= {low}, found {value!r}")


def _requant(acc: tirx.PrimExpr, shift: int, relu: bool, cfg: KernelConfig) -> tirx.PrimExpr:
    """int32 accumulator → int16 with round-half-up shift and saturation (ReLU as the lower bound)."""
    if shift < 0:
        raise KernelError(f"requantisation shift: expected >= 0, found {shift}")
    v = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc
    if cfg.saturate == "acle":  # one USAT/SSAT (the shift folds into it) instead of compare-and-select
        sat = T.call_extern("int32", "__usat", v, 15) if relu else T.call_extern("int32", "__ssat", v, 16)
        return T.Cast("int16", sat)
    return T.Cast("int16", T.max(T.min(v, I16_MAX), 0 if relu else I16_MIN))


def _smlad(a: tirx.PrimExpr, b: tirx.PrimExpr, acc: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.call_extern("int32", "__smlad", a, b, acc)


@dataclass(frozen=True)
class Simd:
    """A board's SIMD multiply-accumulate over one group of ``width`` int16 weights. Kernel buffers
    hold ``dtype`` elements, ``per_group`` of them per group; ``mac(acc, A, i, B, j)`` adds the dot
    product of group i of buffer A and group j of buffer B (indices in groups) to ``acc``."""

    name: str
    width: int
    dtype: str
    per_group: int

    def mac(self, acc, a, i, b, j):
        if self.name == "dsp":  # one word of two int16: SMLAD
            return _smlad(a[i], b[j], acc)
        return T.call_extern("int32", "scalpel_dot8", acc, T.address_of(a[i * self.per_group]),
                             T.address_of(b[j * self.per_group]))


DSP = Simd("dsp", 2, "int32", 1)  # Cortex-M4 DSP extension
MVE = Simd("mve", 8, "int16", 8)  # Cortex-M55 Helium


def _mul(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.Cast("int32", a) * T.Cast("int32", b)


def _sparse_unroll(pixels: int, cfg: KernelConfig) -> int:
    """Sparse loops unroll one pixel at a time only: a block of pixels already amortises the loop, and
    unrolling it too spills the block's accumulators and row pointers (13 usable registers)."""
    return cfg.unroll if pixels == 1 else 1


def _pixel_blocks(P: int) -> tuple[int, int]:
    """(pixels per block, blocks): a conv runs PIXEL_BLOCK pixels per pass over a weight row, so every
    weight (and index) loaded serves several MACs; the last P % PIXEL_BLOCK pixels run one at a time."""
    pb = PIXEL_BLOCK if P >= PIXEL_BLOCK else 1
    return pb, P // pb


def dense(O: int, K2: int, P: int, shift: int, relu: bool, cfg: KernelConfig = KernelConfig(),
          simd: Simd = DSP) -> tirx.PrimFunc:
    """y[o, p] = requant(b[o] + Σ_k W[o, k]·x[p, k]) over K2 groups of ``simd.width`` int16 per row."""
    _check(O=O, K2=K2, P=P)
    e = simd.per_group
    unroll = cfg.unroll
    main, tail = K2 // unroll * unroll, K2 % unroll
    pb, blocks = _pixel_blocks(P)

    @T.macro
    def row(W, x, b, y, acc, o, p0, n: int):
        for u in T.unroll(n):
            acc[u] = b[o]
        for k0 in range(main // unroll):
            for k1 in T.unroll(unroll):
                for u in T.unroll(n):
                    acc[u] = simd.mac(acc[u], W, o * K2 + k0 * unroll + k1, x, (p0 + u) * K2 + k0 * unroll + k1)
        for k in T.unroll(tail):
            for u in T.unroll(n):
                acc[u] = simd.mac(acc[u], W, o * K2 + main + k, x, (p0 + u) * K2 + main + k)
        for u in T.unroll(n):
            y[o * P + p0 + u] = _requant(acc[u], shift, relu, cfg)

    @T.prim_func
    def f(Wp: T.handle(simd.dtype), xp: T.handle(simd.dtype), bp: T.handle("int32"), yp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        W = T.decl_buffer((O * K2 * e,), simd.dtype, data=Wp)
        x = T.decl_buffer((P * K2 * e,), simd.dtype, data=xp)
        b = T.decl_buffer((O,), "int32", data=bp)
        y = T.decl_buffer((O * P,), "int16", data=yp)
        acc = T.decl_buffer((pb,), "int32", scope="global")
        for p in range(blocks):
            for o in range(O):
                row(W, x, b, y, acc, o, p * pb, pb)
        for p in range(P - blocks * pb):
            for o in range(O):
                row(W, x, b, y, acc, o, blocks * pb + p, 1)

    return f


def _sparse(O: int, K: int, N: int, P: int, shift: int, relu: bool, cfg: KernelConfig, dtype: str, e: int,
            mac) -> tirx.PrimFunc:
    """A row-compressed kernel over units of ``e`` ``dtype`` elements (a weight group, or one weight):
    ``vals`` [N] units, ``cols`` [N] uint16 unit positions in a row of K units, ``rows`` [O + 1] row
    pointers; ``mac(acc, vals, i, x, j)`` multiply-accumulates unit i of ``vals`` with unit j of ``x``."""
    pb, blocks = _pixel_blocks(P)

    @T.macro
    def row(vals, cols, rows, x, b, y, acc, gi, o, p0, n: int):
        for u in T.unroll(n):
            acc[u] = b[o]
        gi[0] = rows[o]
        xb: T.let[T.handle(dtype)] = T.address_of(x[p0 * K * e])  # the block's first pixel, once per row
        xblk = T.decl_buffer((n * K * e,), dtype, data=xb)
        while gi[0] + _sparse_unroll(n, cfg) <= rows[o + 1]:
            for j in T.unroll(_sparse_unroll(n, cfg)):
                # One pointer to the unit's column in the block's first pixel: the other pixels are
                # constant offsets from it (an immediate in each load), not an add per pixel.
                q: T.let[T.handle(dtype)] = T.address_of(xblk[T.Cast("int32", cols[gi[0] + j]) * e])
                xq = T.decl_buffer((((n - 1) * K + 1) * e,), dtype, data=q)
                for u in T.unroll(n):
                    acc[u] = mac(acc[u], vals, gi[0] + j, xq, u * K)
            gi[0] = gi[0] + _sparse_unroll(n, cfg)
        while gi[0] < rows[o + 1]:
            q1: T.let[T.handle(dtype)] = T.address_of(xblk[T.Cast("int32", cols[gi[0]]) * e])
            xq1 = T.decl_buffer((((n - 1) * K + 1) * e,), dtype, data=q1)
            for u in T.unroll(n):
                acc[u] = mac(acc[u], vals, gi[0], xq1, u * K)
            gi[0] = gi[0] + 1
        for u in T.unroll(n):
            y[o * P + p0 + u] = _requant(acc[u], shift, relu, cfg)

    @T.prim_func
    def f(vp: T.handle(dtype), cp: T.handle("uint16"), rp: T.handle("int32"), xp: T.handle(dtype),
          bp: T.handle("int32"), yp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        vals = T.decl_buffer((max(N, 1) * e,), dtype, data=vp)
        cols = T.decl_buffer((max(N, 1),), "uint16", data=cp)
        rows = T.decl_buffer((O + 1,), "int32", data=rp)
        x = T.decl_buffer((P * K * e,), dtype, data=xp)
        b = T.decl_buffer((O,), "int32", data=bp)
        y = T.decl_buffer((O * P,), "int16", data=yp)
        acc = T.decl_buffer((pb,), "int32", scope="global")
        gi = T.decl_buffer((1,), "int32", scope="global")
        for p in range(blocks):
            for o in range(O):
                row(vals, cols, rows, x, b, y, acc, gi, o, p * pb, pb)
        for p in range(P - blocks * pb):
            for o in range(O):
                row(vals, cols, rows, x, b, y, acc, gi, o, blocks * pb + p, 1)

    return f


def group(O: int, K2: int, G: int, P: int, shift: int, relu: bool, cfg: KernelConfig = KernelConfig(),
          simd: Simd = DSP) -> tirx.PrimFunc:
    """Group-sparse at w = ``simd.width``: ``vals`` [G] groups, ``cols`` [G] the group index of each in
    its row of K2 groups, ``rows`` [O + 1] row pointers. One SIMD MAC and one index per group."""
    _check(O=O, K2=K2, G=G, P=P)
    return _sparse(O, K2, G, P, shift, relu, cfg, simd.dtype, simd.per_group, simd.mac)


def csr(O: int, Kp: int, NNZ: int, P: int, shift: int, relu: bool, cfg: KernelConfig = KernelConfig()) -> tirx.PrimFunc:
    """CSR: ``vals`` [NNZ] int16, ``cols`` [NNZ] element index, ``rows`` [O + 1]; one MLA per weight."""
    _check(O=O, Kp=Kp, NNZ=NNZ, P=P)
    return _sparse(O, Kp, NNZ, P, shift, relu, cfg, "int16", 1, lambda acc, a, i, b, j: acc + _mul(a[i], b[j]))


@T.macro
def _copy(out, o, x, i, n: int):
    """n int16 from x[i] to out[o]: pairs as one 32-bit load and store (``scalpel_copy2``; the M4
    allows unaligned words), then the odd one."""
    for j in range(n // 2):
        T.evaluate(T.call_extern("void", "scalpel_copy2", T.address_of(out[o + 2 * j]), T.address_of(x[i + 2 * j])))
    for j in range(n % 2):
        out[o + n - 1 + j] = x[i + n - 1 + j]


def pad(C: int, H: int, W: int, p: int) -> tirx.PrimFunc:
    """x [C, H, W] → y [C, H + 2p, W + 2p] with a zero border, so that im2col reads every window
    without a bounds test (tested per element, the border cost ~6.5 instructions an element: 27 % of
    ConvNet's Scalpel build on the M4). The border is rewritten every call: y may share an arena."""
    _check(C=C, H=H, W=W, p=p)
    Hp, Wp = H + 2 * p, W + 2 * p

    @T.prim_func
    def f(xp: T.handle("int16"), yp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        x = T.decl_buffer((C * H * W,), "int16", data=xp)
        y = T.decl_buffer((C * Hp * Wp,), "int16", data=yp)
        for c in range(C):
            for i in range(p * Wp):
                y[c * Hp * Wp + i] = T.int16(0)
                y[(c * Hp + p + H) * Wp + i] = T.int16(0)
            for h in range(H):
                for j in range(p):
                    y[(c * Hp + p + h) * Wp + j] = T.int16(0)
                    y[(c * Hp + p + h) * Wp + p + W + j] = T.int16(0)
                _copy(y, (c * Hp + p + h) * Wp + p, x, (c * H + h) * W, W)

    return f


def im2col(C: int, H: int, W: int, KH: int, KW: int, stride: int, OH: int, OW: int, Kp: int) -> tirx.PrimFunc:
    """x [C, H, W] (already padded, see ``pad``) → patches [OH·OW, Kp], each output pixel's receptive
    field contiguous (c, kh, kw order, the per-filter flattening of the weights), zero in the pad
    column. Each kernel row is a contiguous run of KW inputs, copied two int16 at a time."""
    _check(C=C, H=H, W=W, KH=KH, KW=KW, stride=stride, OH=OH, OW=OW, Kp=Kp)
    if (OH - 1) * stride + KH > H or (OW - 1) * stride + KW > W:
        raise KernelError(f"im2col: {OH}x{OW} windows of {KH}x{KW} at stride {stride} need an input of at least "
                          f"{(OH - 1) * stride + KH}x{(OW - 1) * stride + KW}, found {H}x{W}")
    K = C * KH * KW

    @T.prim_func
    def f(xp: T.handle("int16"), op: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        x = T.decl_buffer((C * H * W,), "int16", data=xp)
        out = T.decl_buffer((OH * OW * Kp,), "int16", data=op)
        for oh in range(OH):
            for ow in range(OW):
                for c in range(C):
                    for kh in range(KH):
                        _copy(out, (oh * OW + ow) * Kp + (c * KH + kh) * KW, x,
                              (c * H + oh * stride + kh) * W + ow * stride, KW)
                for k in range(Kp - K):
                    out[(oh * OW + ow) * Kp + K + k] = T.int16(0)

    return f


def _pool(C: int, H: int, W: int, K: int, stride: int, OH: int, OW: int, acc_dtype: str, init, step,
          finish) -> tirx.PrimFunc:
    """K×K windows clipped to the image (Caffe/torch ceil mode): ``t = init``, ``t = step(t, x)`` over
    the pixels inside, ``y = finish(t, count)`` with ``count`` the pixels inside. Windows wholly inside
    the image (all but the last row and column in ceil mode) run without bounds tests."""
    _check(C=C, H=H, W=W, K=K, stride=stride, OH=OH, OW=OW)
    OHi = max(0, min(OH, (H - K) // stride + 1)) if H >= K else 0  # windows rows wholly inside
    OWi = max(0, min(OW, (W - K) // stride + 1)) if W >= K else 0

    @T.macro
    def window(x, y, t, c, oh, ow, inside: bool):
        t[0] = init
        for kh in range(K):
            for kw in range(K):
                if inside or (oh * stride + kh < H and ow * stride + kw < W):
                    t[0] = step(t[0], x[(c * H + oh * stride + kh) * W + ow * stride + kw])
        y[(c * OH + oh) * OW + ow] = finish(
            t[0], (T.min(oh * stride + K, H) - oh * stride) * (T.min(ow * stride + K, W) - ow * stride))

    @T.prim_func
    def f(xp: T.handle("int16"), yp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        x = T.decl_buffer((C * H * W,), "int16", data=xp)
        y = T.decl_buffer((C * OH * OW,), "int16", data=yp)
        t = T.decl_buffer((1,), acc_dtype, scope="global")
        for c in range(C):
            for oh in range(OHi):
                for ow in range(OWi):
                    window(x, y, t, c, oh, ow, True)
                for ow in range(OWi, OW):
                    window(x, y, t, c, oh, ow, False)
            for oh in range(OHi, OH):
                for ow in range(OW):
                    window(x, y, t, c, oh, ow, False)

    return f


def max_pool(C: int, H: int, W: int, K: int, stride: int, OH: int, OW: int, relu: bool) -> tirx.PrimFunc:
    """Max over the windows; a fused ReLU is the starting value 0."""
    return _pool(C, H, W, K, stride, OH, OW, "int16", T.int16(0) if relu else T.int16(I16_MIN),
                 lambda t, v: T.max(t, v), lambda t, count: t)


def avg_pool(C: int, H: int, W: int, K: int, stride: int, OH: int, OW: int, relu: bool) -> tirx.PrimFunc:
    """Mean over the windows, divided by the pixels inside, rounded half up (floor division, so negative
    sums round like the numpy reference)."""
    return _pool(C, H, W, K, stride, OH, OW, "int32", T.int32(0), lambda t, v: t + T.Cast("int32", v),
                 lambda t, n: T.Cast("int16", T.max(T.floordiv(2 * t + n, 2 * n), 0 if relu else I16_MIN)))


def lrn(C: int, H: int, W: int, n: int, sq_shift: int, lut_shift: int, L: int) -> tirx.PrimFunc:
    """Within-channel LRN in fixed point: t = Σ_{n×n, zero padded} (x² >> sq_shift);
    y = (x · lut[min(t >> lut_shift, L - 1)] + 2^14) >> 15 with ``lut`` the Q15 factor table.

    Separable, row by row: the n vertical squares of each column go into ``cs`` (zero-bordered by
    n // 2 on each side), then each output adds n neighbours of ``cs``. Every square is taken n times,
    not n²; only the first and last n // 2 rows test bounds (a per-element test over the n×n window
    cost ~71 instructions an output on the M4, ~27 here)."""
    _check(C=C, H=H, W=W, n=n, sq_shift=sq_shift, lut_shift=lut_shift, L=L)
    p = n // 2

    def square(v: tirx.PrimExpr) -> tirx.PrimExpr:
        return (T.Cast("int32", v) * T.Cast("int32", v)) >> sq_shift

    @T.prim_func
    def f(xp: T.handle("int16"), lp: T.handle("uint16"), yp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        x = T.decl_buffer((C * H * W,), "int16", data=xp)
        lut = T.decl_buffer((L,), "uint16", data=lp)
        y = T.decl_buffer((C * H * W,), "int16", data=yp)
        cs = T.decl_buffer((W + 2 * p,), "int32", scope="global")
        t = T.decl_buffer((1,), "int32", scope="global")
        for i in range(p):
            cs[i] = 0
            cs[W + p + i] = 0
        for c in range(C):
            for h in range(H):
                if h >= p and h < H - p:
                    for w in range(W):
                        t[0] = 0
                        for dh in T.unroll(n):
                            t[0] = t[0] + square(x[(c * H + h + dh - p) * W + w])
                        cs[p + w] = t[0]
                else:
                    for w in range(W):
                        t[0] = 0
                        for dh in T.unroll(n):
                            if h + dh >= p and h + dh < H + p:
                                t[0] = t[0] + square(x[(c * H + h + dh - p) * W + w])
                        cs[p + w] = t[0]
                for w in range(W):
                    t[0] = 0
                    for dw in T.unroll(n):
                        t[0] = t[0] + cs[w + dw]
                    y[(c * H + h) * W + w] = T.Cast("int16", (T.Cast("int32", x[(c * H + h) * W + w])
                                                              * T.Cast("int32", lut[T.min(t[0] >> lut_shift, L - 1)])
                                                              + (1 << 14)) >> 15)

    return f


def relu(N: int) -> tirx.PrimFunc:
    """In-place max(x, 0) over N int16 (a ReLU that could not be fused into the layer before it)."""
    _check(N=N)

    @T.prim_func
    def f(xp: T.handle("int16")):
        T.func_attr({"tir.noalias": True})
        x = T.decl_buffer((N,), "int16", data=xp)
        for i in range(N):
            x[i] = T.max(x[i], T.int16(0))

    return f
