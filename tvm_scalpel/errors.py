"""The exception hierarchy: every error says what was expected, what was found, and what to do."""


class ScalpelError(Exception):
    """Base class of every error raised by tvm_scalpel."""


class TargetError(ScalpelError, ValueError):
    """A target that tvm_scalpel cannot turn into a hardware spec."""


class FormatError(ScalpelError, ValueError):
    """A weight or an encoded group-sparse matrix that does not have the expected shape or content."""


class KernelError(ScalpelError, ValueError):
    """A kernel asked for with shapes or a target it does not support."""
