"""Memory arithmetic for Gemma 4 on llama.cpp: sizes, tensor bytes, KV-cache cells and bytes, compute buffers.

Pure functions over numbers (no files, no llama.cpp): ``placement.py`` feeds them a model layout and a set of runtime
settings. Each formula names the llama.cpp behaviour it reproduces (llama-context.cpp, llama-kv-cache*.cpp,
ggml-alloc); tests/test_plan.py checks them against llama.cpp's own no_alloc numbers on full-size skeletons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GgufMtpError
from ..settings import N_CTX_PAD

MiB = 1024 * 1024
GiB = 1024 * MiB

KV_CELL_PAD = N_CTX_PAD  # llama_context pads n_ctx (and the SWA cache) to 256 cells
TENSOR_ALIGN = 32  # GGUF data alignment; CPU buffers align each tensor to 32 bytes (CUDA: 128)
GPU_TENSOR_ALIGN = 128
_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


# --- sizes as people write them ---------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'24GiB', '24GB' (decimal), '1024MiB', '1.5G' (binary) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise GgufMtpError(f"expected a size like 24GiB, 24GB or 1024MiB, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "KI": 2**10, "KIB": 2**10, "KB": 10**3, "M": 2**20, "MI": 2**20, "MIB": 2**20,
             "MB": 10**6, "G": 2**30, "GI": 2**30, "GIB": 2**30, "GB": 10**9, "T": 2**40, "TI": 2**40,
             "TIB": 2**40, "TB": 10**12}[unit]
    return int(value * scale)


def fmt_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# --- ggml types -------------------------------------------------------------------------------------


def ggml_type(name: str) -> GGMLQuantizationType:
    """A ggml type from llama.cpp's spelling, any case ("q8_0", "Q4_K", "bf16")."""
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise GgufMtpError(f"unknown ggml type {name!r}") from None


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of ``n`` consecutive elements (ggml_row_size): whole blocks of the type."""
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    if n % block:
        raise GgufMtpError(f"a row of {n} elements is not a whole number of {type_name} blocks ({block})")
    return n // block * size


def tensor_bytes(type_name: str, shape: tuple[int, ...] | list[int]) -> int:
    """ggml_nbytes of a contiguous tensor, shape in ggml order {ne0, ne1, ...}."""
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows * row_bytes(type_name, shape[0])


def pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


# llama.cpp's AMX buffer type (ggml-cpu/amx, offered where the CPU has AMX and the process may use it) takes the
# CPU-resident matmul weights of these types and repacks them, adding bytes per block (mmq.cpp get_row_size:
# Q8_0 a 4-byte compensation sum, Q4_K/Q5_K 4 bytes of scales, IQ4_XS 2). A weight qualifies when its rows are
# whole blocks (K % block; TILE_K = 32 for the legacy types, QK_K = 256 for the K-types) and its row count is a
# multiple of 2 * TILE_N = 32. Matmul weights only: not token_embd / per-layer embeddings (GET_ROWS), norms,
# or 3-D MoE experts (MUL_MAT_ID). Checked against llama.cpp's accounting on an AMX machine: E2B Q4_K_M target
# on the CPU, +25,073,664 bytes.
AMX_BLOCK_EXTRA = {"Q4_0": (32, 0), "Q4_1": (32, 0), "Q8_0": (32, 4), "Q4_K": (256, 4), "Q5_K": (256, 4),
                   "Q6_K": (256, 0), "IQ4_XS": (256, 2)}
AMX_ROW_MULTIPLE = 32


def amx_weight_bytes(type_name: str, shape: tuple[int, ...] | list[int]) -> int | None:
    """The AMX buffer's size for a 2-D matmul weight, or None where the AMX buffer type does not take it."""
    rule = AMX_BLOCK_EXTRA.get(type_name.upper())
    if rule is None or len(shape) != 2:
        return None
    block, extra = rule
    k, n = shape
    if k % block or n % AMX_ROW_MULTIPLE:
        return None
    return tensor_bytes(type_name, shape) + k // block * n * extra


# --- KV cache ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnLayer:
    """One attention layer as the KV cache sees it (llama_hparams per layer)."""

    sliding: bool
    head_dim: int  # n_embd_head_k == n_embd_head_v for Gemma 4
    n_head: int
    n_head_kv: int
    owns_kv: bool = True  # False: a KV-shared layer (reads an earlier layer's cache)

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv


@dataclass(frozen=True)
class KVCells:
    """Cell counts the way llama_context / llama_kv_cache_iswa compute them."""

    n_ctx: int  # after padding to 256 (what llama_n_ctx reports)
    full: int  # cells of the non-SWA cache (per stream)
    sliding: int  # cells of the SWA cache (per stream)
    streams: int  # 1 with a unified cache, else n_seq_max


def kv_cells(n_ctx: int, n_ubatch: int, n_swa: int, n_seq: int = 1, unified: bool = False,
             swa_full: bool = False) -> KVCells:
    """llama_context: n_ctx padded to 256 (per sequence when not unified); the iswa cache sizes the sliding
    part to ``pad(min(full, n_swa * (unified ? n_seq : 1) + n_ubatch), 256)`` unless ``swa_full``.

    ``n_ubatch`` is the context's effective ubatch: min(n_ubatch, n_batch, n_ctx).
    """
    n_ctx = pad(n_ctx, KV_CELL_PAD)
    if unified:
        per_seq = n_ctx
    else:
        per_seq = pad(n_ctx // n_seq, KV_CELL_PAD)
        n_ctx = per_seq * n_seq
    swa = per_seq if swa_full else pad(min(per_seq, n_swa * (n_seq if unified else 1) + n_ubatch), KV_CELL_PAD)
    return KVCells(n_ctx=n_ctx, full=per_seq, sliding=swa, streams=1 if unified else n_seq)


def kv_bytes(layers: Sequence[AttnLayer], cells: KVCells, type_k: str, type_v: str, flash_attn: bool) -> list[int]:
    """K + V bytes of each layer's cache, a {n_embd_kv, cells, streams} tensor each (0 for a KV-shared layer, which
    reads an earlier layer's). With flash attention off the V cache is transposed and, when widths differ, every V
    row is padded to the widest layer's -- over *all* layers, shared ones included (llama.cpp's "padding V cache")."""
    widths = {layer.n_embd_kv for layer in layers}
    v_row = max(widths) if not flash_attn and len(widths) > 1 else None
    out = []
    for layer in layers:
        n = (cells.sliding if layer.sliding else cells.full) * cells.streams if layer.owns_kv else 0
        out.append(n * (row_bytes(type_k, layer.n_embd_kv) + row_bytes(type_v, v_row or layer.n_embd_kv)))
    return out


def output_buffer_bytes(n_vocab: int, n_outputs: int, n_embd_out: int = 0, n_batch: int = 0,
                        nextn_unmasked: bool = False) -> int:
    """llama_context::output_reserve: host memory for logits (n_vocab x outputs, f32) and, for an MTP target,
    the nextn hidden rows (one per batch token when unmasked)."""
    rows = n_batch if nextn_unmasked else n_outputs
    return 4 * (n_vocab * n_outputs + (n_embd_out * rows if n_embd_out else 0))


# --- compute buffers --------------------------------------------------------------------------------
# ggml-alloc packs a graph's intermediate tensors into one buffer per backend, freeing each tensor after its
# last consumer. The buffer's size is the high-water mark, reached in one of a few phases of a Gemma 4 graph;
# each phase below sums the f32 tensors alive at that point. Fused GLU outputs are not computed in place; the
# logit soft-cap ops are.

F32 = 4


@dataclass(frozen=True)
class TextGraph:
    """The dimensions of a gemma4 (target) or gemma4-assistant (drafter) graph."""

    n_embd: int
    n_vocab: int
    layers: tuple[AttnLayer, ...]
    ffn: tuple[int, ...]
    ple_dim: int = 0
    moe: tuple[int, int, int] | None = None  # (experts, used per token, expert FFN width)
    n_embd_backbone: int = 0  # drafter: the target's hidden size (pre/post projections)


@dataclass(frozen=True)
class GraphShape:
    """The worst-case ubatch llama.cpp reserves: min(n_ctx, n_ubatch) tokens, min(tokens, n_outputs_max) outputs."""

    n_tokens: int
    n_outputs: int
    n_kv_full: int
    n_kv_sliding: int
    flash_attn: bool


def graph_shape(n_ctx: int, n_batch: int, n_ubatch: int, n_outputs_max: int, cells: KVCells,
                flash_attn: bool, n_seq: int = 1) -> GraphShape:
    """llama_context::sched_reserve: n_batch capped by n_ctx, ubatch by n_batch, outputs by n_outputs_max
    (0 = n_batch); graph_reserve then rounds the tokens up to a whole number per sequence (n_seq_max)."""
    n_batch = min(n_ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    n_tokens = min(cells.n_ctx, n_ubatch)
    outputs = n_outputs_max or n_batch
    return GraphShape(pad(n_tokens, n_seq), min(n_tokens, outputs), cells.full * cells.streams,
                      cells.sliding * cells.streams, flash_attn)


# Calibration against llama.cpp's own numbers (tests/test_plan.py, bench/plan_matrix.py): the allocator leaves
# holes, so a phase needs a little more than the sum of its live tensors. FFN peaks land ~10% above the sum,
# the logits phase sits above the masks' region when the model has per-layer embeddings; without flash attention
# one more layer-sized set of rows (a full layer's Q, the residual row and the per-layer-embedding rows) stays
# allocated under the score matrix.
FFN_SLACK = 1.10
OUTPUT_SLACK = 1.02
FIXED_OVERHEAD = 256 * 1024  # token ids, positions, output ids, small norms


def compute_phases(g: TextGraph, s: GraphShape, quantized_kv: bool = False) -> dict[str, int]:
    """Bytes alive at each phase's peak (the buffer is the largest, see ``compute_buffer_bytes``)."""
    t, o, e = s.n_tokens, s.n_outputs, g.n_embd
    mask_el = 2 if s.flash_attn else F32
    has_full = any(not layer.sliding for layer in g.layers)
    has_swa = any(layer.sliding for layer in g.layers)
    ple_rows = F32 * g.ple_dim * len(g.layers) * t
    masks = mask_el * t * ((s.n_kv_full if has_full else 0) + (s.n_kv_sliding if has_swa else 0))
    persistent = masks + ple_rows
    if quantized_kv:  # Hadamard rotation matrices of the quantized cache, one per head size
        persistent += F32 * sum(d * d for d in {ly.head_dim for ly in g.layers if ly.head_dim % 64 == 0})
    resid = F32 * e * t
    phases: dict[str, int] = {}
    if g.ple_dim:
        phases["input"] = persistent + resid + 2 * ple_rows
    if g.n_embd_backbone:  # drafter input: target embedding rows + hidden, concatenated, projected
        phases["input"] = F32 * t * (9 * g.n_embd_backbone // 2 + e)  # before the masks exist
    q_full = max((F32 * ly.head_dim * ly.n_head * t for ly in g.layers if not ly.sliding), default=0)
    attn = 0
    for ly in g.layers:
        n_kv = s.n_kv_sliding if ly.sliding else s.n_kv_full
        q = F32 * ly.head_dim * ly.n_head * t
        kv = 2 * F32 * ly.n_embd_kv * t if ly.owns_kv else 0
        if s.flash_attn:
            rotated = q if quantized_kv and not g.n_embd_backbone else 0  # the target rotates a copy of Q
            cur = q + kv + q + rotated  # Q (+ rotated Q), K, V, attention output
        else:
            cur = q + F32 * n_kv * t * ly.n_head + q  # Q, scores (soft-max in place), KQV
            if not g.n_embd_backbone:  # the target's holes: a full layer's Q, a residual row, the PLE rows
                cur += q_full + resid + ple_rows
        attn = max(attn, persistent + 2 * resid + cur)
    phases["attention"] = attn
    ffn = max(g.ffn) if g.ffn else 0
    slack = 1.0 if g.n_embd_backbone else FFN_SLACK  # the drafter's 4 layers leave no holes worth counting
    phases["ffn"] = int(slack * (persistent + 3 * resid + 3 * F32 * ffn * t))
    if g.moe:
        _, used, fx = g.moe
        phases["moe"] = persistent + 4 * resid + F32 * t * used * (3 * fx + e)
    # with per-layer embeddings (E2B/E4B) the masks' freed region stays walled in and the logits land above it;
    # without them (26B/31B) the logits reuse it (measured on all four variants, 2k-131k contexts)
    below = masks if g.ple_dim else 0
    phases["output"] = int(OUTPUT_SLACK * (below + resid + 2 * F32 * e * o + F32 * g.n_vocab * o))
    return phases


def compute_buffer_bytes(g: TextGraph, s: GraphShape, quantized_kv: bool = False, output: bool = True) -> int:
    """llama.cpp's compute buffer for one context on one backend holding the whole graph; ``output`` False: a
    device of a layer split that holds repeating layers but not the output layer (no logits phase)."""
    phases = compute_phases(g, s, quantized_kv)
    if not output:
        phases.pop("output", None)
    return max(phases.values()) + FIXED_OVERHEAD


SCHED_MAX_COPIES = 4  # ggml-backend's GGML_SCHED_MAX_COPIES: input copies under pipeline parallelism


def graph_input_bytes(g: TextGraph, s: GraphShape) -> int:
    """One copy of a device's graph inputs in a layer split: the masks and the residual (and PLE) rows it receives
    (an estimate, not yet checked against llama.cpp's multi-device accounting)."""
    mask_el = 2 if s.flash_attn else F32
    masks = mask_el * s.n_tokens * (s.n_kv_full + s.n_kv_sliding)
    return masks + F32 * s.n_tokens * (g.n_embd + g.ple_dim * len(g.layers))


def host_compute_bytes(g: TextGraph, s: GraphShape) -> int:
    """The CPU-side compute buffer when every layer is on the GPU: the input layer runs on the CPU
    (token_embd and per_layer_token_embd stay there), so its rows are gathered in host memory."""
    return F32 * s.n_tokens * (g.n_embd + g.ple_dim * len(g.layers)) + FIXED_OVERHEAD


__all__ = [
    "AttnLayer", "GiB", "GraphShape", "KVCells", "MiB", "TextGraph", "compute_buffer_bytes", "compute_phases",
    "fmt_size", "ggml_type", "graph_input_bytes", "graph_shape", "host_compute_bytes", "kv_bytes", "kv_cells", "output_buffer_bytes", "pad",
    "parse_size", "row_bytes", "tensor_bytes",
]
