"""CPU (llvm) kernels in TensorIR: dense and group-sparse matrix-vector / matrix-matrix, CSR, im2col.

Every kernel is a PrimFunc specialised to static shapes and to the target's SIMD lanes (from
``hardware_spec``); sparse index arrays are runtime buffers, so one kernel serves every sparsity
pattern of its shape. Two layouts:

- ``*_nt``:  Y[n, m] = X[n, k] · W[m, k]ᵀ  (Linear; n = batch, n = 1 is matrix-vector). Vectorised
  along k (the group axis), one accumulator vector per (batch row, weight row).
- ``*_gemm``: O[m, n] = W[m, k] · D[k, n]  (conv after im2col; n = output pixels). Vectorised along n,
  a register tile of accumulators per row.

Accumulators live in ``compat.stack_scratch`` memory so LLVM keeps them in registers (see there).
Tails are exact: a ragged last group (k % w) meets a zero-padded copy of X's last columns, and dense_nt's
ragged k tail is one vector FMA over the last full vector of columns against a copy of X's with the
overlap zeroed (scalar paths where a copy would not fit the stack); a ragged last column vector is
clamped to end at n and recomputed inside the same parallel task (identical values, no race).

Every layer kernel takes an ``Epilogue`` (the layer's bias and ReLU, applied before each store). With
a bias the kernel has one more input, B[m], last before the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from ..compat import stack_scratch
from ..errors import KernelError
from ..target import HardwareSpec

F32 = "float32"
_BYTES = 4


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise KernelError(f"{name}: expected a positive int, found {value!r}")


@dataclass(frozen=True)
class Epilogue:
    """What a layer kernel applies to each output before storing it: ``+ B[row]`` (``bias``; B[m] is
    then the kernel's last input), then ``max(·, 0)`` (``relu``). Fused, they cost no pass over the
    output and, at batch 1, no VM call and allocation of their own."""

    bias: bool = False
    relu: bool = False

    @property
    def suffix(self) -> str:
        """Kernel-name suffix: kernels with different epilogues must not share a name."""
        return "_bias" * self.bias + "_relu" * self.relu

    def __call__(self, value: tirx.PrimExpr, B: tirx.Buffer | None, row: tirx.PrimExpr) -> tirx.PrimExpr:
        if B is not None:
            value = value + B[row]
        return T.max(value, T.float32(0)) if self.relu else value


NO_EPILOGUE = Epilogue()


# Below this many multiply-adds (dense-equivalent) a kernel runs on one thread: waking the pool costs
# more than it saves (LeNet-300-100's 100x300 layer took 10 us in parallel, ~8 us of it launch).
PARALLEL_MIN_MACS = 1 << 18


def _loop(work: int):
    """T.parallel for kernels big enough to pay for a parallel launch, T.serial otherwise."""
    return T.parallel if work >= PARALLEL_MIN_MACS else T.serial


def _hsum(buf: tirx.Buffer, prefix: tuple, lanes: int) -> tirx.PrimExpr:
    """Pairwise sum of buf[*prefix, 0:lanes] as one expression (a horizontal reduction)."""
    terms = [buf[(*prefix, i)] for i in range(lanes)]
    while len(terms) > 1:
        pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def _folds(lanes: int):
    """A macro ``fold(acc, i)`` leaving the sum of acc[i, 0:lanes] in acc[i, 0] (lanes a power of two),
    by halves: each level is one vector add of the upper half onto the lower. Why: LLVM turns
    ``_hsum``'s pairwise expression into ~20 shuffles and adds for 16 lanes, the halves into 8
    instructions (extract, add, ...), a sixth of a sparse matrix-vector kernel's time (142x784 at 92 %
    zero groups: 1.51 -> 1.22 us, kernel alone)."""
    half = lanes // 2
    if half == 1:
        @T.macro
        def last(acc, i):
            acc[i, 0] = acc[i, 0] + acc[i, 1]

        return last
    inner = _folds(half)

    @T.macro
    def fold(acc, i):
        for l in T.vectorized(half):
            acc[i, l] = acc[i, l] + acc[i, l + half]
        inner(acc, i)

    return fold


def _row_sum(lanes: int):
    """``(fold, folded)``: a macro to run on acc[i, :] before reading the row's sum, and whether the
    sum is then acc[i, 0] (lanes a power of two ≥ 2) or still ``_hsum``'s expression (fold is None)."""
    if lanes >= 2 and lanes & (lanes - 1) == 0:
        return _folds(lanes), True
    return None, False


def _chunks(rows: int, spec: HardwareSpec) -> tuple[int, int]:
    """(number of parallel row chunks, rows per chunk): a few chunks per core balance random rows."""
    chunks = max(1, min(rows, 4 * spec.num_cores))
    per = -(-rows // chunks)
    return -(-rows // per), per


def _parallel_rows(row, m: int, n: int, k: int, spec: HardwareSpec):
    """A macro that calls ``row(X, V, I, P, B, Y, XT, r, n0, nb)`` for every weight row r and batch tile
    [n0, n0 + nb) (nb ≤ 4), parallel over chunks of rows: the driver of the ``*_nt`` sparse kernels.
    XT is ``_sparse_nt_func``'s zero-padded copy of X's ragged last group (None without one)."""
    nb_ = min(n, 4)
    nt, n_rem = divmod(n, nb_)
    chunks, per = _chunks(m, spec)
    loop = _loop(m * n * k)

    @T.macro
    def rows(X, V, I, P, B, Y, XT):
        for c in loop(chunks):
            for q in range(per):
                if c * per + q < m:
                    for s in range(nt):
                        row(X, V, I, P, B, Y, XT, c * per + q, s * nb_, nb_)
                    for s in range(n_rem):
                        row(X, V, I, P, B, Y, XT, c * per + q, nt * nb_ + s, 1)

    return rows


# A ragged last group's X columns are copied, zero-padded to w, to the stack once per call when they fit.
TAIL_COPY_MAX_BYTES = 32 << 10


def _tail_copy(n: int, k: int, width: int, tail: int, at: int):
    """A macro filling XT[n, width] with X's last ``tail`` columns at lanes [at, at + tail), zeros
    elsewhere: the operand of a ragged tail's one vector FMA."""
    @T.macro
    def fill(X, XT):
        for a in range(n):
            for l in range(width):
                XT[a, l] = T.float32(0)
            for l in range(tail):
                XT[a, at + l] = X[a, k - tail + l]

    return fill


def _sparse_nt_func(rows, name: str, m: int, k: int, n: int, vw: int, epilogue: Epilogue,
                    tail: int = 0) -> tirx.PrimFunc:
    """The PrimFunc around a ``_parallel_rows`` driver: X[n, k], values V[nnz, vw], indices I[nnz],
    row pointers P[m + 1], B[m] (with a bias epilogue), Y[n, m]. ``tail`` > 0: X's last ``tail``
    columns are copied to XT[n, vw] with zeros after them, so the ragged group is one vector FMA."""
    if tail:
        fill = _tail_copy(n, k, vw, tail, at=0)

        @T.macro
        def run(X, V, I, P, B, Y):
            xt: T.let[T.handle] = stack_scratch(n * vw * _BYTES)
            XT = T.decl_buffer((n, vw), F32, data=xt)
            fill(X, XT)
            rows(X, V, I, P, B, Y, XT)
    else:
        @T.macro
        def run(X, V, I, P, B, Y):
            rows(X, V, I, P, B, Y, None)

    if epilogue.bias:
        @T.prim_func
        def kernel_b(x_h: T.handle, v_h: T.handle, i_h: T.handle, p_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            G = T.int32()
            X = T.match_buffer(x_h, (n, k), F32)
            V = T.match_buffer(v_h, (G, vw), F32)
            I = T.match_buffer(i_h, (G,), "int32")
            P = T.match_buffer(p_h, (m + 1,), "int32")
            B = T.match_buffer(b_h, (m,), F32)
            Y = T.match_buffer(y_h, (n, m), F32)
            run(X, V, I, P, B, Y)

        return kernel_b

    @T.prim_func
    def kernel(x_h: T.handle, v_h: T.handle, i_h: T.handle, p_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        G = T.int32()
        X = T.match_buffer(x_h, (n, k), F32)
        V = T.match_buffer(v_h, (G, vw), F32)
        I = T.match_buffer(i_h, (G,), "int32")
        P = T.match_buffer(p_h, (m + 1,), "int32")
        Y = T.match_buffer(y_h, (n, m), F32)
        run(X, V, I, P, None, Y)

    return kernel


@dataclass(frozen=True)
class _Columns:
    """Tiling of a GEMM's n axis into vectors of ``width`` and parallel blocks of ``nv`` vectors.

    Blocks are anchored at the right end: block ``b`` holds vectors ``nvec - (nblk - b)·nv + v``. The
    last vector is clamped to end at n, so a ragged tail overlaps the vector before it; both sit in
    the last block (one task, identical values rewritten). Block 0 clamps its surplus vectors to
    vector 0, again inside one task. Any nv works, and no two tasks write the same element.
    """

    n: int
    width: int
    nv: int

    @property
    def nvec(self) -> int:
        return -(-self.n // self.width)

    @property
    def nblk(self) -> int:
        return -(-self.nvec // self.nv)

    def offset(self, blk, v):
        vec = T.max(self.nvec - (self.nblk - blk) * self.nv + v, 0)
        return T.min(vec * self.width, self.n - self.width)


def _columns(n: int, lanes: int, nv: int) -> _Columns:
    width = min(lanes, n)
    return _Columns(n=n, width=width, nv=min(nv, -(-n // width)))


def _pack_block(k: int, cols: _Columns):
    """A macro ``pack(D, S, blk)`` copying D's column block ``blk`` into S[k, nv, width] (contiguous):
    every later vector load from S is aligned, and its rows share no cache sets whatever n's stride."""
    @T.macro
    def pack(D, S, blk):
        for kk in range(k):
            for v in T.unroll(cols.nv):
                for l in T.vectorized(cols.width):
                    S[kk, v, l] = D[kk, cols.offset(blk, v) + l]

    return pack


# ----------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------


def _dense_func(body, name: str, shapes: tuple, m: int, epilogue: Epilogue) -> tirx.PrimFunc:
    """The PrimFunc around a dense ``body(A, C, B, Out)``: inputs A, C and Out of ``shapes``, and B[m]
    between the inputs and the output with a bias epilogue."""
    a_shape, c_shape, out_shape = shapes
    if epilogue.bias:
        @T.prim_func
        def kernel_b(A: T.Buffer(a_shape, F32), C: T.Buffer(c_shape, F32), B: T.Buffer((m,), F32),
                     Out: T.Buffer(out_shape, F32)):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(A, C, B, Out)

        return kernel_b

    @T.prim_func
    def kernel(A: T.Buffer(a_shape, F32), C: T.Buffer(c_shape, F32), Out: T.Buffer(out_shape, F32)):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        body(A, C, None, Out)

    return kernel


def dense_nt(m: int, k: int, n: int, spec: HardwareSpec, epilogue: Epilogue = NO_EPILOGUE) -> tirx.PrimFunc:
    """Y[n, m] = X[n, k] · W[m, k]ᵀ (+ B[m], ReLU: ``epilogue``), dense; n = 1 is the matrix-vector product."""
    _check_dims(m=m, k=k, n=n)
    lanes = spec.lanes(F32)
    kv, kr = divmod(k, lanes)
    nb_ = min(n, 4)
    mb_ = 4 if m >= 4 else 1
    nt, n_rem = divmod(n, nb_)
    mt, m_rem = divmod(m, mb_)
    loop = _loop(m * n * k)
    # A ragged tail (k % lanes) is one vector FMA over W's last `lanes` columns (in bounds: k ≥ lanes)
    # against a copy of X's last `lanes` columns whose first lanes - kr (already counted) are zeroed.
    overlap = kr > 0 and kv > 0 and n * lanes * _BYTES <= TAIL_COPY_MAX_BYTES
    fold, folded = _row_sum(lanes)

    @T.macro
    def tile(X, W, B, Y, XT, n0, m0, nb, mb):
        p: T.let[T.handle] = stack_scratch(nb * mb * lanes * _BYTES)
        acc = T.decl_buffer((nb, mb, lanes), F32, data=p)
        rows = T.decl_buffer((nb * mb, lanes), F32, data=p)  # acc, one row per (a, b), for fold
        for a, b in T.grid(nb, mb):
            for l in T.vectorized(lanes):
                acc[a, b, l] = T.float32(0)
        for kk in range(kv):
            for a in T.unroll(nb):
                for b in T.unroll(mb):
                    for l in T.vectorized(lanes):
                        acc[a, b, l] = acc[a, b, l] + X[n0 + a, kk * lanes + l] * W[m0 + b, kk * lanes + l]
        if overlap:
            for a in T.unroll(nb):
                for b in T.unroll(mb):
                    for l in T.vectorized(lanes):
                        acc[a, b, l] = acc[a, b, l] + XT[n0 + a, l] * W[m0 + b, k - lanes + l]
        for a, b in T.grid(nb, mb):
            if not overlap:
                for r in range(kr):
                    acc[a, b, 0] = acc[a, b, 0] + X[n0 + a, kv * lanes + r] * W[m0 + b, kv * lanes + r]
            if folded:
                fold(rows, a * mb + b)
                Y[n0 + a, m0 + b] = epilogue(rows[a * mb + b, 0], B, m0 + b)
            else:
                Y[n0 + a, m0 + b] = epilogue(_hsum(acc, (a, b), lanes), B, m0 + b)

    @T.macro
    def tiles(X, W, B, Y, XT):
        for t in loop(mt):
            for s in range(nt):
                tile(X, W, B, Y, XT, s * nb_, t * mb_, nb_, mb_)
            for s in range(n_rem):
                tile(X, W, B, Y, XT, nt * nb_ + s, t * mb_, 1, mb_)
        for r in range(m_rem):
            for s in range(n):
                tile(X, W, B, Y, XT, s, mt * mb_ + r, 1, 1)

    if overlap:
        fill = _tail_copy(n, k, lanes, kr, at=lanes - kr)

        @T.macro
        def body(X, W, B, Y):
            xt: T.let[T.handle] = stack_scratch(n * lanes * _BYTES)
            XT = T.decl_buffer((n, lanes), F32, data=xt)
            fill(X, XT)
            tiles(X, W, B, Y, XT)
    else:
        @T.macro
        def body(X, W, B, Y):
            tiles(X, W, B, Y, None)

    return _dense_func(body, "dense_nt", ((n, k), (m, k), (n, m)), m, epilogue)


# dense_gemm packs D's column block from this reduction length, row count and column count on.
PACK_MIN_K, PACK_MIN_ROWS, PACK_MIN_COLS = 1024, 128, 128


def dense_gemm_packs(m: int, k: int, n: int) -> bool:
    """Whether ``dense_gemm`` copies each task's D[:, block] to a contiguous scratch first (as
    ``group_sparse_gemm`` does): when the block is long (k rows of 3 vectors, several times L1) and at
    least 16 row tiles read it. In place, its rows are n floats apart; at a multiple of 1 KiB
    (NIN's 256 and 1024 pixels) they fall into a few cache sets and evict each other. Measured here
    (benchmarks/results/dense_gemm_pack.md; two earlier runs agree): NIN's conv2 192x2400 · 2400x256 1.9x
    faster packed (earlier 2.1-2.2x), its pruned conv2 at batch 16 (n = 4096) 2.8x, AlexNet's convs
    (n = 729, 169) 1.01-1.11x (earlier 0.85-1.25x); with few rows (m ≤ 64) or n = 64 packing lost up to
    15 % (the copy is not paid back). Some shorter blocks gained too (NIN's conv1, k = 75: 1.16x; AlexNet's
    conv1, k = 363: 1.07-1.21x) and are left unpacked: the rule keeps to the clear wins. Thresholds assume
    the default 8-row tile and were measured on this machine only."""
    return k >= PACK_MIN_K and m >= PACK_MIN_ROWS and n >= PACK_MIN_COLS


def dense_gemm(m: int, k: int, n: int, spec: HardwareSpec, tile: tuple[int, int] = (8, 3),
               epilogue: Epilogue = NO_EPILOGUE, pack: bool | None = None) -> tirx.PrimFunc:
    """O[m, n] = W[m, k] · D[k, n] (+ B[m], ReLU: ``epilogue``), dense; register tile of ``tile`` =
    (rows, vectors), parallel over column blocks (D[:, block] stays in L2 while every row tile passes
    over it). ``pack`` (default: ``dense_gemm_packs``): read the block from a contiguous copy."""
    _check_dims(m=m, k=k, n=n)
    pack = dense_gemm_packs(m, k, n) if pack is None else pack
    cols = _columns(n, spec.lanes(F32), tile[1])
    width, nv = cols.width, cols.nv
    mb = min(tile[0], m)
    mt = -(-m // mb)
    loop = _loop(m * n * k)
    pack_block = _pack_block(k, cols)

    @T.macro
    def tiles(W, D, S, B, O, acc, blk):
        for t in range(mt):
            # The last row tile is clamped to end at m: rows recomputed by the same task.
            for i in T.unroll(mb):
                for v in T.unroll(nv):
                    for l in T.vectorized(width):
                        acc[i, v, l] = T.float32(0)
            for kk in range(k):
                for i in T.unroll(mb):
                    for v in T.unroll(nv):
                        for l in T.vectorized(width):
                            if pack:
                                acc[i, v, l] = acc[i, v, l] + W[T.min(t * mb, m - mb) + i, kk] * S[kk, v, l]
                            else:
                                acc[i, v, l] = acc[i, v, l] + W[T.min(t * mb, m - mb) + i, kk] * D[
                                    kk, cols.offset(blk, v) + l]
            for i in T.unroll(mb):
                for v in T.unroll(nv):
                    for l in T.vectorized(width):
                        O[T.min(t * mb, m - mb) + i, cols.offset(blk, v) + l] = epilogue(
                            acc[i, v, l], B, T.min(t * mb, m - mb) + i)

    @T.macro
    def body(W, D, B, O):
        for blk in loop(cols.nblk):
            p: T.let[T.handle] = stack_scratch(mb * nv * width * _BYTES)
            acc = T.decl_buffer((mb, nv, width), F32, data=p)
            if pack:
                S = T.decl_buffer((k, nv, width), F32, scope="global")
                pack_block(D, S, blk)
                tiles(W, D, S, B, O, acc, blk)
            else:
                tiles(W, D, None, B, O, acc, blk)

    return _dense_func(body, "dense_gemm", ((m, k), (k, n), (m, n)), m, epilogue)


# ----------------------------------------------------------------------------------------------
# Group-sparse (1×w blocks, one block-column index per kept group)
# ----------------------------------------------------------------------------------------------


def group_sparse_nt(m: int, k: int, w: int, n: int, spec: HardwareSpec,
                    epilogue: Epilogue = NO_EPILOGUE) -> tirx.PrimFunc:
    """Y[n, m] = X[n, k] · Wᵀ (+ B[m], ReLU: ``epilogue``) with W group-sparse (values[G, w],
    col_idx[G], row_ptr[m + 1]).

    Per kept group: one w-wide vector load of weights and one of X at the group's column, one FMA.
    """
    _check_dims(m=m, k=k, w=w, n=n)
    full, kr = divmod(k, w)
    ragged = kr != 0
    tail = kr if ragged and n * w * _BYTES <= TAIL_COPY_MAX_BYTES else 0
    copied = tail > 0
    fold, folded = _row_sum(w)

    @T.macro
    def row(X, V, I, P, B, Y, XT, r, n0, nb):
        p: T.let[T.handle] = stack_scratch(nb * w * _BYTES)
        acc = T.decl_buffer((nb, w), F32, data=p)
        for a in T.unroll(nb):
            for l in T.vectorized(w):
                acc[a, l] = T.float32(0)
        for j in range(P[r], P[r + 1]):
            if ragged:
                if I[j] == full:
                    if copied:  # the group's zero padding meets XT's: one vector FMA
                        for a in T.unroll(nb):
                            for l in T.vectorized(w):
                                acc[a, l] = acc[a, l] + V[j, l] * XT[n0 + a, l]
                    else:
                        for a in T.unroll(nb):
                            for l in range(kr):
                                acc[a, l] = acc[a, l] + V[j, l] * X[n0 + a, full * w + l]
                else:
                    for a in T.unroll(nb):
                        for l in T.vectorized(w):
                            acc[a, l] = acc[a, l] + V[j, l] * X[n0 + a, I[j] * w + l]
            else:
                for a in T.unroll(nb):
                    for l in T.vectorized(w):
                        acc[a, l] = acc[a, l] + V[j, l] * X[n0 + a, I[j] * w + l]
        for a in T.unroll(nb):
            if folded:
                fold(acc, a)
                Y[n0 + a, r] = epilogue(acc[a, 0], B, r)
            else:
                Y[n0 + a, r] = epilogue(_hsum(acc, (a,), w), B, r)

    rows = _parallel_rows(row, m, n, k, spec)

    return _sparse_nt_func(rows, "group_sparse_nt", m, k, n, w, epilogue, tail)


def group_sparse_gemm(m: int, k: int, w: int, n: int, spec: HardwareSpec, nv: int = 6,
                      pack: bool = True, epilogue: Epilogue = NO_EPILOGUE) -> tirx.PrimFunc:
    """O[m, n] = W · D[k, n] (+ B[m], ReLU: ``epilogue``) with W group-sparse; per kept group, w
    broadcast-FMAs per column vector.

    Parallel over blocks of ``nv`` column vectors. With ``pack`` each task first copies its D[:, block]
    into a contiguous scratch: every later vector load is then cache-line aligned and L2-resident,
    whatever n's row stride (a 729-float row makes every load straddle two lines).
    """
    _check_dims(m=m, k=k, w=w, n=n)
    full, kr = divmod(k, w)
    ragged = kr != 0
    cols = _columns(n, spec.lanes(F32), nv)
    width, nv = cols.width, cols.nv
    loop = _loop(m * n * k)
    pack_block = _pack_block(k, cols)

    @T.macro
    def group(V, S, acc, j, col0, nrows, blk):
        for kk in T.unroll(nrows):
            for v in T.unroll(nv):
                for l in T.vectorized(width):
                    if pack:
                        acc[v, l] = acc[v, l] + V[j, kk] * S[col0 + kk, v, l]
                    else:
                        acc[v, l] = acc[v, l] + V[j, kk] * S[col0 + kk, cols.offset(blk, v) + l]

    @T.macro
    def rows(V, I, P, S, B, O, acc, blk):
        for r in range(m):
            for v in T.unroll(nv):
                for l in T.vectorized(width):
                    acc[v, l] = T.float32(0)
            for j in range(P[r], P[r + 1]):
                if ragged:
                    if I[j] == full:
                        group(V, S, acc, j, full * w, kr, blk)
                    else:
                        group(V, S, acc, j, I[j] * w, w, blk)
                else:
                    group(V, S, acc, j, I[j] * w, w, blk)
            for v in T.unroll(nv):
                for l in T.vectorized(width):
                    O[r, cols.offset(blk, v) + l] = epilogue(acc[v, l], B, r)

    @T.macro
    def body(V, I, P, D, B, O):
        for blk in loop(cols.nblk):
            p: T.let[T.handle] = stack_scratch(nv * width * _BYTES)
            acc = T.decl_buffer((nv, width), F32, data=p)
            if pack:
                S = T.decl_buffer((k, nv, width), F32, scope="global")
                pack_block(D, S, blk)
                rows(V, I, P, S, B, O, acc, blk)
            else:
                rows(V, I, P, D, B, O, acc, blk)

    if epilogue.bias:
        @T.prim_func
        def kernel_b(v_h: T.handle, i_h: T.handle, p_h: T.handle, d_h: T.handle, b_h: T.handle, o_h: T.handle):
            T.func_attr({"global_symbol": "group_sparse_gemm", "tir.noalias": True})
            G = T.int32()
            V = T.match_buffer(v_h, (G, w), F32)
            I = T.match_buffer(i_h, (G,), "int32")
            P = T.match_buffer(p_h, (m + 1,), "int32")
            D = T.match_buffer(d_h, (k, n), F32)
            B = T.match_buffer(b_h, (m,), F32)
            O = T.match_buffer(o_h, (m, n), F32)
            body(V, I, P, D, B, O)

        return kernel_b

    @T.prim_func
    def kernel(v_h: T.handle, i_h: T.handle, p_h: T.handle, d_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "group_sparse_gemm", "tir.noalias": True})
        G = T.int32()
        V = T.match_buffer(v_h, (G, w), F32)
        I = T.match_buffer(i_h, (G,), "int32")
        P = T.match_buffer(p_h, (m + 1,), "int32")
        D = T.match_buffer(d_h, (k, n), F32)
        O = T.match_buffer(o_h, (m, n), F32)
        body(V, I, P, D, None, O)

    return kernel


# ----------------------------------------------------------------------------------------------
# CSR (one index per nonzero): the format of traditional, unstructured pruning
# ----------------------------------------------------------------------------------------------


def csr_nt(m: int, k: int, n: int, spec: HardwareSpec, epilogue: Epilogue = NO_EPILOGUE) -> tirx.PrimFunc:
    """Y[n, m] = X[n, k] · Wᵀ (+ B[m], ReLU: ``epilogue``) with W in CSR (values[nnz, 1], col_idx[nnz],
    row_ptr[m + 1]: the w = 1 group layout): a scalar gather of X per nonzero (no SIMD possible)."""
    _check_dims(m=m, k=k, n=n)

    @T.macro
    def row(X, V, C, P, B, Y, _XT, r, n0, nb):
        p: T.let[T.handle] = stack_scratch(nb * _BYTES)
        acc = T.decl_buffer((nb,), F32, data=p)
        for a in T.unroll(nb):
            acc[a] = T.float32(0)
        for j in range(P[r], P[r + 1]):
            for a in T.unroll(nb):
                acc[a] = acc[a] + V[j, 0] * X[n0 + a, C[j]]
        for a in T.unroll(nb):
            Y[n0 + a, r] = epilogue(acc[a], B, r)

    rows = _parallel_rows(row, m, n, k, spec)

    return _sparse_nt_func(rows, "csr_nt", m, k, n, 1, epilogue)


# ----------------------------------------------------------------------------------------------
# Convolution via im2col (then dense_gemm or group_sparse_gemm)
# ----------------------------------------------------------------------------------------------


def conv_out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    out = (size + 2 * pad - kernel) // stride + 1
    if out < 1:
        raise KernelError(f"conv: input {size} with kernel {kernel}, stride {stride}, pad {pad} gives no output")
    return out


def im2col(b: int, c: int, h: int, w: int, kh: int, kw: int, stride: tuple[int, int] = (1, 1),
           pad: tuple[int, int] = (0, 0)) -> tirx.PrimFunc:
    """Cols[c·kh·kw, b·oh·ow] from X[b, c, h, w] (NCHW, zero padding), the D operand of a conv as GEMM.

    Row order (c, i, j) matches a conv weight flattened per filter, so O = W.reshape(oc, -1) · Cols
    is the conv of the whole batch in one GEMM, laid out O[oc, b, oh, ow].
    """
    _check_dims(b=b, c=c, h=h, w=w, kh=kh, kw=kw, stride_h=stride[0], stride_w=stride[1])
    sh, sw = stride
    ph, pw = pad
    oh, ow = conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw)
    rows = c * kh * kw
    loop = _loop(8 * rows * b * oh * ow)  # a copy: weigh an element like a few multiply-adds

    @T.prim_func
    def kernel(X: T.Buffer((b, c, h, w), F32), Cols: T.Buffer((rows, b * oh * ow), F32)):
        T.func_attr({"global_symbol": "im2col", "tir.noalias": True})
        for r in loop(rows):
            for n, y, x in T.grid(b, oh, ow):
                Cols[r, (n * oh + y) * ow + x] = T.if_then_else(
                    0 <= y * sh - ph + r % (kh * kw) // kw
                    and y * sh - ph + r % (kh * kw) // kw < h
                    and 0 <= x * sw - pw + r % kw
                    and x * sw - pw + r % kw < w,
                    X[n, r // (kh * kw),
                      T.max(T.min(y * sh - ph + r % (kh * kw) // kw, h - 1), 0),
                      T.max(T.min(x * sw - pw + r % kw, w - 1), 0)],
                    T.float32(0),
                )

    return kernel
