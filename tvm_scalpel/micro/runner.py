"""Build a generated project with arm-none-eabi-gcc, run it on QEMU, read outputs and instruction counts.

Instructions executed between ``cost_begin()`` and ``cost_end()`` are counted by a small QEMU TCG plugin
(``qemu_plugin/insn_count.c``) built from source with the host's gcc on first use. TCG executes the same
guest instructions whatever the host is doing, so counts are deterministic. They are instructions, not
cycles (loads take 1–2 cycles on an M4).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ScalpelError
from .project import Project

INSTALL = ("apt-get install -y --no-install-recommends gcc-arm-none-eabi libnewlib-arm-none-eabi "
           "qemu-system-arm")
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-nm", "arm-none-eabi-size", "qemu-system-arm", "make", "gcc")
PLUGIN_DIR = Path(__file__).parent / "qemu_plugin"


class ToolchainMissing(ScalpelError, RuntimeError):
    """The ARM toolchain or QEMU is not installed."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def check_toolchain() -> None:
    missing = missing_tools()
    if missing:
        raise ToolchainMissing(f"the microcontroller path needs {', '.join(missing)}; install with: {INSTALL}")


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise ScalpelError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
    return p.stdout


def plugin_path() -> Path:
    """The instruction-count plugin, compiled once per source version into the user cache."""
    src = PLUGIN_DIR / "insn_count.c"
    digest = hashlib.sha256(src.read_bytes() + (PLUGIN_DIR / "qemu_plugin_api.h").read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvm_scalpel"
    so = cache / f"insn_count-{digest}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        _run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", f"-I{PLUGIN_DIR}", str(src), "-o", str(tmp)])
        tmp.replace(so)
    return so


@dataclass(frozen=True)
class RunResult:
    outputs: np.ndarray  # int16 [N, n_out]
    instructions: tuple[int, ...]  # per inference
    flash_bytes: int  # model.o + kernels.o: code and const data
    ram_bytes: int  # model.o + kernels.o: static buffers


def _section_sizes(project: Project) -> tuple[int, int]:
    out = _run(["arm-none-eabi-size", "-A", "model.o", "kernels.o"], cwd=project.path)
    flash = ram = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        name, size = parts[0], int(parts[1])
        if name.startswith((".text", ".rodata")):
            flash += size
        elif name.startswith((".bss", ".data")):
            ram += size
            if name.startswith(".data"):
                flash += size  # initial values live in flash too
    return flash, ram


def _symbols(project: Project, *names: str) -> list[str]:
    """Addresses (hex) of ``names`` in the ELF, from one nm call."""
    out = _run(["arm-none-eabi-nm", str(project.elf)])
    found = []
    for name in names:
        m = re.search(rf"^([0-9a-f]+) [Tt] {name}$", out, re.MULTILINE)
        if not m:
            raise ScalpelError(f"{project.elf}: no symbol {name}")
        found.append(m.group(1))
    return found


def build_and_run(project: Project, timeout: float = 600) -> RunResult:
    """make, then one QEMU run of every compiled-in input."""
    check_toolchain()
    _run(["make", "-s", "model.elf"], cwd=project.path, timeout=timeout)
    flash, ram = _section_sizes(project)
    counts = project.path / "instructions.txt"
    begin, end = _symbols(project, "cost_begin", "cost_end")
    plugin = f"{plugin_path()},begin=0x{begin},end=0x{end},out={counts}"
    stdout = _run(["qemu-system-arm", "-M", project.board.machine, "-nographic", "-semihosting",
                   "-kernel", str(project.elf), "-plugin", plugin], cwd=project.path, timeout=timeout)
    rows = [line.split(":", 1)[1].split() for line in stdout.splitlines() if line.startswith("out ")]
    n = project.inputs.shape[0]
    if len(rows) != n:
        raise ScalpelError(f"QEMU printed {len(rows)} outputs, expected {n}:\n{stdout[-2000:]}")
    outputs = np.array(rows, dtype=np.int64).astype(np.int16)
    instructions = tuple(int(v) for v in counts.read_text().split())
    if len(instructions) != n:
        raise ScalpelError(f"the instruction counter recorded {len(instructions)} inferences, expected {n}")
    return RunResult(outputs, instructions, flash, ram)
