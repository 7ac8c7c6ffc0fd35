"""Shared matching for the layer-lowering passes: find constant-weight Linear / Conv2d calls and emit
kernel calls for them. Each pass decides *which* kernel; this module knows how layers look in Relax.

A rewriter with ``fuses_epilogue`` also takes the layer's bias add and ReLU into its kernel (an
``Epilogue``) when they follow the layer directly and nothing else reads the intermediate tensors:
``matmul → add(bias) → relu`` (torch.export: ``add(bias, matmul)``; conv: ``add(conv, reshape(bias))``)
becomes one kernel call, so the bias and the activation cost no VM call and no pass over the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator

from .. import formats
from ..compat import constant_array, with_root_block
from ..errors import PlanError
from ..schedules import cpu
from .fuse_layer_chain import KERNEL_ATTR

logger = logging.getLogger(__name__)

F32 = "float32"


def layer_key(weight_shape: tuple[int, ...]) -> str:
    """``linear:OUTxIN`` for a 2-D [out, in] weight, ``conv2d:OCxICxKHxKW`` for an OIHW weight."""
    kind = "linear" if len(weight_shape) == 2 else "conv2d"
    return f"{kind}:" + "x".join(str(int(d)) for d in weight_shape)


class _FusedEpilogue:
    """The kernel-side view of a layer's fused ``bias`` and ``relu`` fields."""

    bias: np.ndarray | None
    relu: bool

    @property
    def epilogue(self) -> cpu.Epilogue:
        return cpu.Epilogue(bias=self.bias is not None, relu=self.relu)

    def bias_args(self) -> list[relax.Expr]:
        """The kernel's B[m] input (last before the output), if the layer has a fused bias."""
        return [] if self.bias is None else [relax.const(self.bias)]


@dataclass(frozen=True)
class Linear(_FusedEpilogue):
    """``matmul(x, Wᵀ)`` with a constant weight [out, in] and a static [batch, in] fp32 input."""

    x: relax.Expr
    weight: np.ndarray  # [out, in]
    batch: int
    bias: np.ndarray | None = field(default=None, repr=False)  # [out], fused from the following add
    relu: bool = False  # a following ReLU, fused

    @property
    def key(self) -> str:
        return layer_key(self.weight.shape)


@dataclass(frozen=True)
class Conv2d(_FusedEpilogue):
    """A plain NCHW/OIHW conv2d (groups 1, dilation 1, symmetric padding), constant weight."""

    x: relax.Expr
    weight: np.ndarray  # [oc, ic, kh, kw]
    shape: tuple[int, int, int, int]  # the input's (b, c, h, w)
    stride: tuple[int, int]
    pad: tuple[int, int]
    bias: np.ndarray | None = field(default=None, repr=False)  # [oc], fused from the following add
    relu: bool = False

    @property
    def key(self) -> str:
        return layer_key(self.weight.shape)

    @property
    def out_hw(self) -> tuple[int, int]:
        kh, kw = self.weight.shape[2:]
        return (cpu.conv_out_size(self.shape[2], kh, self.stride[0], self.pad[0]),
                cpu.conv_out_size(self.shape[3], kw, self.stride[1], self.pad[1]))

    @property
    def im2col_is_x(self) -> bool:
        """A 1×1 conv, stride 1, no padding, batch 1: its im2col is X itself, [c, h·w] in NCHW order."""
        return (self.shape[0] == 1 and self.weight.shape[2:] == (1, 1) and self.stride == (1, 1)
                and self.pad == (0, 0))


def static_shape(x: relax.Expr, ndim: int) -> list[int] | None:
    """x's shape if it is a static fp32 tensor of rank ``ndim``, else None."""
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != ndim or ty.dtype != F32 or ty.shape is None:
        return None
    dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    return None if None in dims else dims


@dataclass(frozen=True)
class _Epilogue:
    """The bias add and ReLU after a layer's binding that its kernel can take over."""

    tail: relax.Var  # the last binding the fused kernel computes (the relu, or the add)
    replaced: frozenset  # the bindings the fused kernel makes redundant (the add and the relu)
    bias: np.ndarray | None  # per output channel
    relu: bool


def _op_is(value: relax.Expr, name: str) -> bool:
    return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get(name)


def _channel_bias(value: np.ndarray | None, out_shape: list[int]) -> np.ndarray | None:
    """``value`` as a per-channel [C] vector if adding it to an [N, C, ...] output adds value[c] to
    channel c (shapes (C,), (1, C), (C, 1, 1), (1, C, 1, 1), ...), else None."""
    if value is None or value.dtype != np.float32 or value.ndim > len(out_shape):
        return None
    dims = (1,) * (len(out_shape) - value.ndim) + value.shape
    if dims[1] != out_shape[1] or any(d != 1 for i, d in enumerate(dims) if i != 1):
        return None
    return np.ascontiguousarray(value.reshape(-1))


def find_epilogues(func: relax.Function) -> dict[relax.Var, _Epilogue]:
    """For each Linear / Conv2d binding in ``func``'s dataflow blocks, the bias add and ReLU that follow
    it directly, each the only reader of the tensor before it (a dataflow var, so no reader outside)."""
    found = {}
    for block in func.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            found.update(_block_epilogues(block))
    return found


def _block_epilogues(block: relax.DataflowBlock) -> dict[relax.Var, _Epilogue]:
    found = {}
    values = {b.var: b.value for b in block.bindings if isinstance(b, relax.VarBinding)}
    users = relax.analysis.udchain(block)

    def only_reader(var):
        readers = users.get(var, [])
        ok = isinstance(var, relax.DataflowVar) and len(readers) == 1 and readers[0] in values
        return readers[0] if ok else None

    def constant(expr):  # a constant, or a reshape of one (how torch.export shapes a conv bias)
        expr = values.get(expr, expr)
        if _op_is(expr, "relax.reshape") and constant_array(expr.args[0]) is not None:
            shape = static_shape(expr, ndim=expr.ty.ndim)
            return None if shape is None else constant_array(expr.args[0]).reshape(shape)
        return constant_array(expr)

    for head, value in values.items():
        if not (_op_is(value, "relax.matmul") or _op_is(value, "relax.nn.conv2d")):
            continue
        out_shape = static_shape(head, ndim=2 if _op_is(value, "relax.matmul") else 4)
        if out_shape is None:
            continue
        tail, replaced, bias, relu = head, [], None, False
        nxt = only_reader(tail)
        if nxt is not None and _op_is(values[nxt], "relax.add"):
            a, b = values[nxt].args
            other = b if a.same_as(tail) else a if b.same_as(tail) else None
            bias = None if other is None else _channel_bias(constant(other), out_shape)
            if bias is not None:
                tail = nxt
                replaced.append(nxt)
                nxt = only_reader(tail)
        if nxt is not None and _op_is(values[nxt], "relax.nn.relu"):
            tail, relu = nxt, True
            replaced.append(nxt)
        if replaced:
            found[head] = _Epilogue(tail, frozenset(replaced), bias, relu)
    return found


class LayerRewriter(PyExprMutator):
    """Base mutator: calls ``rewrite_linear`` / ``rewrite_conv2d`` for every matched layer (their
    result replaces the call; returning None leaves the call alone) and records the layer keys seen.

    With ``fuses_epilogue`` the layer handed to them carries the bias and ReLU that follow it
    (``find_epilogues``); a rewrite that returns a call must then apply them (``layer.epilogue``,
    ``layer.bias_args()``), and the add and relu bindings are dropped."""

    fuses_epilogue = False

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.seen_keys: set[str] = set()
        self.epilogues: dict[relax.Var, _Epilogue] = {}
        self._pending: _Epilogue | None = None  # the epilogue of the binding being visited
        self._fused = False
        self._replaced: set[relax.Var] = set()

    def start_function(self, func: relax.Function) -> None:
        self.epilogues = find_epilogues(func) if self.fuses_epilogue else {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self._replaced:
            return  # computed by a fused layer kernel
        self._pending, self._fused = self.epilogues.get(binding.var), False
        super().visit_var_binding_(binding)
        if self._fused:
            fused, tail = self.get_var_remap(binding.var), self._pending.tail
            if not isinstance(tail, relax.DataflowVar):  # the block's output (ONNX): keep it an output var
                fused = self.builder_.emit_output(fused, name_hint=tail.name)
            self.set_var_remap(tail, fused)
            self._replaced |= self._pending.replaced
        self._pending = None

    # -- subclass hooks --------------------------------------------------------------------------
    def rewrite_linear(self, layer: Linear) -> relax.Expr | None:
        return None

    def rewrite_conv2d(self, layer: Conv2d) -> relax.Expr | None:
        return None

    # -- matching ----------------------------------------------------------------------------------
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        layer = None
        if call.op == tvm.ir.Op.get("relax.matmul"):
            layer = self._match_linear(call)
        elif call.op == tvm.ir.Op.get("relax.nn.conv2d"):
            layer = self._match_conv2d(call)
        if layer is None:
            return call
        self.seen_keys.add(layer.key)
        ep = self._pending
        if ep is not None:
            layer = replace(layer, bias=ep.bias, relu=ep.relu)
        out = self.rewrite_linear(layer) if isinstance(layer, Linear) else self.rewrite_conv2d(layer)
        self._fused = out is not None and ep is not None
        return call if out is None else out

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr

    def _weight_nk(self, rhs: relax.Expr) -> np.ndarray | None:
        """The [out, in] weight behind a matmul's right operand, if it is a constant."""
        rhs = self._bound(rhs)
        direct = constant_array(rhs)
        if direct is not None:
            return direct.T if direct.ndim == 2 else None
        if isinstance(rhs, relax.Call) and rhs.op == tvm.ir.Op.get("relax.permute_dims"):
            w = constant_array(self._bound(rhs.args[0]))
            axes = rhs.attrs.axes
            if w is not None and w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return w
        return None

    def _match_linear(self, call: relax.Call) -> Linear | None:
        x, rhs = call.args
        shape = static_shape(x, ndim=2)
        weight = self._weight_nk(rhs)
        if shape is None or weight is None or weight.dtype != np.float32:
            return None
        return Linear(x=x, weight=weight, batch=shape[0])

    def _match_conv2d(self, call: relax.Call) -> Conv2d | None:
        x, wexpr = call.args
        a = call.attrs
        shape = static_shape(x, ndim=4)
        weight = constant_array(self._bound(wexpr))
        pad = [int(p) for p in a.padding]
        plain = (a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
                 and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
                 and pad[0] == pad[2] and pad[1] == pad[3])
        if shape is None or weight is None or weight.dtype != np.float32 or not plain:
            logger.debug("skip conv2d %s: not a plain NCHW fp32 conv with a constant weight", a)
            return None
        return Conv2d(x=x, weight=weight, shape=tuple(shape), stride=tuple(int(s) for s in a.strides),
                      pad=(pad[0], pad[1]))

    # -- emitting ------------------------------------------------------------------------------------
    def add_kernel(self, func: tvm.tirx.PrimFunc, name: str) -> tvm.ir.GlobalVar:
        """Add a kernel (the builder dedupes identical ones). op_pattern 8 (opaque): it is scheduled
        already, and FuseOps must not merge it."""
        func = (with_root_block(func).with_attr("global_symbol", name).with_attr("op_pattern", 8)
                .with_attr("tir.is_scheduled", True).with_attr(KERNEL_ATTR, True))
        return self.builder_.add_func(func, name)

    def emit_conv_gemm(self, layer: Conv2d, gemm: tvm.tirx.PrimFunc, gemm_name: str,
                       weight_args: list[relax.Expr], im2col_kernel=cpu.im2col) -> relax.Expr:
        """im2col of the whole batch, ``gemm(*weight_args, cols[, bias])`` → O[oc, b·oh·ow], back to
        NCHW. ``im2col_kernel`` builds the im2col PrimFunc (the CPU one by default). When the im2col
        would be X itself (``Conv2d.im2col_is_x``) the GEMM reads a reshape of X: no copy (NIN's 1×1
        convs spent 0.17 ms per call in im2col copies). After RemoveRedundantReshape a GEMM following
        a GEMM reads its output directly (they chain); any other reshape is a VM view, or FuseLayerChain's
        copy where it leads a chain (a 1×1 conv on the model's input or after a pool)."""
        b, c, h, w = layer.shape
        oc, _, kh, kw = layer.weight.shape
        oh, ow = layer.out_hw
        npix = b * oh * ow
        if layer.im2col_is_x:
            cols = self.builder_.emit(relax.op.reshape(layer.x, (c, npix)))
        else:
            (sh, sw), (ph, pw) = layer.stride, layer.pad
            tag = f"{c}x{h}x{w}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_b{b}"
            im2col = self.add_kernel(im2col_kernel(b, c, h, w, kh, kw, layer.stride, layer.pad),
                                     f"im2col_{tag}")
            cols = self.builder_.emit(relax.call_tir(im2col, [layer.x], out_ty=relax.TensorType(
                (c * kh * kw, npix), F32)))
        gv = self.add_kernel(gemm, gemm_name)
        out = self.builder_.emit(relax.call_tir(gv, [*weight_args, cols, *layer.bias_args()], out_ty=relax.TensorType(
            (oc, npix), F32)))
        if b == 1:
            return relax.op.reshape(out, (1, oc, oh, ow))
        out = self.builder_.emit(relax.op.reshape(out, (oc, b, oh, ow)))
        return relax.op.permute_dims(out, [1, 0, 2, 3])


def run_layer_pass(mod: tvm.IRModule, rewriter: LayerRewriter, configured_keys, pass_name: str):
    """Apply a LayerRewriter to every Relax function; unknown per-layer keys are a PlanError."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.start_function(func)
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    unknown = set(configured_keys) - rewriter.seen_keys
    if unknown:
        raise PlanError(f"{pass_name}: per-layer settings for {sorted(unknown)} match no constant-weight "
                        f"layer; the module has {sorted(rewriter.seen_keys)}")
    out = rewriter.builder_.get()
    return relax.transform.DeadCodeElimination()(out)


def encoded_constants(weight_2d: np.ndarray, w: int) -> list[relax.Expr]:
    """values, col_idx, row_ptr of the group-sparse encoding, as Relax constants."""
    g = formats.encode(weight_2d, w)
    return [relax.const(np.array(a)) for a in (g.values, g.col_idx, g.row_ptr)]
