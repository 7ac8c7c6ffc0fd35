"""TensorIR kernels and their schedules, per target family (cpu; cuda and micro in later modules)."""

from .kernel import CompiledKernel

__all__ = ["CompiledKernel"]
