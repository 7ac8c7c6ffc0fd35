"""The one place that turns a TVM target into hardware facts: class, SIMD lanes per dtype, warp size.

Lanes come from the target's ISA features (``llvm_cpu_has_features`` and the ``feature.*`` attrs TVM
attaches to ARM targets), never from ``llvm_get_vector_width``, which is a fixed table (512 bits for
every x86 CPU).
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

from tvm.target import Target, codegen

from .errors import TargetError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "int16", "int8")


class HardwareClass(str, enum.Enum):
    """Scalpel's three levels of hardware parallelism."""

    MCU = "mcu"
    CPU = "cpu"
    GPU = "gpu"


# Register width in bits of each SIMD ISA we know, and the dtypes it computes on.
_SIMD_BITS = {"avx512": 512, "avx2": 256, "avx": 256, "sse": 128, "neon": 128, "mve": 128}

# The smallest memory transaction of an NVIDIA GPU: one 32-byte sector. A pruning tile spans one sector
# of each weight row along K, so skipping a tile skips whole transactions.
_GPU_SECTOR_BYTES = 32

# Shorthands accepted by hardware_spec() besides tags and Target objects.
SHORTHANDS: dict[str, dict[str, Any]] = {
    "cortex-m4": {
        "kind": "llvm", "mtriple": "thumbv7em-none-eabi", "mcpu": "cortex-m4", "mfloat-abi": "hard",
    },
    "cortex-m55": {
        "kind": "llvm", "mtriple": "thumbv8.1m.main-none-eabi", "mcpu": "cortex-m55",
        "mfloat-abi": "hard",
    },
    "cuda": {"kind": "cuda", "arch": "sm_90"},
}

TargetLike = Union[str, Mapping[str, Any], Target]


@dataclass(frozen=True)
class HardwareSpec:
    """Immutable hardware facts derived from one target.

    ``lanes_*`` is how many elements of that dtype one SIMD instruction processes: the group width of
    SIMD-aware pruning. For CUDA it is the elements in one thread's 128-bit vector load; the SIMT
    width is ``warp_size``.

    ``tile_rows`` × ``tile_k`` (GPU only) is the unit of GPU-aware fine-grain pruning: the fp32 weight
    tile one thread block of our tiled kernels (``schedules.cuda``) loads per reduction step: one warp
    width of output rows × one 32-byte sector along K. A pruned tile is a skipped step.
    """

    target_json: str
    hardware_class: HardwareClass
    cpu: str
    isa: str
    lanes_float32: int
    lanes_int16: int
    lanes_int8: int
    num_cores: int = 1
    warp_size: int | None = None
    max_threads: int | None = None
    tile_rows: int | None = None
    tile_k: int | None = None

    @property
    def tile(self) -> tuple[int, int]:
        """(rows, k) of the GPU pruning tile; a TargetError for targets without one."""
        if self.tile_rows is None or self.tile_k is None:
            raise TargetError(f"tile: GPU-aware tile pruning needs a CUDA target, found a "
                              f"{self.hardware_class.value} ({self.cpu})")
        return self.tile_rows, self.tile_k

    @property
    def target(self) -> Target:
        """The TVM target these facts were derived from."""
        return Target(json.loads(self.target_json))

    def lanes(self, dtype: str = "float32") -> int:
        """SIMD lanes for ``dtype``; the group width ``w`` of SIMD-aware pruning."""
        if dtype not in DTYPES:
            raise TargetError(f"lanes: expected a dtype in {DTYPES}, found {dtype!r}")
        return getattr(self, f"lanes_{dtype}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hardware_class"] = self.hardware_class.value
        d["target"] = json.loads(self.target_json)
        del d["target_json"]
        return d


def host_target() -> Target:
    """The host CPU as an llvm target with its real ``-mcpu`` (never generic x86-64/SSE)."""
    cpu = codegen.llvm_get_system_cpu()
    probe = Target({"kind": "llvm"})
    if not cpu or cpu == "generic" or cpu not in codegen.llvm_get_cpu_archlist(probe):
        raise TargetError(
            f"'host': LLVM does not recognise this machine's CPU (llvm_get_system_cpu() = {cpu!r}); "
            "pass an explicit target such as {'kind': 'llvm', 'mcpu': 'skylake-avx512'}"
        )
    return Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})


def as_target(target: TargetLike) -> Target:
    """Turn a Target, a target dict, a TVM tag or a shorthand into a ``tvm.target.Target``."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target == "host":
            return host_target()
        if target in SHORTHANDS:
            return Target(SHORTHANDS[target])
        if " " in target:
            raise TargetError(
                f"target string {target!r}: TVM 0.27 rejects option strings; expected a dict such as "
                "{'kind': 'llvm', 'mcpu': 'znver4'}, a tag, or one of "
                f"{['host', *SHORTHANDS]}"
            )
    elif not isinstance(target, Mapping):
        raise TargetError(
            f"expected a tvm.target.Target, a target dict, a tag or a shorthand, found {type(target).__name__}"
        )
    try:
        return Target(dict(target) if isinstance(target, Mapping) else target)
    except (ValueError, RuntimeError) as err:
        raise TargetError(
            f"unknown target {target!r}: expected a TVM target dict, a TVM tag "
            f"(tvm.target.tag.list_tags()), or one of {['host', *SHORTHANDS]} ({err})"
        ) from None


def _is_m_profile(t: Target) -> bool:
    triple = str(t.attrs.get("mtriple", ""))
    cpu = str(t.attrs.get("mcpu", ""))
    return cpu.startswith("cortex-m") or triple.startswith(("thumbv6m", "thumbv7m", "thumbv7em", "thumbv8"))


def _check_llvm_cpu(t: Target) -> str:
    cpu = str(t.attrs.get("mcpu", ""))
    if cpu and cpu not in codegen.llvm_get_cpu_archlist(t):
        raise TargetError(
            f"unknown -mcpu {cpu!r} for triple {t.attrs.get('mtriple', 'host')!r}: LLVM would silently "
            "build generic code; expected a CPU that LLVM knows, e.g. 'znver4', 'skylake-avx512', 'haswell'"
        )
    return cpu or "generic"


def _x86_isa(t: Target) -> str:
    for isa, feature in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if codegen.llvm_cpu_has_features(feature, t):
            return isa
    return "sse"


def _lanes_for(bits: int, int_bits: int | None = None) -> tuple[int, int, int]:
    """fp32, int16, int8 lanes for a register of ``bits`` (``int_bits`` for integer ops if narrower)."""
    ib = int_bits or bits
    return bits // 32, ib // 16, ib // 8


def _mcu_spec(t: Target, cpu: str) -> tuple[str, tuple[int, int, int]]:
    if bool(t.attrs.get("feature.has_mve", False)):
        return "mve", _lanes_for(_SIMD_BITS["mve"])
    if bool(t.attrs.get("feature.has_dsp", False)):
        # The DSP extension packs two int16 (SMLAD) or four int8 in one 32-bit register; fp32 is scalar.
        return "dsp", (1, 2, 4)
    return "scalar", (1, 1, 1)


def hardware_spec(target: TargetLike) -> HardwareSpec:
    """Hardware facts for ``target`` (a Target, target dict, TVM tag, or 'host'/'cuda'/'cortex-m4'/'cortex-m55')."""
    t = as_target(target)
    kind = t.kind.name
    cores = int(t.attrs.get("num-cores", 0) or os.cpu_count() or 1)
    if kind == "cuda":
        return HardwareSpec(
            target_json=json.dumps(dict(_target_dict(t))),
            hardware_class=HardwareClass.GPU,
            cpu=str(t.attrs.get("arch", "cuda")),
            isa="cuda",
            lanes_float32=4, lanes_int16=8, lanes_int8=16,
            num_cores=1,
            warp_size=int(t.attrs["thread_warp_size"]),
            max_threads=int(t.attrs["max_num_threads"]),
            tile_rows=int(t.attrs["thread_warp_size"]),
            tile_k=_GPU_SECTOR_BYTES // 4,
        )
    if kind not in ("llvm", "c"):
        raise TargetError(
            f"target kind {kind!r} is not supported; expected 'llvm' (CPU or Cortex-M), 'c' (Cortex-M) or 'cuda'"
        )
    if kind == "c" or _is_m_profile(t):
        cpu = str(t.attrs.get("mcpu", "")) or "generic"
        if kind == "llvm":
            cpu = _check_llvm_cpu(t)
        isa, (f32, i16, i8) = _mcu_spec(t, cpu)
        hw = HardwareClass.MCU
        cores = 1
    else:
        cpu = _check_llvm_cpu(t)
        if bool(t.attrs.get("feature.is_aarch64", False)) or bool(t.attrs.get("feature.has_asimd", False)):
            isa = "neon"
            f32, i16, i8 = _lanes_for(_SIMD_BITS["neon"])
        else:
            isa = _x86_isa(t)
            int_bits = _SIMD_BITS[isa]
            if isa == "avx512" and not codegen.llvm_cpu_has_features("avx512bw", t):
                int_bits = 256  # 16/8-bit ops at 512 bits need AVX-512BW
            elif isa == "avx":
                int_bits = 128  # AVX1 has no 256-bit integer ops
            f32, i16, i8 = _lanes_for(_SIMD_BITS[isa], int_bits)
        hw = HardwareClass.CPU
    logger.debug("hardware_spec(%s): %s %s isa=%s lanes=%d/%d/%d", t, hw.value, cpu, isa, f32, i16, i8)
    return HardwareSpec(
        target_json=json.dumps(_target_dict(t)),
        hardware_class=hw, cpu=cpu, isa=isa,
        lanes_float32=f32, lanes_int16=i16, lanes_int8=i8, num_cores=cores,
    )


def _target_dict(t: Target) -> dict[str, Any]:
    d = json.loads(str(t)) if str(t).startswith("{") else {"kind": t.kind.name}
    d.pop("tag", None)
    d.pop("keys", None)
    if t.host is not None and "host" not in d:
        d["host"] = {"kind": t.host.kind.name}
    return d
