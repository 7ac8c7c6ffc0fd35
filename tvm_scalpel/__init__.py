"""tvm_scalpel: hardware-aware DNN pruning (Scalpel, ISCA 2017) built into Apache TVM."""

from . import errors, formats
from .errors import FormatError, KernelError, PlanError, ScalpelError, TargetError
from .pipeline import CompilePlan, build, pipeline
from .target import HardwareClass, HardwareSpec, as_target, hardware_spec

__all__ = [
    "CompilePlan", "build", "pipeline",
    "FormatError", "HardwareClass", "HardwareSpec", "KernelError", "PlanError", "ScalpelError", "TargetError",
    "as_target", "errors", "formats", "hardware_spec",
]
__version__ = "0.1.0"
