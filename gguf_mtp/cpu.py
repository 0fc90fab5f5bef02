"""What this CPU can do for llama.cpp, and whether its AMX path is safe to use in this process.

Why this exists (../shared/notes/cpu.md, docs/runtime-build.md): on Intel CPUs with AMX, llama.cpp's CPU backend
puts quantized weights into its AMX extra buffer type. GCC 12 miscompiles ggml's tile configuration
(``ggml_tile_config_init``: ``_tile_loadconfig`` is declared as reading 8 bytes, so the ``rows`` / ``colsb`` stores
are dropped as dead) and the first batched matrix multiplication dies at ``ldtilecfg``. Our runtime build fixes it
(patch ``amx-tile-config``); for any other build we look at the machine code before loading and load without the
CPU's extra buffer types when the tile configuration is broken.

Standard library only: ``runtime_build.py`` (loaded by path before gguf-mtp is installed) keys its wheel cache on
:func:`cpu_flags`.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

# Linux x86-64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) before any tile-data instruction
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18

# ldtilecfg m512: VEX.128.NP.0F38.W0 49 /0 (C4 E2 78 49, ModRM.reg = 0)
LDTILECFG = b"\xc4\xe2\x78\x49"
# tile_config_t: palette_id at +0, colsb[16] (u16) at +16, rows[16] (u8) at +48
COLSB_OFFSET, ROWS_OFFSET = 16, 48


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The kernel's CPU flags (``/proc/cpuinfo``, first processor); empty where there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    m = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


def reports_amx(flags: Iterable[str]) -> bool:
    """Does the CPU (as the kernel reports it) have AMX integer tiles, the ones llama.cpp's kernels use?"""
    f = set(flags)
    return {"amx_tile", "amx_int8"} <= f


def request_tile_permission() -> bool | None:
    """Ask Linux for AMX tile-data state in this process, as ggml does before it offers its AMX buffer type.

    True: granted (tile instructions can run); False: refused (the OS or hypervisor has not enabled tile state);
    None: not a Linux x86-64 process, where the question does not arise.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                        ctypes.c_long(XFEATURE_XTILEDATA)) == 0


# --- the tile configuration in machine code ----------------------------------------------------------

_INSN = re.compile(r"^\s*[0-9a-f]+:\s+(?P<mnem>[a-z][a-z0-9.]*)\s*(?P<ops>[^#<]*)")
_MEM = re.compile(r"^(?P<disp>-?(?:0x[0-9a-f]+|\d+))?\((?P<base>%[a-z0-9]+)\)$")


def _mem(operand: str) -> tuple[int, str] | None:
    m = _MEM.match(operand.strip())
    if not m:
        return None
    return int(m.group("disp") or "0", 0), m.group("base")


def _split_ops(ops: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in ops.strip():
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts


def tile_config_checks(disassembly: str, window: int = 64) -> list[bool]:
    """For every ``ldtilecfg`` in ``objdump -d`` output (AT&T syntax): are the configuration's ``colsb`` and
    ``rows`` fields stored before it, in the instructions that lead up to it within its function?

    A correct ``ggml_tile_config_init`` writes palette_id (+0), colsb (+16) and rows (+48) of the 64-byte block
    that ``ldtilecfg`` reads; the GCC 12 miscompilation keeps only the zeroing and the palette store.
    """
    results: list[bool] = []
    recent: deque[tuple[str, list[str]]] = deque(maxlen=window)
    for line in disassembly.splitlines():
        if line.endswith(">:"):  # a new function
            recent.clear()
            continue
        m = _INSN.match(line)
        if not m:
            continue
        mnem, ops = m.group("mnem"), _split_ops(m.group("ops"))
        if mnem == "ldtilecfg" and ops:
            where = _mem(ops[0])
            if where is None:
                results.append(False)
                continue
            disp, base = where
            stored = {_mem(o[-1]) for mn, o in recent if mn.startswith(("mov", "vmov")) and o}
            results.append((disp + COLSB_OFFSET, base) in stored and (disp + ROWS_OFFSET, base) in stored)
        recent.append((mnem, ops))
    return results


def objdump() -> str | None:
    return shutil.which("objdump")


def disassemble(path: Path) -> str:
    tool = objdump()
    if tool is None:
        raise FileNotFoundError("objdump (binutils) is needed to read machine code")
    r = subprocess.run([tool, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"objdump failed on {path}: {r.stderr.strip()[:200]}")
    return r.stdout


@functools.lru_cache(maxsize=8)
def _library_tile_config(path: str, _stamp: tuple[int, int]) -> str:
    data = Path(path).read_bytes()
    if LDTILECFG not in data:
        return "absent"
    if objdump() is None:
        return "unknown"
    checks = tile_config_checks(disassemble(Path(path)))
    if not checks:
        return "absent"
    return "ok" if all(checks) else "broken"


def library_tile_config(path: Path) -> str:
    """``absent`` (no AMX code compiled in), ``ok``, ``broken`` (the GCC 12 miscompilation) or ``unknown``
    (AMX code present, no objdump to read it). Cached per file version."""
    st = path.stat()
    return _library_tile_config(str(path), (st.st_size, st.st_mtime_ns))


# --- llama.cpp's view ----------------------------------------------------------------------------------

def parse_system_info(text: str) -> dict[str, bool]:
    """``llama_print_system_info()`` -> {feature: on}, CPU section ("CPU : SSE3 = 1 | AVX = 1 | ...")."""
    out: dict[str, bool] = {}
    for name, value in re.findall(r"([A-Z][A-Z0-9_]*)\s*=\s*(\d+)", text):
        out.setdefault(name, value != "0")
    return out


@dataclass
class AmxStatus:
    """Can llama.cpp's AMX path run in this process? Every input of the answer, for ``runtime info``."""

    cpu_reports_amx: bool
    tile_permission: bool | None  # None: not asked (no AMX, or not Linux x86-64)
    library_amx: str  # absent | ok | broken | unknown (see library_tile_config)
    patched: bool  # the runtime carries our amx-tile-config patch

    @property
    def offered(self) -> bool:
        """llama.cpp offers its AMX buffer type here: AMX CPU, tile state granted, AMX kernels compiled in."""
        return self.cpu_reports_amx and self.tile_permission is not False and self.library_amx != "absent"

    @property
    def correct(self) -> bool:
        """The AMX kernels configure their tiles correctly: our patch, or machine code that keeps the stores."""
        return self.patched or self.library_amx == "ok"

    @property
    def usable(self) -> bool:
        """AMX kernels will run, and run correctly."""
        return self.offered and self.correct

    @property
    def extra_bufts_safe(self) -> bool:
        """May models load with llama.cpp's CPU extra buffer types (AMX, CPU_REPACK)? False only where the AMX
        buffer type would be offered and its kernels would crash."""
        return not self.offered or self.correct

    def to_dict(self) -> dict:
        return {**asdict(self), "usable": self.usable, "extra_bufts_safe": self.extra_bufts_safe}


def amx_status(library: Path | None, patched: bool, flags: Iterable[str] | None = None) -> AmxStatus:
    """Decide from the CPU report, the OS permission and the library's machine code (``library``: the CPU
    backend, libggml-cpu; None where it cannot be found)."""
    has = reports_amx(cpu_flags() if flags is None else flags)
    if not has:
        return AmxStatus(False, None, "absent" if library is None else library_tile_config(library), patched)
    lib_state = library_tile_config(library) if library is not None else "unknown"
    return AmxStatus(True, request_tile_permission(), lib_state, patched)


KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")


def kernel_flags(flags: Iterable[str]) -> list[str]:
    """The kernel's CPU flags that select llama.cpp's CPU kernels, in a fixed order."""
    f = set(flags)
    return [k for k in KERNEL_FLAGS if k in f]
