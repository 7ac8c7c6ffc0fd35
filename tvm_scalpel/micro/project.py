"""The deployable microcontroller project: TVM-generated kernels, a generated C driver, weights in
flash, static activation buffers, and a Makefile for arm-none-eabi-gcc.

Files written to the build directory:
- ``kernels.c``  one TVM-generated kernel per layer (plain C, no TVM runtime);
- ``model.c/.h`` weights as ``const`` arrays, two ping-pong activation arenas (which also hold padded
  convs' zero-bordered inputs) and an im2col scratch (static, sized by the largest tensor each holds),
  and ``scalpel_model_run(input, output)``;
- ``main.c``, ``startup.c``  the QEMU harness: test inputs, the instruction-count markers
  ``cost_begin()``/``cost_end()`` around each inference, outputs printed over semihosting;
- ``Makefile``, ``README.md``.
Take ``kernels.c`` + ``model.c`` + ``model.h`` to a board; ``main.c``/``startup.c`` are for the emulator.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import formats
from ..errors import KernelError
from . import codegen, kernels
from .graph import LRN, AvgPool, Conv, Linear, MaxPool, Relu
from .quantize import QLayer, QuantizedModel


class Method(str, enum.Enum):
    DENSE = "dense"  # every weight, a SIMD MAC per group of w
    GROUP = "group"  # Scalpel SIMD-aware: one index per kept group of w
    CSR = "csr"  # traditional pruning, one index per weight


@dataclass(frozen=True)
class Board:
    """An emulated board: QEMU machine, compiler and linker flags, memory, and the SIMD MAC its kernels
    use (its width is the group width w; ``board_for`` checks it against ``hardware_spec``)."""

    name: str
    machine: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    memory_bytes: int  # where code, weights and buffers live (a program larger than this cannot load)
    simd: kernels.Simd
    stack_top: int  # initial stack pointer, the end of a RAM block

    @property
    def group_width(self) -> int:
        return self.simd.width


BOARDS = {
    # 4 MB SRAM at 0x0 holds everything.
    "cortex-m4": Board("cortex-m4", "mps2-an386",
                       ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                       ("-Wl,--section-start=.isr_vector=0x0",), 4 << 20, kernels.DSP, 0x00400000),
    # The vector table in the 512 KB ITCM at 0x0 (too small for LeNet-300-100's dense weights), code,
    # weights and buffers in the 2 MB SRAM at 0x01000000, the stack at the top of the 512 KB DTCM.
    "cortex-m55": Board("cortex-m55", "mps3-an547", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"),
                        ("-Wl,--section-start=.isr_vector=0x0", "-Wl,-Ttext=0x01000000"), 2 << 20, kernels.MVE,
                        0x20080000),
}

_C_TYPES = {"int16": "int16_t", "int32": "int32_t", "uint16": "uint16_t"}


@dataclass
class _Emitter:
    """Collects kernels, constant arrays and the driver's statements while walking the layers."""

    kernels: dict = field(default_factory=dict)
    arrays: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    weight_bytes: dict = field(default_factory=dict)

    def array(self, name: str, data: np.ndarray, dtype: str) -> str:
        flat = np.asarray(data).astype(dtype).reshape(-1)
        if flat.size == 0:
            flat = np.zeros(1, dtype)
        body = ",".join(str(int(v)) for v in flat)
        self.arrays.append(f"static const {_C_TYPES[dtype]} {name}[{flat.size}] = {{{body}}};")
        return name


def _groups(weight_q: np.ndarray, simd: kernels.Simd) -> tuple[np.ndarray, str]:
    """int16 [.., w·k] as the kernels' ``simd.dtype`` elements: on the DSP, int32 words with element 2j
    in the low half (little-endian, as SMLAD reads them); on MVE, int16 as they are."""
    weight_q = np.ascontiguousarray(weight_q, dtype="<i2")
    return (weight_q.view("<i4"), "int32") if simd.dtype == "int32" else (weight_q, "int16")


def _padded_shape(layer: Conv) -> tuple[int, int, int]:
    c, h, w = layer.in_shape
    return c, h + 2 * layer.pad, w + 2 * layer.pad


def _weighted(e: _Emitter, i: int, q: QLayer, method: Method, src: str, dst: str, scratch: str, padded: str,
              cfg: kernels.KernelConfig, simd: kernels.Simd) -> None:
    """A Linear or Conv layer from ``src`` to ``dst``. A conv unfolds its input into ``scratch``, first
    copying it into ``padded`` with a zero border when it has padding."""
    layer = q.layer
    O, Kp = q.weight.shape
    P = 1
    x = src
    if isinstance(layer, Conv):
        if layer.pad:
            e.kernels[f"l{i}_pad"] = kernels.pad(*layer.in_shape, layer.pad)
            e.calls.append(f"l{i}_pad((int16_t*){src}, (int16_t*){padded});")
            src = padded
        c, h, w = _padded_shape(layer)
        kh, kw = layer.weight.shape[2:]
        oh, ow = layer.out_hw
        P = oh * ow
        e.kernels[f"l{i}_im2col"] = kernels.im2col(c, h, w, kh, kw, layer.stride, oh, ow, Kp)
        e.calls.append(f"l{i}_im2col((int16_t*){src}, (int16_t*){scratch});")
        x = scratch
    if Kp % simd.width:
        raise KernelError(f"{layer.key}: the int16 weights have {Kp} columns, expected a multiple of the "
                          f"board's group width {simd.width} (quantize(..., align={simd.width}))")
    bias = e.array(f"l{i}_bias", q.bias, "int32")
    name = f"l{i}_{method.value}"
    ct = _C_TYPES[simd.dtype]
    if method is Method.DENSE:
        e.kernels[name] = kernels.dense(O, Kp // simd.width, P, q.shift, q.relu, cfg, simd)
        wts = e.array(f"l{i}_w", *_groups(q.weight, simd))
        e.calls.append(f"{name}(({ct}*){wts}, ({ct}*){x}, (int32_t*){bias}, (int16_t*){dst});")
        sizes = formats.SizeReport(values=q.weight.size * 2, indices=0, row_pointers=0)
    elif method is Method.GROUP:
        g = formats.encode(q.weight, simd.width)
        e.kernels[name] = kernels.group(O, Kp // simd.width, g.n_groups, P, q.shift, q.relu, cfg, simd)
        v = e.array(f"l{i}_vals", *_groups(g.values, simd))
        c_ = e.array(f"l{i}_cols", g.col_idx, "uint16")
        r = e.array(f"l{i}_rows", g.row_ptr, "int32")
        e.calls.append(f"{name}(({ct}*){v}, (uint16_t*){c_}, (int32_t*){r}, ({ct}*){x}, "
                       f"(int32_t*){bias}, (int16_t*){dst});")
        sizes = g.sizes(value_bytes=2, index_bytes=2)
        sizes = formats.SizeReport(sizes.values, sizes.indices, (O + 1) * 4)
    else:
        m = formats.encode_csr(q.weight)
        e.kernels[name] = kernels.csr(O, Kp, m.nnz, P, q.shift, q.relu, cfg)
        v = e.array(f"l{i}_vals", m.values, "int16")
        c_ = e.array(f"l{i}_cols", m.col_idx, "uint16")
        r = e.array(f"l{i}_rows", m.row_ptr, "int32")
        e.calls.append(f"{name}((int16_t*){v}, (uint16_t*){c_}, (int32_t*){r}, (int16_t*){x}, "
                       f"(int32_t*){bias}, (int16_t*){dst});")
        sizes = formats.SizeReport(values=m.nnz * 2, indices=m.nnz * 2, row_pointers=(O + 1) * 4)
    e.weight_bytes[f"l{i}:{layer.key}"] = {"method": method.value, "values": sizes.values,
                                           "indices": sizes.indices, "row_pointers": sizes.row_pointers,
                                           "bias": O * 4}


@dataclass(frozen=True)
class Project:
    """A generated build directory and what it holds."""

    path: Path
    board: Board
    model: QuantizedModel
    methods: tuple[str, ...]
    weight_bytes: Mapping[str, Mapping[str, int]]
    activation_bytes: int
    inputs: np.ndarray  # int16 [N, *in_shape] compiled into main.c
    config: kernels.KernelConfig = kernels.KernelConfig()
    decisions: tuple[str, ...] = ()  # why each layer got its kernel, when they were measured

    @property
    def elf(self) -> Path:
        return self.path / "model.elf"


def _numel(shape) -> int:
    return int(np.prod(shape))


def generate(model: QuantizedModel, board: Board, methods: Mapping[str, Method] | Method, out_dir: Path,
             inputs: np.ndarray, cfg: kernels.KernelConfig = kernels.KernelConfig()) -> Project:
    """Write the project for ``model``; ``methods`` per layer key (or one for all weighted layers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    e = _Emitter()
    n_out = _numel(model.graph.out_shape)
    arenas = [0, 0]
    scratch = max((_numel((*q.layer.out_hw, q.weight.shape[1])) for q in model.layers if isinstance(q.layer, Conv)),
                  default=0)  # im2col patches: OH·OW rows of Kp
    src, used = "input", []
    last = len(model.layers) - 1
    for i, q in enumerate(model.layers):
        layer = q.layer
        if isinstance(layer, Relu):  # in place
            e.kernels[f"l{i}_relu"] = kernels.relu(_numel(layer.in_shape))
            e.calls.append(f"l{i}_relu((int16_t*){src});")
            used.append("relu")
            continue
        a = 0 if src != "arena0" else 1
        dst = "output" if i == last else f"arena{a}"
        if i != last:
            arenas[a] = max(arenas[a], _numel(layer.out_shape))
        if isinstance(layer, Linear) and src.startswith("arena"):  # it reads its input up to Kp (zero weights)
            arenas[int(src[-1])] = max(arenas[int(src[-1])], q.weight.shape[1])
        if isinstance(layer, (Linear, Conv)):
            method = methods if isinstance(methods, Method) else Method(methods.get(layer.key, Method.GROUP))
            # A padded conv's zero-bordered input lives in the arena that does not hold its input (its
            # output arena, unless it writes the model's output): im2col is done with it before the
            # layer writes its output.
            if isinstance(layer, Conv) and layer.pad:
                arenas[a] = max(arenas[a], _numel(_padded_shape(layer)))
            _weighted(e, i, q, method, src, dst, "scratch", f"arena{a}", cfg, board.simd)
            used.append(method.value)
        elif isinstance(layer, (MaxPool, AvgPool)):
            c, h, w = layer.in_shape
            _, oh, ow = layer.out_shape
            kind = "maxpool" if isinstance(layer, MaxPool) else "avgpool"
            make = kernels.max_pool if isinstance(layer, MaxPool) else kernels.avg_pool
            e.kernels[f"l{i}_{kind}"] = make(c, h, w, layer.size, layer.stride, oh, ow, layer.relu)
            e.calls.append(f"l{i}_{kind}((int16_t*){src}, (int16_t*){dst});")
            used.append(kind)
        elif isinstance(layer, LRN):
            c, h, w = layer.in_shape
            e.kernels[f"l{i}_lrn"] = kernels.lrn(c, h, w, layer.size, q.sq_shift, q.lut_shift, len(q.lut))
            lut = e.array(f"l{i}_lut", q.lut, "uint16")
            e.calls.append(f"l{i}_lrn((int16_t*){src}, (uint16_t*){lut}, (int16_t*){dst});")
            used.append("lrn")
        src = dst
    if src != "output":
        raise KernelError("microcontroller path: the model must end with a layer that writes the output")
    words = [(n + 1) // 2 for n in (*arenas, scratch)]
    (out_dir / "kernels.c").write_text(codegen.to_c(e.kernels))
    (out_dir / "model.h").write_text(_model_h(model, n_out))
    (out_dir / "model.c").write_text(_model_c(e, words))
    (out_dir / "main.c").write_text(_main_c(inputs, n_out))
    (out_dir / "startup.c").write_text(STARTUP_C.replace("STACK_TOP", f"0x{board.stack_top:08x}"))
    (out_dir / "Makefile").write_text(_makefile(board))
    (out_dir / "README.md").write_text(README.format(board=board.name, machine=board.machine))
    meta = {"board": board.name, "layers": used, "kernel_config": vars(cfg), "frac_in": model.frac_in,
            "frac_out": model.frac_out, "weight_bytes": e.weight_bytes, "activation_bytes": 4 * sum(words)}
    (out_dir / "project.json").write_text(json.dumps(meta, indent=1))
    return Project(out_dir, board, model, tuple(used), e.weight_bytes, 4 * sum(words), inputs, cfg)


def _model_h(model: QuantizedModel, n_out: int) -> str:
    n_in = _numel(model.graph.in_shape)
    return f"""\
/* Generated by tvm_scalpel. int16 fixed point: input = round(x * 2^{model.frac_in}),
 * output = value * 2^-{model.frac_out}. */
#ifndef SCALPEL_MODEL_H
#define SCALPEL_MODEL_H
#include <stdint.h>
#define SCALPEL_INPUT_SIZE {n_in}
#define SCALPEL_OUTPUT_SIZE {n_out}
#define SCALPEL_INPUT_FRAC {model.frac_in}
#define SCALPEL_OUTPUT_FRAC {model.frac_out}
/* One inference. input: SCALPEL_INPUT_SIZE int16 (CHW), 4-byte aligned; output: SCALPEL_OUTPUT_SIZE. */
void scalpel_model_run(const int16_t *input, int16_t *output);
#endif
"""


def _model_c(e: _Emitter, words: list[int]) -> str:
    protos = "\n".join(_prototype(name, f) for name, f in e.kernels.items())
    buffers = "\n".join(f"static int32_t {n}[{max(w, 1)}];" for n, w in zip(("arena0", "arena1", "scratch"), words))
    calls = "\n  ".join(e.calls)
    return f"""\
/* Generated by tvm_scalpel: weights in flash, static activation buffers, layers in order. */
#include "model.h"

{protos}

{chr(10).join(e.arrays)}

/* Activations ping-pong between two arenas; convolutions unfold their input into the scratch (a padded
   one first copies it, zero-bordered, into the arena that does not hold its input). */
{buffers}

void scalpel_model_run(const int16_t *input, int16_t *output) {{
  {calls}
}}
"""


def _prototype(name: str, func) -> str:
    params = ", ".join(f"{_C_TYPES[str(p.ty.element_type.dtype)]}*" for p in func.params)
    return f"void {name}({params});"


def _main_c(inputs: np.ndarray, n_out: int) -> str:
    n, size = inputs.shape[0], _numel(inputs.shape[1:])
    rows = ",\n".join("{" + ",".join(str(int(v)) for v in x.reshape(-1)) + "}" for x in inputs)
    return f"""\
/* QEMU harness: runs each compiled-in input, counts instructions between the markers, prints outputs. */
#include <stdio.h>
#include "model.h"

__attribute__((noinline)) void cost_begin(void) {{ __asm volatile(""); }}
__attribute__((noinline)) void cost_end(void) {{ __asm volatile(""); }}

static const int16_t inputs[{n}][{size}] __attribute__((aligned(4))) = {{
{rows}
}};
static int16_t output[{n_out}] __attribute__((aligned(4)));

int main(void) {{
  for (int n = 0; n < {n}; n++) {{
    cost_begin();
    scalpel_model_run(inputs[n], output);
    cost_end();
    printf("out %d:", n);
    for (int i = 0; i < SCALPEL_OUTPUT_SIZE; i++) printf(" %d", output[i]);
    printf("\\n");
  }}
  return 0;
}}
"""


STARTUP_C = """\
/* Minimal Cortex-M start-up for QEMU: vector table (initial SP, reset), FPU on, then newlib's _start. */
#include <stdint.h>
extern void _start(void);
static void reset_handler(void) {
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: CP10/CP11 full access */
  __asm volatile("dsb\\n isb");
  _start();
}
__attribute__((section(".isr_vector"), used)) const void *vector_table[2] = {(void *)STACK_TOP,
                                                                            (void *)reset_handler};
"""


def _makefile(board: Board) -> str:
    return f"""\
# Generated by tvm_scalpel for {board.name} (QEMU machine {board.machine}).
CC = arm-none-eabi-gcc
SIZE = arm-none-eabi-size
CFLAGS = -O2 -funroll-loops -std=c11 -Wall -Wno-unused-variable -ffunction-sections -fdata-sections {' '.join(board.cflags)}
LDFLAGS = --specs=rdimon.specs {' '.join(board.ldflags)}

model.elf: startup.o main.o model.o kernels.o
\t$(CC) $(CFLAGS) $^ $(LDFLAGS) -o $@

%.o: %.c model.h
\t$(CC) $(CFLAGS) -c $< -o $@

size: model.o kernels.o
\t$(SIZE) -A model.o kernels.o

run: model.elf
\tqemu-system-arm -M {board.machine} -nographic -semihosting -kernel model.elf

clean:
\trm -f *.o model.elf
"""


README = """\
# Generated by tvm_scalpel for {board}

- `kernels.c`: the layer kernels, generated by TVM's C code generator (plain C, no TVM runtime).
- `model.c`, `model.h`: weights (`const`, in flash), static activation buffers, `scalpel_model_run()`.
- `main.c`, `startup.c`: a harness for QEMU (`make run`, machine {machine}); replace them on a board.

Build: `make` (arm-none-eabi-gcc); `make size` prints the model's flash (text) and RAM (bss) bytes.
"""
