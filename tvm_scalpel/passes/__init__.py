"""Relax passes (one per module), each a pure IRModule -> IRModule ``tvm.transform.Pass``."""
