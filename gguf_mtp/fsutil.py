"""Atomic output files: a temp file beside the target, renamed into place only on success.

An interrupted or failed run leaves no half-written file at the output path, and an existing file is
never replaced unless the caller passed ``force``. Ctrl-C and errors remove the temp file on the way out; a
run killed outright (kill -9, OOM killer, power loss) cannot, so the temp name carries the writer's pid and the
next ``atomic_output`` in that directory removes temps whose writer is gone (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import GgufMtpError

log = logging.getLogger("gguf_mtp.fsutil")

TMP_PREFIX = ".gguf-mtp-tmp-"
_TMP_PID = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")  # .gguf-mtp-tmp-<pid>-<random><suffix>
# write failures that are about the output, never the input: reported as one line naming the output
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file is too large for this file system or process limit",
                errno.EROFS: "the file system is read-only"}


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output we must not write, before any work is done."""
    out = Path(path)
    if out.is_dir():
        raise GgufMtpError(f"output path {out} is a directory")
    if not out.parent.is_dir():
        raise GgufMtpError(f"output directory {out.parent} does not exist")
    if out.exists() and not force:
        raise GgufMtpError(f"{out} exists (use --force to overwrite)")
    if not os.access(out.parent, os.W_OK):
        raise GgufMtpError(f"output directory {out.parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp path in the output's directory; rename it to ``path`` if the block succeeds."""
    out = check_output_path(path, force)
    removed = remove_stale_temps(out.parent)
    if removed:
        log.warning("removed %d temp file(s) that an interrupted run left in %s", len(removed), out.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=out.suffix, dir=out.parent)
    except OSError as e:
        raise GgufMtpError(f"cannot write in {out.parent}: {e.strerror}") from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an output is as readable as any new file (Ollama's user)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if out.exists() and not force:  # appeared while we worked
            raise GgufMtpError(f"{out} exists (use --force to overwrite)")
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.errno in WRITE_ERRNOS:
            raise GgufMtpError(write_failure(out, e.strerror, WRITE_ERRNOS[e.errno])) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(out: Path, what: str, why: str) -> str:
    """The one line for an output that could not be written (after its temp file is gone)."""
    free = shutil.disk_usage(out.parent).free
    return f"cannot write {out}: {what} ({why}; {free / 2**20:.1f} MiB free in {out.parent}); nothing was written"


def check_free_space(path: str | os.PathLike, need: int) -> None:
    """Refuse, before any work, an output that cannot fit in its file system's free space."""
    out = Path(path)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise GgufMtpError(f"cannot write {out}: it needs {need / 2**20:.1f} MiB and {out.parent} has "
                           f"{free / 2**20:.1f} MiB free")


def _writer_alive(name: str) -> bool:
    m = _TMP_PID.match(name)
    if m is None:
        return False  # no pid in the name (older versions): nobody can be writing it still
    pid = int(m[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a name we cannot judge): leave it
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files that killed runs left behind (their writer's pid is gone); returns what was removed.

    Temps of runs still going (this process's, or another live one's) are left alone, so two conversions into
    one directory do not delete each other's work.
    """
    removed = []
    for p in Path(directory).glob(TMP_PREFIX + "*"):
        if _writer_alive(p.name) or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
