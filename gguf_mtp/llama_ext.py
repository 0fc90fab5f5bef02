"""Small generic helpers over llama-cpp-python's ctypes bindings, shared by the runtime, the quantizer and the probe.

``LLAMA_LOG``: llama.cpp reports what it did (layer placement, flash attention, KV sizes, quantizer tensor lines)
and why it failed ("failed to quantize: ...") only through its process-global log callback. One sink receives
every line for the life of the process: it joins the fragments llama.cpp emits into lines, sends them to the
``gguf_mtp.llama`` Python logger at DEBUG (the CLI's ``-v``), and hands them to the active ``capture()`` blocks,
so errors can quote them, tests can prove a setting arrived, and a progress bar can follow a long C call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger("gguf_mtp.llama")

# enum ggml_log_level (ggml/include/ggml.h); CONT continues the previous fragment's line
LEVEL_NAMES = {1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR"}
LEVEL_CONT = 5


@dataclass(frozen=True)
class LogLine:
    level: str  # DEBUG / INFO / WARN / ERROR
    text: str

    def __str__(self) -> str:
        return self.text


class LlamaLog:
    """The process' llama.cpp / ggml log sink. A line takes the level of its first fragment."""

    def __init__(self) -> None:
        self._captures: list[tuple[list[LogLine], Callable[[LogLine], None] | None]] = []
        self._partial = ""
        self._level = 2
        self._lock = threading.Lock()
        self._callback = None

    @property
    def callback(self):
        """The ctypes callback (created once: it must outlive every C library that was given it)."""
        if self._callback is None:
            import llama_cpp.llama_cpp as lib

            self._callback = lib.llama_log_callback(self._on_log)
        return self._callback

    def install(self) -> None:
        import llama_cpp.llama_cpp as lib

        lib.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        try:  # an exception must never cross into C
            with self._lock:
                if not self._partial and level != LEVEL_CONT:
                    self._level = level
                self._partial += text.decode("utf-8", errors="replace") if text else ""
                while "\n" in self._partial:
                    line, self._partial = self._partial.split("\n", 1)
                    self._emit(LogLine(LEVEL_NAMES.get(self._level, "INFO"), line))
        except Exception:  # noqa: BLE001
            pass

    def _emit(self, line: LogLine) -> None:
        log.debug("%s", line.text)
        for lines, on_line in self._captures:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    @contextlib.contextmanager
    def capture(self, on_line: Callable[[LogLine], None] | None = None) -> Iterator[list[LogLine]]:
        """The lines llama.cpp logs inside the block; ``on_line`` is called as each arrives (re-installs the
        sink first: llama-cpp-python's ``Llama`` class replaces the global callback with its own)."""
        self.install()
        entry: tuple[list[LogLine], Callable[[LogLine], None] | None] = ([], on_line)
        with self._lock:
            self._captures.append(entry)
        try:
            yield entry[0]
        finally:
            with self._lock:
                self._captures.remove(entry)


LLAMA_LOG = LlamaLog()
_init_lock = threading.Lock()
_initialized = False


def llama() -> object:
    """The ``llama_cpp.llama_cpp`` bindings, with our log sink installed and the backend initialised once per
    process (imported lazily: ~0.1 s)."""
    import llama_cpp.llama_cpp as lib

    global _initialized
    with _init_lock:
        if not _initialized:
            LLAMA_LOG.install()
            lib.llama_backend_init()
            _initialized = True
    return lib


def ggml_fn(name: str, restype, argtypes: list):
    """A ggml C function, typed, looked up through libllama's handle: that resolves ggml's symbols in the copies
    llama.cpp itself uses. (The wheel ships libggml-base.so and .so.0 as two files: opening one by name maps a second
    copy, with its own device registry and abort callback, that llama.cpp never calls.)"""
    import llama_cpp.llama_cpp as lib

    f = getattr(lib._lib, name)
    f.restype, f.argtypes = restype, argtypes
    return f


# --- loading models: the CPU's extra buffer types -------------------------------------------------------

_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=")

@functools.cache
def cpu_amx():  # -> cpu.AmxStatus
    """The AMX facts of this process: the CPU's report, the OS permission, the loaded CPU backend's machine code
    and whether it carries our fix (runtime_build.AMX_TILE_CONFIG). Decided once per process."""
    from . import runtime_build

    llama()
    return runtime_build.loaded_amx_status()


@functools.cache
def extra_bufts_allowed() -> bool:
    """May models load with llama.cpp's CPU extra buffer types (AMX, CPU_REPACK) in this process?

    No only where the CPU offers AMX and the loaded CPU backend's AMX kernels carry the GCC 12 tile-configuration
    miscompilation (a stock build; ours is patched): then every batched decode would crash, so models load without
    the extra buffer types (slower CPU matmuls, never a crash), and stderr says so once.
    """
    safe = cpu_amx().extra_bufts_safe
    if not safe:
        print("gguf-mtp: warning: this llama.cpp build's AMX kernels are miscompiled (GCC 12 drops the tile "
              "configuration; every batched decode would crash). Loading models without the CPU's extra buffer "
              "types (AMX, CPU_REPACK): slower, correct. Fix: gguf-mtp runtime build", file=sys.stderr)
    return safe


def model_params(n_gpu_layers: int, repack: bool = True) -> object:
    """``llama_model_params`` as every gguf-mtp load wants them (the runtime and the planner's probe alike).
    ``repack``: the settings' wish (llama-server --no-repack); granted where :func:`extra_bufts_allowed`."""
    lib = llama()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    mp.use_extra_bufts = repack and extra_bufts_allowed()
    return mp


def buffer_types(lines: Sequence[LogLine]) -> list[str]:
    """The buffer types a model's weights went to, from its load log ("load_tensors: CPU_REPACK model buffer
    size = ..."), in the order llama.cpp reports them."""
    found = []
    for ln in lines:
        m = _BUFFER_LINE.search(ln.text)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found


def error_lines(lines: Sequence[LogLine], limit: int = 3) -> str:
    """The last few ERROR lines (else WARN lines), joined for an exception message."""
    for level in ("ERROR", "WARN"):
        bad = [ln.text.strip() for ln in lines if ln.level == level and ln.text.strip()]
        if bad:
            return "; ".join(bad[-limit:])
    return ""


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while a long C call runs, and raise KeyboardInterrupt once it returns.

    Python runs its SIGINT handler at the next Python line, and during a C call that is inside our log
    callback: the KeyboardInterrupt would be raised there, which ctypes prints and drops, and the call would go
    on to finish as if nothing happened. Main thread only (elsewhere signals go to the main thread anyway).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt
