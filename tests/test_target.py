"""The hardware model: classes, lanes per dtype from ISA features, clear errors."""

import dataclasses
import json

import pytest
import tvm
from tvm.target import Target

from tvm_scalpel import HardwareClass, TargetError, hardware_spec
from tvm_scalpel.compat import system_cpu


@pytest.mark.parametrize(
    "target, cls, f32, i16, i8",
    [
        ({"kind": "llvm", "mcpu": "znver4"}, "cpu", 16, 32, 64),
        ({"kind": "llvm", "mcpu": "skylake-avx512"}, "cpu", 16, 32, 64),
        ({"kind": "llvm", "mcpu": "haswell"}, "cpu", 8, 16, 32),
        ({"kind": "llvm", "mcpu": "x86-64"}, "cpu", 4, 8, 16),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, "cpu", 4, 8, 16),
        ("cortex-m4", "mcu", 1, 2, 4),
        ("cortex-m55", "mcu", 4, 8, 16),
        ({"kind": "llvm", "mtriple": "thumbv7m-none-eabi", "mcpu": "cortex-m3"}, "mcu", 1, 1, 1),
        ("cuda", "gpu", 4, 8, 16),
    ],
)
def test_lanes_and_class(target, cls, f32, i16, i8):
    spec = hardware_spec(target)
    assert spec.hardware_class == HardwareClass(cls)
    assert (spec.lanes("float32"), spec.lanes("int16"), spec.lanes("int8")) == (f32, i16, i8)


def test_cuda_warp_and_threads_from_target_and_tag():
    for t in ("cuda", "nvidia/nvidia-h100", Target({"kind": "cuda", "arch": "sm_80"})):
        spec = hardware_spec(t)
        assert spec.hardware_class is HardwareClass.GPU
        assert spec.warp_size == 32 and spec.max_threads == 1024


def test_cpu_has_no_warp():
    spec = hardware_spec({"kind": "llvm", "mcpu": "haswell"})
    assert spec.warp_size is None and spec.max_threads is None


def test_host_resolves_to_real_cpu_not_generic():
    spec = hardware_spec("host")
    assert spec.cpu == system_cpu() and spec.cpu not in ("generic", "x86-64")
    assert spec.target.attrs["mcpu"] == spec.cpu
    # The host's lanes must match what LLVM says the CPU has, never the SSE fallback.
    has512 = tvm.target.codegen.llvm_cpu_has_features("avx512f", spec.target)
    has256 = tvm.target.codegen.llvm_cpu_has_features("avx2", spec.target)
    assert spec.lanes("float32") == (16 if has512 else 8 if has256 else 4)


def test_accepts_target_object_dict_tag_and_shorthand_consistently():
    d = {"kind": "llvm", "mcpu": "haswell"}
    assert hardware_spec(Target(d)).lanes() == hardware_spec(d).lanes() == 8


def test_spec_is_immutable_and_json_serialisable():
    spec = hardware_spec("cortex-m4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lanes_float32 = 8  # type: ignore[misc]
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["hardware_class"] == "mcu" and d["target"]["mcpu"] == "cortex-m4"
    assert hardware_spec(spec.target) == spec


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"kind": "llvm", "mcpu": "not-a-cpu"}, "unknown -mcpu 'not-a-cpu'"),
        ("definitely-not-a-target", "unknown target"),
        ("llvm -mcpu=znver4", "rejects option strings"),
        (42, "found int"),
        ({"kind": "opencl"}, "not supported"),
    ],
)
def test_bad_targets_raise_clear_errors(bad, fragment):
    with pytest.raises(TargetError, match=fragment.replace("(", r"\(").replace("'", "'")):
        hardware_spec(bad)


def test_unknown_dtype_is_an_error():
    with pytest.raises(TargetError, match="expected a dtype"):
        hardware_spec("cortex-m4").lanes("float64")
