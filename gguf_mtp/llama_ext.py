"""Small generic helpers over llama-cpp-python's ctypes bindings, for code outside the runtime package.

``captured_log``: llama.cpp reports progress and errors only through its log callback (quantizer tensor lines,
"failed to quantize: ..."). Unlike the runtime's permanent sink (runtime/bindings.py ``LLAMA_LOG``, which keeps
lines for error messages), this calls back per line *while* a long C call runs, so a progress bar can follow
it. The callback is process-global: the previous one (llama-cpp-python's, or the runtime's) is restored on exit,
and the captured lines are not forwarded (llama-cpp-python's default sink would print all of them).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# enum ggml_log_level (ggml/include/ggml.h)
LEVEL_DEBUG, LEVEL_INFO, LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = 1, 2, 3, 4, 5


def llama() -> object:
    """The ``llama_cpp.llama_cpp`` bindings, with the backend initialised once (imported lazily: ~0.1 s)."""
    import llama_cpp.llama_cpp as lib

    global _backend_ready
    if not _backend_ready:
        lib.llama_backend_init()
        _backend_ready = True
    return lib


_backend_ready = False


@dataclass
class LogCapture:
    """Complete log lines seen so far (the last ``keep`` of them) and the error lines among them."""

    keep: int = 400
    lines: deque = field(default_factory=deque)
    errors: list[str] = field(default_factory=list)

    def add(self, level: int, line: str) -> None:
        self.lines.append(line)
        while len(self.lines) > self.keep:
            self.lines.popleft()
        if level == LEVEL_ERROR and line.strip() and len(self.errors) < 50:
            self.errors.append(line.strip())


@contextlib.contextmanager
def captured_log(on_line: Callable[[int, str], None] | None = None, keep: int = 400,
                 echo: bool = False) -> Iterator[LogCapture]:
    """Route llama.cpp's log into Python for the duration of the block.

    llama.cpp emits a line in fragments (several calls, the later ones often at level CONT); fragments are
    joined and ``on_line(level, line)`` is called once per complete line, with the level of its first fragment.
    ``echo`` also writes the raw text to stderr.
    """
    import sys

    lib = llama()
    cap = LogCapture(keep=keep)
    pending: list[str] = []
    pending_level = [LEVEL_INFO]

    def emit(level: int, line: str) -> None:
        cap.add(level, line)
        if on_line is not None:
            on_line(level, line)

    @lib.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            s = text.decode("utf-8", errors="replace") if text else ""
            if echo:
                sys.stderr.write(s)
            if not pending and level != LEVEL_CONT:
                pending_level[0] = level
            while "\n" in s:
                head, s = s.split("\n", 1)
                pending.append(head)
                emit(pending_level[0], "".join(pending))
                pending.clear()
                pending_level[0] = level if level != LEVEL_CONT else pending_level[0]
            if s:
                pending.append(s)
        except Exception:  # an exception must never cross into C
            pass

    old_cb = lib.llama_log_callback()
    old_ud = ctypes.c_void_p()
    lib.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_ud))
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield cap
    finally:
        lib.llama_log_set(old_cb, old_ud)
        if pending:
            emit(pending_level[0], "".join(pending))


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
