"""FoldNodeMasks: remove dead nodes (neurons / channels) and shrink the dense layers around them.

A chain ``producer → [bias add] → (relu | 0/1 mask multiply | max/avg pool | per-channel region |
flatten)* → consumer``,
where producer and consumer are constant-weight Linear or plain Conv2d layers and every intermediate
value has the chain as its only user, is shrunk to the kept nodes. A node is dead when

- an explicit mask multiplies it by 0 (a mask layer exported as ``multiply`` by a constant 0/1 vector),
- its producer row and bias are zero and every op in the chain maps a zero node to zero, or
- every consumer column that reads it is zero (through a flatten: its H·W consecutive inputs).

A per-channel region is a sub-graph of per-channel elementwise ops with scalar constants and pools that
rejoins in one value, such as within-channel LRN, x·(1 + α·avgpool(x²))^-β.

The producer's rows and bias and the consumer's columns are sliced and mask multiplies (1 for every kept
node) are deleted. A node with another reader (a branch, a residual add, a concat, the output) stops the
chain: that layer is left exactly as it was. ``round_to`` keeps a multiple of that many nodes (hardware
granularity); nodes kept only for rounding have their consumer columns zeroed, so results are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..compat import constant_array
from ..errors import PlanError

logger = logging.getLogger(__name__)

_OP = tvm.ir.Op.get
_POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")


@dataclass(frozen=True)
class FoldConfig:
    round_to: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PlanError(f"FoldNodeMasks: round_to must be a positive int, found {self.round_to!r}")


@dataclass
class _Chain:
    """One producer → consumer chain and what to rewrite in it (keys are the original Call nodes)."""

    producer: relax.Call
    weight: np.ndarray  # producer weight, [out, in] (linear) or OIHW
    consumer: relax.Call | None = None
    consumer_weight: np.ndarray | None = None  # [out2, in2] (linear) or OIHW
    bias_add: relax.Call | None = None
    bias_index: int = 1  # which operand of the add is the bias
    bias_source: relax.Call | None = None  # reshape(const bias) feeding the add, if any
    bias: np.ndarray | None = None  # [out]
    masks: list[tuple[relax.Call, np.ndarray, int]] = field(default_factory=list)  # call, keep, chain operand
    flatten: relax.Call | None = None
    spatial: int = 1  # H·W at the flatten: a channel feeds that many consecutive Linear inputs
    zero_preserving: bool = True  # a dead node's 0 stays 0 through the chain (needed by the zero-row rule)

    @property
    def nodes(self) -> int:
        return int(self.weight.shape[0])


class _Graph:
    """Bindings of a function's dataflow blocks: var → value, and var → the expressions using it."""

    def __init__(self, func: relax.Function):
        self.value: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                for arg in _operands(b.value):
                    if isinstance(arg, relax.Var):
                        self.users.setdefault(arg, []).append((b.var, b.value))
        out = func.body.body
        for arg in [out, *_operands(out)]:
            if isinstance(arg, relax.Var):
                self.users.setdefault(arg, []).append((None, out))

    def const(self, expr: relax.Expr) -> np.ndarray | None:
        if isinstance(expr, relax.Var) and expr in self.value:
            expr = self.value[expr]
        return constant_array(expr)

    def only_user(self, var: relax.Var):
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and users[0][0] is not None else (None, None)


def _operands(expr: relax.Expr) -> list:
    if isinstance(expr, relax.Call):
        return list(expr.args)
    if isinstance(expr, relax.Tuple):
        return list(expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return [expr.tuple_value]
    return []


def _is(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op == _OP(name)


def _plain_conv(call: relax.Call) -> bool:
    a = call.attrs
    return (a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and int(a.groups) == 1
            and a.out_layout == "NCHW")


def _linear_weight(graph: _Graph, call: relax.Call) -> np.ndarray | None:
    """[out, in] weight of ``matmul(x, permute_dims(W))`` or ``matmul(x, Wt)``, if constant."""
    rhs = call.args[1]
    bound = graph.value.get(rhs, rhs) if isinstance(rhs, relax.Var) else rhs
    if _is(bound, "relax.permute_dims"):
        w = graph.const(bound.args[0])
        axes = bound.attrs.axes
        ok = axes is None or [int(a) for a in axes] == [1, 0]
        return w if w is not None and w.ndim == 2 and ok else None
    w = graph.const(rhs)
    return w.T if w is not None and w.ndim == 2 else None


def _layer_weight(graph: _Graph, call) -> np.ndarray | None:
    if _is(call, "relax.matmul"):
        return _linear_weight(graph, call)
    if _is(call, "relax.nn.conv2d") and _plain_conv(call):
        w = graph.const(call.args[1])
        return w if w is not None and w.ndim == 4 else None
    return None


def _node_vector(arr: np.ndarray, nodes: int, conv: bool) -> np.ndarray | None:
    """A per-node vector from a broadcastable constant ([n], [1, n], [1, n, 1, 1], [n, 1, 1])."""
    if arr is None or arr.size != nodes:
        return None
    ok_shapes = {(nodes,), (1, nodes)} | ({(1, nodes, 1, 1), (nodes, 1, 1)} if conv else set())
    return arr.reshape(nodes) if tuple(arr.shape) in ok_shapes else None


def _find_chain(graph: _Graph, var: relax.Var, producer: relax.Call) -> _Chain | None:
    weight = _layer_weight(graph, producer)
    if weight is None:
        return None
    conv = weight.ndim == 4
    chain = _Chain(producer=producer, weight=weight)
    cur = var
    nxt_var, nxt = graph.only_user(cur)
    if _is(nxt, "relax.add"):  # bias
        chain.bias_index = 1 if nxt.args[0].same_as(cur) else 0
        other = nxt.args[chain.bias_index]
        src = graph.value.get(other) if isinstance(other, relax.Var) else None
        bias = _node_vector(graph.const(other), chain.nodes, conv)
        if bias is None and _is(src, "relax.reshape"):
            bias = _node_vector(graph.const(src.args[0]), chain.nodes, conv)
            chain.bias_source = src if bias is not None else None
        if bias is None:
            return None
        chain.bias_add, chain.bias = nxt, bias
        cur = nxt_var
    spatial_ndim = conv
    while True:
        users = graph.users.get(cur, [])
        if spatial_ndim and len(users) == 2 and any(_is(u[1], "relax.zeros_like") for u in users):
            cur = _through_pool_tuple(graph, cur, users)  # torch.export's max_pool2d: (out, zeros_like)[0]
            if cur is None:
                return None
            continue
        if len(users) > 1 or (users and _channelwise(graph, users[0][1], {cur}) and not _simple(graph, users[0][1])):
            region = _through_channel_region(graph, cur, spatial_ndim)
            if region is None:
                return None
            cur, zero = region
            chain.zero_preserving &= zero
            continue
        nxt_var, nxt = graph.only_user(cur)
        if nxt is None:
            return None
        if _is(nxt, "relax.nn.relu") or (spatial_ndim and _is_op(nxt) and nxt.op.name in _POOLS):
            cur = nxt_var
        elif _is(nxt, "relax.multiply"):
            idx = 0 if nxt.args[0].same_as(cur) else 1
            mask = _node_vector(graph.const(nxt.args[1 - idx]), chain.nodes, spatial_ndim)
            if mask is None or not np.all((mask == 0) | (mask == 1)):
                return None
            chain.masks.append((nxt, mask != 0, idx))
            cur = nxt_var
        elif _is(nxt, "relax.reshape") and spatial_ndim:
            shape = [int(d) for d in cur.ty.shape.values]
            new = [int(d) for d in nxt.ty.shape.values]
            if len(new) != 2 or new[0] != shape[0] or new[1] != int(np.prod(shape[1:])):
                return None
            chain.flatten, chain.spatial, spatial_ndim = nxt, shape[2] * shape[3], False
            cur = nxt_var
        else:
            w2 = _layer_weight(graph, nxt) if isinstance(nxt, relax.Call) and nxt.args[0].same_as(cur) else None
            if w2 is None or (w2.ndim == 4) != bool(spatial_ndim):
                return None
            if w2.shape[1] != (chain.nodes if w2.ndim == 4 else chain.nodes * chain.spatial):
                return None
            chain.consumer, chain.consumer_weight = nxt, w2
            return chain


_UNARY_ZERO = {"relax.nn.relu": True, "relax.tanh": True, "relax.sqrt": True, "relax.negative": True,
               "relax.abs": True, "relax.sigmoid": False, "relax.exp": False}
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power")


def _simple(graph: _Graph, call) -> bool:
    """Ops the straight chain walker handles itself: relu, pools, a multiply by a per-node mask."""
    if _is(call, "relax.nn.relu") or (_is_op(call) and call.op.name in _POOLS):
        return True
    if _is(call, "relax.multiply"):
        return any(graph.const(a) is not None and graph.const(a).size > 1 for a in call.args)
    return False


def _is_op(call) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)


def _scalar(graph: _Graph, expr) -> float | None:
    """The value of a scalar constant (a size-1 tensor, or a Python-valued Constant), else None."""
    if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, (int, float)):
        return float(expr.value)
    arr = graph.const(expr)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _channelwise(graph: _Graph, call, region: set) -> bool:
    """A per-channel op of region tensors and scalar constants (it keeps channels independent)."""
    if not _is_op(call):
        return False
    name = call.op.name
    if name in _UNARY_ZERO or name in _POOLS:
        return call.args[0] in region
    if name in _BINARY:
        tensors = [a for a in call.args if a in region]
        others = [a for a in call.args if a not in region]
        return bool(tensors) and all(_scalar(graph, a) is not None for a in others)
    return False


def _zero_kept(graph: _Graph, call, region_zero: dict) -> bool:
    """Does ``call`` map an all-zero channel to zero, given which region inputs do?"""
    name = call.op.name
    zero = [region_zero.get(a) if a in region_zero else None for a in call.args]
    if name in _POOLS:
        return zero[0]
    if name in _UNARY_ZERO:
        return zero[0] and _UNARY_ZERO[name]
    consts = [_scalar(graph, a) if a not in region_zero else None for a in call.args]
    if name == "relax.multiply":
        return any(z for z in zero if z) or any(c == 0 for c in consts if c is not None)
    if name == "relax.divide":
        return bool(zero[0])
    if name == "relax.power":
        return bool(zero[0]) and consts[1] is not None and consts[1] > 0
    # add / subtract: zero only if every operand is
    return all(z if z is not None else c == 0 for z, c in zip(zero, consts))


def _through_channel_region(graph: _Graph, start: relax.Var, spatial: bool):
    """Step over a per-channel sub-graph that starts at ``start`` and rejoins in one value (e.g.
    within-channel LRN: x · (1 + α·avgpool(x²))^-β). Returns (exit var, zero-preserving) or None."""
    region = {start: True}  # var -> maps a dead (zero) channel to zero
    frontier = [start]
    while frontier:
        var = frontier.pop()
        for user_var, user in graph.users.get(var, []):
            if user_var is None or user_var in region:
                continue
            if not _channelwise(graph, user, set(region)):
                continue
            if not all(a in region or _scalar(graph, a) is not None for a in user.args):
                continue  # waits until its other region operand is reached
            if user.op.name in _POOLS and not spatial:
                return None
            region[user_var] = _zero_kept(graph, user, region)
            frontier.append(user_var)
    exits = [v for v in region if any(u[0] not in region for u in graph.users.get(v, []))]
    if len(exits) != 1 or exits[0] is start:
        return None
    # Every region value must feed the region only, except the exit; every op must have been reached.
    for v in region:
        outside = [u for u in graph.users.get(v, []) if u[0] not in region]
        if v is not exits[0] and outside:
            return None
    return exits[0], region[exits[0]]


def _through_pool_tuple(graph: _Graph, cur: relax.Var, users) -> relax.Var | None:
    """Step over ``t = (cur, zeros_like(cur)); y = t[0]`` (how torch.export imports max_pool2d)."""
    zeros = [u for u in users if _is(u[1], "relax.zeros_like")]
    tuples = [u for u in users if isinstance(u[1], relax.Tuple)]
    if len(zeros) != 1 or len(tuples) != 1:
        return None
    t_var, t = tuples[0]
    if [int(i) for i, f in enumerate(t.fields) if f.same_as(cur)] != [0]:
        return None
    item_var, item = graph.only_user(t_var)
    if not isinstance(item, relax.TupleGetItem) or int(item.index) != 0:
        return None
    return item_var


def _dead(chain: _Chain) -> np.ndarray:
    dead = np.zeros(chain.nodes, bool)
    for _, keep, _ in chain.masks:
        dead |= ~keep
    if chain.zero_preserving:
        rows = chain.weight.reshape(chain.nodes, -1)
        zero_out = ~np.any(rows != 0, axis=1)
        if chain.bias is not None:
            zero_out &= chain.bias == 0
        dead |= zero_out
    cols = _consumer_columns(chain)
    dead |= ~np.any(cols != 0, axis=(0, 2))
    return dead


def _consumer_columns(chain: _Chain) -> np.ndarray:
    """Consumer weight as [out2, nodes, reads-per-node]."""
    w2 = chain.consumer_weight
    return w2.reshape(w2.shape[0], chain.nodes, -1)


def _decide_keep(chain: _Chain, round_to: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept node indices, kept-only-for-rounding indices)."""
    dead = _dead(chain)
    keep = np.flatnonzero(~dead)
    if keep.size == 0:
        keep = np.array([0])  # zero-size tensors are not worth the trouble; one zeroed node is kept
    extra = np.array([], dtype=int)
    want = min(chain.nodes, -(-keep.size // round_to) * round_to)
    if want > keep.size:
        extra = np.flatnonzero(dead & ~np.isin(np.arange(chain.nodes), keep))[: want - keep.size]
        keep = np.sort(np.concatenate([keep, extra]))
    return keep, extra


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, edits: dict):
        super().__init__(mod)
        self.edits = edits  # original Call -> edit(folder, call, new_args) -> replacement expr

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        edit = self.edits.get(call)
        if edit is None:
            return self.visit_expr_post_order(call)
        # Rebuild from the visited arguments: re-normalising the old call first would fail, its
        # other operands (a bias, a weight) still having the old node count.
        return edit(self, call, [self.visit_expr(a) for a in call.args])

    def linear_weight(self, w: np.ndarray) -> relax.Expr:
        return self.builder_.emit(relax.op.permute_dims(relax.const(np.ascontiguousarray(w)), [1, 0]))


def _with_arg(call: relax.Call, args: list, index: int, arg: relax.Expr) -> relax.Call:
    args = list(args)
    args[index] = arg
    return relax.Call(call.op, args, call.attrs, call.ty_args)


def _resized(shape, nodes: int, kept: int) -> list[int]:
    """A broadcast shape with its node axis (the dimension of size ``nodes``) set to ``kept``."""
    shape = [int(d) for d in shape]
    axis = shape.index(nodes)
    return shape[:axis] + [kept] + shape[axis + 1:]


def _plan_edits(chain: _Chain, keep: np.ndarray, extra: np.ndarray) -> dict:
    """The replacements for one chain, keyed by the original Call nodes."""
    edits = {}
    w_kept = np.ascontiguousarray(chain.weight[keep])
    if w_kept.ndim == 4:
        edits[chain.producer] = lambda f, c, a: _with_arg(c, a, 1, relax.const(w_kept))
    else:
        edits[chain.producer] = lambda f, c, a: _with_arg(c, a, 1, f.linear_weight(w_kept))
    if chain.bias is not None:
        b_kept = np.ascontiguousarray(chain.bias[keep])
        if chain.bias_source is not None:
            target = _resized(chain.bias_source.args[1].values, chain.nodes, keep.size)
            edits[chain.bias_source] = lambda f, c, a: relax.op.reshape(relax.const(b_kept), target)
        else:
            old_shape = chain.bias_add.args[chain.bias_index].ty.shape.values
            b_new = b_kept.reshape(_resized(old_shape, chain.nodes, keep.size))
            edits[chain.bias_add] = lambda f, c, a: _with_arg(c, a, chain.bias_index, relax.const(b_new))
    for mask_call, _, idx in chain.masks:
        edits[mask_call] = lambda f, c, a, idx=idx: a[idx]
    if chain.flatten is not None:
        edits[chain.flatten] = lambda f, c, a: relax.op.reshape(
            a[0], [int(a[0].ty.shape.values[0]), keep.size * chain.spatial])
    cols = _consumer_columns(chain)[:, keep, :].copy()
    if extra.size:
        cols[:, np.searchsorted(keep, extra), :] = 0  # kept only for rounding: contributes nothing
    w2 = chain.consumer_weight
    if w2.ndim == 4:
        w2_kept = np.ascontiguousarray(cols.reshape(w2.shape[0], keep.size, *w2.shape[2:]))
        edits[chain.consumer] = lambda f, c, a: _with_arg(c, a, 1, relax.const(w2_kept))
    else:
        w2_kept = np.ascontiguousarray(cols.reshape(w2.shape[0], -1))
        edits[chain.consumer] = lambda f, c, a: _with_arg(c, a, 1, f.linear_weight(w2_kept))
    return edits


def fold_function_chains(func: relax.Function, round_to: int) -> tuple[dict, list[tuple[str, int, int]]]:
    """Analyse one function: the edits to apply, and (layer, kept, total) per folded chain.

    Chains overlap (a layer consumes one chain and produces the next); a call gets at most one edit
    per round, so an overlapping chain waits for the next round.
    """
    graph = _Graph(func)
    edits: dict = {}
    report = []
    for var, value in graph.value.items():
        if not (_is(value, "relax.matmul") or _is(value, "relax.nn.conv2d")) or value in edits:
            continue
        chain = _find_chain(graph, var, value)
        if chain is None or chain.consumer in edits:
            continue
        keep, extra = _decide_keep(chain, round_to)
        if keep.size == chain.nodes and not chain.masks:
            continue
        edits.update(_plan_edits(chain, keep, extra))
        report.append((var.name, int(keep.size), chain.nodes))
    return edits, report


@tvm.transform.module_pass(opt_level=0, name="FoldNodeMasks")
class FoldNodeMasks:
    """Remove dead nodes and shrink the layers around them (see the module docstring)."""

    def __init__(self, config: FoldConfig | None = None):
        self.config = config or FoldConfig()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        # Chains overlap (a layer is the consumer of one and the producer of the next): fold the
        # non-overlapping ones, then repeat until nothing changes.
        for _ in range(64):
            changed = False
            for gv, func in list(mod.functions_items()):
                if not isinstance(func, relax.Function):
                    continue
                edits, report = fold_function_chains(func, self.config.round_to)
                if not edits:
                    continue
                folder = _Folder(mod, edits)
                folder.builder_.update_func(gv, folder.visit_expr(func))
                # Deleted mask multiplies leave `m = a` aliases; canonicalise them away, drop dead bindings.
                mod = relax.transform.CanonicalizeBindings()(folder.builder_.get())
                mod = relax.transform.DeadCodeElimination()(mod)
                for name, kept, total in report:
                    logger.debug("FoldNodeMasks: %s keeps %d of %d nodes", name, kept, total)
                changed = True
            if not changed:
                return mod
        return mod
