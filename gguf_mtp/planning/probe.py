"""Ask llama.cpp itself what a model + context would allocate, without allocating or reading weights.

``measure`` loads a GGUF with ``no_alloc`` (and ``load_mode = NONE``, without which llama.cpp aborts), creates
the target context and optionally the drafter's MTP context (``ctx_type = MTP``, ``ctx_other`` = the target
context), and reads back llama.cpp's per-buffer-type memory breakdown (model weights, KV cache, compute buffers).
The planner never calls this: it is the yardstick the planner's own arithmetic is tested against
(tests/test_plan.py, bench/plan_matrix.py, bench/gpu_check.sh).

``llama_get_memory_breakdown`` returns a C++ ``std::map`` by value; it is read here through the Itanium ABI
(hidden return pointer, libstdc++ red-black tree nodes). A staging API of llama.cpp: if its layout changes,
the log lines (``llama_kv_cache: size = ...``, ``compute buffer size = ...``) remain as a cross-check.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

from ..errors import GgufMtpError
from ..llama_ext import LLAMA_LOG, cpu_amx, ggml_fn, llama, model_params

LOAD_MODE_NONE = 0
CTX_TYPE_MTP_NAME = "LLAMA_CONTEXT_TYPE_MTP"
FLASH = {"auto": -1, "off": 0, "on": 1}


# --- the memory breakdown (std::map<buft, {model, context, compute}>) --------------------------------

class _MapHeader(ctypes.Structure):
    # libstdc++ std::map: key_compare (padded to 8), header node {color, parent, left, right}, node count
    _fields_ = [("cmp", ctypes.c_uint64), ("color", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("root", ctypes.c_void_p), ("left", ctypes.c_void_p), ("right", ctypes.c_void_p),
                ("count", ctypes.c_size_t)]


class _Node(ctypes.Structure):
    _fields_ = [("color", ctypes.c_int32), ("pad", ctypes.c_int32), ("parent", ctypes.c_void_p),
                ("left", ctypes.c_void_p), ("right", ctypes.c_void_p), ("buft", ctypes.c_void_p),
                ("model", ctypes.c_size_t), ("context", ctypes.c_size_t), ("compute", ctypes.c_size_t)]


def memory_breakdown(ctx: ctypes.c_void_p) -> dict[str, dict[str, int]]:
    """buffer-type name -> {"model", "context", "compute"} bytes, as llama.cpp accounts them."""
    fn = ggml_fn("_Z26llama_get_memory_breakdownPK13llama_context", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p])
    name_fn = ggml_fn("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])
    head = _MapHeader()
    fn(ctypes.addressof(head), ctx)
    out: dict[str, dict[str, int]] = {}
    stack = [head.root] if head.root else []
    seen = 0
    while stack:
        ptr = stack.pop()
        node = _Node.from_address(ptr)
        name = name_fn(node.buft).decode() if node.buft else "?"
        acc = out.setdefault(name, {"model": 0, "context": 0, "compute": 0})
        acc["model"] += node.model
        acc["context"] += node.context
        acc["compute"] += node.compute
        seen += 1
        stack += [p for p in (node.left, node.right) if p]
    if seen != head.count:
        raise GgufMtpError(f"memory breakdown: read {seen} entries, llama.cpp reports {head.count}")
    return out  # the map's nodes are leaked on purpose: a few bytes per probe, freeing needs C++


# --- measuring --------------------------------------------------------------------------------------

@dataclass
class ContextShape:
    """The llama_context_params that size memory."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_outputs_max: int = 0  # 0 = n_batch (llama.cpp's default)
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"
    swa_full: bool = False
    kv_unified: bool = False


@dataclass
class Usage:
    """One context's accounting: per buffer type, plus the numbers parsed from the log."""

    breakdown: dict[str, dict[str, int]]
    log: str
    n_ctx: int = 0

    def total(self, kind: str) -> int:
        return sum(v[kind] for v in self.breakdown.values())

    @property
    def kv_log_bytes(self) -> int:
        """Sum of the 'llama_kv_cache: size = X MiB' lines (MiB, 2 decimals: a cross-check only)."""
        return int(sum(float(m) for m in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", self.log)) * 2**20)

    @property
    def kv_cells(self) -> list[int]:
        return [int(c) for c in re.findall(r"llama_kv_cache: size = +[\d.]+ MiB \( *(\d+) cells", self.log)]


@dataclass
class Measurement:
    target: Usage
    drafter: Usage | None = None
    device_used: int | None = None  # alloc=True: GPU bytes the loads and contexts took (free memory before - after)


def _ggml_type_id(name: str) -> int:
    from .memory import ggml_type

    return int(ggml_type(name))


def _ctx_params(shape: ContextShape):  # -> llama_context_params
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = shape.n_ctx, shape.n_batch, shape.n_ubatch
    p.n_seq_max, p.n_outputs_max = shape.n_seq_max, shape.n_outputs_max
    p.type_k, p.type_v = _ggml_type_id(shape.type_k), _ggml_type_id(shape.type_v)
    p.flash_attn_type = FLASH[shape.flash_attn]
    p.swa_full, p.kv_unified = shape.swa_full, shape.kv_unified
    p.n_threads = p.n_threads_batch = 1
    return p


def _load(path: str | os.PathLike, n_gpu_layers: int, overrides=None, alloc: bool = False, repack: bool = True,
          devices=None):
    import llama_cpp

    mp = model_params(n_gpu_layers, repack)
    if devices is not None:  # runtime.devices.Placement: several devices, as the engine loads them
        devices.apply(mp)
    mp.no_alloc = not alloc
    if not alloc:
        mp.load_mode = LOAD_MODE_NONE  # no_alloc under mmap aborts the process (GGML_ASSERT(!ml.no_alloc))
    if overrides is not None and overrides.pointer:
        mp.tensor_buft_overrides = overrides.pointer
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mp)
    if not model:
        raise GgufMtpError(f"llama.cpp could not load {path} ({'allocating' if alloc else 'no_alloc'})")
    return model


def measure(target: str | os.PathLike, shape: ContextShape | None = None, drafter: str | os.PathLike | None = None,
            drafter_shape: ContextShape | None = None, n_gpu_layers: int = -1,
            overrides: list[tuple[str, str]] | None = None, drafter_n_gpu_layers: int | None = None,
            alloc: bool = False, repack: bool = True, target_devices=None, drafter_devices=None) -> Measurement:
    """llama.cpp's own accounting for target (+ drafter MTP context), with nothing allocated or read.

    ``overrides``: (pattern, "CPU"|"GPU") tensor buffer-type overrides (``-ot``; ``n_cpu_moe`` expands to these).
    ``repack``: allow the CPU's extra buffer types (llama-server --no-repack turns them off).
    ``alloc``: really allocate (on a GPU machine, to compare with the device's free memory; the skeleton's
    sparse data reads as zeros).
    ``target_devices`` / ``drafter_devices``: ``runtime.devices.Placement`` (devices, tensor_split, n_gpu_layers)
    for a load over several devices, RPC servers included; they replace ``n_gpu_layers``.
    """
    import llama_cpp

    from ..runtime.bindings import BuftOverrides

    llama()  # backend initialised once
    shape = shape or ContextShape()
    models, ctxs = [], []
    ovr = BuftOverrides(overrides) if overrides else None
    gpus = [n for n in device_memory() if n.startswith(("CUDA", "ROCm", "Metal", "Vulkan"))] if alloc else []
    free0 = device_memory()[gpus[0]][0] if gpus else None
    try:
        with LLAMA_LOG.capture() as log:
            tm = _load(target, n_gpu_layers, ovr, alloc, repack, target_devices)
            models.append(tm)
            tctx = llama_cpp.llama_init_from_model(tm, _ctx_params(shape))
            if not tctx:
                raise GgufMtpError(f"llama.cpp could not create a context for {target}")
            ctxs.append(tctx)
        tusage = Usage(memory_breakdown(tctx), "\n".join(map(str, log)), llama_cpp.llama_n_ctx(tctx))
        dusage = None
        if drafter is not None:
            with LLAMA_LOG.capture() as dlog:
                dm = _load(drafter, n_gpu_layers if drafter_n_gpu_layers is None else drafter_n_gpu_layers,
                           None, alloc, repack, drafter_devices)
                models.append(dm)
                dp = _ctx_params(drafter_shape or shape)
                dp.n_ctx = llama_cpp.llama_n_ctx(tctx)
                dp.ctx_type = getattr(llama_cpp, CTX_TYPE_MTP_NAME)
                dp.ctx_other = tctx
                dp.n_rs_seq = 0
                dctx = llama_cpp.llama_init_from_model(dm, dp)
                if not dctx:
                    raise GgufMtpError(f"llama.cpp could not create the MTP context for {drafter}")
                ctxs.append(dctx)
            dusage = Usage(memory_breakdown(dctx), "\n".join(map(str, dlog)), llama_cpp.llama_n_ctx(dctx))
        used = free0 - device_memory()[gpus[0]][0] if free0 is not None else None
        return Measurement(tusage, dusage, used)
    finally:
        for c in reversed(ctxs):
            llama_cpp.llama_free(c)
        for m in reversed(models):
            llama_cpp.llama_model_free(m)


def device_memory() -> dict[str, tuple[int, int]]:
    """Free and total bytes of every backend device (ggml_backend_dev_memory): the GPU's ground truth."""
    llama()
    size_p = ctypes.POINTER(ctypes.c_size_t)
    count = ggml_fn("ggml_backend_dev_count", ctypes.c_size_t, [])
    get = ggml_fn("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    name = ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    memory = ggml_fn("ggml_backend_dev_memory", None, [ctypes.c_void_p, size_p, size_p])
    out = {}
    for i in range(count()):
        dev = get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        out[name(dev).decode()] = (free.value, total.value)
    return out


def model_buffers(path: str | os.PathLike, n_gpu_layers: int = -1) -> dict[str, int]:
    """Weights per buffer type for a loaded model (a minimal context is created to reach the breakdown)."""
    m = measure(path, ContextShape(n_ctx=256, n_batch=32, n_ubatch=32), n_gpu_layers=n_gpu_layers)
    return {k: v["model"] for k, v in m.target.breakdown.items() if v["model"]}


# --- the projector (libmtmd) ------------------------------------------------------------------------

class _DevNode(ctypes.Structure):
    # std::map<ggml_backend_dev_t, size_t> node: base {color, parent, left, right}, then the pair
    _fields_ = [("color", ctypes.c_int32), ("pad", ctypes.c_int32), ("parent", ctypes.c_void_p),
                ("left", ctypes.c_void_p), ("right", ctypes.c_void_p), ("dev", ctypes.c_void_p),
                ("size", ctypes.c_size_t)]


def projector_usage(mmproj: str | os.PathLike, flash_attn: str = "auto", image_max_tokens: int = 0) -> dict[str, int]:
    """libmtmd's own estimate (``mtmd_get_memory_usage``: a no_alloc load plus its warm-up graph, which for
    gemma4v is a 256-token image): device name -> weights + compute bytes."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    llama()
    lib = mtmd_cpp._libmtmd
    fn = getattr(lib, "_Z21mtmd_get_memory_usagePKc19mtmd_context_params")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, mtmd_cpp.mtmd_context_params]
    fn.restype = ctypes.c_void_p
    dev_name = ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = True
    params.warmup = True
    params.n_threads = 1
    params.flash_attn_type = FLASH[flash_attn]
    params.image_max_tokens = image_max_tokens or -1
    head = _MapHeader()
    fn(ctypes.addressof(head), os.fsencode(mmproj), params)
    out: dict[str, int] = {}
    stack = [head.root] if head.root else []
    while stack:
        node = _DevNode.from_address(stack.pop())
        name = dev_name(node.dev).decode() if node.dev else "?"
        out[name] = out.get(name, 0) + node.size
        stack += [p for p in (node.left, node.right) if p]
    if not out:
        raise GgufMtpError(f"libmtmd could not estimate {mmproj} (it failed to load)")
    del llama_cpp
    return out


# --- planner vs llama.cpp -----------------------------------------------------------------------------

@dataclass
class Agreement:
    """One number both the planner and llama.cpp produce."""

    item: str
    planner: int
    llama: int

    @property
    def error(self) -> float:
        return self.planner / self.llama - 1 if self.llama else (0.0 if not self.planner else float("inf"))

    def to_dict(self) -> dict:
        return {"item": self.item, "planner": self.planner, "llama": self.llama, "error": round(self.error, 5)}


def compare_with_llama(target: str | os.PathLike, drafter: str | os.PathLike | None = None,
                       settings=None, mmproj: str | os.PathLike | None = None, image_tokens: int = 256) -> list[Agreement]:
    """The planner's weights / KV / compute numbers next to llama.cpp's own no_alloc accounting, for one set of
    runtime settings (``n_parallel`` sequences: both contexts shaped as the engine makes them). Everything is
    compared on the CPU (n_gpu_layers 0): a CPU-only build puts every buffer there, and the totals per component
    are what both sides must agree on."""
    from . import placement as planner
    from ..settings import RuntimeSettings

    s = (settings or RuntimeSettings()).replace(n_gpu_layers=0, drafter_on_gpu=False, mmproj_on_gpu=False)
    files = planner.files_from_paths(target, drafter, mmproj)
    b = planner.breakdown(files, s, image_tokens, cpu_amx=cpu_amx().usable)
    shapes = _shapes(s, drafter is not None)
    m = measure(target, shapes["target"], drafter, shapes.get("drafter"), n_gpu_layers=0, repack=s.repack)
    pick = lambda prefix: sum(n for (_, c), n in b.items.items() if c.startswith(prefix))  # noqa: E731
    out = [
        Agreement("target weights", pick("target layers") + pick("target embeddings") + pick("target output head")
                  + pick("target offloaded"), m.target.total("model")),
        Agreement("KV cache", pick("KV cache"), m.target.total("context")),
        Agreement("target compute", pick("target compute buffer"), m.target.total("compute")),
    ]
    if drafter is not None and m.drafter is not None:
        out += [
            Agreement("drafter weights", pick("drafter layers") + pick("drafter embeddings") + pick("drafter output head"),
                      m.drafter.total("model")),
            Agreement("drafter KV cache", 0, m.drafter.total("context")),
            Agreement("drafter compute", pick("drafter compute"), m.drafter.total("compute")),
        ]
    if mmproj is not None:
        usage = sum(projector_usage(mmproj, s.flash_attn).values())  # weights + compute, one number
        weights = pick("projector weights")
        out.append(Agreement("projector weights + compute", weights + pick("projector compute"), usage))
        out.append(Agreement("projector compute (256-token image)", pick("projector compute"), usage - weights))
    return out


def _shapes(s, drafter: bool) -> dict[str, ContextShape]:
    """Both contexts as the engine shapes them for these settings (placement.context_shapes)."""
    from . import placement as planner

    return {role: ContextShape(n_ctx=c["n_ctx"], n_batch=c["n_batch"], n_ubatch=c["n_ubatch"],
                               n_seq_max=c["n_seq_max"], n_outputs_max=c["n_outputs_max"], type_k=s.cache_type_k,
                               type_v=s.cache_type_v, flash_attn=s.flash_attn, swa_full=s.swa_full,
                               kv_unified=c["kv_unified"])
            for role, c in planner.context_shapes(s, drafter).items()}


# --- per device: the planner's split next to llama.cpp's own per-device allocation ------------------------

# what the planner's components are, by the breakdown's kind (model / context / compute); anything else (the host
# output buffers) is not in llama.cpp's memory breakdown
_KINDS = {"model": ("layers", "embeddings (input)", "output head", "offloaded tensors"),
          "context": ("KV cache",), "compute": ("compute buffer",)}
_KIND_NAMES = {"model": "weights", "context": "KV cache", "compute": "compute"}


def buft_device(buft: str, names: list[str]) -> str:
    """The plan's device name for one of llama.cpp's buffer types: CPU and host buffers are "CPU"; an RPC
    buffer ("RPC0[host:port]") is the plan's device of that endpoint ("RPC1", "RPC[host:port]", ...)."""
    rpc = re.fullmatch(r"RPC\d*\[(.+)\]", buft)
    if rpc:
        return next((n for n in names if n.endswith(f"[{rpc.group(1)}]")), buft)
    if buft.startswith("CPU") or buft.endswith("_Host"):
        return "CPU"
    return buft


def _planned(b, role: str, kind: str, device: str) -> int:
    parts = _KINDS[kind]
    return sum(n for (d, c), n in b.items.items() if d == device and (
        c.startswith("KV cache") if kind == "context" and role == "target" else
        c.startswith(f"{role} ") and c[len(role) + 1:].startswith(parts)))


def compare_devices(target: str | os.PathLike, drafter: str | os.PathLike | None, settings) -> list[Agreement]:
    """Per device, per model: the planner's weights, KV and compute bytes next to llama.cpp's no_alloc accounting
    of a load over the same devices, made as the engine makes it (runtime.devices: RPC servers added, the target's
    layer split, the drafter on its device). ``settings.devices`` name the plan's devices (``RPC[host:port]`` for a
    server, so the names do not depend on the order they were added), without "CPU": the layers
    ``n_gpu_layers`` leaves out stay on the CPU. Adds the RPC servers to this process for good (run it in a process
    of its own)."""
    from . import placement as planner
    from ..runtime import devices as rdev

    s = settings
    files = planner.files_from_paths(target, drafter)
    b = planner.breakdown(files, s, cpu_amx=cpu_amx().usable)
    rdev.add_rpc_servers(s.rpc)
    shapes = _shapes(s, drafter is not None)
    m = measure(target, shapes["target"], drafter, shapes.get("drafter"), repack=s.repack,
                target_devices=rdev.target_placement(s, files.target.n_layer),
                drafter_devices=rdev.drafter_placement(s) if drafter is not None else None)
    names = ["CPU", *[n for n in s.devices if n != "CPU"]]
    out = []
    for role, usage in (("target", m.target), ("drafter", m.drafter)):
        if usage is None:
            continue
        measured: dict[tuple[str, str], int] = {}
        for buft, acc in usage.breakdown.items():
            for kind, n in acc.items():
                key = (buft_device(buft, names), kind)
                measured[key] = measured.get(key, 0) + n
        for dev in names:
            for kind in _KINDS:
                planned = _planned(b, role, kind, dev) if not (role == "drafter" and kind == "context") else 0
                got = measured.get((dev, kind), 0)
                if planned or got:
                    out.append(Agreement(f"{role} {_KIND_NAMES[kind]} on {dev}", planned, got))
    return out


__all__ = ["Agreement", "ContextShape", "Measurement", "Usage", "buft_device", "compare_devices", "compare_with_llama",
           "device_memory", "measure", "memory_breakdown", "model_buffers", "projector_usage"]
