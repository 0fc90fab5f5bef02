"""Quantization names as llama.cpp spells them: presets (llama_ftype) and tensor types (ggml_type).

Plain data, so ``inspect`` can name a file's type without loading llama.cpp. Values are llama.cpp's ABI
constants (include/llama.h, ggml/include/ggml.h of the vendored llama.cpp); tests pin them against
llama-cpp-python's and gguf-py's copies. The preset list and its order follow tools/quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GgufMtpError


@dataclass(frozen=True)
class Preset:
    name: str
    ftype: int  # llama_ftype
    default_type: str  # the ggml type most tensors get
    note: str = ""
    needs_imatrix: bool = False  # llama.cpp refuses to write it without importance data
    only_copy: bool = False


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("Q1_0", 40, "Q1_0", "1.125 bpw"),
    Preset("Q2_0", 41, "Q2_0", "2.25 bpw (group 64)"),
    Preset("Q4_0", 2, "Q4_0", "4.5 bpw, legacy"),
    Preset("Q4_1", 3, "Q4_1", "5.0 bpw, legacy"),
    Preset("MXFP4_MOE", 38, "MXFP4", "MXFP4 experts"),
    Preset("Q5_0", 8, "Q5_0", "5.5 bpw, legacy"),
    Preset("Q5_1", 9, "Q5_1", "6.0 bpw, legacy"),
    Preset("IQ2_XXS", 19, "IQ2_XXS", "2.06 bpw", needs_imatrix=True),
    Preset("IQ2_XS", 20, "IQ2_XS", "2.31 bpw", needs_imatrix=True),
    Preset("IQ2_S", 28, "IQ2_XS", "2.5 bpw mix", needs_imatrix=True),
    Preset("IQ2_M", 29, "IQ2_S", "2.7 bpw mix", needs_imatrix=True),
    Preset("IQ1_S", 24, "IQ1_S", "1.56 bpw", needs_imatrix=True),
    Preset("IQ1_M", 31, "IQ1_M", "1.75 bpw", needs_imatrix=True),
    Preset("TQ1_0", 36, "TQ1_0", "1.69 bpw ternary"),
    Preset("TQ2_0", 37, "TQ2_0", "2.06 bpw ternary"),
    Preset("Q2_K", 10, "Q2_K", "k-quant mix"),
    Preset("Q2_K_S", 21, "Q2_K", "k-quant mix", needs_imatrix=True),
    Preset("IQ3_XXS", 23, "IQ3_XXS", "3.06 bpw", needs_imatrix=True),
    Preset("IQ3_S", 26, "IQ3_S", "3.44 bpw"),
    Preset("IQ3_M", 27, "IQ3_S", "3.66 bpw mix"),
    Preset("Q3_K", 12, "Q3_K", "alias for Q3_K_M"),
    Preset("IQ3_XS", 22, "IQ3_S", "3.3 bpw mix"),
    Preset("Q3_K_S", 11, "Q3_K", "k-quant mix"),
    Preset("Q3_K_M", 12, "Q3_K", "k-quant mix"),
    Preset("Q3_K_L", 13, "Q3_K", "k-quant mix"),
    Preset("IQ4_NL", 25, "IQ4_NL", "4.5 bpw non-linear"),
    Preset("IQ4_XS", 30, "IQ4_XS", "4.25 bpw non-linear"),
    Preset("Q4_K", 15, "Q4_K", "alias for Q4_K_M"),
    Preset("Q4_K_S", 14, "Q4_K", "k-quant mix"),
    Preset("Q4_K_M", 15, "Q4_K", "k-quant mix; Q6_K on output/embeddings and half of attn_v/ffn_down"),
    Preset("Q5_K", 17, "Q5_K", "alias for Q5_K_M"),
    Preset("Q5_K_S", 16, "Q5_K", "k-quant mix"),
    Preset("Q5_K_M", 17, "Q5_K", "k-quant mix"),
    Preset("Q6_K", 18, "Q6_K", "6.56 bpw"),
    Preset("Q8_0", 7, "Q8_0", "8.5 bpw"),
    Preset("F16", 1, "F16", "16 bpw"),
    Preset("BF16", 32, "BF16", "16 bpw"),
    Preset("F32", 0, "F32", "32 bpw"),
    Preset("COPY", 0, "F32", "copy tensors unchanged (metadata rewrite)", only_copy=True),
)}

# ggml_type values (ggml/include/ggml.h); gaps are removed types
GGML_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22,
    "IQ4_XS": 23, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28, "IQ1_M": 29, "BF16": 30,
    "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39, "NVFP4": 40, "Q1_0": 41, "Q2_0": 42,
}
GGML_TYPE_COUNT = 43
# types a tensor can be quantized *to* (not the integer / dot-product helper types)
TARGET_TYPES = tuple(t for t in GGML_TYPES if t not in ("I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"))

# llama_ftype value -> the preset name that means it (aliases and COPY excluded)
FTYPE_NAMES: dict[int, str] = {}
for _p in PRESETS.values():
    if not _p.only_copy and not _p.note.startswith("alias"):
        FTYPE_NAMES.setdefault(_p.ftype, _p.name)


def preset(name: str) -> Preset:
    """A preset by name, case-insensitive (``q4_k_m`` -> Q4_K_M), or a clear error listing them."""
    p = PRESETS.get(name.strip().upper())
    if p is None:
        raise GgufMtpError(f"unknown quantization type {name!r}; expected one of {', '.join(PRESETS)}")
    return p


def ggml_type(name: str, what: str = "tensor type") -> int:
    """A ggml tensor type by name, case-insensitive (``q8_0``, ``Q6_K``)."""
    t = name.strip().upper()
    if t not in TARGET_TYPES:
        raise GgufMtpError(f"unknown {what} {name!r}; expected one of {', '.join(TARGET_TYPES)}")
    return GGML_TYPES[t]


def ftype_name(ftype: int | None) -> str | None:
    """general.file_type as a name (``15`` -> ``Q4_K_M``); None when absent."""
    if ftype is None:
        return None
    if not isinstance(ftype, int):  # a file from elsewhere may hold anything here
        return f"unknown ({str(ftype)[:20]})"
    return FTYPE_NAMES.get(int(ftype) & ~1024, f"unknown ({ftype})")
