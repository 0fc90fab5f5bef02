"""Atomic output files: a temp file beside the target, renamed into place only on success.

An interrupted or failed run leaves no half-written file at the output path, and an existing file is
never replaced unless the caller passed ``force``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import GgufMtpError

TMP_PREFIX = ".gguf-mtp-tmp-"


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
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if out.exists() and not force:  # appeared while we worked
            raise GgufMtpError(f"{out} exists (use --force to overwrite)")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed run (kill -9) left behind; returns what was removed."""
    removed = []
    for p in Path(directory).glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
