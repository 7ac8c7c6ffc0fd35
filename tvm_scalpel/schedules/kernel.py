"""Compile a kernel PrimFunc once and call it with numpy arrays (tests, profiling, benchmarks)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tvm import tirx

from .. import compat
from ..errors import KernelError
from ..target import HardwareSpec


class CompiledKernel:
    """A compiled PrimFunc; the last parameter is the output, allocated on each call."""

    def __init__(self, func: tirx.PrimFunc, spec: HardwareSpec):
        self.name = str(func.attrs["global_symbol"])
        self.spec = spec
        self.executable = compat.compile_prim_func(func, spec.target)
        self._fn = self.executable[self.name]

    def __call__(self, *inputs: np.ndarray, out_shape: Sequence[int], dtype: str = "float32") -> np.ndarray:
        out = np.zeros(tuple(out_shape), dtype)
        args = compat.to_device([*inputs, out])
        try:
            self._fn(*args)
        except Exception as err:  # TVM reports argument mismatches as generic errors
            shapes = [tuple(np.shape(a)) for a in inputs]
            raise KernelError(f"{self.name}: call with input shapes {shapes} failed: {err}") from None
        return args[-1].numpy()

    def device_args(self, *arrays: np.ndarray) -> list[Any]:
        """Arrays placed on the device once, for repeated timed calls."""
        return compat.to_device(arrays)

    def raw(self, *device_args: Any) -> None:
        """Call on device tensors without copies (the benchmark hot path)."""
        self._fn(*device_args)
