"""ctypes glue that llama-cpp-python 0.3.36 lacks, kept in one place.

- ``tensor_buft_overrides`` is an untyped pointer in llama-cpp-python: ``buft_overrides`` builds the
  NULL-terminated ``{pattern, buft}`` array llama.cpp reads (``-ot`` / ``--n-cpu-moe``), with buffer types from
  libggml-base (CPU) and the backend registry (GPU).
- ``Batch`` is a ``llama_batch`` whose arrays Python owns; a row can carry a token *and* an embedding, which the
  MTP drafter needs (``llama_batch_ext_set_embd_state`` is a stub in this version).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import numpy as np

import llama_cpp.llama_cpp as llama
import llama_cpp.llama_cpp_ext as llama_ext  # noqa: F401  (re-exported for engine.py)

from ..errors import GgufMtpError
from ..llama_ext import ggml_fn

log = logging.getLogger("gguf_mtp.llama")

# --- ggml constants llama-cpp-python does not export --------------------------------------------
GGML_TYPE_BF16 = 30
KV_TYPE_IDS = {
    "f32": llama.GGML_TYPE_F32, "f16": llama.GGML_TYPE_F16, "bf16": GGML_TYPE_BF16, "q8_0": llama.GGML_TYPE_Q8_0,
    "q4_0": llama.GGML_TYPE_Q4_0, "q4_1": llama.GGML_TYPE_Q4_1, "iq4_nl": llama.GGML_TYPE_IQ4_NL,
    "q5_0": llama.GGML_TYPE_Q5_0, "q5_1": llama.GGML_TYPE_Q5_1,
}
FLASH_ATTN_IDS = {"auto": -1, "off": 0, "on": 1}
GGML_BACKEND_DEVICE_TYPE_GPU = 1


# --- tensor buffer-type overrides ----------------------------------------------------------------
class TensorBuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (include/llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    return ggml_fn("ggml_backend_cpu_buffer_type", ctypes.c_void_p, [])()


def gpu_buffer_type() -> int | None:
    """The first GPU device's buffer type, or None on a CPU-only build."""
    dev = ggml_fn("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])(GGML_BACKEND_DEVICE_TYPE_GPU)
    if not dev:
        return None
    return ggml_fn("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p])(dev)


def buffer_type_name(buft: int) -> str:
    return ggml_fn("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])(buft).decode()


class BuftOverrides:
    """A NULL-terminated override array plus the pattern bytes it points at (kept alive together)."""

    def __init__(self, overrides: Sequence[tuple[str, str]]) -> None:
        self.skipped: list[tuple[str, str]] = []
        entries = []
        gpu = None
        for pattern, device in overrides:
            if device == "CPU":
                buft = cpu_buffer_type()
            else:
                gpu = gpu if gpu is not None else (gpu_buffer_type() or 0)
                if not gpu:  # like -ngl on a CPU build: nothing to place there
                    self.skipped.append((pattern, device))
                    continue
                buft = gpu
            entries.append((pattern.encode(), buft))
        limit = int(llama.llama_max_tensor_buft_overrides())
        if len(entries) >= limit:
            raise GgufMtpError(f"tensor overrides: llama.cpp takes at most {limit - 1}, got {len(entries)}")
        self._patterns = [p for p, _ in entries]
        self.array = (TensorBuftOverride * (len(entries) + 1))()
        for i, (p, buft) in enumerate(entries):
            self.array[i].pattern = p
            self.array[i].buft = buft
        self.count = len(entries)

    @property
    def pointer(self) -> int | None:
        return ctypes.cast(self.array, ctypes.c_void_p).value if self.count else None


# --- batches -------------------------------------------------------------------------------------
class Batch:
    """A reusable ``llama_batch`` backed by numpy arrays, one sequence id per row.

    ``set`` fills the first n rows of one sequence at consecutive positions and returns the struct to pass to
    ``llama_decode``; ``rows`` fills rows of several sequences at any positions (batched decoding). With ``embd``
    the rows carry both token ids and embeddings (the MTP drafter's input: token + the target's hidden state).
    """

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)  # row i's sequence; seq_id[i] points at seq[i]
        int_p = ctypes.POINTER(ctypes.c_int32)
        self._seq_ptrs = (int_p * capacity)(
            *[ctypes.cast(self.seq.ctypes.data + 4 * i, int_p) for i in range(capacity)])
        self.logits = np.zeros(capacity, dtype=np.int8)
        self.embd = np.zeros((capacity, n_embd), dtype=np.float32) if n_embd else None
        self.struct = llama.llama_batch()
        self.struct.token = self.token.ctypes.data_as(int_p)
        self.struct.pos = self.pos.ctypes.data_as(int_p)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(int_p)
        self.struct.seq_id = self._seq_ptrs
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._embd_ptr = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if n_embd else None

    def set(self, tokens: Sequence[int] | np.ndarray, pos0: int, outputs: str | Sequence[bool] = "last",
            embd: np.ndarray | None = None, same_pos: bool = False, seq: int = 0) -> llama.llama_batch:
        """Rows ``tokens`` of sequence ``seq`` at positions pos0, pos0+1, ... (all at pos0 with ``same_pos``).

        ``outputs``: "last", "all", "none", or one flag per row.
        """
        n = len(tokens)
        pos = pos0 if same_pos else np.arange(pos0, pos0 + n, dtype=np.int32)
        named = isinstance(outputs, str)
        b = self.rows(tokens, pos, seq, outputs == "all" if named else outputs, embd)
        if named and outputs == "last" and n:
            self.logits[n - 1] = 1  # the struct reads these flags at decode time
        return b

    def rows(self, tokens: Sequence[int] | np.ndarray, pos: int | Sequence[int] | np.ndarray,
             seq: int | Sequence[int] | np.ndarray, outputs: bool | Sequence[bool] | np.ndarray,
             embd: np.ndarray | None = None) -> llama.llama_batch:
        """Row i: ``tokens[i]`` at ``pos[i]`` in sequence ``seq[i]`` (a scalar ``pos`` / ``seq`` / ``outputs``
        holds for every row), an output if ``outputs[i]``, reading ``embd[i]`` when given."""
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"batch of {n} rows exceeds capacity {self.capacity}")
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seq
        self.logits[:n] = outputs
        if embd is not None:
            if self.embd is None:
                raise ValueError("this batch was made without an embedding buffer")
            self.embd[:n] = embd
            self.struct.embd = self._embd_ptr
        else:
            self.struct.embd = None
        self.struct.n_tokens = n
        return self.struct
