"""Target + MTP drafter loaded through llama-cpp-python's low-level API, ready for the speculative loop.

The engine owns the llama.cpp objects and the bookkeeping of what the target's KV cache holds (``tokens``), so a
chat can keep its cache across turns: ``reuse_prefix`` keeps the longest common prefix of the cached tokens and a
new prompt, ``truncate`` drops positions, ``decode`` appends. The speculative loop (loop.py) drives it.

Set-up order matters (see the notes on llama.cpp's MTP context): the drafter context shares the target's KV
cells (``ctx_other``) and creating it resets them, so it is made right after the target context, before the
target decodes anything; nextn embeddings are switched on for both.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import pairing
from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from ..llama_ext import LLAMA_LOG, LogLine, buffer_types, error_lines, model_params
from ..llama_ext import llama as backend_init
from ..runtime_build import write_load_record
from .bindings import FLASH_ATTN_IDS, KV_TYPE_IDS, Batch, BuftOverrides, llama, llama_ext
from .devices import Placement, add_rpc_servers, drafter_placement, target_placement

log = logging.getLogger("gguf_mtp.runtime")


@dataclass
class Engine:
    """A loaded target (and drafter): tokenizer, KV bookkeeping and the three primitive steps of a round.

    Arrays returned by ``logits`` / ``hidden`` / ``draft_step`` are views into llama.cpp's buffers, valid until
    the next decode on the same context.
    """

    target_path: Path
    drafter_path: Path | None
    settings: RuntimeSettings
    k_max: int
    model: int
    ctx: int
    draft_model: int | None = None
    draft_ctx: int | None = None
    drafter_problem: str | None = None  # why there is no drafter (allow_no_drafter)
    load_log: list[LogLine] = field(default_factory=list, repr=False)  # what llama.cpp said while loading
    buffers: dict[str, list[str]] = field(default_factory=dict)  # model path -> buffer types its weights went to
    tokens: list[int] = field(default_factory=list, repr=False)  # the target KV cache: position i holds tokens[i]
    n_seq: int = 1  # sequences the contexts hold (batch_engine.BatchEngine drives n_seq > 1; this API uses seq 0)

    # --- loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, target: str | Path, drafter: str | Path | None = None, settings: RuntimeSettings | None = None,
             *, k_max: int | None = None, allow_no_drafter: bool = False, n_seq: int = 1) -> Engine:
        """Check the pair, load both files and make the two contexts.

        ``k_max`` bounds the draft length (default: the settings' draft_max, else draft_cap); the target's
        n_batch is raised to 1 + k_max so one verify batch always fits. A drafter that cannot be loaded or whose
        context cannot be made raises with llama.cpp's reason, unless ``allow_no_drafter`` (then a warning, and
        ``drafter_problem`` says why). ``n_seq`` > 1 makes contexts for that many sequences (_context_params).
        """
        settings = settings or RuntimeSettings()
        if k_max is None:
            k_max = settings.draft_max if settings.draft_max is not None else settings.draft_cap
        k_max = max(0, k_max)
        if not 1 <= n_seq <= llama.llama_max_parallel_sequences():
            raise GgufMtpError(f"sequences: expected 1..{llama.llama_max_parallel_sequences()}, got {n_seq}")
        target, drafter = Path(target), Path(drafter) if drafter else None
        facts_t = pairing.facts_from_gguf(target)
        facts_d = pairing.facts_from_gguf(drafter) if drafter else None
        centroids = bool(facts_d and facts_d.centroids) and _runtime_centroids()
        pairing.require_compatible(facts_t, facts_d, runtime_centroids=centroids)
        backend_init()
        add_rpc_servers(settings.rpc)  # bounded: one clear error naming a host that is down
        several = bool(settings.devices or settings.tensor_split)
        placement = target_placement(settings, len(facts_t.layer_layout)) if several else None
        with LLAMA_LOG.capture() as lines:
            overrides = BuftOverrides(settings.effective_overrides())
            for pattern, device in overrides.skipped:
                log.warning("tensor override %s=%s ignored: this llama.cpp build has no %s device", pattern, device,
                            device)
            buffers: dict[str, list[str]] = {}
            model = _load_model(target, settings.n_gpu_layers, settings.repack, overrides, lines, buffers,
                                placement)
            eng = cls(target, drafter, settings, k_max, model, 0, buffers=buffers, n_seq=n_seq)
            try:
                eng.ctx = _new_context(model, _context_params(settings, k_max, n_seq), lines, f"{target}: context")
                if drafter is not None:
                    eng._attach_drafter(drafter, lines, allow_no_drafter)
            except BaseException:
                eng.close()
                raise
        eng.load_log = list(lines)
        eng._setup()
        write_load_record(eng.buffers)
        return eng

    def _attach_drafter(self, path: Path, lines: list[LogLine], allow_missing: bool) -> None:
        try:
            self.draft_model = _load_model(path, -1 if self.settings.drafter_on_gpu else 0, self.settings.repack,
                                           None, lines, self.buffers, drafter_placement(self.settings))
            cp = _context_params(self.settings, self.k_max, self.n_seq)
            cp.ctx_type = llama.LLAMA_CONTEXT_TYPE_MTP
            cp.ctx_other = self.ctx
            cp.n_ctx = llama.llama_n_ctx(self.ctx)
            cp.n_batch = cp.n_ubatch = self.draft_rows_max
            cp.n_rs_seq = 0
            self.draft_ctx = _new_context(self.draft_model, cp, lines, f"{path}: MTP drafter context")
            n_out = llama.llama_model_n_embd_out(self.draft_model)
            if n_out != llama.llama_model_n_embd(self.model):
                raise GgufMtpError(f"{path}: drafter reads hidden states of size {n_out}, target has "
                                   f"{llama.llama_model_n_embd(self.model)}")
        except GgufMtpError as e:
            self._free_drafter()
            if not allow_missing:
                raise
            self.drafter_problem = str(e)
            log.warning("running without the drafter: %s", e)

    def _setup(self) -> None:
        self.mem = llama.llama_get_memory(self.ctx)
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama.llama_model_n_embd(self.model))
        self.n_ctx = int(llama.llama_n_ctx(self.ctx))
        self.n_batch = int(llama.llama_n_batch(self.ctx))
        self.n_swa = int(llama.llama_model_n_swa(self.model))
        self._batch = Batch(self.n_batch)
        self.suppressed = _suppress_tokens(self.vocab, self.n_vocab)
        if self.draft_ctx is not None:
            llama_ext.llama_set_embeddings_nextn(self.ctx, True, False)  # one hidden row per batch token
            llama_ext.llama_set_embeddings_nextn(self.draft_ctx, True, True)  # rows only for outputs
            self._draft_batch = Batch(self.draft_rows_max, self.n_embd)

    # --- lifetime -----------------------------------------------------------------------------------
    def _free_drafter(self) -> None:
        if self.draft_ctx:
            llama.llama_free(self.draft_ctx)
        if self.draft_model:
            llama.llama_model_free(self.draft_model)
        self.draft_ctx = self.draft_model = None

    def close(self) -> None:
        """Free the drafter first: its context points into the target's."""
        self._free_drafter()
        if self.ctx:
            llama.llama_free(self.ctx)
        if self.model:
            llama.llama_model_free(self.model)
        self.ctx = self.model = 0

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def has_drafter(self) -> bool:
        return self.draft_ctx is not None

    @property
    def draft_rows_max(self) -> int:
        """Rows one drafter decode takes: k_max + 1 (``draft_rows``), or one per sequence (a batched step)."""
        return max(1, self.k_max + 1, self.n_seq)

    # --- tokenizer ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return int(llama.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(llama.llama_vocab_eos(self.vocab))

    @property
    def adds_bos(self) -> bool:
        return bool(llama.llama_vocab_get_add_bos(self.vocab))

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    # --- KV cache -----------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        """Forget positions >= n (a rejected draft, an edited chat turn)."""
        if n < self.n_past:
            self._forget_from(max(n, 0))

    def drop_unrecorded(self) -> None:
        """Clear cells at positions >= n_past: rows a failed batch decoded outside ``decode`` (the projector's)
        may have left, which ``tokens`` never recorded."""
        self._forget_from(self.n_past)

    def _forget_from(self, n: int) -> None:
        llama.llama_memory_seq_rm(self.mem, 0, n, -1)
        del self.tokens[n:]

    def record_decoded(self, token: int, n: int) -> None:
        """Note that a decode outside ``decode`` (the projector's) wrote n positions at n_past; ``token`` stands
        for all of them (an image's or audio clip's identity id), so ``reuse_prefix`` can match them next turn."""
        self.tokens.extend([int(token)] * n)

    def can_rewind_to(self, n: int) -> bool:
        """Whether positions < n are all still usable after dropping the rest.

        A sliding-window cache sized to the window (swa_full off) overwrites old cells; going back to n needs the
        cells of the window before n (llama-server's rule).
        """
        return self.seq_can_rewind_to(0, n, self.n_past)

    def seq_can_rewind_to(self, seq: int, n: int, n_past: int) -> bool:
        """``can_rewind_to`` for sequence ``seq``, whose cache holds ``n_past`` positions."""
        if n >= n_past or n == 0 or self.n_swa == 0 or self.settings.swa_full:
            return True
        pos_min = int(llama.llama_memory_seq_pos_min(self.mem, seq))
        return pos_min <= 0 or pos_min < n - self.n_swa

    def reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix shared with ``prompt`` (at least its last token is left to decode); returns it."""
        keep = reusable_prefix(self.tokens, prompt)
        if not self.can_rewind_to(keep):
            keep = 0
        self.truncate(keep)
        return keep

    def decode(self, tokens: Sequence[int], outputs: str = "last") -> int:
        """Append ``tokens`` to the target's KV at n_past (in n_batch chunks); logits for "last" or "all" rows.

        Returns the number of rows of the last chunk (``hidden(row)`` indexes those).
        """
        if not len(tokens):
            raise ValueError("nothing to decode")
        start = chunk_len = 0
        while start < len(tokens):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            out = outputs if last else "none"
            if self.n_past + len(chunk) > self.n_ctx:
                raise GgufMtpError(f"context full: {self.n_past} + {len(chunk)} tokens > n_ctx {self.n_ctx}")
            rc = llama.llama_decode(self.ctx, self._batch.set(chunk, self.n_past, out))
            if rc != 0:
                raise GgufMtpError(f"target decode failed (code {rc}) at position {self.n_past}")
            self.tokens.extend(int(t) for t in chunk)
            start += len(chunk)
            chunk_len = len(chunk)
        return chunk_len

    def logits(self, n_rows: int) -> np.ndarray:
        """Logits of the last decode's output rows, shape (n_rows, n_vocab)."""
        return self._logits(self.ctx, n_rows)

    def _logits(self, ctx: int, n_rows: int) -> np.ndarray:
        """The output rows of ``ctx``'s last decode (a view, edited in place) with the model's suppress tokens
        (``tokenizer.ggml.suppress_tokens``, the 12B's media placeholders) at -inf, as llama.cpp's common sampler
        biases them: no sampler, acceptance rule or drafter ever picks one."""
        rows = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(n_rows, self.n_vocab))
        if self.suppressed.size:
            rows[:, self.suppressed] = -np.inf
        return rows

    def hidden(self, row: int) -> np.ndarray:
        """The target's hidden state (post final norm) at batch row ``row`` of the last decode."""
        ptr = llama_ext.llama_get_embeddings_nextn_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def draft_step(self, token: int, pos: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One drafter step: (token at pos, previous hidden) -> (logits, hidden for the next step)."""
        logits = self.draft_rows([token], pos, hidden[None, :])
        return logits[0], self.draft_hidden(0)

    def draft_rows(self, tokens: Sequence[int], pos: int | Sequence[int], hidden: np.ndarray,
                   seqs: Sequence[int] | None = None) -> np.ndarray:
        """Several drafter rows in one llama_decode, all at position ``pos`` (a Gemma 4 drafter drafts every step
        of a round at the same position): row i reads (tokens[i], hidden[i]); returns logits (n, n_vocab).

        The drafter keeps no KV of its own (it reads the target's), so each row is what ``draft_step`` gives for
        the same inputs; up to ``draft_rows_max`` rows cost one drafter call. A batched step passes one row per
        sequence: ``seqs[i]`` and ``pos[i]``, the position after that sequence's cache (llama.cpp refuses rows
        that do not continue their sequence's cache).
        """
        n = len(tokens)
        b = self._draft_batch.rows(tokens, pos, 0 if seqs is None else seqs, 1, embd=hidden)
        rc = llama.llama_decode(self.draft_ctx, b)
        if rc != 0:
            raise GgufMtpError(f"drafter decode failed (code {rc}) at position {pos}")
        return self._logits(self.draft_ctx, n)

    def draft_hidden(self, row: int) -> np.ndarray:
        """The drafter's hidden state at row ``row`` of its last decode: the next step's input."""
        return np.ctypeslib.as_array(llama_ext.llama_get_embeddings_nextn_ith(self.draft_ctx, row),
                                     shape=(self.n_embd,))


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Length of the longest common prefix of a cache and a prompt, leaving at least the prompt's last token to
    decode (its logits give the first new token)."""
    keep, limit = 0, min(len(cached), len(prompt) - 1)
    while keep < limit and cached[keep] == prompt[keep]:
        keep += 1
    return keep


def _suppress_tokens(vocab: int, n_vocab: int) -> np.ndarray:
    """The ids the GGUF says never to generate (llama.cpp validates the key's type on load)."""
    n = ctypes.c_int32(0)
    ptr = llama.llama_vocab_get_suppress_tokens(vocab, ctypes.byref(n))
    ids = np.array([ptr[i] for i in range(n.value)] if ptr and n.value else [], dtype=np.int64)
    return ids[(ids >= 0) & (ids < n_vocab)]


def _runtime_centroids() -> bool:
    from . import centroid_support

    return centroid_support()


# --- llama.cpp parameter structs -------------------------------------------------------------------
def _load_model(path: Path, n_gpu_layers: int, repack: bool, overrides: BuftOverrides | None, lines: list[LogLine],
                buffers: dict[str, list[str]], placement: Placement | None = None) -> int:
    start = len(lines)
    mp = model_params(n_gpu_layers, repack)
    if placement is not None:  # several devices: their list, tensor_split and n_gpu_layers
        placement.apply(mp)
    if overrides is not None and overrides.pointer:
        mp.tensor_buft_overrides = overrides.pointer
    model = llama.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise GgufMtpError(f"{path}: llama.cpp could not load it ({error_lines(lines[start:]) or 'no reason logged'})")
    buffers[str(path)] = buffer_types(lines[start:])
    return model


def _context_params(s: RuntimeSettings, k_max: int, n_seq: int = 1) -> llama.llama_context_params:
    """Several sequences share one unified KV pool of n_ctx cells: llama.cpp then splits a batch of any mix of
    sequences into ubatches in order (one graph per round); per-sequence caches split it into equal per-sequence
    slices, several graphs per round. One verify batch of every sequence fits n_batch."""
    cp = llama.llama_context_default_params()
    cp.n_ctx = s.n_ctx
    cp.n_batch = max(s.n_batch, n_seq * (k_max + 1))
    cp.n_seq_max = n_seq
    cp.kv_unified = n_seq > 1
    cp.n_ubatch = min(s.n_ubatch, cp.n_batch)
    cp.type_k = KV_TYPE_IDS[s.cache_type_k]
    cp.type_v = KV_TYPE_IDS[s.cache_type_v]
    cp.flash_attn_type = FLASH_ATTN_IDS[s.flash_attn]
    cp.swa_full = s.swa_full
    cp.no_perf = True
    if s.threads:
        cp.n_threads = cp.n_threads_batch = s.threads
    return cp


def _new_context(model: int, cp: llama.llama_context_params, lines: list[LogLine], what: str) -> int:
    start = len(lines)
    ctx = llama.llama_init_from_model(model, cp)
    if not ctx:
        raise GgufMtpError(f"{what} could not be created ({error_lines(lines[start:]) or 'no reason logged'})")
    return ctx
