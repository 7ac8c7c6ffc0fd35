"""int16 fixed point for the microcontroller path, and a numpy reference of exactly its arithmetic.

Every tensor has a power-of-two scale: value ≈ q / 2^frac. Activation fracs come from calibration
data (the largest magnitude seen must fit int16). A weighted layer's weight frac is the largest that
(a) fits every weight in int16 and (b) makes the int32 accumulator provably overflow-free for *any*
int16 input: |bias| + Σ|w_q|·32768 < 2^31 for every row. SMLAD wraps on overflow, so (b) is what makes
the board's result equal the exact integer sum, whatever the order of the MACs (dense, group-sparse
and CSR kernels give bit-identical outputs). Output: ``clamp((acc + 2^(s-1)) >> s)`` with
``s = frac_w + frac_in - frac_out`` (round half up, arithmetic shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import KernelError
from .graph import LRN, WEIGHTED, AvgPool, Conv, Graph, Layer, Linear, MaxPool, Relu

I16_MAX = 32767
ACC_LIMIT = 2**31 - 1
MAX_FRAC = 24  # beyond this the scale is finer than any int16 value needs
LRN_TABLE = 1024  # entries of the LRN factor table (uint16, Q15)


def _frac_for(max_abs: float, limit: int = I16_MAX) -> int:
    """The largest frac with round(max_abs·2^frac) ≤ limit."""
    if max_abs <= 0:
        return MAX_FRAC
    frac = int(np.floor(np.log2(limit / max_abs)))
    while frac > -16 and np.round(max_abs * 2.0**frac) > limit:
        frac -= 1
    return min(frac, MAX_FRAC)


# ---------------------------------------------------------------------------------------------- float
def im2col(x: np.ndarray, layer: Conv) -> np.ndarray:
    """x [C, H, W] → [OH·OW, C·KH·KW] patches (the order of the C kernel)."""
    c, h, w = layer.in_shape
    kh, kw = layer.weight.shape[2:]
    oh, ow = layer.out_hw
    s, p = layer.stride, layer.pad
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    cols = np.empty((oh * ow, c, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, i:i + s * oh:s, j:j + s * ow:s].reshape(c, -1).T
    return cols.reshape(oh * ow, -1)


def _windows(x: np.ndarray, layer, fill) -> tuple[np.ndarray, np.ndarray]:
    """(stack of the K·K strided views, count of real pixels per output) for a ceil-mode pool; the part
    of a window past the edge reads ``fill``."""
    c, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    k, s = layer.size, layer.stride
    xp = np.pad(x, ((0, 0), (0, max(0, (oh - 1) * s + k - h)), (0, max(0, (ow - 1) * s + k - w))),
                constant_values=fill)
    views = np.stack([xp[:, i:i + s * oh:s, j:j + s * ow:s] for i in range(k) for j in range(k)])
    rows = np.minimum(np.arange(oh) * s + k, h) - np.arange(oh) * s
    cols = np.minimum(np.arange(ow) * s + k, w) - np.arange(ow) * s
    return views, np.outer(rows, cols)


def _window_sum_same(x: np.ndarray, n: int) -> np.ndarray:
    """Σ over the n×n neighbourhood of every pixel, zero padded (stride 1, pad n//2)."""
    c, h, w = x.shape
    p = n // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    return sum(xp[:, i:i + h, j:j + w] for i in range(n) for j in range(n))


def forward_float(graph: Graph, x: np.ndarray, trace: list[np.ndarray] | None = None) -> np.ndarray:
    """The float model on one input [*in_shape] (checks the chain against torch; calibrates)."""
    y = np.asarray(x, np.float32).reshape(graph.in_shape)
    for layer in graph.layers:
        if isinstance(layer, Linear):
            y = layer.weight @ y.reshape(-1) + layer.bias
        elif isinstance(layer, Conv):
            w2 = layer.weight.reshape(layer.weight.shape[0], -1)
            y = (w2 @ im2col(y, layer).T + layer.bias[:, None]).reshape(layer.out_shape)
        elif isinstance(layer, MaxPool):
            y = _windows(y.reshape(layer.in_shape), layer, -np.inf)[0].max(0)
        elif isinstance(layer, AvgPool):
            views, count = _windows(y.reshape(layer.in_shape), layer, 0.0)
            y = views.sum(0) / count
        elif isinstance(layer, LRN):
            y = y.reshape(layer.in_shape)
            mean = _window_sum_same(y * y, layer.size) / layer.size**2
            y = y * (layer.k + layer.alpha * mean) ** -layer.beta
        if getattr(layer, "relu", False) or isinstance(layer, Relu):
            y = np.maximum(y, 0)
        if trace is not None:
            trace.append(y)
    return y


# ---------------------------------------------------------------------------------------------- int16
@dataclass(frozen=True, eq=False)
class QLayer:
    """A layer with its fixed-point facts. ``weight`` [O, Kp] int16 (Kp = K rounded up to a multiple of
    the board's group width, zero padded) and ``bias`` int32 for weighted layers; ``shift`` requantises
    the accumulator."""

    layer: Layer
    frac_in: int
    frac_out: int
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    frac_w: int | None = None
    lut: np.ndarray | None = None  # LRN: factor table, uint16 Q15
    lut_shift: int = 0  # LRN: table index = window Σ >> lut_shift
    sq_shift: int = 0  # LRN: each x² is shifted right by this before summing (int32 headroom)

    @property
    def shift(self) -> int:
        return 0 if self.frac_w is None else self.frac_w + self.frac_in - self.frac_out

    @property
    def relu(self) -> bool:
        return bool(getattr(self.layer, "relu", False))


@dataclass(frozen=True, eq=False)
class QuantizedModel:
    graph: Graph
    frac_in: int
    layers: tuple[QLayer, ...]

    @property
    def frac_out(self) -> int:
        return self.layers[-1].frac_out

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        q = np.round(np.asarray(x, np.float64) * 2.0**self.frac_in)
        q = np.clip(q, -I16_MAX - 1, I16_MAX).astype(np.int16)
        return q.reshape(self.graph.in_shape) if q.size == np.prod(self.graph.in_shape) else \
            q.reshape(-1, *self.graph.in_shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, np.float64) / 2.0**self.frac_out

    def run(self, xq: np.ndarray) -> np.ndarray:
        """The exact integer arithmetic of the generated C: one int16 input [*in_shape] → [n_out], or a
        batch [N, *in_shape] → [N, n_out]."""
        xq = np.asarray(xq, np.int16)
        single = xq.shape == self.graph.in_shape
        y = xq.reshape(-1, *self.graph.in_shape)
        for q in self.layers:
            y = _run_layer(q, y)
        y = y.reshape(y.shape[0], -1)
        return y[0] if single else y


def _requant(acc: np.ndarray, shift: int, relu: bool) -> np.ndarray:
    if np.abs(acc).max(initial=0) > ACC_LIMIT:
        raise KernelError("int16 reference: an accumulator left int32; the overflow bound is broken")
    v = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc
    return np.clip(v, 0 if relu else -I16_MAX - 1, I16_MAX).astype(np.int16)


def _run_layer(q: QLayer, y: np.ndarray) -> np.ndarray:
    """One layer on a batch y [N, *in_shape] of int16."""
    layer, n = q.layer, y.shape[0]
    if isinstance(layer, (Linear, Conv)):
        kp = q.weight.shape[1]
        if isinstance(layer, Linear):
            x = y.reshape(n, 1, -1)
        else:
            x = np.stack([im2col(yi.reshape(layer.in_shape), layer) for yi in y])  # [N, P, K]
        x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (0, kp - x.shape[2])))
        acc = np.einsum("ok,npk->nop", q.weight.astype(np.int64), x) + q.bias.astype(np.int64)[None, :, None]
        return _requant(acc, q.shift, q.relu).reshape(n, *layer.out_shape)
    if isinstance(layer, (MaxPool, AvgPool)):
        pool = _max_pool_int if isinstance(layer, MaxPool) else _avg_pool_int
        out = np.stack([pool(yi, layer) for yi in y])
        return np.maximum(out, 0).astype(np.int16) if layer.relu else out
    if isinstance(layer, LRN):
        return np.stack([_lrn_int(yi, q) for yi in y])
    return np.maximum(y, 0).astype(np.int16)  # Relu


def _max_pool_int(y: np.ndarray, layer: MaxPool) -> np.ndarray:
    return _windows(y.reshape(layer.in_shape), layer, np.int16(-I16_MAX - 1))[0].max(0)


def _avg_pool_int(y: np.ndarray, layer: AvgPool) -> np.ndarray:
    """Σ of the real pixels, then round-half-up division by their count (floor division, as the C)."""
    views, count = _windows(y.reshape(layer.in_shape).astype(np.int64), layer, 0)
    return ((2 * views.sum(0) + count) // (2 * count)).astype(np.int16)


def _lrn_int(y: np.ndarray, q: QLayer) -> np.ndarray:
    x = y.reshape(q.layer.in_shape).astype(np.int64)
    t = _window_sum_same((x * x) >> q.sq_shift, q.layer.size)
    idx = np.minimum(t >> q.lut_shift, len(q.lut) - 1)
    return ((x * q.lut[idx].astype(np.int64) + (1 << 14)) >> 15).astype(np.int16)


def _quantize_lrn(layer: LRN, frac: int) -> QLayer:
    """The factor (k + alpha·mean(x²))^-beta from a table indexed by the int32 window sum of x²."""
    if layer.k < 1 or layer.alpha < 0 or layer.beta < 0:
        raise KernelError(f"LRN: expected k >= 1, alpha >= 0, beta >= 0 (a factor <= 1), found {layer}")
    n2 = layer.size**2
    sq_shift = int(np.ceil(np.log2(n2)))  # n² terms of (32767² >> sq_shift) stay below 2^31
    t_max = n2 * ((I16_MAX**2) >> sq_shift)
    lut_shift = max(0, int(np.ceil(np.log2((t_max + 1) / LRN_TABLE))))
    centre = (np.arange(LRN_TABLE) + 0.5) * 2.0**lut_shift * 2.0**sq_shift / 2.0**(2 * frac)  # Σ x² (real)
    factor = (layer.k + layer.alpha * centre / n2) ** -layer.beta
    lut = np.clip(np.round(factor * 2**15), 0, 2**15).astype(np.uint16)
    return QLayer(layer, frac, frac, lut=lut, lut_shift=lut_shift, sq_shift=sq_shift)


def _quantize_weighted(layer: Linear | Conv, frac_in: int, frac_out: int, align: int) -> QLayer:
    w2 = layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64)
    kp = -(-w2.shape[1] // align) * align
    frac_w = _frac_for(float(np.abs(w2).max()))
    while True:
        wq = np.round(w2 * 2.0**frac_w).astype(np.int64)
        bq = np.round(layer.bias.astype(np.float64) * 2.0**(frac_w + frac_in)).astype(np.int64)
        bound = np.abs(bq) + np.abs(wq).sum(axis=1) * (I16_MAX + 1)
        if bound.max() <= ACC_LIMIT and frac_w + frac_in >= frac_out:
            break
        if bound.max() <= ACC_LIMIT:  # output finer than the accumulator: coarsen the output instead
            frac_out = frac_w + frac_in
            break
        frac_w -= 1
        if frac_w < -16:
            raise KernelError(f"{layer.key}: no weight scale keeps the int32 accumulator from overflowing")
    weight = np.zeros((w2.shape[0], kp), np.int16)
    weight[:, :w2.shape[1]] = wq
    return QLayer(layer, frac_in, frac_out, weight, bq.astype(np.int32), frac_w)


def quantize(graph: Graph, calibration: np.ndarray, align: int = 2) -> QuantizedModel:
    """Fixed-point scales from ``calibration`` inputs [N, *in_shape] (a few hundred real examples).
    ``align``: weight rows are zero padded to a multiple of it (the board's group width)."""
    if not isinstance(align, int) or align < 1:
        raise KernelError(f"quantize: expected align >= 1 (the board's group width), found {align!r}")
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != len(graph.in_shape) + 1 or calibration.shape[1:] != graph.in_shape:
        raise KernelError(f"calibration: expected inputs of shape [N, {', '.join(map(str, graph.in_shape))}], "
                          f"found {calibration.shape}")
    peaks = np.zeros(len(graph.layers))
    for x in calibration:
        trace: list[np.ndarray] = []
        forward_float(graph, x, trace)
        peaks = np.maximum(peaks, [float(np.abs(t).max()) for t in trace])
    frac_in = first = _frac_for(float(np.abs(calibration).max()))
    qlayers = []
    for layer, peak in zip(graph.layers, peaks):
        if isinstance(layer, WEIGHTED):
            q = _quantize_weighted(layer, frac_in, _frac_for(peak), align)
        elif isinstance(layer, LRN):
            q = _quantize_lrn(layer, frac_in)
        else:  # pools and ReLUs keep the scale
            q = QLayer(layer, frac_in, frac_in)
        qlayers.append(q)
        frac_in = q.frac_out
    return QuantizedModel(graph, first, tuple(qlayers))
