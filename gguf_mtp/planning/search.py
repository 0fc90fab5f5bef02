"""Choose how a Gemma 4 target + MTP drafter + vision projector fit a VRAM budget.

``plan()`` walks placements from everything on the GPU towards ever more offloading (MoE experts, the projector,
whole layers), and for each the KV type and the largest context that fit (``placement.breakdown`` prices each
try), or says what does not fit and by how much. With ``n_parallel`` sequences (``base``) the context is their
shared pool: it grows in whole 256-cell blocks per sequence, so each gets ``slot_ctx`` = n_ctx / n_parallel
positions, at most the model's context length. The result's ``runtime`` member is exactly
``RuntimeSettings.to_dict()``. File sets come from GGUFs (``placement.files_from_paths``) or from a registry variant
before download (``files_from_variant``: layouts from the exporter's tables, ``layout.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import keys, render
from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from . import memory
from .memory import GiB, fmt_size, parse_size
from .placement import CPU, GPU, IMAGE_MAX_TOKENS, Breakdown, Files, ModelFile, breakdown, files_from_paths

DEFAULT_VRAM = 24 * GiB
DEFAULT_MARGIN = 1 * GiB
MIN_CTX = 4096  # below this a plan offloads weights rather than shrinking the context further
KV_CHOICES = ("f16", "q8_0", "q4_0")
SCHEMA = "gguf-mtp.plan/1"


# --- choosing ---------------------------------------------------------------------------------------

@dataclass
class Request:
    files: Files
    vram: int = DEFAULT_VRAM
    margin: int = DEFAULT_MARGIN
    ram: int | None = None  # host RAM budget (None: not checked)
    n_ctx: int | None = None  # fixed context (the pool of all base.n_parallel sequences); None: the largest that fits
    max_ctx: bool = False
    kv_type: str | None = None
    flash_attn: str = "auto"
    image_tokens: int = IMAGE_MAX_TOKENS
    base: RuntimeSettings = field(default_factory=RuntimeSettings)


@dataclass
class Plan:
    request: Request
    settings: RuntimeSettings
    breakdown: Breakdown
    fits: bool
    steps: list[str] = field(default_factory=list)
    shortfall: int = 0
    rank: int = 0  # position in the offload order (0: everything on the GPU)

    @property
    def budget(self) -> int:
        return self.request.vram - self.request.margin

    @property
    def gpu_used(self) -> int:
        return self.breakdown.on(GPU)

    @property
    def host_used(self) -> int:
        return self.breakdown.on(CPU)

    def to_dict(self) -> dict[str, Any]:
        f = self.request.files
        paths = {"target": f.target.source, "drafter": f.drafter.source if f.drafter else None,
                 "mmproj": f.mmproj.source if f.mmproj else None}
        per_device: dict[str, dict[str, Any]] = {}
        for dev, comp, n in self.breakdown.rows():
            entry = per_device.setdefault(dev, {"total": 0, "components": {}})
            entry["components"][comp] = n
            entry["total"] += n
        per_device.setdefault(GPU, {"total": 0, "components": {}})["budget"] = self.budget
        if self.request.ram is not None:
            per_device.setdefault(CPU, {"total": 0, "components": {}})["budget"] = self.request.ram
        return {
            "schema": SCHEMA,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall,
            "files": paths,
            "quants": {"target": f.target.quant, "drafter": f.drafter.quant if f.drafter else None},
            "budget": {"vram": self.request.vram, "margin": self.request.margin, "ram": self.request.ram},
            "runtime": self.settings.to_dict(),
            "slot_ctx": self.settings.slot_ctx,
            "contexts": self.breakdown.contexts,
            "kv_cells": {"full": self.breakdown.cells.full, "sliding": self.breakdown.cells.sliding}
            if self.breakdown.cells else None,
            "devices": per_device,
            "steps": self.steps,
            "llama_server": render.server_command(self.settings, paths["target"], paths["drafter"], paths["mmproj"],
                                                  draft_default=_draft_default(f)),
            "ollama": {
                "parameters": render.ollama_parameters(self.settings, f.drafter is not None, f.target.n_layer,
                                                       draft_default=_draft_default(f)),
                "not_expressible": [o.comment for o in render.ollama_unexpressible(self.settings)],
            },
        }


def _draft_default(f: Files) -> int | None:
    try:
        return render.recommended_draft_length(f.target.n_embd, f.target.n_layer)
    except GgufMtpError:
        return None


def _fits(files: Files, s: RuntimeSettings, req: Request) -> tuple[bool, Breakdown]:
    b = breakdown(files, s, req.image_tokens)
    ok = b.on(GPU) <= req.vram - req.margin and (req.ram is None or b.on(CPU) <= req.ram)
    return ok, b


def _largest_ctx(files: Files, s: RuntimeSettings, req: Request, lo: int, hi: int) -> int | None:
    """The largest multiple of 256 x n_parallel in [lo, hi] that fits (memory grows with the context), or None."""
    step = memory.KV_CELL_PAD * s.n_parallel
    lo, hi = memory.pad(lo, step), hi // step * step
    if hi < lo or not _fits(files, s.replace(n_ctx=lo), req)[0]:
        return None
    while lo < hi:
        mid = (lo + hi + step) // 2 // step * step
        if _fits(files, s.replace(n_ctx=mid), req)[0]:
            lo = mid
        else:
            hi = mid - step
    return lo


def _placements(files: Files, s: RuntimeSettings) -> Iterable[tuple[RuntimeSettings, str]]:
    """Ever less on the GPU: MoE experts layer by layer (like --n-cpu-moe), then the projector, then whole
    layers from the front (n_gpu_layers). At least one repeating layer stays on the GPU: below that the
    budget is too small for anything."""
    t = files.target
    yield s, "everything on the GPU"
    moe_layers = [i for i in range(t.n_layer) if t.tensor(f"blk.{i}.ffn_down_exps.weight")]
    for n in range(1, len(moe_layers) + 1):
        yield s.replace(n_cpu_moe=n), f"MoE experts of the first {n} layer(s) on the CPU (--n-cpu-moe {n})"
    if moe_layers:
        s = s.replace(n_cpu_moe=len(moe_layers))
    if files.mmproj is not None:
        s = s.replace(mmproj_on_gpu=False)
        yield s, "projector on the CPU"
    for ngl in range(t.n_layer, 1, -1):
        yield s.replace(n_gpu_layers=ngl), f"{ngl - 1} of {t.n_layer} layers and the output layer on the GPU (-ngl {ngl})"


def plan(req: Request) -> Plan:
    """Placement, KV type and context for the request; ``fits`` False with the shortfall when nothing fits."""
    files = req.files
    _check_files(files)
    n_seq = req.base.n_parallel
    n_train = files.target.n_ctx_train or 131072
    want_max = req.n_ctx is None or req.max_ctx
    each = -(-req.n_ctx // n_seq) if req.n_ctx is not None else 0  # a fixed pool's share per sequence
    if each > n_train:
        per_seq = f" ({each} for each of {n_seq} sequences)" if n_seq > 1 else ""
        raise GgufMtpError(f"--ctx {req.n_ctx}{per_seq} exceeds the model's context length ({n_train})")
    floor = req.n_ctx if req.n_ctx is not None and not req.max_ctx else min(MIN_CTX, n_train) * n_seq
    kv_types = [req.kv_type] if req.kv_type else list(KV_CHOICES[:2])
    base = req.base.replace(flash_attn=req.flash_attn)
    if not req.kv_type:
        base = base.replace(cache_type_k="f16", cache_type_v="f16")
    best: Plan | None = None
    for kv in kv_types:
        fa = "on" if kv not in ("f16", "f32", "bf16") and req.flash_attn == "auto" else req.flash_attn
        if kv not in ("f16", "f32", "bf16") and fa == "off":
            continue  # llama.cpp refuses a quantized V cache without flash attention
        s0 = base.replace(cache_type_k=kv, cache_type_v=kv, flash_attn=fa)
        for rank, (s, step) in enumerate(_placements(files, s0)):
            if best is not None and rank > best.rank:
                break  # more offloading than a plan we already have
            hi = n_train * n_seq if want_max else req.n_ctx
            ctx = _largest_ctx(files, s, req, floor, hi) if want_max else (
                req.n_ctx if _fits(files, s.replace(n_ctx=req.n_ctx), req)[0] else None)
            if ctx is None:
                continue
            s = s.replace(n_ctx=ctx)
            p = Plan(req, s, breakdown(files, s, req.image_tokens), True, [step], rank=rank)
            if best is None or _better(p, best):
                best = p
            break
    if best is not None:
        return best
    # nothing fits: report the configuration that misses by the least, at the floor context
    kv = kv_types[-1]
    fa = "on" if kv != "f16" and req.flash_attn == "auto" else req.flash_attn
    least: Plan | None = None
    for s, step in _placements(files, base.replace(n_ctx=floor, cache_type_k=kv, cache_type_v=kv, flash_attn=fa)):
        b = breakdown(files, s, req.image_tokens)
        short = max(b.on(GPU) - (req.vram - req.margin), b.on(CPU) - req.ram if req.ram is not None else 0, 1)
        if least is None or short < least.shortfall:
            least = Plan(req, s, b, False, [step], short)
    assert least is not None
    return least


def _better(p: Plan, best: Plan) -> bool:
    """Less offloading wins (offloaded weights cost far more speed than a quantized cache); then context, where
    a quantized cache must buy at least twice the context to beat f16."""
    if p.rank != best.rank:
        return p.rank < best.rank
    a, b = p.settings, best.settings
    quant_a, quant_b = a.cache_type_k != "f16", b.cache_type_k != "f16"
    if quant_a != quant_b:
        return a.n_ctx >= 2 * b.n_ctx if quant_a else 2 * a.n_ctx > b.n_ctx
    return a.n_ctx > b.n_ctx


def _check_files(files: Files) -> None:
    from .. import pairing

    if files.target.arch != keys.ARCH_TARGET:
        raise GgufMtpError(f"{files.target.source}: expected a {keys.ARCH_TARGET} target, got "
                           f"{files.target.arch or 'no architecture'}")
    facts = lambda m: pairing.facts_from_metadata(m.meta) if m else None  # noqa: E731
    pairing.require_compatible(facts(files.target), facts(files.drafter), facts(files.mmproj),
                               runtime_centroids=True)


def shortfall_message(p: Plan) -> str:
    """One line: what does not fit, and by how much."""
    b, s = p.breakdown, p.settings
    gpu_over = b.on(GPU) - p.budget
    parts = [f"even with {p.steps[-1] if p.steps else 'the smallest placement'} and a {s.cache_type_k} KV cache"]
    if gpu_over > 0:
        biggest = max(((c, n) for (d, c), n in b.items.items() if d == GPU), key=lambda x: x[1], default=None)
        parts.append(f"the GPU needs {fmt_size(b.on(GPU))} for a {fmt_size(p.budget)} budget "
                     f"(VRAM {fmt_size(p.request.vram)} - margin {fmt_size(p.request.margin)}): "
                     f"{fmt_size(gpu_over)} short at {s.n_ctx} tokens of context{_slots(s)}"
                     + (f"; largest item: {biggest[0]} {fmt_size(biggest[1])}" if biggest else ""))
    if p.request.ram is not None and b.on(CPU) > p.request.ram:
        parts.append(f"host RAM needs {fmt_size(b.on(CPU))} of {fmt_size(p.request.ram)} "
                     f"({fmt_size(b.on(CPU) - p.request.ram)} short)")
    return "does not fit: " + "; ".join(parts)


def _slots(s: RuntimeSettings) -> str:
    return f" ({s.n_parallel} sequences of {s.slot_ctx})" if s.n_parallel > 1 else ""


# --- building the file set ------------------------------------------------------------------------------

def variant_file_names(variant: str, quant: str, drafter_quant: str) -> dict[str, str]:
    """The usual file names for a variant's files (as published GGUF repos name them)."""
    return {"target": f"gemma-4-{variant}-it-{quant}.gguf", "drafter": f"mtp-gemma-4-{variant}-it-{drafter_quant}.gguf",
            "mmproj": f"mmproj-gemma-4-{variant}-it-F16.gguf"}


def files_from_variant(variant: str, quant: str | None = None, drafter_quant: str | None = None,
                       drafter: bool = True, vision: bool = False) -> Files:
    """The file set of a registry variant before download: the exporter's layouts for it, with the per-tensor types
    llama.cpp's quantizer gives them (``layout.layout_for``); no file is written."""
    from ..registry import get_variant
    from .layout import layout_for

    v = get_variant(variant)
    quant = (quant or v.recommended.target_quant).upper()
    dq = (drafter_quant or v.recommended.drafter_quant).upper()
    names = variant_file_names(v.name, quant, dq)
    if vision and v.vision is None:
        raise GgufMtpError(f"{v.name} has no vision tower")
    return Files(
        ModelFile.from_layout(layout_for(v.name, "target", quant), "target", names["target"]),
        ModelFile.from_layout(layout_for(v.name, "drafter", dq), "drafter", names["drafter"]) if drafter else None,
        ModelFile.from_layout(layout_for(v.name, "mmproj"), "mmproj", names["mmproj"]) if vision else None,
    )


def plan_for_files(target: str | Path, drafter: str | Path | None = None, mmproj: str | Path | None = None, *,
                   vram: str | int = DEFAULT_VRAM, margin: str | int = DEFAULT_MARGIN, n_ctx: int | None = None,
                   kv_type: str | None = None, n_parallel: int = 1) -> Plan:
    """One call for other commands (serve-cmd / modelfile --vram): plan these files for this budget."""
    return plan(Request(files_from_paths(target, drafter, mmproj), parse_size(vram), parse_size(margin),
                        n_ctx=n_ctx, kv_type=kv_type, base=RuntimeSettings(n_parallel=n_parallel)))


def table_rows(p: Plan) -> list[list[str]]:
    """Device, component, size rows for the human table, GPU first, with a total and free line per device."""
    rows: list[list[str]] = []
    for dev in (GPU, CPU):
        items = [(c, n) for d, c, n in p.breakdown.rows() if d == dev]
        for c, n in items:
            rows.append([dev, c, fmt_size(n)])
        total = p.breakdown.on(dev)
        if dev == GPU:
            rows.append([dev, f"total (budget {fmt_size(p.budget)})", f"{fmt_size(total)} ({fmt_size(p.budget - total)} free)"])
        else:
            rows.append([dev, "total host memory" + (f" (budget {fmt_size(p.request.ram)})" if p.request.ram else ""),
                         fmt_size(total)])
    return rows


__all__ = [
    "DEFAULT_MARGIN", "DEFAULT_VRAM", "Plan", "Request", "files_from_variant", "plan", "plan_for_files",
    "shortfall_message", "table_rows", "variant_file_names",
]
