"""CUDA kernels in TensorIR: tile-sparse GEMM / GEMV that skip pruned weight tiles, and im2col.

The weight is stored as kept ``rows × k`` tiles (``formats.encode_tiles``; the tile is
``HardwareSpec.tile``): ``V[T, rows, k]``, one tile-column index ``I[T]`` per kept tile and a row
pointer ``P[row blocks + 1]``. One thread block owns one row block of the output; each step of its
reduction loop walks the block's index list, so a pruned tile is a step that never happens: no loads,
no multiply-adds, no per-weight index. A dense weight is the same format with every tile kept.

Activations come in two layouts: ``"nk"`` (A[n, K], Linear: n = batch rows; output Y[n, M]) and
``"kn"`` (A[K, n], conv after im2col: n = output pixels; output O[M, n]).

- ``tile_gemm`` (n > ``GEMV_MAX_N``): a (rows × 32·tn) output tile per block, 256 threads as
  (rows/4) × 32; per kept tile the block stages the weight tile and the matching K-slice of A in
  shared memory and every thread does 4 × tn register-tiled multiply-adds per k.
- ``tile_gemv`` (n ≤ ``GEMV_MAX_N``, batch-1 and small-batch Linear): threads as rows × k-lanes;
  each thread multiplies one weight of the tile by n activations, then the k-lanes are summed in
  shared memory.

``emulate=True`` builds the same per-thread code as plain loops for the CPU (``llvm``): one serial loop
over the threads per phase, shared and per-thread buffers in ordinary memory. Tests run it against
numpy, which checks the index arithmetic and the tile walk of the GPU kernel without a GPU; the GPU
version differs only in loop kinds, memory scopes and the barriers between phases.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..errors import KernelError

F32 = "float32"
LAYOUTS = ("nk", "kn")
GEMV_MAX_N = 8
_TX = 32  # threads along n in tile_gemm (one warp)
_TM = 4  # output rows per thread in tile_gemm


def _check(m: int, k: int, n: int, tile: tuple[int, int], layout: str) -> tuple[int, int]:
    for name, value in (("m", m), ("k", k), ("n", n), ("tile rows", tile[0]), ("tile k", tile[1])):
        if not isinstance(value, int) or value < 1:
            raise KernelError(f"{name}: expected a positive int, found {value!r}")
    if layout not in LAYOUTS:
        raise KernelError(f"layout: expected one of {LAYOUTS}, found {layout!r}")
    rows, kt = tile
    if rows % _TM:
        raise KernelError(f"tile rows: expected a multiple of {_TM} (rows per thread), found {rows}")
    return rows, kt


def _threads(emulate: bool, extent: int, tag: str):
    """A loop over ``extent`` GPU threads/blocks (``tag``), or a serial loop when emulating."""
    return T.serial(extent) if emulate else T.thread_binding(extent, thread=tag)


def _scope(emulate: bool, scope: str) -> str:
    return "global" if emulate else scope


def _load_a(A, layout: str, k: int, n: int, kk, c):
    """A[k, c] of the logical K × n operand, 0 outside it (ragged tiles and column blocks)."""
    inside = tirx.all(kk < k, c < n)
    if layout == "kn":
        return T.if_then_else(inside, A[T.min(kk, k - 1), T.min(c, n - 1)], T.float32(0))
    return T.if_then_else(inside, A[T.min(c, n - 1), T.min(kk, k - 1)], T.float32(0))


def _kernel(name: str, rows: int, kt: int, mb: int, a_shape: tuple, out_shape: tuple, body) -> tirx.PrimFunc:
    """The PrimFunc every tile kernel shares: (values, tile columns, row pointers, A) → out; ``body`` is
    the GPU or emulated macro."""

    @T.prim_func
    def kernel(v_h: T.handle, i_h: T.handle, p_h: T.handle, a_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        NT = T.int32()
        V = T.match_buffer(v_h, (NT, rows, kt), F32)
        I = T.match_buffer(i_h, (NT,), "int32")
        P = T.match_buffer(p_h, (mb + 1,), "int32")
        A = T.match_buffer(a_h, a_shape, F32)
        O = T.match_buffer(o_h, out_shape, F32)
        body(V, I, P, A, O)

    return kernel


def tile_gemm(m: int, k: int, n: int, tile: tuple[int, int], layout: str = "kn", *,
              emulate: bool = False) -> tirx.PrimFunc:
    """Tile-sparse W[m, k] times A (layout ``layout``) for n > GEMV_MAX_N columns."""
    rows, kt = _check(m, k, n, tile, layout)
    ty_n = rows // _TM
    tn = 4 if n >= 128 else 2 if n >= 64 else 1
    bn = _TX * tn
    nthreads = ty_n * _TX
    mb, nb = -(-m // rows), -(-n // bn)
    w_steps, a_steps = -(-rows * kt // nthreads), -(-kt * bn // nthreads)
    out_shape = (n, m) if layout == "nk" else (m, n)
    a_shape = (n, k) if layout == "nk" else (k, n)

    @T.macro
    def load(V, I, A, Ws, As, j, bx, ty, tx):
        for q in range(w_steps):
            if q * nthreads + ty * _TX + tx < rows * kt:
                Ws[(q * nthreads + ty * _TX + tx) // kt, (q * nthreads + ty * _TX + tx) % kt] = V[
                    j, (q * nthreads + ty * _TX + tx) // kt, (q * nthreads + ty * _TX + tx) % kt]
        for q in range(a_steps):
            if q * nthreads + ty * _TX + tx < kt * bn:
                if layout == "kn":  # coalesced along n
                    As[(q * nthreads + ty * _TX + tx) // bn, (q * nthreads + ty * _TX + tx) % bn] = _load_a(
                        A, layout, k, n, I[j] * kt + (q * nthreads + ty * _TX + tx) // bn,
                        bx * bn + (q * nthreads + ty * _TX + tx) % bn)
                else:  # coalesced along k
                    As[(q * nthreads + ty * _TX + tx) % kt, (q * nthreads + ty * _TX + tx) // kt] = _load_a(
                        A, layout, k, n, I[j] * kt + (q * nthreads + ty * _TX + tx) % kt,
                        bx * bn + (q * nthreads + ty * _TX + tx) // kt)

    @T.macro
    def compute(Ws, As, acc, ty, tx):
        for kk in T.unroll(kt):
            for i in T.unroll(_TM):
                for jj in T.unroll(tn):
                    acc[i, jj] = acc[i, jj] + Ws[ty * _TM + i, kk] * As[kk, tx + _TX * jj]

    @T.macro
    def store(O, acc, by, bx, ty, tx):
        for i in T.unroll(_TM):
            for jj in T.unroll(tn):
                if by * rows + ty * _TM + i < m and bx * bn + tx + _TX * jj < n:
                    if layout == "kn":
                        O[by * rows + ty * _TM + i, bx * bn + tx + _TX * jj] = acc[i, jj]
                    else:
                        O[bx * bn + tx + _TX * jj, by * rows + ty * _TM + i] = acc[i, jj]

    @T.macro
    def zero(acc):
        for i, jj in T.grid(_TM, tn):
            acc[i, jj] = T.float32(0)

    @T.macro
    def gpu(V, I, P, A, O):
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for by in T.thread_binding(mb, thread="blockIdx.y"):
                for ty in T.thread_binding(ty_n, thread="threadIdx.y"):
                    for tx in T.thread_binding(_TX, thread="threadIdx.x"):
                        Ws = T.decl_buffer((rows, kt), F32, scope="shared")
                        As = T.decl_buffer((kt, bn), F32, scope="shared")
                        acc = T.decl_buffer((_TM, tn), F32, scope="local")
                        zero(acc)
                        for j in range(P[by], P[by + 1]):
                            load(V, I, A, Ws, As, j, bx, ty, tx)
                            T.tvm_storage_sync("shared")
                            compute(Ws, As, acc, ty, tx)
                            T.tvm_storage_sync("shared")
                        store(O, acc, by, bx, ty, tx)

    @T.macro
    def emulated(V, I, P, A, O):
        for bx in range(nb):
            for by in range(mb):
                Ws = T.decl_buffer((rows, kt), F32)
                As = T.decl_buffer((kt, bn), F32)
                accs = T.decl_buffer((ty_n, _TX, _TM, tn), F32)
                for ty, tx in T.grid(ty_n, _TX):
                    acc = T.decl_buffer((_TM, tn), F32, data=accs.data, elem_offset=(ty * _TX + tx) * _TM * tn)
                    zero(acc)
                for j in range(P[by], P[by + 1]):
                    for ty, tx in T.grid(ty_n, _TX):
                        load(V, I, A, Ws, As, j, bx, ty, tx)
                    for ty, tx in T.grid(ty_n, _TX):
                        acc = T.decl_buffer((_TM, tn), F32, data=accs.data, elem_offset=(ty * _TX + tx) * _TM * tn)
                        compute(Ws, As, acc, ty, tx)
                for ty, tx in T.grid(ty_n, _TX):
                    acc = T.decl_buffer((_TM, tn), F32, data=accs.data, elem_offset=(ty * _TX + tx) * _TM * tn)
                    store(O, acc, by, bx, ty, tx)

    return _kernel("tile_gemm", rows, kt, mb, a_shape, out_shape, emulated if emulate else gpu)


def tile_gemv(m: int, k: int, n: int, tile: tuple[int, int], layout: str = "nk", *,
              emulate: bool = False) -> tirx.PrimFunc:
    """Tile-sparse W[m, k] times A for n ≤ GEMV_MAX_N columns: threads = tile rows × tile k-lanes."""
    rows, kt = _check(m, k, n, tile, layout)
    if n > GEMV_MAX_N:
        raise KernelError(f"tile_gemv: expected n ≤ {GEMV_MAX_N} columns, found {n}; use tile_gemm")
    mb = -(-m // rows)
    out_shape = (n, m) if layout == "nk" else (m, n)
    a_shape = (n, k) if layout == "nk" else (k, n)

    @T.macro
    def accumulate(V, I, P, A, acc, by, ty, tx):
        for c in range(n):
            acc[c] = T.float32(0)
        for j in range(P[by], P[by + 1]):
            for c in T.unroll(n):
                acc[c] = acc[c] + V[j, ty, tx] * _load_a(A, layout, k, n, I[j] * kt + tx, c)

    @T.macro
    def publish(Red, acc, ty, tx):
        for c in range(n):
            Red[ty, c, tx] = acc[c]

    @T.macro
    def reduce(Red, O, by, ty, tx):
        if tx == 0 and by * rows + ty < m:
            for c in range(n):
                s = T.decl_buffer((1,), F32, scope=_scope(emulate, "local"))
                s[0] = T.float32(0)
                for q in T.unroll(kt):
                    s[0] = s[0] + Red[ty, c, q]
                if layout == "kn":
                    O[by * rows + ty, c] = s[0]
                else:
                    O[c, by * rows + ty] = s[0]

    @T.macro
    def gpu(V, I, P, A, O):
        for by in T.thread_binding(mb, thread="blockIdx.x"):
            for ty in T.thread_binding(rows, thread="threadIdx.y"):
                for tx in T.thread_binding(kt, thread="threadIdx.x"):
                    Red = T.decl_buffer((rows, n, kt), F32, scope="shared")
                    acc = T.decl_buffer((n,), F32, scope="local")
                    accumulate(V, I, P, A, acc, by, ty, tx)
                    publish(Red, acc, ty, tx)
                    T.tvm_storage_sync("shared")
                    reduce(Red, O, by, ty, tx)

    @T.macro
    def emulated(V, I, P, A, O):
        for by in range(mb):
            Red = T.decl_buffer((rows, n, kt), F32)
            for ty, tx in T.grid(rows, kt):
                acc = T.decl_buffer((n,), F32)
                accumulate(V, I, P, A, acc, by, ty, tx)
                publish(Red, acc, ty, tx)
            for ty, tx in T.grid(rows, kt):
                reduce(Red, O, by, ty, tx)

    return _kernel("tile_gemv", rows, kt, mb, a_shape, out_shape, emulated if emulate else gpu)


def tile_matmul(m: int, k: int, n: int, tile: tuple[int, int], layout: str, *,
                emulate: bool = False) -> tuple[tirx.PrimFunc, str]:
    """The kernel for this shape (gemv for n ≤ GEMV_MAX_N, else gemm) and a unique name for it."""
    kind = "tile_gemv" if n <= GEMV_MAX_N else "tile_gemm"
    make = tile_gemv if n <= GEMV_MAX_N else tile_gemm
    name = f"{kind}_{layout}_{m}x{k}_n{n}_t{tile[0]}x{tile[1]}"
    return make(m, k, n, tile, layout, emulate=emulate), name


_IM2COL_THREADS = 256


def im2col(b: int, c: int, h: int, w: int, kh: int, kw: int, stride: tuple[int, int] = (1, 1),
           pad: tuple[int, int] = (0, 0), *, emulate: bool = False) -> tirx.PrimFunc:
    """Cols[c·kh·kw, b·oh·ow] from X[b, c, h, w] (NCHW, zero padding): one thread per element of Cols,
    consecutive threads on consecutive output pixels (coalesced writes)."""
    from .cpu import conv_out_size

    sh, sw = stride
    ph, pw = pad
    oh, ow = conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw)
    rows, npix = c * kh * kw, b * oh * ow
    total = rows * npix
    nblk = -(-total // _IM2COL_THREADS)

    @T.macro
    def element(X, Cols, e):
        if e < total:
            Cols[e // npix, e % npix] = T.if_then_else(
                0 <= (e % npix) % (oh * ow) // ow * sh - ph + (e // npix) % (kh * kw) // kw
                and (e % npix) % (oh * ow) // ow * sh - ph + (e // npix) % (kh * kw) // kw < h
                and 0 <= (e % npix) % ow * sw - pw + (e // npix) % kw
                and (e % npix) % ow * sw - pw + (e // npix) % kw < w,
                X[(e % npix) // (oh * ow), (e // npix) // (kh * kw),
                  T.max(T.min((e % npix) % (oh * ow) // ow * sh - ph + (e // npix) % (kh * kw) // kw, h - 1), 0),
                  T.max(T.min((e % npix) % ow * sw - pw + (e // npix) % kw, w - 1), 0)],
                T.float32(0),
            )

    @T.prim_func
    def kernel(X: T.Buffer((b, c, h, w), F32), Cols: T.Buffer((rows, npix), F32)):
        T.func_attr({"global_symbol": "im2col", "tir.noalias": True})
        for bx in _threads(emulate, nblk, "blockIdx.x"):
            for tx in _threads(emulate, _IM2COL_THREADS, "threadIdx.x"):
                element(X, Cols, bx * _IM2COL_THREADS + tx)

    return kernel
