"""Build llama-cpp-python 0.3.36 with our llama.cpp patches (patches/llama.cpp/), and tell which runtime is loaded.

Why a build of our own: stock llama.cpp refuses real centroid tensors, so E2B/E4B drafters keep their dense head
(see docs/runtime-build.md). The build is one pip wheel of the sdist, patched, labelled ``0.3.36+gguf_mtp.N`` (still
satisfies ``llama-cpp-python==0.3.36`` by PEP 440), cached by the patch series' hash, built in a persistent build
directory so a changed patch recompiles only what it touches.

Standard library only: ``tools/build_runtime.py`` loads this file by path before gguf-mtp or its dependencies are
installed (README set-up: build the runtime first, then ``pip install -e .`` accepts it; one compile, not two).

Cache layout (``$GGUF_MTP_CACHE``, else ``$XDG_CACHE_HOME/gguf-mtp``, else ``~/.cache/gguf-mtp``)::

    sdist/llama_cpp_python-0.3.36.tar.gz
    src/<variant>/llama_cpp_python-0.3.36/   patched tree; unchanged files keep their mtime
    build/<variant>/                         scikit-build-core build dir (incremental)
    wheels/<variant>-<series hash>/*.whl
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    from . import cpu
    from .errors import GgufMtpError as _ErrorBase
except ImportError:  # loaded by path (tools/build_runtime.py) before gguf-mtp is installed
    _ErrorBase = Exception  # type: ignore[misc,assignment]
    _spec = importlib.util.spec_from_file_location("gguf_mtp_cpu", Path(__file__).with_name("cpu.py"))
    cpu = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = cpu
    _spec.loader.exec_module(cpu)

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
LOCAL_LABEL = "gguf_mtp"  # wheel version: 0.3.36+gguf_mtp.<series>
VERSION_SYMBOL = "llama_gguf_mtp_patch_version"  # exported by the last patch: "gguf_mtp.<series>:<topic>,..."
CENTROID_HEAD = "centroid-head"  # patch topic that loads the centroid-clustered drafter head
AMX_TILE_CONFIG = "amx-tile-config"  # patch topic that fixes the GCC 12 AMX miscompilation
# --portable: no -march=native; an AVX2/FMA/F16C baseline (x86-64-v3: Haswell, Zen 1 and later). llama-cpp-python
# 0.3.36 installs only the one ggml-cpu library, not ggml's run-time-selected CPU variants (GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS), so a portable wheel is one baseline build.
PORTABLE_ARGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                 "-DGGML_BMI2=ON")

RPC_ARGS = ("-DGGML_RPC=ON",)  # llama.cpp's RPC backend (libggml-rpc) in the runtime: built unless --no-rpc
RPC_SERVER = "rpc-server"  # llama.cpp's tools/rpc server, built from the same tree, shipped in llama_cpp/lib/

_PATCH_NAME = re.compile(r"^(\d{4})-([a-z0-9][a-z0-9-]*)\.patch$")
_SERIES_DECL = re.compile(r'"gguf_mtp\.(\d+):([a-z0-9,-]+)"')


class RuntimeBuildError(_ErrorBase):
    """The runtime build cannot proceed (message says why and what to do)."""

    exit_code = 2


# --- the patch series ----------------------------------------------------------------------------

def default_patch_dir() -> Path:
    """patches/llama.cpp of this checkout (GGUF_MTP_PATCHES overrides, e.g. for a non-editable install)."""
    env = os.environ.get("GGUF_MTP_PATCHES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "patches" / "llama.cpp"


@dataclass(frozen=True)
class PatchSeries:
    """The ordered patches, the series number and topics they declare, and a hash of their contents."""

    patches: tuple[Path, ...]
    version: int  # N in 0.3.36+gguf_mtp.N, declared by the version patch
    topics: tuple[str, ...]  # from the file names, in order
    sha256: str

    @property
    def label(self) -> str:
        return f"{LLAMA_CPP_PYTHON}+{LOCAL_LABEL}.{self.version}"

    @property
    def declared(self) -> str:
        """What the patched library's version symbol returns."""
        return f"{LOCAL_LABEL}.{self.version}:{','.join(self.topics)}"


def load_series(patch_dir: Path | None = None) -> PatchSeries:
    """Read patches/llama.cpp/NNNN-<topic>.patch in order; the series must declare itself consistently."""
    d = patch_dir or default_patch_dir()
    files = sorted(p for p in d.glob("*.patch")) if d.is_dir() else []
    if not files:
        raise RuntimeBuildError(f"no patches in {d} (set GGUF_MTP_PATCHES to the checkout's patches/llama.cpp)")
    topics, h, declared = [], hashlib.sha256(), None
    for i, p in enumerate(files, 1):
        m = _PATCH_NAME.match(p.name)
        if not m or int(m.group(1)) != i:
            raise RuntimeBuildError(f"patch {p.name}: expected name {i:04d}-<topic>.patch")
        topics.append(m.group(2))
        data = p.read_bytes()
        h.update(p.name.encode() + b"\0" + data + b"\0")
        found = _SERIES_DECL.search(data.decode("utf-8", "replace"))
        if found:
            declared = found
    if declared is None:
        raise RuntimeBuildError(f"no patch in {d} defines {VERSION_SYMBOL}() as \"gguf_mtp.<N>:<topics>\"")
    series = PatchSeries(tuple(files), int(declared.group(1)), tuple(topics), h.hexdigest())
    if declared.group(2) != ",".join(topics):
        raise RuntimeBuildError(f"{VERSION_SYMBOL}() declares topics {declared.group(2)!r}, the series has "
                                f"{','.join(topics)!r}: update the version patch")
    return series


def touched_files(patch: Path) -> list[str]:
    """The files a patch changes, relative to vendor/llama.cpp."""
    return re.findall(r"^diff --git a/(\S+) b/", patch.read_text(), flags=re.M)


def parse_declared(value: str) -> tuple[int, tuple[str, ...]] | None:
    """'gguf_mtp.1:centroid-head,gguf-mtp-version' -> (1, ('centroid-head', 'gguf-mtp-version'))."""
    m = re.fullmatch(r"gguf_mtp\.(\d+):([a-z0-9,-]*)", value.strip())
    if not m:
        return None
    return int(m.group(1)), tuple(t for t in m.group(2).split(",") if t)


# --- cache, sdist, patched source tree ------------------------------------------------------------

def cache_dir() -> Path:
    env = os.environ.get("GGUF_MTP_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "gguf-mtp"


def variant_name(cuda: bool, cuda_arch: str | None, portable: bool = False, rpc: bool = True) -> str:
    """The build directory's name: one persistent build per variant (a portable build must not share a
    build directory with a native one, or each switch would recompile everything)."""
    name = "cpu" if not cuda else "cuda" + ("-" + re.sub(r"[^0-9A-Za-z]+", "-", cuda_arch).strip("-")
                                              if cuda_arch else "")
    return name + ("-rpc" if rpc else "") + ("-portable" if portable else "")


def fetch_sdist(cache: Path, sdist: Path | None = None) -> Path:
    """The sdist archive: the one given, the cached one, or ``pip download`` (the only network step)."""
    if sdist is not None:
        if not sdist.is_file():
            raise RuntimeBuildError(f"sdist archive not found: {sdist}")
        return sdist
    archive = cache / "sdist" / f"{SDIST_NAME}.tar.gz"
    if archive.is_file():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(archive.parent)]
    if subprocess.run(cmd).returncode != 0 or not archive.is_file():
        raise RuntimeBuildError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist "
                                "(pip download failed)")
    return archive


def _unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - old Pythons without extraction filters
            tar.extractall(dest)
    root = dest / SDIST_NAME
    if not (root / "vendor" / "llama.cpp").is_dir():
        raise RuntimeBuildError(f"{archive} is not the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
    return root


def apply_patches(llama_dir: Path, patches: Sequence[Path]) -> None:
    """Apply the series in order inside vendor/llama.cpp (git apply, else patch -p1); name the patch that fails."""
    gitlink = llama_dir / ".git"  # the sdist ships a dangling submodule gitlink; git would trip over it
    if gitlink.is_file():
        gitlink.unlink()
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(llama_dir.parent)}
    for p in patches:
        if shutil.which("git"):
            cmd = ["git", "apply", "--whitespace=nowarn", str(p.resolve())]
        elif shutil.which("patch"):
            cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(p.resolve())]
        else:
            raise RuntimeBuildError("applying patches needs git or patch on PATH")
        r = subprocess.run(cmd, cwd=llama_dir, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise RuntimeBuildError(f"patch {p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON}'s "
                                    f"llama.cpp: {detail[0] if detail else 'failed'}")


def set_version(src: Path, label: str) -> None:
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    new, n = re.subn(r'^__version__ = "[^"]*"', f'__version__ = "{label}"', text, count=1, flags=re.M)
    if n != 1:
        raise RuntimeBuildError(f"cannot find __version__ in {init}")
    init.write_text(new)


def _same(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def sync_tree(src: Path, dst: Path, keep: Sequence[str] = ()) -> int:
    """Make dst a copy of src, touching only files whose content changed (so the incremental build stays small).

    Files under ``keep`` (relative prefixes) are left alone. Returns the number of files written or removed.
    """
    changed = 0
    seen = set()
    for s in src.rglob("*"):
        rel = s.relative_to(src)
        seen.add(rel)
        d = dst / rel
        if s.is_symlink() or not s.is_file():
            if s.is_dir():
                d.mkdir(parents=True, exist_ok=True)
            continue
        if d.is_file() and _same(s, d):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)  # new mtime on purpose: the build must see the change
        shutil.copymode(s, d)
        changed += 1
    if dst.is_dir():
        for d in sorted(dst.rglob("*"), reverse=True):
            rel = d.relative_to(dst)
            if rel in seen or any(str(rel).startswith(k) for k in keep):
                continue
            if d.is_dir() and not d.is_symlink():
                if not any(d.iterdir()):
                    d.rmdir()
            else:
                d.unlink()
                changed += 1
    return changed


def prepare_source(archive: Path, series: PatchSeries, src_root: Path) -> int:
    """Unpack, patch and label the sdist into a scratch dir, then sync it into src_root. Returns files changed."""
    src_root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gguf-mtp-sdist-", dir=src_root.parent) as tmp:
        fresh = _unpack(archive, Path(tmp))
        apply_patches(fresh / "vendor" / "llama.cpp", series.patches)
        set_version(fresh, series.label)
        return sync_tree(fresh, src_root, keep=("llama_cpp/lib",))


# --- wheel build and install -----------------------------------------------------------------------

@dataclass
class BuildResult:
    wheel: Path
    built: bool  # False: taken from the wheel cache
    installed: bool
    version: str
    variant: str
    series_sha256: str
    files_changed: int = 0


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build per cache at a time (two builds in one build dir corrupt it)."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cmake_args(cuda: bool, cuda_arch: str | None, portable: bool = False, rpc: bool = True) -> list[str]:
    args = (list(PORTABLE_ARGS) if portable else []) + (list(RPC_ARGS) if rpc else [])
    if cuda:
        args.append("-DGGML_CUDA=on")
        if cuda_arch:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    extra = os.environ.get("CMAKE_ARGS", "").split()
    return args + extra


def cmake_option(args: Sequence[str], name: str, default: bool) -> bool:
    """A boolean CMake option as the build will see it: the last -D<name>=... wins (CMAKE_ARGS come last)."""
    value = default
    for a in args:
        m = re.fullmatch(rf"-D{name}(?::BOOL)?=(\S+)", a, flags=re.I)
        if m:
            value = m.group(1).upper() in ("ON", "1", "TRUE", "YES", "Y")
    return value


def is_native(args: Sequence[str]) -> bool:
    """Does the build compile for this CPU (-march=native)? ggml's default unless GGML_NATIVE is turned off."""
    return cmake_option(args, "GGML_NATIVE", True)


def compiler_identity() -> str:
    """The C++ compiler CMake will pick (CXX, else c++), by its version line: another compiler, another binary
    (GCC 12 is the one that miscompiles the AMX tile configuration)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{cxx}: unknown"
    return f"{cxx}: {out.splitlines()[0] if out else 'unknown'}"


def cache_key(series_sha256: str, args: Sequence[str], cpu_flags: frozenset[str] | set[str], compiler: str) -> str:
    """The wheel cache key: everything that changes the binary. The patch series, the CMake arguments
    (CMAKE_ARGS, CUDA architectures, --portable), the compiler, and for a native build (-march=native) the CPU's
    feature set: a native wheel from one CPU can die with SIGILL on another."""
    parts = [series_sha256, " ".join(args), compiler]
    if is_native(args):
        parts.append("native:" + " ".join(sorted(cpu_flags)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


_STEP = re.compile(r"\[(\d+)/(\d+)\]")


class Progress:
    """One updating line for a long build: the compile step (ninja's [n/N]) and the elapsed time.

    On a terminal it rewrites one line; elsewhere (CI logs) it prints a line every 10% or minute at most.
    """

    def __init__(self, out=None) -> None:
        self.out = out or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.step, self.total, self._shown = 0, 0, (0.0, -1)

    def line(self) -> str:
        m, sec = divmod(int(time.monotonic() - self.start), 60)
        where = f"step {self.step} of {self.total}" if self.total else "configuring"
        return f"building llama-cpp-python: {where}, {m}:{sec:02d} elapsed"

    def feed(self, text: str) -> None:
        found = _STEP.search(text)
        if found:
            self.step, self.total = int(found.group(1)), int(found.group(2))
        now, tenth = time.monotonic() - self.start, self.step * 10 // max(self.total, 1)
        if self.tty:
            if now - self._shown[0] >= 0.5 or found and self.step == self.total:
                self.out.write("\r" + self.line().ljust(72))
                self.out.flush()
                self._shown = (now, tenth)
        elif found and (tenth > self._shown[1] or now - self._shown[0] >= 60):
            self.out.write(self.line() + "\n")
            self.out.flush()
            self._shown = (now, tenth)

    def close(self) -> None:
        if self.tty:
            self.out.write("\r" + self.line().ljust(72) + "\n")
            self.out.flush()


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def build_wheel(src_root: Path, build_dir: Path, out_dir: Path, args: Sequence[str], jobs: int | None,
                log: Path, progress: Progress | None = None) -> Path:
    """pip wheel the patched tree with a persistent scikit-build-core build dir. The compiler's output goes to the
    log only; the terminal gets one progress line, and on failure the log's path and its last lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(src_root / "llama_cpp" / "lib", ignore_errors=True)  # CMake re-installs it; no stale backends
    env = {**os.environ, "CMAKE_ARGS": " ".join(args)}
    if jobs:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(out_dir),
           "-C", f"build-dir={build_dir}", "-C", "build.verbose=false", str(src_root)]
    log.parent.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + f"\nCMAKE_ARGS={env['CMAKE_ARGS']}\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                progress.feed(line)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # Ctrl-C: stop the compiler too
                proc.kill()
                proc.wait()
            progress.close()
    wheels = sorted(out_dir.glob("llama_cpp_python-*.whl"))
    if rc != 0 or not wheels:
        raise RuntimeBuildError(f"building the patched llama-cpp-python failed (exit {rc}); full log: {log}\n"
                                f"last lines:\n{tail(log)}")
    return wheels[-1]


def check_wheel(wheel: Path) -> str:
    """Read the CPU backend's machine code in a built wheel: the AMX tile configuration must be stored before
    ``ldtilecfg`` (cpu.library_tile_config). Returns its state; a broken one is refused, never cached."""
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(prefix="gguf-mtp-check-") as tmp:
        names = [n for n in zf.namelist() if re.search(r"/libggml-cpu[^/]*\.so[.0-9]*$", n)]
        states = []
        for n in names:
            states.append(cpu.library_tile_config(Path(zf.extract(n, tmp))))
    if "broken" in states:
        raise RuntimeBuildError(f"{wheel.name}: the AMX tile configuration in libggml-cpu is miscompiled (its "
                                "rows/colsb stores are missing before ldtilecfg); the wheel would crash on AMX CPUs")
    return "unknown" if "unknown" in states else "ok" if "ok" in states else "absent"


def build_rpc_server(src_root: Path, out: Path, log: Path) -> Path:
    """Compile llama.cpp's ``tools/rpc/rpc-server.cpp`` of the patched tree against the ggml libraries the wheel
    build just installed into ``llama_cpp/lib`` (same ggml, so the same RPC protocol as the runtime). One source file
    that links only ggml: seconds, not a second CMake build of ggml. Its rpath is ``$ORIGIN``: it runs from
    ``llama_cpp/lib/`` of the installed wheel, next to those libraries."""
    llama, lib = src_root / "vendor" / "llama.cpp", src_root / "llama_cpp" / "lib"
    if not (lib / "libggml-rpc.so").exists():
        raise RuntimeBuildError(f"the build did not produce libggml-rpc.so in {lib} (was -DGGML_RPC=ON overridden "
                                "by CMAKE_ARGS?)")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    cmd = [cxx, "-std=c++17", "-O2", "-pthread", "-I", str(llama / "ggml" / "include"),
           str(llama / "tools" / "rpc" / "rpc-server.cpp"), "-o", str(out), "-L", str(lib), "-lggml", "-lggml-base",
           "-Wl,-rpath,$ORIGIN"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    with log.open("a") as fh:
        fh.write("\n$ " + " ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeBuildError(f"building {RPC_SERVER} failed (exit {r.returncode}); full log: {log}\n"
                                f"last lines:\n{tail(log)}")
    return out


def add_to_wheel(wheel: Path, file: Path, arcname: str) -> None:
    """Add an executable to a built wheel and list it in RECORD, so pip installs and uninstalls it with the rest."""
    import base64
    import stat

    data = file.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for item in src.infolist():
            if item.filename not in (record, arcname):
                dst.writestr(item, src.read(item.filename))
        info = zipfile.ZipInfo(arcname, date_time=time.localtime()[:6])
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(info, data)
        lines = [ln for ln in src.read(record).decode().splitlines() if ln and not ln.startswith(arcname + ",")]
        lines.insert(len(lines) - 1, f"{arcname},sha256={digest},{len(data)}")  # RECORD's own line stays last
        dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, wheel)


def rpc_server_path() -> Path | None:
    """The installed runtime's rpc-server (``llama_cpp/lib/rpc-server``, built unless ``runtime build --no-rpc``),
    found without loading libllama; None when the installed runtime was built without it."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "lib" / RPC_SERVER
    return path if path.is_file() else None


def install_wheel(wheel: Path) -> None:
    """Replace whatever llama-cpp-python is installed, then add its own dependencies if missing (numpy, ...)."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    for cmd in (pip + ["--no-deps", "--force-reinstall", str(wheel)], pip + [str(wheel)]):
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeBuildError(f"pip could not install {wheel}")


def build_runtime(cuda: bool = False, cuda_arch: str | None = None, jobs: int | None = None, force: bool = False,
                  install: bool = True, sdist: Path | None = None, patch_dir: Path | None = None,
                  cache: Path | None = None, portable: bool = False, rpc: bool = True) -> BuildResult:
    """Fetch, patch, build (incrementally) and install the runtime; a cached wheel of the same key is reused.
    ``rpc`` (the default; False: --no-rpc): also llama.cpp's RPC backend and its rpc-server, shipped in the wheel
    (``llama_cpp/lib/rpc-server``). CMAKE_ARGS=-DGGML_RPC=OFF counts as --no-rpc."""
    series = load_series(patch_dir)
    cache = cache or cache_dir()
    args = cmake_args(cuda, cuda_arch, portable, rpc)
    rpc = cmake_option(args, "GGML_RPC", False)
    variant = variant_name(cuda, cuda_arch, portable, rpc)
    key = cache_key(series.sha256, args, cpu.cpu_flags(), compiler_identity())
    wheel_dir = cache / "wheels" / f"{variant}-{key}"
    with _locked(cache):
        cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
        changed, built = 0, False
        if cached and not force:
            wheel = cached[-1]
        else:
            archive = fetch_sdist(cache, sdist)
            src_root = cache / "src" / variant / SDIST_NAME
            changed = prepare_source(archive, series, src_root)
            shutil.rmtree(wheel_dir, ignore_errors=True)
            log = cache / "logs" / f"build-{variant}.log"
            wheel = build_wheel(src_root, cache / "build" / variant, wheel_dir, args, jobs, log)
            try:
                check_wheel(wheel)
                if rpc:
                    server = build_rpc_server(src_root, cache / "build" / variant / RPC_SERVER, log)
                    add_to_wheel(wheel, server, f"llama_cpp/lib/{RPC_SERVER}")
            except RuntimeBuildError:
                shutil.rmtree(wheel_dir, ignore_errors=True)
                raise
            built = True
        if install:
            install_wheel(wheel)
    return BuildResult(wheel, built, install, series.label, variant, series.sha256, changed)


# --- what is loaded now ----------------------------------------------------------------------------

@dataclass
class RuntimeInfo:
    """The llama-cpp-python this process loads, its backends and our patches in it."""

    installed: bool
    llama_cpp_python: str | None = None
    library: str | None = None
    gpu_offload: bool = False  # a local GPU device (llama_supports_gpu_offload also says yes for RPC alone)
    rpc: bool = False  # llama.cpp's RPC backend is in the library (rpc-server hosts can be added)
    backends: list[str] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    patch_series: int | None = None  # None: stock library (no version symbol)
    patches: list[str] = field(default_factory=list)
    expected_series: int | None = None  # what this checkout's patches/llama.cpp would build
    expected_patches: list[str] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)  # the kernel's flags that select llama.cpp's CPU kernels
    cpu_features: dict[str, bool] = field(default_factory=dict)  # what llama.cpp reports (llama_print_system_info)
    amx: dict = field(default_factory=dict)  # cpu.AmxStatus: is the AMX path usable in this process, and safe
    last_load: dict = field(default_factory=dict)  # extra buffer types the last loaded models used (load_record)

    @property
    def patched(self) -> bool:
        return self.patch_series is not None

    @property
    def centroid_head(self) -> bool:
        return CENTROID_HEAD in self.patches

    @property
    def up_to_date(self) -> bool | None:
        if self.expected_series is None:
            return None
        return self.patch_series == self.expected_series and self.patches == self.expected_patches

    def to_dict(self) -> dict:
        return {**asdict(self), "patched": self.patched, "centroid_head": self.centroid_head,
                "up_to_date": self.up_to_date}


_DEV_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}


def _devices(lib: ctypes.CDLL) -> tuple[list[str], list[dict]]:
    """Backends and devices from ggml's registry (reachable through libllama's handle)."""
    try:
        count, get = lib.ggml_backend_dev_count, lib.ggml_backend_dev_get
        name, desc, typ = lib.ggml_backend_dev_name, lib.ggml_backend_dev_description, lib.ggml_backend_dev_type
        reg_of, reg_name = lib.ggml_backend_dev_backend_reg, lib.ggml_backend_reg_name
    except AttributeError:
        return [], []
    count.restype, get.restype, get.argtypes = ctypes.c_size_t, ctypes.c_void_p, [ctypes.c_size_t]
    for f in (name, desc, reg_name):
        f.restype, f.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    typ.restype, typ.argtypes = ctypes.c_int, [ctypes.c_void_p]
    reg_of.restype, reg_of.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    backends, devices = [], []
    for i in range(count()):
        dev = get(i)
        backend = (reg_name(reg_of(dev)) or b"").decode()
        if backend and backend not in backends:
            backends.append(backend)
        devices.append({"name": (name(dev) or b"").decode(), "description": (desc(dev) or b"").decode(),
                        "type": _DEV_TYPES.get(typ(dev), str(typ(dev))), "backend": backend})
    return backends, devices


def _has_backend(lib: ctypes.CDLL, name: str) -> bool:
    """Is backend ``name`` registered (it may have no device yet: RPC gets one per added server)?"""
    try:
        by_name = lib.ggml_backend_reg_by_name
    except AttributeError:
        return False
    by_name.restype, by_name.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    return bool(by_name(name.encode()))


def patch_declaration(lib: ctypes.CDLL) -> str | None:
    """The version symbol's string, or None for a stock library."""
    try:
        fn = getattr(lib, VERSION_SYMBOL)
    except AttributeError:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return (fn() or b"").decode()


def _loaded_declaration(lib: ctypes.CDLL) -> tuple[int, tuple[str, ...]] | None:
    """(series, topics) of a loaded libllama, or None for a stock library."""
    declared = patch_declaration(lib)
    return parse_declared(declared) if declared else None


def loaded_patches() -> tuple[str, ...]:
    """The patch topics the llama-cpp-python in this process carries (empty: stock, or not installed)."""
    try:
        from llama_cpp import llama_cpp as bindings
    except ImportError:
        return ()
    parsed = _loaded_declaration(bindings._lib)
    return parsed[1] if parsed else ()


def loaded_amx_status(flags: frozenset[str] | None = None):  # -> cpu.AmxStatus
    """cpu.amx_status for the llama-cpp-python in this process: its CPU backend's machine code, our patch in it."""
    return cpu.amx_status(cpu_library(), AMX_TILE_CONFIG in loaded_patches(), flags)


def runtime_info(patch_dir: Path | None = None) -> RuntimeInfo:
    """Inspect the llama-cpp-python importable in this process (imports it, loading libllama)."""
    try:
        expected = load_series(patch_dir)
    except RuntimeBuildError:
        expected = None
    exp = {"expected_series": expected.version, "expected_patches": list(expected.topics)} if expected else {}
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as bindings
    except ImportError:
        return RuntimeInfo(installed=False, **exp)
    lib = bindings._lib
    backends, devices = _devices(lib)
    parsed = _loaded_declaration(lib)
    flags = cpu.cpu_flags()
    return RuntimeInfo(
        installed=True,
        llama_cpp_python=getattr(llama_cpp, "__version__", None),
        library=getattr(lib, "_name", None),
        gpu_offload=any(d["type"] in ("GPU", "IGPU") for d in devices),
        rpc=_has_backend(lib, "RPC"),
        backends=backends,
        devices=devices,
        patch_series=parsed[0] if parsed else None,
        patches=list(parsed[1]) if parsed else [],
        cpu_flags=cpu.kernel_flags(flags),
        cpu_features=cpu.parse_system_info((bindings.llama_print_system_info() or b"").decode()),
        amx=loaded_amx_status(flags).to_dict(),
        last_load=read_load_record(),
        **exp,
    )


def cpu_library() -> Path | None:
    """The loaded llama-cpp-python's CPU backend library (libggml-cpu), where its machine code can be read."""
    try:
        import llama_cpp
    except ImportError:
        return None
    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    return found[0] if found else None


# --- which buffer types the last loads used ----------------------------------------------------------

def load_record_path() -> Path:
    return cache_dir() / "last-load.json"


def write_load_record(models: dict[str, list[str]]) -> None:
    """Remember which buffer types each model of the last load used ({path: ["CPU", "CPU_REPACK", ...]}), for
    ``runtime info``. Best effort: a read-only cache only loses this note."""
    path = load_record_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": models}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def read_load_record() -> dict:
    try:
        data = json.loads(load_record_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def supports_centroid_head() -> bool:
    """Does the loaded runtime load centroid-head drafters (for pairing.check_set(runtime_centroids=...))?"""
    try:
        return CENTROID_HEAD in loaded_patches()
    except Exception:  # noqa: BLE001 - a broken install simply has no patches
        return False


# --- standalone command line (tools/build_runtime.py) -----------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build_runtime", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="build (and install) the patched llama-cpp-python")
    b.add_argument("--cuda", action="store_true", help="build the CUDA backend (-DGGML_CUDA=on)")
    b.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or '86;89' (default: CMake's)")
    b.add_argument("--jobs", "-j", type=int, help="parallel compile jobs")
    b.add_argument("--force", action="store_true", help="rebuild even if a wheel of this series is cached")
    b.add_argument("--no-install", action="store_true", help="only build the wheel")
    b.add_argument("--sdist", type=Path, help="use this llama-cpp-python 0.3.36 sdist archive (no download)")
    b.add_argument("--rpc", dest="rpc", action="store_true", default=True, help="llama.cpp's RPC backend "
                   "(-DGGML_RPC=ON) and its rpc-server, for models split over several machines (the default)")
    b.add_argument("--no-rpc", dest="rpc", action="store_false", help="a runtime without RPC")
    b.add_argument("--portable", action="store_true", help="no -march=native: an AVX2 baseline that runs on other "
                   "x86-64 CPUs (for a shared cache or a copied wheel)")
    i = sub.add_parser("info", help="which llama-cpp-python is loaded, its backends and our patches in it")
    i.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            info = runtime_info()
            print(json.dumps(info.to_dict(), indent=2) if args.json else _describe(info))
            return 0
        if args.cmd != "build":
            ap.print_help()
            return 2
        r = build_runtime(cuda=args.cuda, cuda_arch=args.cuda_arch, jobs=args.jobs, force=args.force,
                          install=not args.no_install, sdist=args.sdist, portable=args.portable,
                          rpc=args.rpc)
        how = "built" if r.built else "cached"
        print(f"{how} {r.wheel}" + (" and installed" if r.installed else ""))
        return 0
    except RuntimeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _describe(info: RuntimeInfo) -> str:
    if not info.installed:
        return "llama-cpp-python: not installed"
    patches = ", ".join(info.patches) if info.patched else "none (stock build)"
    lines = [f"llama-cpp-python: {info.llama_cpp_python}", f"library: {info.library}",
             f"backends: {', '.join(info.backends) or 'unknown'} (GPU offload: {'yes' if info.gpu_offload else 'no'}; "
             f"RPC: {'yes' if info.rpc else 'no'})",
             f"gguf-mtp patches: {patches}"]
    lines.append(f"CPU flags: {' '.join(info.cpu_flags) or 'none'}; AMX usable: {'yes' if info.amx.get('usable') else 'no'}")
    if info.up_to_date is False:
        lines.append(f"this checkout's series is gguf_mtp.{info.expected_series}: "
                     f"{', '.join(info.expected_patches)} (rebuild: gguf-mtp runtime build)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
