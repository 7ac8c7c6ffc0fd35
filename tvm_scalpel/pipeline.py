"""The one build flow: ``pipeline(target)`` as ``tvm.compile(mod, target, relax_pipeline=...)``, or
``build(mod, target)`` in one call.

CPU (llvm): SplitGroupedConv → FoldNodeMasks → RewriteCSR → RewriteGroupSparse → RewriteDense (each layer's
kernel takes over the bias add and ReLU after it) → TVM's RemoveRedundantReshape → TVM's dispatch +
legalization + FuseOps
→ FuseLayerChain (each run of layer kernels becomes one PrimFunc, with TVM's FuseTIR) → ScheduleRemaining → TVM's lowering and finalisation. Every PrimFunc of the result is one of our
kernels or carries a schedule (``tir.is_scheduled``). GPU (cuda): SplitGroupedConv → FoldNodeMasks → RewriteTileSparse (our
tiled kernels for every conv and tile-sparse Linear, skipping pruned tiles) → TVM's CUDA pipeline (dlight
schedules the rest). Cortex-M: ``build`` hands over to ``tvm_scalpel.micro`` (int16,
TVM-generated plain C per layer, a generated driver; no Relax VM on the board).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import tvm
from tvm import relax

from .compat import ensure_cuda_compiler
from .errors import PlanError, ScalpelError, TargetError
from .passes.fold_node_masks import FoldConfig, FoldNodeMasks
from .passes.fuse_layer_chain import FuseLayerChain
from .passes.rewrite_csr import CSRConfig, RewriteCSR
from .passes.rewrite_dense import DenseConfig, RewriteDense
from .passes.rewrite_group_sparse import GroupSparseConfig, RewriteGroupSparse
from .passes.rewrite_tile_sparse import RewriteTileSparse, TileSparseConfig
from .passes.schedule_remaining import ScheduleRemaining
from .passes.split_grouped_conv import SplitGroupedConv
from .target import HardwareClass, TargetLike, hardware_spec


@dataclass(frozen=True)
class CompilePlan:
    """Per-layer compile decisions, by layer key (``passes._layers.layer_key``, after node folding).
    ``layer_thresholds``: the minimum fraction of zero groups (CPU) or zero tiles (CUDA) for the sparse
    kernel (> 1 keeps the layer dense). ``csr_layers``: layers that run CSR kernels (traditional pruning, one index per
    weight); a layer cannot be both CSR and group-sparse. ``fuse_chains``: CPU only, run each chain of layer
    kernels as one PrimFunc (``FuseLayerChain``; off to time or inspect the kernels one by one)."""

    group_width: int | None = None
    layer_thresholds: Mapping[str, float] = field(default_factory=dict)
    round_to: int = 1
    csr_layers: frozenset[str] = frozenset()
    fuse_chains: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.csr_layers, str):
            raise PlanError(f"CompilePlan.csr_layers: expected a set of layer keys, found the string "
                            f"{self.csr_layers!r}; write frozenset({{{self.csr_layers!r}}})")
        object.__setattr__(self, "csr_layers", frozenset(self.csr_layers))
        both = sorted(k for k in self.csr_layers if self.layer_thresholds.get(k, 2.0) <= 1.0)
        if both:
            raise PlanError(f"CompilePlan: {both} are asked to be both CSR and group-sparse; give each "
                            "layer one method (drop it from csr_layers or set its threshold above 1)")


def pipeline(target: TargetLike, plan: CompilePlan | None = None) -> tvm.transform.Pass:
    spec = hardware_spec(target)
    plan = plan or CompilePlan()
    split, fold = SplitGroupedConv(), FoldNodeMasks(FoldConfig(round_to=plan.round_to))
    if spec.hardware_class is HardwareClass.GPU:
        if plan.csr_layers:
            raise PlanError(f"CompilePlan.csr_layers {sorted(plan.csr_layers)}: CSR kernels exist for CPU "
                            "(llvm) targets only; drop csr_layers for CUDA")
        if plan.group_width is not None:
            raise PlanError(f"CompilePlan.group_width={plan.group_width}: a CUDA target prunes in tiles of "
                            f"{spec.tile} (HardwareSpec.tile), not SIMD groups; drop group_width")
        tiles = RewriteTileSparse(TileSparseConfig(spec, layers=plan.layer_thresholds))
        return tvm.transform.Sequential([split, fold, tiles, relax.get_default_pipeline(spec.target)], name="scalpel_gpu")
    if spec.hardware_class is not HardwareClass.CPU:
        raise TargetError(f"tvm_scalpel.pipeline: {spec.cpu} is a microcontroller, which runs no Relax VM and so "
                          "has no Relax pipeline; expected a CPU (llvm) or CUDA target, or use "
                          "tvm_scalpel.build(mod, target, out_dir=..., calibration=...) for the C project")
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target_obj = spec.target
    ours = [
        split,
        fold,
        RewriteCSR(CSRConfig(spec, layers=plan.csr_layers)),
        RewriteGroupSparse(GroupSparseConfig(spec, width=plan.group_width, layers={
            k: v for k, v in plan.layer_thresholds.items() if k not in plan.csr_layers})),
        RewriteDense(DenseConfig(spec)),
        # reshape(reshape(O)) from a GEMM to the next 1×1 conv's GEMM → O itself, so the two chain
        relax.transform.RemoveRedundantReshape(),
    ]
    legalize = cpu.legalize_passes(target_obj)
    if legalize[-1].info.name != "FuseTIR":  # FuseLayerChain runs FuseTIR itself, after grouping chains
        raise ScalpelError(f"tvm_scalpel.pipeline: expected TVM's CPU legalize passes to end with FuseTIR, "
                          f"found {[p.info.name for p in legalize]}")
    fuse = FuseLayerChain() if plan.fuse_chains else legalize[-1]
    tvm_lowering = (cpu.library_dispatch_passes(target_obj) + legalize[:-1] + [fuse, ScheduleRemaining(spec)]
                    + cpu.dataflow_lower_passes(target_obj)
                    + cpu.finalize_passes(target_obj))

    @tvm.transform.module_pass(opt_level=0, name="scalpel_cpu")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = tvm.transform.Sequential(ours)(mod)
        with target_obj:
            return tvm.transform.Sequential(tvm_lowering)(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: TargetLike, plan: CompilePlan | None = None, *,
          out_dir: str | None = None, calibration: Any = None, inputs: Any = None) -> Any:
    """Compile a Relax module (from torch.export or ONNX) for ``target``; returns the executable.

    For a microcontroller ('cortex-m4') the result is a ``tvm_scalpel.micro.Project``: the int16 model as
    TVM-generated C + a driver + a Makefile in ``out_dir``, fixed-point scales from ``calibration``
    (float inputs [N, *input shape]); ``inputs`` are compiled into its QEMU harness.
    """
    spec = hardware_spec(target)
    if spec.hardware_class is HardwareClass.MCU:
        if out_dir is None or calibration is None:
            raise PlanError("tvm_scalpel.build for a microcontroller writes C sources to out_dir and quantises "
                            "to int16 with scales from calibration inputs; expected out_dir=... and "
                            f"calibration=[N, *input shape], found out_dir={out_dir!r}, calibration="
                            f"{None if calibration is None else 'given'}")
        from . import micro

        return micro.build(mod, target, out_dir, calibration, inputs=inputs, plan=plan or CompilePlan())
    tgt = spec.target
    if spec.hardware_class is HardwareClass.GPU:
        ensure_cuda_compiler()
        if tgt.host is None:
            tgt = tvm.target.Target(tgt, host={"kind": "llvm"})
        return tvm.compile(mod, tgt, relax_pipeline=pipeline(target, plan))
    # CPU: the Relax VM's main compiled to machine code (no bytecode interpreter). benchmarks/call_floor.py
    # (results/call_floor.json), batch 1: pruned LeNet-300-100 3.53-3.84 -> 2.84-3.40 us, a one-op model
    # 1.36-1.72 -> 1.13-1.36 us.
    # (CUDA stays on the bytecode VM: not measured on a GPU here.)
    return relax.build(mod, tgt, relax_pipeline=pipeline(target, plan), exec_mode="compiled")
