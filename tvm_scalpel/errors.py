"""The exception hierarchy: every error says what was expected, what was found, and what to do.

Each class is registered with TVM's FFI so that an error raised inside a pass or a packed function
reaches the caller as itself, not as a bare RuntimeError.
"""

import tvm_ffi


@tvm_ffi.register_error
class ScalpelError(Exception):
    """Base class of every error raised by tvm_scalpel."""


@tvm_ffi.register_error
class TargetError(ScalpelError, ValueError):
    """A target that tvm_scalpel cannot turn into a hardware spec."""


@tvm_ffi.register_error
class FormatError(ScalpelError, ValueError):
    """A weight or an encoded group-sparse matrix that does not have the expected shape or content."""


@tvm_ffi.register_error
class KernelError(ScalpelError, ValueError):
    """A kernel asked for with shapes or a target it does not support."""


@tvm_ffi.register_error
class PlanError(ScalpelError, ValueError):
    """A pruning plan or per-layer setting that does not match the model it is applied to."""


@tvm_ffi.register_error
class VerificationError(ScalpelError):
    """A compiled model whose outputs differ from its reference (PyTorch, or the dense kernels)."""
