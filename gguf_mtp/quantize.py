"""Quantize GGUF files with llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python).

Not a re-implementation: every preset llama-quantize has (Q4_K_M, IQ4_XS, ...) with llama.cpp's per-tensor mix
rules. We add what a Python caller needs around it: names checked before llama.cpp sees them, the importance
matrix read from llama-imatrix's GGUF and handed over the way tools/quantize does, progress from llama.cpp's log,
atomic output, drafter-aware defaults, and a check that our ``gguf_mtp.*`` provenance keys survived.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import keys, quanttypes
from .errors import GgufMtpError, IncompatiblePair
from .fsutil import atomic_output, check_output_path
from .gguffile import GgufInfo, ggml_type_sizes, read_gguf, tensor_array

ProgressFn = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor name)

DISK_FULL_BYTES = 16 << 20  # a write that failed with less than this free: call it a full disk
DEFAULT_DRAFTER_TYPE = "Q8_0"  # until acceptance is measured per drafter type on a trained pair (docs/quantize.md)

# Drafter tensors that keep their source type whatever the preset: the centroid head picks which tokens get
# scored at all, and it is tiny. (pattern, why) -- matched with llama.cpp's std::regex_search.
KEEP_SOURCE_TYPE = (
    ("^" + re.escape(keys.CENTROIDS_TENSOR) + "$",
     "centroid head: cluster choice is sensitive, and the tensor is small"),
)

# "[  12/  40] blk.1.attn_q.weight   - [  256,   256,     1,     1], type =    f32, ..."
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+),(.*)$")
_DRY_RUN_TYPE = re.compile(r"->.*\((\w+)\)\s*$")


# --- results ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorChange:
    name: str
    shape: tuple[int, ...]
    src_type: str
    dst_type: str
    src_bytes: int
    dst_bytes: int


@dataclass
class QuantizeResult:
    src: Path
    dst: Path | None  # None for a dry run
    qtype: str
    dry_run: bool
    src_file_bytes: int
    dst_file_bytes: int  # dry run: estimated (source header + new tensor data)
    tensors: list[TensorChange]
    seconds: float
    imatrix_entries: int = 0
    kept: list[str] = field(default_factory=list)  # tensors held at their source type by KEEP_SOURCE_TYPE

    @property
    def src_tensor_bytes(self) -> int:
        return sum(t.src_bytes for t in self.tensors)

    @property
    def dst_tensor_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.dst_tensor_bytes / max(1, self.n_elements)

    def by_type(self) -> dict[str, dict[str, int]]:
        """Output tensors grouped by ggml type: count and bytes."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            d = out.setdefault(t.dst_type, {"tensors": 0, "bytes": 0})
            d["tensors"] += 1
            d["bytes"] += t.dst_bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": str(self.src), "dst": str(self.dst) if self.dst else None, "qtype": self.qtype,
            "dry_run": self.dry_run, "src_file_bytes": self.src_file_bytes, "dst_file_bytes": self.dst_file_bytes,
            "src_tensor_bytes": self.src_tensor_bytes, "dst_tensor_bytes": self.dst_tensor_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4), "seconds": round(self.seconds, 3),
            "imatrix_entries": self.imatrix_entries, "kept_source_type": self.kept, "by_type": self.by_type(),
            "tensors": [dict(name=t.name, shape=list(t.shape), src_type=t.src_type, dst_type=t.dst_type,
                             src_bytes=t.src_bytes, dst_bytes=t.dst_bytes) for t in self.tensors],
        }


# --- importance matrix -----------------------------------------------------------------------------------
@dataclass
class Imatrix:
    """Per-tensor importance (mean squared activation per input column, per expert), as llama.cpp consumes it."""

    path: Path
    entries: dict[str, np.ndarray]  # tensor name -> float32, ne0 * n_experts values
    datasets: list[str]
    chunk_count: int


def load_imatrix(path: str | Path) -> Imatrix:
    """Read llama-imatrix's GGUF output the way tools/quantize does.

    The file holds ``<tensor>.in_sum2`` (sums of squared activations, ne0 per expert) and ``<tensor>.counts``
    (tokens seen, one per expert), both F32, plus ``imatrix.datasets`` / ``chunk_count`` / ``chunk_size``.
    The quantizer wants sum/count per expert, and 1.0 for experts that saw no tokens.
    """
    p = Path(path)
    if not p.is_file():
        raise GgufMtpError(f"{p}: no such file")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GgufMtpError(f"{p}: not a GGUF imatrix (legacy .dat imatrix files are not supported; "
                               "convert one with llama-imatrix --in-file FILE.dat -o FILE.gguf)")
    info = read_gguf(p, tokens=False)
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in info.metadata]
    if missing:
        raise GgufMtpError(f"{p}: not an imatrix GGUF (missing {', '.join(missing)})")
    tensors = {t.name: t for t in info.tensors}
    entries: dict[str, np.ndarray] = {}
    for name in sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")):
        sums_t, counts_t = tensors[name + ".in_sum2"], tensors.get(name + ".counts")
        if counts_t is None:
            raise GgufMtpError(f"{p}: {name} has sums but no counts")
        if sums_t.type != "F32" or counts_t.type != "F32":
            raise GgufMtpError(f"{p}: sums and counts of {name} must be F32")
        n_experts = counts_t.n_elements
        if n_experts < 1 or sums_t.n_elements % n_experts:
            raise GgufMtpError(f"{p}: {name}: {sums_t.n_elements} sums do not split into {n_experts} experts")
        sums = np.asarray(tensor_array(info, sums_t.name), dtype=np.float32).reshape(n_experts, -1)
        counts = np.rint(np.asarray(tensor_array(info, counts_t.name), dtype=np.float64)).reshape(n_experts, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1.0).astype(np.float32)
        if not np.isfinite(values).all():
            raise GgufMtpError(f"{p}: {name} has non-finite importance values")
        entries[name] = np.ascontiguousarray(values.reshape(-1))
    if not entries:
        raise GgufMtpError(f"{p}: no importance data (no *.in_sum2 tensors)")
    datasets = info.metadata.get("imatrix.datasets") or []
    return Imatrix(p, entries, [str(d) for d in datasets], int(info.metadata.get("imatrix.chunk_count") or 0))


# --- ctypes arrays for llama_model_quantize_params -------------------------------------------------------
def _null_terminated(struct_type: Any, items: list[Any]) -> Any:
    """A C array of ``struct_type`` with one zeroed element after ``items`` (llama.cpp's list terminator)."""
    arr = (struct_type * (len(items) + 1))()
    for i, fill in enumerate(items):
        fill(arr[i])
    return arr


def _imatrix_array(lib: Any, imatrix: Imatrix) -> Any:
    def filler(name: str, values: np.ndarray):
        def fill(s: Any) -> None:
            s.name = name.encode()
            s.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            s.size = values.size
        return fill

    return _null_terminated(lib.llama_model_imatrix_data, [filler(n, v) for n, v in imatrix.entries.items()])


def _kv_array(lib: Any, values: dict[str, str | int]) -> Any:
    def filler(key: str, value: str | int):
        def fill(o: Any) -> None:
            o.key = key.encode()[:127]
            if isinstance(value, int):
                o.tag, o.value.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                o.tag, o.value.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
        return fill

    return _null_terminated(lib.llama_model_kv_override, [filler(k, v) for k, v in values.items()])


def _tt_array(lib: Any, overrides: list[tuple[str, int]]) -> Any:
    def filler(pattern: str, qtype: int):
        def fill(o: Any) -> None:
            o.pattern, o.type = pattern.encode(), qtype
        return fill

    arr = _null_terminated(lib.llama_model_tensor_override, [filler(p, t) for p, t in overrides])
    arr[len(overrides)].type = quanttypes.GGML_TYPE_COUNT
    return arr


# --- the plan: everything checked before llama.cpp runs --------------------------------------------------
@dataclass
class _Plan:
    src: Path
    info: GgufInfo
    preset: quanttypes.Preset
    output_tensor_type: int
    token_embedding_type: int
    overrides: list[tuple[str, int]]
    kept: list[str]
    imatrix: Imatrix | None
    threads: int
    allow_requantize: bool


def parse_tensor_type(spec: str | tuple[str, str]) -> tuple[str, int]:
    """``PATTERN=TYPE`` (or a (pattern, type) pair) -> (pattern, ggml_type); the pattern must be a valid regex."""
    if isinstance(spec, str):
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern or not type_name:
            raise GgufMtpError(f"--tensor-type: expected PATTERN=TYPE, got {spec!r}")
    else:
        pattern, type_name = spec
    try:
        re.compile(pattern)
    except re.error as e:
        raise GgufMtpError(f"--tensor-type: bad pattern {pattern!r} ({e})") from None
    return pattern, quanttypes.ggml_type(type_name, "--tensor-type type")


def _plan(src: str | Path, qtype: str, output_tensor_type: str | None, token_embedding_type: str | None,
          tensor_types: Sequence[str | tuple[str, str]], imatrix: str | Path | Imatrix | None, threads: int | None,
          dry_run: bool, allow_requantize: bool) -> _Plan:
    src = Path(src)
    preset = quanttypes.preset(qtype)
    info = read_gguf(src, tokens=False)  # a bad file stops here, before llama.cpp parses it
    overrides = [parse_tensor_type(s) for s in tensor_types]
    kept = []
    for pattern, _why in KEEP_SOURCE_TYPE:
        t = next((t for t in info.tensors if re.search(pattern, t.name)), None)
        if t is not None and not any(re.search(p, t.name) for p, _ in overrides):  # the user's choice wins
            overrides.append((pattern, quanttypes.GGML_TYPES[t.type]))
            kept.append(t.name)
    im = load_imatrix(imatrix) if isinstance(imatrix, str | Path) else imatrix
    if preset.needs_imatrix and im is None and not dry_run:
        raise GgufMtpError(f"{preset.name} needs an importance matrix (--imatrix FILE from llama-imatrix)")
    if threads is not None and threads < 1:
        raise GgufMtpError(f"--threads: expected >= 1, got {threads}")
    out_t = quanttypes.ggml_type(output_tensor_type, "--output-tensor-type") if output_tensor_type else None
    emb_t = quanttypes.ggml_type(token_embedding_type, "--token-embedding-type") if token_embedding_type else None
    return _Plan(src, info, preset, quanttypes.GGML_TYPE_COUNT if out_t is None else out_t,
                 quanttypes.GGML_TYPE_COUNT if emb_t is None else emb_t, overrides, kept, im, threads or 0,
                 allow_requantize)


def _run(plan: _Plan, out: Path | None, progress: ProgressFn | None) -> tuple[dict[str, str], float]:
    """Call llama_model_quantize; returns the new type of each tensor as llama.cpp logged it, and seconds."""
    from .llama_ext import LLAMA_LOG, LogLine, deferred_interrupt, llama

    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.nthread = plan.threads
    params.ftype = plan.preset.ftype
    params.only_copy = plan.preset.only_copy
    params.output_tensor_type = plan.output_tensor_type
    params.token_embedding_type = plan.token_embedding_type
    params.allow_requantize = plan.allow_requantize
    params.dry_run = out is None
    keep_alive: list[Any] = []  # the C arrays must outlive the call
    if plan.imatrix is not None:
        im = plan.imatrix
        keep_alive.append(_imatrix_array(lib, im))
        params.imatrix = keep_alive[-1]
        kv: dict[str, str | int] = {keys.IMATRIX_KEYS["file"]: str(im.path), keys.IMATRIX_KEYS["entries"]: len(im.entries)}
        if im.datasets:
            kv[keys.IMATRIX_KEYS["dataset"]] = im.datasets[0]
        if im.chunk_count > 0:
            kv[keys.IMATRIX_KEYS["chunks"]] = im.chunk_count
        keep_alive.append(_kv_array(lib, kv))
        params.kv_overrides = keep_alive[-1]
    if plan.overrides:
        keep_alive.append(_tt_array(lib, plan.overrides))
        params.tt_overrides = keep_alive[-1]

    new_types: dict[str, str] = {}

    def on_line(line: LogLine) -> None:
        m = _TENSOR_LINE.match(line.text)
        if not m:
            return
        done, total, name, old, rest = int(m[1]), int(m[2]), m[3], m[4].upper(), m[5]
        dry = _DRY_RUN_TYPE.search(rest)
        new_types[name] = dry[1].upper() if dry else old
        if progress is not None:
            progress(done, total, name)

    t0 = time.perf_counter()
    with LLAMA_LOG.capture(on_line) as log, deferred_interrupt():  # Ctrl-C: after llama.cpp returns (it has no cancel)
        rc = lib.llama_model_quantize(str(plan.src).encode(), str(out or "").encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    if rc != 0:
        reason = _failure([ln.text.strip() for ln in log if ln.level == "ERROR" and ln.text.strip()],
                          [ln.text for ln in log])
        if out is not None and "iostream error" in reason:  # libstdc++'s whole message for a failed write
            free = shutil.disk_usage(out.parent).free
            why = "the disk is full" if free < DISK_FULL_BYTES else "a file size limit, a quota or an I/O error"
            raise GgufMtpError(f"{plan.src}: llama.cpp could not write the output in {out.parent}: {why} "
                               f"({free / 2**20:.1f} MiB free); nothing was written")
        raise GgufMtpError(f"{plan.src}: llama.cpp could not quantize it: {reason}")
    return new_types, seconds


def _failure(errors: list[str], lines: Iterable[str]) -> str:
    for line in [*errors, *lines]:
        if "failed to quantize:" in line:
            msg = line.split("failed to quantize:", 1)[1].strip()
            return msg + (" (use --allow-requantize)" if "requantizing" in msg else "")
    if errors:
        return errors[-1]
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else "llama.cpp logged no reason"


def _changes_from_output(src: GgufInfo, out: GgufInfo) -> list[TensorChange]:
    by_name = {t.name: t for t in out.tensors}
    return [TensorChange(t.name, t.shape, t.type, by_name[t.name].type if t.name in by_name else "-", t.n_bytes,
                         by_name[t.name].n_bytes if t.name in by_name else 0) for t in src.tensors]


def _changes_from_log(src: GgufInfo, new_types: dict[str, str]) -> list[TensorChange]:
    sizes = ggml_type_sizes()
    out = []
    for t in src.tensors:
        new = new_types.get(t.name, t.type)
        block, block_bytes = sizes.get(new, (0, 0))
        n = int(np.prod(t.shape, dtype=np.int64))
        new_bytes = n // block * block_bytes if block else 0
        out.append(TensorChange(t.name, t.shape, t.type, new, t.n_bytes, new_bytes))
    return out


def check_provenance(src: GgufInfo, out: GgufInfo) -> None:
    """Our ``gguf_mtp.*`` keys must come through quantization unchanged (llama.cpp copies every key today)."""
    lost = [k for k, v in src.metadata.items() if k.startswith("gguf_mtp.") and out.metadata.get(k) != v]
    if lost:
        raise GgufMtpError(f"{out.path}: the quantizer dropped or changed {', '.join(sorted(lost))}")


# --- public API ------------------------------------------------------------------------------------------
def quantize(
    src: str | Path,
    dst: str | Path | None,
    qtype: str,
    *,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Sequence[str | tuple[str, str]] = (),
    imatrix: str | Path | Imatrix | None = None,
    threads: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_requantize: bool = False,
    progress: ProgressFn | None = None,
) -> QuantizeResult:
    """Quantize ``src`` to ``dst`` as preset ``qtype`` (llama.cpp's name, e.g. ``Q4_K_M``).

    ``tensor_types``: ``PATTERN=TYPE`` overrides (regex searched in tensor names, first match wins) for tensors
    the preset would quantize. ``dry_run`` computes sizes only and writes nothing (``dst`` may be None).
    """
    with ExitStack() as stack:
        plan = _plan(src, qtype, output_tensor_type, token_embedding_type, tensor_types, imatrix, threads,
                     dry_run, allow_requantize)
        tmp = None if dry_run else _open_output(stack, plan.src, dst, force)
        return _quantize_planned(plan, tmp, None if dry_run else Path(dst), progress)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _open_output(stack: ExitStack, src: Path, dst: str | Path | None, force: bool) -> Path:
    if dst is None:
        raise GgufMtpError("an output path is needed unless --dry-run")
    out = check_output_path(dst, force)
    if out.exists() and out.resolve() == src.resolve():
        raise GgufMtpError(f"input and output are the same file: {out}")
    return stack.enter_context(atomic_output(out, force))


def _quantize_planned(plan: _Plan, tmp: Path | None, dst: Path | None, progress: ProgressFn | None) -> QuantizeResult:
    before = _identity(plan.src)
    new_types, seconds = _run(plan, tmp, progress)
    if _identity(plan.src) != before:  # llama.cpp read a file that was being rewritten: its output is suspect
        raise GgufMtpError(f"{plan.src}: the file changed while it was being quantized (size, mtime or inode "
                           "differ); nothing was written")
    if tmp is None:
        changes = _changes_from_log(plan.info, new_types)
        dst_bytes = plan.info.data_offset + sum(-(-c.dst_bytes // plan.info.alignment) * plan.info.alignment
                                                for c in changes)
    else:
        out = read_gguf(tmp, tokens=False)
        check_provenance(plan.info, out)
        changes = _changes_from_output(plan.info, out)
        dst_bytes = out.file_size
    return QuantizeResult(plan.src, dst, plan.preset.name, tmp is None, plan.info.file_size, dst_bytes, changes,
                          seconds, len(plan.imatrix.entries) if plan.imatrix else 0, plan.kept)


# --- target + drafter ------------------------------------------------------------------------------------
_TYPE_SUFFIX = re.compile(r"[-_.](f32|f16|bf16|copy|(?:i|t)?q\d\w*|mxfp4\w*)$", re.IGNORECASE)


def output_name(src: str | Path, qtype: str) -> str:
    """``model-f16.gguf`` + Q4_K_M -> ``model-Q4_K_M.gguf`` (a type tag already in the name is replaced)."""
    stem = _TYPE_SUFFIX.sub("", Path(src).stem) or Path(src).stem
    return f"{stem}-{quanttypes.preset(qtype).name}.gguf"


@dataclass
class PairResult:
    target: QuantizeResult
    drafter: QuantizeResult

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict(), "drafter": self.drafter.to_dict()}


def quantize_pair(
    target: str | Path,
    drafter: str | Path,
    qtype: str,
    out_dir: str | Path,
    *,
    drafter_type: str = DEFAULT_DRAFTER_TYPE,
    imatrix: str | Path | None = None,
    threads: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_requantize: bool = False,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> PairResult:
    """Quantize a target and its drafter into ``out_dir``; both files appear, or neither.

    The pair is checked first (``pairing.check_set``; the centroid head is allowed here, quantizing does not
    change who can run it). The imatrix applies to the target only: it was measured on the target's tensors.
    """
    from .pairing import check_set, facts_from_gguf

    problems = check_set(facts_from_gguf(target), facts_from_gguf(drafter), runtime_centroids=True)
    if problems:
        raise IncompatiblePair("incompatible pair: " + "; ".join(str(p) for p in problems))
    out = Path(out_dir)
    if not out.is_dir():
        raise GgufMtpError(f"output directory {out} does not exist")
    t_out, d_out = out / output_name(target, qtype), out / output_name(drafter, drafter_type)
    if t_out == d_out:
        raise GgufMtpError(f"target and drafter would both be written to {t_out}; rename one of them")

    def role_progress(role: str) -> ProgressFn | None:
        return None if progress is None else (lambda d, n, name: progress(role, d, n, name))

    t_plan = _plan(target, qtype, None, None, (), imatrix, threads, dry_run, allow_requantize)
    d_plan = _plan(drafter, drafter_type, None, None, (), None, threads, dry_run, allow_requantize)
    with ExitStack() as stack:
        t_tmp = None if dry_run else _open_output(stack, t_plan.src, t_out, force)
        d_tmp = None if dry_run else _open_output(stack, d_plan.src, d_out, force)
        t_res = _quantize_planned(t_plan, t_tmp, None if dry_run else t_out, role_progress("target"))
        d_res = _quantize_planned(d_plan, d_tmp, None if dry_run else d_out, role_progress("drafter"))
        return PairResult(t_res, d_res)
