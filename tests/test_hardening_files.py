"""Hostile file systems: disk full, a file size limit, a read-only or missing output directory, an output path
that is a directory, and input files that change while they are read. Each ends in one ``error:`` line, a
non-zero exit, no output and no temp file, and an existing output left as it was."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.fsutil import TMP_PREFIX

ROOT = Path(__file__).resolve().parent.parent
OLD = b"an existing output that must survive"


def one_error_line(r, code: int = 2) -> str:
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def nothing_left(d: Path, *keep: str) -> None:
    assert sorted(p.name for p in d.iterdir()) == sorted(keep)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs (needs root; the test is skipped without it)."""
    where.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(d: Path, leave: int) -> None:
    """Take the free space of ``d`` down to about ``leave`` bytes."""
    free = shutil.disk_usage(d).free
    (d / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.fixture(scope="module")
def src(tiny_root) -> Path:
    return tiny_root / "tiny-dense" / "target"


@pytest.fixture(scope="module")
def gguf_src(tiny_ggufs) -> Path:
    return tiny_ggufs[("tiny-q", "target")]


# --- disk full ---------------------------------------------------------------------------------------------
def test_convert_refuses_up_front_when_the_disk_is_too_small(src, tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "256k") as d:
        line = one_error_line(invoke("convert", src, "-o", d / "out.gguf"))
        assert "needs" in line and "MiB free" in line
        nothing_left(d)


def test_convert_disk_full_mid_write_keeps_the_old_output(src, exports, tmp_path):
    size = exports.get("tiny-dense", "target").stat().st_size
    with mounted_tmpfs(tmp_path / "fs", "4m") as d:
        (d / "out.gguf").write_bytes(OLD)
        fill(d, size - 16 * 1024)  # room for the tensor data (the up-front check passes), not for the header
        line = one_error_line(invoke("convert", src, "-o", d / "out.gguf", "--force"))
        assert "the disk is full" in line and "nothing was written" in line
        assert (d / "out.gguf").read_bytes() == OLD
        nothing_left(d, "out.gguf", "filler")


def test_quantize_disk_full(gguf_src, tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "64k") as d:
        (d / "out.gguf").write_bytes(OLD)
        line = one_error_line(invoke("quantize", gguf_src, d / "out.gguf", "Q8_0", "--force"))
        assert "could not write the output" in line and "the disk is full" in line
        assert (d / "out.gguf").read_bytes() == OLD
        nothing_left(d, "out.gguf")


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_file_size_limit(command, src, gguf_src, tmp_path):
    """RLIMIT_FSIZE (no root needed): the write fails part way with EFBIG."""
    out = tmp_path / "out.gguf"
    out.write_bytes(OLD)
    args = ["convert", str(src), "-o", str(out)] if command == "convert" else \
        ["quantize", str(gguf_src), str(out), "Q8_0"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run([sys.executable, "-m", "gguf_mtp", *args, "--force"], preexec_fn=limit,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "nothing was written" in r.stderr
    assert out.read_bytes() == OLD
    nothing_left(tmp_path, "out.gguf")


# --- output directories ------------------------------------------------------------------------------------
def _outputs(src: Path, gguf_src: Path, out: Path, pair) -> dict[str, list]:
    """Every command that writes a file, aimed at ``out``."""
    return {
        "convert": ["convert", src, "-o", out],
        "quantize": ["quantize", gguf_src, out, "Q8_0"],
        "plan": ["plan", "--target", pair[0], "--drafter", pair[1], "--vram", "24GiB", "-o", out],
        "modelfile": ["modelfile", "--target", pair[0], "--drafter", pair[1], "--ctx", "4096", "-o", out],
    }


@pytest.fixture(scope="module")
def pair(tiny_ggufs):
    return tiny_ggufs[("tiny-dense", "target")], tiny_ggufs[("tiny-dense", "drafter")]


@pytest.mark.parametrize("command", ["convert", "quantize", "plan", "modelfile"])
def test_read_only_output_directory(command, src, gguf_src, pair, tmp_path):
    if os.geteuid() == 0:
        ctx = mounted_tmpfs(tmp_path / "ro", "64k", read_only=True)  # root ignores permission bits
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
    with ctx as d:
        line = one_error_line(invoke(*_outputs(src, gguf_src, d / "out.gguf", pair)[command]))
        assert "not writable" in line
        nothing_left(d)


@pytest.mark.parametrize("command", ["convert", "quantize", "plan", "modelfile"])
def test_output_path_is_a_directory(command, src, gguf_src, pair, tmp_path):
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "dir.gguf" / "inside").write_bytes(b"x")
    r = invoke(*_outputs(src, gguf_src, tmp_path / "dir.gguf", pair)[command])
    # click's own check (``dir_okay=False``) answers first, as a usage error
    assert r.exit_code == 2 and r.stderr.rstrip().splitlines()[-1].endswith("is a directory.") and not r.stdout
    assert (tmp_path / "dir.gguf" / "inside").read_bytes() == b"x"


@pytest.mark.parametrize("command", ["convert", "quantize", "plan", "modelfile"])
def test_missing_output_directory(command, src, gguf_src, pair, tmp_path):
    line = one_error_line(invoke(*_outputs(src, gguf_src, tmp_path / "nope" / "out.gguf", pair)[command]))
    assert "does not exist" in line


# --- inputs that change under us -------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change", ["append", "truncate", "rewrite", "replace"])
def test_checkpoint_changing_during_convert(change, src, tmp_path):
    """A download still running or an edit: found by the size/mtime/inode check after each tensor."""
    from gguf_mtp.export import convert

    ckpt = _copy(src, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    done = []

    def meddle(ev) -> None:
        if done or ev.done < 2:
            return
        done.append(ev.tensor)
        data = weights.read_bytes()
        if change == "append":
            with open(weights, "ab") as f:
                f.write(b"\0" * 64)
        elif change == "truncate":
            os.truncate(weights, len(data) // 2)
        elif change == "rewrite":  # same size, new bytes and mtime
            os.utime(weights, ns=(0, os.stat(weights).st_mtime_ns + 10**9))
        else:  # a new file renamed over it: we keep reading the old one, which is consistent
            (ckpt / "new").write_bytes(data)
            os.replace(ckpt / "new", weights)

    if change == "replace":
        convert(ckpt, out, progress=meddle)
        assert out.exists()
        return
    with pytest.raises(GgufMtpError, match="changed while it was being read|truncated") as e:
        convert(ckpt, out, progress=meddle)
    assert "\n" not in str(e.value)
    nothing_left(out.parent)


def test_gguf_changing_during_quantize(gguf_src, tmp_path, monkeypatch):
    from gguf_mtp import quantize as q

    src = tmp_path / "src.gguf"
    shutil.copy(gguf_src, src)
    real = q._run

    def run_and_touch(plan, out, progress):
        result = real(plan, out, progress)
        os.utime(src, ns=(0, os.stat(src).st_mtime_ns + 10**9))
        return result

    monkeypatch.setattr(q, "_run", run_and_touch)
    (tmp_path / "out").mkdir()
    with pytest.raises(GgufMtpError, match="changed while it was being quantized"):
        q.quantize(src, tmp_path / "out" / "q.gguf", "Q8_0")
    nothing_left(tmp_path / "out")


def test_temp_file_name_and_output_mode(src, tmp_path):
    """The temp file sits beside the output, named with our prefix and pid; the output gets the usual mode."""
    from gguf_mtp.export import convert

    seen = []
    convert(src, tmp_path / "x.gguf", progress=lambda ev: seen.extend(p.name for p in tmp_path.iterdir()))
    assert any(n.startswith(f"{TMP_PREFIX}{os.getpid()}-") for n in seen)
    nothing_left(tmp_path, "x.gguf")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "x.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
