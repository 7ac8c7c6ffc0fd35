"""FuseLayerChain: consecutive layer kernels become one PrimFunc, so the VM makes one call per chain.

At batch 1 a pruned layer's kernel runs in well under a microsecond, and each ``call_tir`` costs the
Relax VM about 0.4 us of its own (an intermediate tensor made from storage and a packed call; measured
on this machine: a model of three tiny layers takes 1.8 us per call, of one layer 1.0 us). A chain is a
run of ``call_tir`` bindings of our kernels (marked ``scalpel.kernel`` by ``LayerRewriter.add_kernel``)
in which each result is a dataflow var read only by the next kernel. Each chain of two or more is
moved into a ``Primitive`` Relax function, and TVM's ``FuseTIR`` (run here, in place of the pipeline's
own) turns it into one PrimFunc whose intermediates are local buffers; the kernels' bodies and parallel
loops are unchanged. Kernels left with no caller are dropped, so they are not compiled. A reshape
(flatten) feeding a chain's first kernel is led into the chain as a view: that kernel reads the
reshape's input in place.

Runs after ``FuseOps``, so the only ``Primitive`` functions it meets are FuseOps' groups, which FuseTIR
lowers as usual.
"""

from __future__ import annotations

import math
from collections import Counter

import tvm
from tvm import relax

from ..errors import KernelError


KERNEL_ATTR = "scalpel.kernel"
CHAIN_ATTR = "scalpel.kernels"  # on a fused chain's PrimFunc: the names of the kernels it runs, in order
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _kernel_call(mod: tvm.IRModule, value: relax.Expr) -> bool:
    """Whether ``value`` is ``call_tir`` of one of our layer kernels."""
    if not (isinstance(value, relax.Call) and value.op.same_as(_CALL_TIR)):
        return False
    func = mod[value.args[0]]
    return isinstance(func, tvm.tirx.PrimFunc) and bool(func.attrs.get(KERNEL_ATTR, False))


def _reshape_call(mod: tvm.IRModule, value: relax.Expr) -> bool:
    """Whether ``value`` is ``call_tir`` of a legalized reshape (a flatten before the first layer). Led
    into a chain, it replaces the VM's reshape view (a separate VM call, 0.3 us in a model of one tiny
    op)."""
    if not (isinstance(value, relax.Call) and value.op.same_as(_CALL_TIR)):
        return False
    func = mod[value.args[0]]
    if not (isinstance(func, tvm.tirx.PrimFunc) and relax.analysis.has_reshape_pattern(func)):
        return False
    # TVM counts a contiguous slice as a reshape too (a grouped conv's first channel half): only the same
    # elements in a new shape are a copy of the whole input.
    args = value.args[1].fields
    return (len(args) == 1 and _size(args[0].ty.shape) is not None
            and _size(args[0].ty.shape) == _size(value.ty.shape))


def _size(shape) -> int | None:
    """The element count of a static shape, else None."""
    dims = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in (shape or [])]
    return None if not dims or None in dims else math.prod(dims)


def _use_counts(func: relax.Function) -> Counter:
    counts: Counter = Counter()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _chains(mod: tvm.IRModule, block: relax.DataflowBlock, uses: Counter,
            lead_reshapes: bool = False) -> list[list[relax.VarBinding]]:
    """Maximal runs of consecutive kernel bindings where binding i's var is read once, by binding i+1;
    a run may start with a reshape that feeds its first kernel."""
    chains: list[list[relax.VarBinding]] = []
    run: list[relax.VarBinding] = []
    for binding in block.bindings:
        var_binding = isinstance(binding, relax.VarBinding)
        kernel = var_binding and _kernel_call(mod, binding.value)
        prev = run[-1].var if run else None
        links = (kernel and prev is not None and isinstance(prev, relax.DataflowVar) and uses[prev] == 1
                 and any(a.same_as(prev) for a in binding.value.args[1].fields))
        if links:
            run.append(binding)
            continue
        if len(run) > 1:
            chains.append(run)
        lead = lead_reshapes and var_binding and _reshape_call(mod, binding.value)
        run = [binding] if kernel or lead else []
    if len(run) > 1:
        chains.append(run)
    return chains


def _chain_function(chain: list[relax.VarBinding]) -> tuple[relax.Function, list[relax.Expr]]:
    """A Primitive function running ``chain``; its parameters are the chain's outside inputs, in order."""
    inner = {b.var for b in chain}
    params: list[relax.Var] = []
    outside: list[relax.Expr] = []
    remap: dict = {}
    bb = relax.BlockBuilder()
    for binding in chain:
        for arg in binding.value.args[1].fields:
            if arg in inner or arg in remap:
                continue
            param = relax.Var(f"p{len(params)}", arg.ty)
            params.append(param)
            outside.append(arg)
            remap[arg] = param
    with bb.function("chain", params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            last = None
            for binding in chain:
                call = binding.value
                args = [remap[a] for a in call.args[1].fields]
                last = bb.emit(relax.Call(call.op, [call.args[0], relax.Tuple(args), *call.args[2:]],
                                          call.attrs, call.ty_args))
                remap[binding.var] = last
            out = bb.emit_output(last)
        bb.emit_func_output(out)
    return bb.get()["chain"], outside


@tvm.transform.module_pass(opt_level=0, name="FuseLayerChain")
class FuseLayerChain:
    """``lead_flatten``: a reshape feeding a chain's first kernel (a flatten) is led into the chain, the
    kernel reading the reshape's input through a flat view; otherwise reshapes stay VM views."""

    def __init__(self, lead_flatten: bool = True):
        self.lead_flatten = lead_flatten

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        members: set[str] = set()  # the PrimFuncs moved into chains
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or func.attrs.get("Primitive", False):
                continue
            uses = _use_counts(func)
            blocks = [_fuse_block(bb, mod, gv.name_hint, b, uses, members, self.lead_flatten)
                      if isinstance(b, relax.DataflowBlock) else b
                      for b in func.body.blocks]
            if any(a is not b for a, b in zip(blocks, func.body.blocks)):
                bb.update_func(gv, relax.Function(func.params, relax.SeqExpr(blocks, func.body.body),
                                                  func.ret_ty, func.is_pure, func.attrs, func.span))
        grouped = bb.get()
        chains = {gv.name_hint: f.attrs[CHAIN_ATTR] for gv, f in grouped.functions_items()
                  if isinstance(f, relax.Function) and f.attrs and CHAIN_ATTR in f.attrs}
        return _drop_orphans(_name_chain_kernels(relax.transform.FuseTIR()(grouped), chains), members)


def kernel_names(mod: tvm.IRModule) -> list[str]:
    """Our kernels in a lowered module, sorted, those inside fused chains included."""
    names: list[str] = []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            names += [str(n) for n in func.attrs[CHAIN_ATTR]] if CHAIN_ATTR in func.attrs else [gv.name_hint]
    return sorted(names)


def _name_chain_kernels(mod: tvm.IRModule, chains: dict) -> tvm.IRModule:
    """FuseTIR names each fused PrimFunc after its Relax function and drops that function's attributes;
    put the chain's kernel names (``chains``, by function name) back on the PrimFunc."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for name, kernels in chains.items():
        gv = out.get_global_var(name)
        out[gv] = out[gv].with_attr(CHAIN_ATTR, kernels)
    return out


def _drop_orphans(mod: tvm.IRModule, members: set[str]) -> tvm.IRModule:
    """``mod`` without the kernels and chain ``members`` that no Relax function calls any more (they live
    on inside chains)."""
    called: set[str] = set()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func.body, lambda e: called.add(e.name_hint) if isinstance(e, tvm.ir.GlobalVar) else None)
    return tvm.IRModule({gv: f for gv, f in mod.functions_items()
                         if not (isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint not in called
                                 and (f.attrs.get(KERNEL_ATTR, False) or gv.name_hint in members))},
                        attrs=mod.attrs)


def _fuse_block(bb: relax.BlockBuilder, mod: tvm.IRModule, owner: str, block: relax.DataflowBlock,
                uses: Counter, members: set[str], lead_flatten: bool) -> relax.DataflowBlock:
    """``block`` with each chain replaced by one call of its Primitive function (bound to the chain's
    last var, so later readers are unchanged)."""
    chains = _chains(mod, block, uses, lead_reshapes=lead_flatten)
    if not chains:
        return block
    replace: dict = {}
    for chain in chains:
        kernels = [str(mod[b.value.args[0]].attrs["global_symbol"]) for b in chain
                   if _kernel_call(mod, b.value)]
        members.update(b.value.args[0].name_hint for b in chain)
        if not _kernel_call(mod, chain[0].value):  # a leading reshape: the first kernel reads its input
            replace[chain[0].var] = None
            chain = [_read_through(bb, mod, chain[0], chain[1]), *chain[2:]]
        func, outside = _chain_function(chain)
        gv = bb.add_func(func.with_attr(CHAIN_ATTR, kernels), f"fused_chain_{owner}")
        replace.update({b.var: None for b in chain[:-1]})
        replace[chain[-1].var] = bb.normalize(relax.Call(gv, outside))
    bindings = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b
                for b in block.bindings if replace.get(b.var, True) is not None]
    return relax.DataflowBlock(bindings, block.span)


def _read_through(bb: relax.BlockBuilder, mod: tvm.IRModule, reshape: relax.VarBinding,
                  first: relax.VarBinding) -> relax.VarBinding:
    """``first`` (the kernel that reads the flatten ``reshape``'s result) calling a variant of its kernel
    that takes the reshape's input and reads it through a flat view of the same memory. A copy into a
    scratch buffer (our earlier lead) cost a workspace allocation and a pass over the input: 0.09 us per
    call for MNIST's 784 floats, pruned LeNet-300-100 1.97 -> 1.85 us (benchmarks/call_floor.py)."""
    (src,) = reshape.value.args[1].fields
    args = list(first.value.args[1].fields)
    index = next(i for i, a in enumerate(args) if a.same_as(reshape.var))
    kernel_gv = first.value.args[0]
    view = _input_view(mod[kernel_gv], index, tuple(int(d) for d in src.ty.shape))
    gv = bb.add_func(view, f"{kernel_gv.name_hint}_view")
    args[index] = src
    call = first.value
    return relax.VarBinding(first.var, relax.Call(call.op, [gv, relax.Tuple(args), *call.args[2:]],
                                                  call.attrs, call.ty_args))


def _input_view(kernel: tvm.tirx.PrimFunc, index: int, shape: tuple[int, ...]) -> tvm.tirx.PrimFunc:
    """``kernel`` with parameter ``index`` taking a tensor of ``shape`` (the same elements, row-major),
    its old buffer declared as a view of the new one's memory."""
    from tvm import s_tir

    old = kernel.params[index]
    if not tvm.tirx.is_buffer_var(old) or _size(old.shape) != math.prod(shape):
        raise KernelError(f"FuseLayerChain: kernel parameter {index} ({old.name}) should be a buffer of "
                          f"{math.prod(shape)} elements to read the flatten's input {shape} in place, found "
                          f"{getattr(old, 'shape', None)}")
    new = tvm.tirx.decl_buffer(shape, old.dtype, str(old.name))
    decl = tvm.tirx.DeclBuffer(old, data=new.data)
    body = kernel.body
    if isinstance(body, s_tir.SBlockRealize):
        b = body.block
        block = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, tvm.tirx.SeqStmt([decl, b.body]),
                             b.init, b.alloc_buffers, b.match_buffers, b.annotations)
        body = s_tir.SBlockRealize(body.iter_values, body.predicate, block)
    else:
        body = tvm.tirx.SeqStmt([decl, body])
    params = [new if i == index else p for i, p in enumerate(kernel.params)]
    return tvm.tirx.PrimFunc(params, body, kernel.ret_type, kernel.attrs)
