"""TVM-version specifics in one place (apache-tvm 0.27), so the next TVM rename is a one-file change."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tvm
from tvm import tirx
from tvm.target import Target

# TVMFFIAny slots are 16 bytes; `tvm_stack_alloca` counts in slots.
_FFI_ANY_BYTES = 16


def stack_scratch(nbytes: int) -> tirx.PrimExpr:
    """A pointer to ``nbytes`` of stack memory in the enclosing function (or parallel task).

    Why: in TVM 0.27 LowerTVMBuiltin turns *every* CPU ``alloc_buffer``/``decl_buffer`` into a
    ``TVMBackendAllocWorkspace`` call, even 16 bytes; LLVM then cannot keep accumulators in registers
    and stores them after every FMA (3x slower GEMM). ``tvm_stack_alloca`` becomes a plain entry-block
    ``alloca`` that LLVM promotes to registers. Use as
    ``p: T.let[T.handle] = stack_scratch(n)`` then ``T.decl_buffer(shape, dtype, data=p)``.
    """
    slots = max(1, -(-int(nbytes) // _FFI_ANY_BYTES))
    return tirx.call_intrin("handle", "tirx.tvm_stack_alloca", "tvm_ffi_any", slots)


def compile_prim_func(func: tirx.PrimFunc, target: Target) -> Any:
    """Compile one PrimFunc for ``target``; returns the executable (call it by its global symbol)."""
    return tvm.compile(func, target)


def to_device(arrays: Sequence[np.ndarray], dev: Any = None) -> list[Any]:
    """numpy arrays → TVM runtime tensors on ``dev`` (CPU by default)."""
    dev = dev or tvm.cpu()
    return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]


def time_evaluator(executable: Any, name: str, dev: Any = None, number: int = 10, repeat: int = 10,
                   min_repeat_ms: int = 0):
    """TVM's time evaluator for a compiled PrimFunc (0.27: lives on the JIT'd runtime module)."""
    return executable.jit().time_evaluator(name, dev or tvm.cpu(), number=number, repeat=repeat,
                                           min_repeat_ms=min_repeat_ms)


def system_cpu() -> str:
    """LLVM's name for the host CPU."""
    return tvm.target.codegen.llvm_get_system_cpu()


def constant_array(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant, or None for any other expression.

    0.27: Relax constants are ``tvm.ir.expr.Constant`` (``GenericConst``) with the tensor in ``.value``.
    """
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()  # (scalar constants share the class, with a Python value)
    return None


def with_root_block(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Wrap a loop-nest PrimFunc's body in an opaque root block.

    0.27's Relax build (RewriteDataflowReshape → HasReshapePattern) checks that the body of any
    ``call_tir`` callee whose argument and result sizes match is a block, and aborts otherwise. An
    opaque root block changes nothing in the generated code.
    """
    from tvm import s_tir

    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    block = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, block))


def ensure_cuda_compiler() -> None:
    """Make TVM compile CUDA with a compiler this machine has.

    0.27 defaults to NVRTC, which needs the ``cuda-bindings`` package; without it, fall back to nvcc
    (``TVM_CUDA_COMPILE_MODE=nvcc``) when nvcc is on the PATH, else say what to install.
    """
    import importlib.util
    import os
    import shutil

    import tvm.support.nvcc  # noqa: F401  (registers TVM's CUDA compile callback)

    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings"):
        return
    if shutil.which("nvcc"):
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        return
    from .errors import TargetError

    raise TargetError("building for CUDA needs NVRTC (pip install cuda-bindings) or nvcc on the PATH; "
                      "found neither")


def cuda_sources(executable: Any) -> list[str]:
    """The CUDA C source of every CUDA module a built executable carries (0.27: ``inspect_source()``
    on the modules under ``executable.mod.imports``)."""
    sources: list[str] = []

    def walk(m: Any) -> None:
        if m.kind == "cuda":
            sources.append(m.inspect_source())
        for sub in m.imports:
            walk(sub)

    walk(executable.mod)
    return sources


def compile_ptx(source: str, arch_target: Any) -> bytes:
    """nvcc's PTX for a CUDA source, for the arch of ``arch_target`` (raises if nvcc rejects it)."""
    import tvm.support.nvcc as nvcc

    with arch_target:
        return nvcc.compile_cuda(source, target_format="ptx", compiler="nvcc")
