"""A Relax model (after FoldNodeMasks) as the chain of layers the microcontroller driver calls.

The MCU path has no Relax VM: the generated C driver calls one kernel per layer in order. This module
reads the main function's dataflow bindings into that chain and knows nothing about quantisation.
Supported: conv2d (+ bias, groups 1), linear (matmul with a constant weight + bias), ReLU, max- and
average pooling, Caffe's within-channel LRN (as the op pattern torch.export leaves), flatten, and
torch.export's (max_pool, zeros) tuple. Anything else is a KernelError naming the op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax

from ..compat import constant_array
from ..errors import KernelError
from ..passes._layers import layer_key
from ..schedules.cpu import conv_out_size

Shape = tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True, eq=False)
class Linear:
    weight: np.ndarray  # [O, K] float32
    bias: np.ndarray  # [O]
    in_shape: Shape
    relu: bool = False

    @property
    def out_shape(self) -> Shape:
        return (self.weight.shape[0],)

    @property
    def key(self) -> str:
        return layer_key(self.weight.shape)


@dataclass(frozen=True, eq=False)
class Conv:
    weight: np.ndarray  # [O, C, KH, KW] float32
    bias: np.ndarray  # [O]
    in_shape: Shape  # (C, H, W)
    stride: int
    pad: int
    relu: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        kh, kw = self.weight.shape[2:]
        return (conv_out_size(self.in_shape[1], kh, self.stride, self.pad),
                conv_out_size(self.in_shape[2], kw, self.stride, self.pad))

    @property
    def out_shape(self) -> Shape:
        return (self.weight.shape[0], *self.out_hw)

    @property
    def key(self) -> str:
        return layer_key(self.weight.shape)


@dataclass(frozen=True, eq=False)
class MaxPool:
    size: int
    stride: int
    in_shape: Shape
    out_shape: Shape
    relu: bool = False


@dataclass(frozen=True, eq=False)
class AvgPool:
    """Average over K×K windows without padding, clipped at the image edge (ceil mode), divided by the
    number of pixels inside (torch's divisor when padding is 0)."""

    size: int
    stride: int
    in_shape: Shape
    out_shape: Shape
    relu: bool = False


@dataclass(frozen=True, eq=False)
class LRN:
    """Caffe's within-channel LRN: y = x · (k + alpha · mean_{n×n}(x²))^-beta, zero padding counted."""

    size: int
    alpha: float
    k: float
    beta: float
    in_shape: Shape

    @property
    def out_shape(self) -> Shape:
        return self.in_shape


@dataclass(frozen=True, eq=False)
class Relu:
    in_shape: Shape

    @property
    def out_shape(self) -> Shape:
        return self.in_shape


Layer = Linear | Conv | MaxPool | AvgPool | LRN | Relu
WEIGHTED = (Linear, Conv)


@dataclass(frozen=True, eq=False)
class Graph:
    """A chain of layers from ``in_shape`` (batch 1) to the last layer's output."""

    in_shape: Shape
    layers: tuple[Layer, ...]

    @property
    def out_shape(self) -> Shape:
        return self.layers[-1].out_shape


def _op(call: relax.Expr) -> str:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else ""


def _shape(expr: relax.Expr) -> Shape:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.dtype != "float32":
        raise KernelError(f"microcontroller path: expected static float32 tensors, found {ty}")
    dims = tuple(int(d) for d in ty.shape.values)
    if dims[0] != 1:
        raise KernelError(f"microcontroller path: expected batch 1 (one inference at a time), found shape {dims}")
    return dims[1:]


class _Reader:
    """Walks the bindings; ``values`` maps a var to a constant array, the chain's current output, a
    zeros placeholder or a tuple of those."""

    CURRENT = "current"
    IGNORED = "ignored"

    def __init__(self, func: relax.Function):
        params = list(func.params)
        if len(params) != 1:
            raise KernelError(f"microcontroller path: expected a model with one input, found {len(params)}")
        self.in_shape = _shape(params[0])
        self.values: dict[relax.Var, object] = {params[0]: self.CURRENT}
        self.layers: list[Layer] = []
        self.cur_shape = self.in_shape

    def value(self, expr: relax.Expr) -> object:
        arr = constant_array(expr)
        if arr is not None:
            return arr
        if isinstance(expr, relax.Var) and expr in self.values:
            return self.values[expr]
        if isinstance(expr, relax.Tuple):
            return tuple(self.value(f) for f in expr.fields)
        raise KernelError(f"microcontroller path: cannot follow {expr} (only a chain of layers is supported)")

    def current(self, expr: relax.Expr, what: str) -> None:
        if self.value(expr) is not self.CURRENT:
            raise KernelError(f"microcontroller path: {what} must read the previous layer's output "
                              "(only chains of layers are supported)")

    def const(self, expr: relax.Expr, what: str) -> np.ndarray:
        v = self.value(expr)
        if not isinstance(v, np.ndarray):
            raise KernelError(f"microcontroller path: {what} must be a constant, found {expr}")
        return v

    def push(self, layer: Layer) -> object:
        self.layers.append(layer)
        self.cur_shape = layer.out_shape
        return self.CURRENT

    def fuse_relu(self) -> object:
        last = self.layers[-1] if self.layers else None
        if isinstance(last, (Linear, Conv, MaxPool, AvgPool)) and not last.relu:
            self.layers[-1] = replace(last, relu=True)
            return self.CURRENT
        return self.push(Relu(self.cur_shape))

    def add_bias(self, call: relax.Call) -> object:
        a, b = call.args
        if self.value(a) is not self.CURRENT:
            a, b = b, a
        self.current(a, "add")
        bias = self.const(b, "the bias of an add").reshape(-1)
        last = self.layers[-1] if self.layers else None
        if not isinstance(last, WEIGHTED) or last.relu or bias.size != last.weight.shape[0] or last.bias.any():
            raise KernelError("microcontroller path: an add is supported only as the bias of the conv2d/linear "
                              f"right before it, found add of shape {bias.shape} after {type(last).__name__}")
        self.layers[-1] = replace(last, bias=bias.astype(np.float32))
        return self.CURRENT

    def lrn_step(self, op: str, call: relax.Call) -> object | None:
        """One step of the LRN pattern torch.export leaves (x·x → avg-pool → ·alpha → +k → ^-beta → x·f):
        partial results are tuples tagged with how far the pattern got."""
        args = [self.value(a) for a in call.args]
        tags = [a[0] if isinstance(a, tuple) and a and isinstance(a[0], str) else None for a in args]
        const = [float(a.reshape(-1)[0]) if isinstance(a, np.ndarray) and a.size == 1 else None for a in args]
        if op == "relax.multiply" and args[0] is self.CURRENT and args[1] is self.CURRENT:
            return ("lrn_sq",)
        if op == "relax.nn.avg_pool2d" and tags[0] == "lrn_sq":
            a = call.attrs
            n = int(a.pool_size[0])
            if ({int(p) for p in a.pool_size} != {n} or {int(s) for s in a.strides} != {1}
                    or {int(p) for p in a.padding} != {n // 2} or not a.count_include_pad):
                raise KernelError(f"microcontroller path: LRN expects an n×n, stride 1, pad n//2 average, found {a}")
            return ("lrn_mean", n)
        for i, j in ((0, 1), (1, 0)):
            if op == "relax.multiply" and tags[i] == "lrn_mean" and const[j] is not None:
                return ("lrn_scaled", args[i][1], const[j])
            if op == "relax.add" and tags[i] == "lrn_scaled" and const[j] is not None:
                return ("lrn_base", *args[i][1:], const[j])
            if op == "relax.multiply" and tags[i] == "lrn_factor" and args[j] is self.CURRENT:
                _, n, alpha, k, beta = args[i]
                return self.push(LRN(n, alpha, k, beta, self.cur_shape))
        if op == "relax.power" and tags[0] == "lrn_base" and const[1] is not None:
            return ("lrn_factor", *args[0][1:], -const[1])
        return None

    def call(self, call: relax.Call) -> object:
        op, args = _op(call), call.args
        if op in ("relax.multiply", "relax.add", "relax.power", "relax.nn.avg_pool2d"):
            step = self.lrn_step(op, call)
            if step is not None:
                return step
        if op == "relax.permute_dims":
            return np.ascontiguousarray(np.transpose(self.const(args[0], "permute_dims"),
                                                     [int(a) for a in call.attrs.axes]))
        if op == "relax.reshape" and isinstance(self.value(args[0]), np.ndarray):
            return self.const(args[0], "reshape").reshape([int(d) for d in call.ty.shape.values])
        if op == "relax.reshape":  # flatten: the int16 buffers are contiguous CHW, nothing moves
            self.current(args[0], "reshape")
            self.cur_shape = _shape(call)
            return self.CURRENT
        if op == "relax.matmul":
            self.current(args[0], "matmul")
            w = self.const(args[1], "a matmul's weight").T
            return self.push(Linear(np.ascontiguousarray(w, np.float32), np.zeros(w.shape[0], np.float32),
                                    self.cur_shape))
        if op == "relax.nn.conv2d":
            return self.conv2d(call)
        if op == "relax.add":
            return self.add_bias(call)
        if op == "relax.nn.relu":
            self.current(args[0], "relu")
            return self.fuse_relu()
        if op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            return self.pool(call)
        if op == "relax.zeros_like":
            return self.IGNORED
        raise KernelError(f"microcontroller path: unsupported op {op or call.op}; supported: conv2d, linear "
                          "(matmul + bias), relu, max_pool2d, avg_pool2d, within-channel LRN, flatten")

    def conv2d(self, call: relax.Call) -> object:
        a = call.attrs
        self.current(call.args[0], "conv2d")
        w = self.const(call.args[1], "a conv2d's weight")
        pads, strides = {int(p) for p in a.padding}, {int(s) for s in a.strides}
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or int(a.groups) != 1
                or any(int(d) != 1 for d in a.dilation) or len(pads) != 1 or len(strides) != 1):
            raise KernelError(f"microcontroller path: expected NCHW/OIHW conv2d with groups 1, dilation 1 and "
                              f"equal padding/strides, found {a}")
        return self.push(Conv(np.ascontiguousarray(w, np.float32), np.zeros(w.shape[0], np.float32),
                              self.cur_shape, strides.pop(), pads.pop()))

    def pool(self, call: relax.Call) -> object:
        a, kind = call.attrs, _op(call).removeprefix("relax.nn.")
        self.current(call.args[0], kind)
        size, strides = {int(p) for p in a.pool_size}, {int(s) for s in a.strides}
        if any(int(p) for p in a.padding) or any(int(d) != 1 for d in a.dilation) or len(size) != 1 \
                or len(strides) != 1 or a.layout != "NCHW":
            raise KernelError(f"microcontroller path: expected a square NCHW {kind} without padding, found {a}")
        cls = MaxPool if kind == "max_pool2d" else AvgPool
        return self.push(cls(size.pop(), strides.pop(), self.cur_shape, _shape(call)))


def read_graph(mod: tvm.IRModule) -> Graph:
    """The layer chain of ``mod['main']`` (fold dead nodes with FoldNodeMasks first)."""
    func = mod["main"]
    reader = _Reader(func)
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call):
                reader.values[binding.var] = reader.call(value)
            elif isinstance(value, relax.TupleGetItem):
                tup = reader.value(value.tuple_value)
                reader.values[binding.var] = tup[int(value.index)]
            else:
                reader.values[binding.var] = reader.value(value)
    out = reader.value(body.body)
    out = out[0] if isinstance(out, tuple) and len(out) == 1 else out
    if out is not reader.CURRENT or not reader.layers:
        raise KernelError("microcontroller path: expected the model's output to be its last layer's output")
    return Graph(reader.in_shape, tuple(reader.layers))
