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

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import keys, render
from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from . import memory
from .memory import GiB, fmt_size, parse_size
from .placement import (CPU, GPU, IMAGE_MAX_TOKENS, Breakdown, Files, ModelFile, breakdown, files_from_paths,
                        quantized_kv, split_device, split_points, tensor_slot)

DEFAULT_VRAM = 24 * GiB
DEFAULT_MARGIN = 1 * GiB
MIN_CTX = 4096  # below this a plan offloads weights rather than shrinking the context further
KV_CHOICES = ("f16", "q8_0", "q4_0")
SCHEMA = "gguf-mtp.plan/1"


# --- choosing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """One device of a multi-device plan: a local GPU (``CUDA0``...) or an rpc-server's (``RPC0``... at ``endpoint``)."""

    name: str
    vram: int
    endpoint: str | None = None  # host:port of its rpc-server


def devices_from(gpus: Iterable[int], rpc: Iterable[tuple[str, int]] = (), gpu_prefix: str = "CUDA") -> tuple[Device, ...]:
    """Devices in llama.cpp's default order: rpc-servers first (RPC0, RPC1... as --rpc registers them, one device
    each), then local GPUs -- so the last layers, the output layer, the drafter and the projector stay local."""
    remote = [Device(f"RPC{i}", vram, ep) for i, (ep, vram) in enumerate(rpc)]
    return (*remote, *(Device(f"{gpu_prefix}{i}", vram) for i, vram in enumerate(gpus)))


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
    devices: tuple[Device, ...] = ()  # several devices (split mode layer); empty: one GPU of ``vram``

    def budgets(self) -> dict[str, int]:
        """What each GPU device may hold (its memory less the margin)."""
        if not self.devices:
            return {GPU: self.vram - self.margin}
        return {dv.name: dv.vram - self.margin for dv in self.devices}


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
        return self.breakdown.on_gpus()

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
        for dev, budget in self.request.budgets().items():
            if dev in self.breakdown.gpus:
                per_device.setdefault(dev, {"total": 0, "components": {}})["budget"] = budget
        if self.request.devices:
            for dev, n in self.breakdown.layers.items():
                per_device[dev]["layers"] = n
        if self.request.ram is not None:
            per_device.setdefault(CPU, {"total": 0, "components": {}})["budget"] = self.request.ram
        return {
            "schema": SCHEMA,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall,
            "files": paths,
            "quants": {"target": f.target.quant, "drafter": f.drafter.quant if f.drafter else None},
            "budget": {"vram": self.request.vram, "margin": self.request.margin, "ram": self.request.ram,
                       **({"devices": [{"name": d.name, "vram": d.vram, "rpc": d.endpoint} for d in self.request.devices]}
                          if self.request.devices else {})},
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
    if req.devices:
        split = _split(files, s, req)
        return split is not None, breakdown(files, split or s, req.image_tokens)
    b = breakdown(files, s, req.image_tokens)
    return _ok(b, req), b


def _ok(b: Breakdown, req: Request) -> bool:
    return all(b.on(d) <= n for d, n in req.budgets().items()) and (req.ram is None or b.on(CPU) <= req.ram)


def _with_split(s: RuntimeSettings, names: list[str], counts: list[int]) -> RuntimeSettings:
    """Layer counts as llama.cpp's tensor_split: whole-layer proportions put exactly these counts on the devices
    (placement.split_device), the drafter on the device of the target's last layers."""
    return s.replace(devices=list(names), tensor_split=[float(c) for c in counts], drafter_device=names[-1],
                     rpc=[])


def _split(files: Files, s: RuntimeSettings, req: Request) -> RuntimeSettings | None:
    """The layer split (split mode layer) that fits these settings on the request's devices, or None: first the
    offloaded layers in proportion to what each device has left for layers, else packed from the first device. A
    device that cannot take one layer gets none and leaves the list."""
    names = [d.name for d in req.devices]
    budgets = req.budgets()
    t = files.target
    n_off = t.n_layer + 1 if s.n_gpu_layers < 0 else min(s.n_gpu_layers, t.n_layer + 1)
    per_layer = _layer_costs(files, s, req, n_off)
    while names:
        one = [1] * (len(names) - 1)
        probe = breakdown(files, _with_split(s, names, [*one, max(n_off - len(one), 1)]), req.image_tokens)
        held = [[k] for k in range(len(one))] + [range(len(one), n_off)]  # the probe's layers per device
        fixed = {dv: probe.on(dv) - sum(per_layer[i] for i in held[k]) for k, dv in enumerate(names)}
        room = [max(budgets[dv] - fixed[dv], 0) for dv in names]
        counts = _proportional(per_layer, room)
        for c in (counts, _packed(per_layer, room)):
            if c is None or 0 in c:
                continue
            cand = _with_split(s, names, c)
            if _ok(breakdown(files, cand, req.image_tokens), req):
                return _rpc(cand, req)
        small = next((k for k, r in enumerate(room) if r < min(per_layer[:-1], default=0)), None)
        if small is None or len(names) == 1:
            return None
        names.pop(small)
    return None


def _rpc(s: RuntimeSettings, req: Request) -> RuntimeSettings:
    return s.replace(rpc=[d.endpoint for d in req.devices if d.endpoint and d.name in s.devices])


def _layer_costs(files: Files, s: RuntimeSettings, req: Request, n_off: int) -> list[int]:
    """GPU bytes of each offloaded layer (weights + its KV), in order; the output layer's is counted as fixed."""
    t = files.target
    start = t.n_layer + 1 - n_off
    costs = [0] * n_off  # the last is the output layer: 0 here, its head is in the device's fixed part
    over = s.effective_overrides()
    for ts in t.tensors:
        slot, il = tensor_slot(ts.name)
        if slot == "layer" and il >= start and not any(re.search(p, ts.name) for p, _ in over):
            costs[il - start] += memory.pad(ts.n_bytes, memory.GPU_TENSOR_ALIGN)
    cells = breakdown(files, s, req.image_tokens).cells
    kv = memory.kv_bytes(t.attn_layers(), cells, s.cache_type_k, s.cache_type_v, s.flash_attn != "off")
    for i in range(start, t.n_layer):
        costs[i - start] += kv[i]
    return costs


def _proportional(costs: list[int], room: list[int]) -> list[int] | None:
    """Layer counts from llama.cpp's rule with tensor_split = the room each device has."""
    if not sum(room):
        return None
    splits = split_points([float(r) for r in room], len(room))
    counts = [0] * len(room)
    for i in range(len(costs)):
        counts[split_device(splits, i, len(costs))] += 1
    return counts


def _packed(costs: list[int], room: list[int]) -> list[int] | None:
    """Each device but the last filled in order with as many layers as its room takes; the rest on the last."""
    counts, i = [], 0
    for r in room[:-1]:
        c, used = 0, 0
        while i < len(costs) - 1 and used + costs[i] <= r:
            used += costs[i]
            c += 1
            i += 1
        counts.append(c)
    counts.append(len(costs) - i)
    return counts


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
    # "auto" turns flash attention on for a quantized cache, in the plans that fit and in the closest miss alike
    flash = lambda kv: "on" if quantized_kv(kv) and req.flash_attn == "auto" else req.flash_attn  # noqa: E731
    best: Plan | None = None
    for kv in kv_types:
        fa = flash(kv)
        if quantized_kv(kv) and fa == "off":
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
            if req.devices:
                s = _split(files, s, req)
                assert s is not None  # _largest_ctx found a split at this context
                step = f"{step}; {_split_step(s, files)}"
            p = Plan(req, s, breakdown(files, s, req.image_tokens), True, [step], rank=rank)
            if best is None or _better(p, best):
                best = p
            break
    if best is not None:
        return best
    # nothing fits: report the configuration that misses by the least, at the floor context
    kv = kv_types[-1]
    least: Plan | None = None
    for s, step in _placements(files, base.replace(n_ctx=floor, cache_type_k=kv, cache_type_v=kv,
                                                   flash_attn=flash(kv))):
        if req.devices:  # short of the whole: the layers in proportion to the devices' memory
            s = _with_split(s, [d.name for d in req.devices], [d.vram for d in req.devices])
            s = _rpc(s.replace(tensor_split=[float(d.vram // memory.MiB) for d in req.devices]), req)
        b = breakdown(files, s, req.image_tokens)
        short = max(max(b.on(d) - n for d, n in req.budgets().items()),
                    b.on(CPU) - req.ram if req.ram is not None else 0, 1)
        if least is None or short < least.shortfall:
            least = Plan(req, s, b, False, [step], short)
    assert least is not None
    return least


def _split_step(s: RuntimeSettings, files: Files) -> str:
    counts = ", ".join(f"{d} {int(n)}" for d, n in zip(s.devices, s.tensor_split))
    why = (f"the drafter on {s.drafter_device}, which holds the target's last layers (the drafter reads their KV) and "
           "the output layer") if files.drafter else f"the output layer on {s.devices[-1]}"
    return f"layers split {counts} (-sm layer -ts, the output layer counted on the last); {why}"


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
    if p.request.devices:
        gpu_over = 0
        parts += [f"{d} needs {fmt_size(b.on(d))} for a {fmt_size(n)} budget ({fmt_size(b.on(d) - n)} short)"
                  for d, n in p.request.budgets().items() if b.on(d) > n]
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
    return Files(  # a variant without a vision part has no projector file: layout_for says so
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
    budgets = p.request.budgets()
    for dev in (*p.breakdown.gpus, CPU):
        items = [(c, n) for d, c, n in p.breakdown.rows() if d == dev]
        for c, n in items:
            rows.append([dev, c, fmt_size(n)])
        total = p.breakdown.on(dev)
        if dev in budgets:
            layers = p.breakdown.layers.get(dev, 0)
            what = f"total, {layers} layers (budget {fmt_size(budgets[dev])})" if p.request.devices else \
                f"total (budget {fmt_size(budgets[dev])})"
            rows.append([dev, what, f"{fmt_size(total)} ({fmt_size(budgets[dev] - total)} free)"])
        else:
            rows.append([dev, "total host memory" + (f" (budget {fmt_size(p.request.ram)})" if p.request.ram else ""),
                         fmt_size(total)])
    return rows


__all__ = [
    "DEFAULT_MARGIN", "DEFAULT_VRAM", "Device", "Plan", "Request", "devices_from", "files_from_variant", "plan", "plan_for_files",
    "shortfall_message", "table_rows", "variant_file_names",
]
