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
from .graph import WEIGHTED, Conv, Graph, Layer, Linear, MaxPool, Relu

I16_MAX = 32767
ACC_LIMIT = 2**31 - 1
MAX_FRAC = 24  # beyond this the scale is finer than any int16 value needs


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


def max_pool(x: np.ndarray, layer: MaxPool, fill) -> np.ndarray:
    """Max over clipped windows (ceil mode): windows that run past the edge see only real pixels."""
    c, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    k, s = layer.size, layer.stride
    pad_h, pad_w = max(0, (oh - 1) * s + k - h), max(0, (ow - 1) * s + k - w)
    xp = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=fill)
    out = np.full((c, oh, ow), fill, x.dtype)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + s * oh:s, j:j + s * ow:s])
    return out


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
            y = max_pool(y.reshape(layer.in_shape), layer, -np.inf)
        if getattr(layer, "relu", False) or isinstance(layer, Relu):
            y = np.maximum(y, 0)
        if trace is not None:
            trace.append(y)
    return y


# ---------------------------------------------------------------------------------------------- int16
@dataclass(frozen=True, eq=False)
class QLayer:
    """A layer with its fixed-point facts. ``weight`` [O, Kp] int16 (Kp = K rounded up to even, zero
    padded) and ``bias`` int32 for weighted layers; ``shift`` requantises the accumulator."""

    layer: Layer
    frac_in: int
    frac_out: int
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    frac_w: int | None = None

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
        return np.clip(q, -I16_MAX - 1, I16_MAX).astype(np.int16).reshape(self.graph.in_shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, np.float64) / 2.0**self.frac_out

    def run(self, xq: np.ndarray) -> np.ndarray:
        """The exact integer arithmetic of the generated C, for one int16 input."""
        y = np.asarray(xq, np.int16).reshape(self.graph.in_shape)
        for q in self.layers:
            y = _run_layer(q, y)
        return y.reshape(-1)


def _requant(acc: np.ndarray, shift: int, relu: bool) -> np.ndarray:
    if np.abs(acc).max(initial=0) > ACC_LIMIT:
        raise KernelError("int16 reference: an accumulator left int32; the overflow bound is broken")
    v = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc
    return np.clip(v, 0 if relu else -I16_MAX - 1, I16_MAX).astype(np.int16)


def _run_layer(q: QLayer, y: np.ndarray) -> np.ndarray:
    layer = q.layer
    if isinstance(layer, (Linear, Conv)):
        kp = q.weight.shape[1]
        if isinstance(layer, Linear):
            x = y.reshape(1, -1)
        else:
            x = im2col(y.reshape(layer.in_shape), layer)
        x = np.pad(x.astype(np.int64), ((0, 0), (0, kp - x.shape[1])))
        acc = q.weight.astype(np.int64) @ x.T + q.bias.astype(np.int64)[:, None]  # [O, P]
        return _requant(acc, q.shift, q.relu).reshape(layer.out_shape)
    if isinstance(layer, MaxPool):
        out = max_pool(y.reshape(layer.in_shape), layer, np.int16(-I16_MAX - 1))
        return np.maximum(out, 0).astype(np.int16) if layer.relu else out
    return np.maximum(y, 0).astype(np.int16)  # Relu


def _quantize_weighted(layer: Linear | Conv, frac_in: int, frac_out: int) -> QLayer:
    w2 = layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64)
    kp = w2.shape[1] + w2.shape[1] % 2
    frac_w = min(_frac_for(float(np.abs(w2).max())), MAX_FRAC)
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


def quantize(graph: Graph, calibration: np.ndarray) -> QuantizedModel:
    """Fixed-point scales from ``calibration`` inputs [N, *in_shape] (a few hundred real examples)."""
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
            q = _quantize_weighted(layer, frac_in, _frac_for(peak))
        else:  # pools and ReLUs keep the scale
            q = QLayer(layer, frac_in, frac_in)
        qlayers.append(q)
        frac_in = q.frac_out
    return QuantizedModel(graph, first, tuple(qlayers))
