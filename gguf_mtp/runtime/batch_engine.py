"""N sequences in one target context with one shared MTP drafter: per-sequence KV bookkeeping, batched steps.

``BatchEngine`` wraps an ``Engine`` loaded with ``n_seq`` sequences (``Engine.load(n_seq=)``) and owns the KV
edits of every sequence: ``tokens[s]`` is what sequence s holds (position i = ``tokens[s][i]``), ``truncate``
drops positions of one sequence only (``llama_memory_seq_rm`` on that sequence), ``reuse_prefix`` keeps a
sequence's longest prefix shared with a new prompt. ``decode`` appends rows of several sequences in ONE target
``llama_decode`` (a verify round: every sequence's [y, d1..dk]; or prompt chunks); ``draft`` runs one drafter
step for several sequences in ONE drafter ``llama_decode``. With a projector (``load(mmproj=)`` or
``load_projector``), ``decode_span`` decodes one image or audio chunk of a ``MediaPrompt`` into one sequence
(libmtmd's own decode, alone in its batch); its positions hold the identity id, so prefix reuse keeps media like text.

Facts from llama.cpp this relies on (vendor/llama.cpp/src, llama-context.cpp, llama-kv-cache*.cpp,
llama-batch.cpp):
- Both contexts are made with the same ``n_seq_max`` and a unified KV cache (one pool of n_ctx cells; see
  ``engine._context_params``). The drafter's cache is a view of the target's cells, so its per-sequence positions
  are the target's: a drafter row of sequence s must sit at the position after s's last cached one (llama.cpp
  refuses anything else), and all draft steps of a round sit there (the drafter writes no KV).
- The pool is shared, so nothing stops one sequence from taking every cell; each sequence gets ``slot_ctx`` =
  n_ctx // n_seq positions (llama-server's split of ``-c`` over ``-np``), which keeps the sum within the pool.
- Output rows (logits) come back in batch order; the target's nextn hidden rows are indexed by batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from .bindings import Batch, llama
from .engine import Engine, reusable_prefix

if TYPE_CHECKING:
    from .multimodal import MediaPrompt, MediaSpan, Projector

# what a BatchEngine answers from its Engine: the tokenizer, model facts and loading outcome (all read-only, so
# callable from any thread; decoding goes through BatchEngine only)
FROM_ENGINE = frozenset({
    "tokenize", "detokenize", "piece", "is_eog", "bos", "eos", "adds_bos", "chat_template", "metadata", "vocab",
    "n_vocab", "n_embd", "n_ctx", "n_batch", "k_max", "has_drafter", "drafter_problem", "settings",
    "target_path", "drafter_path", "buffers", "load_log",
})


@dataclass
class Part:
    """Rows of one sequence in a target batch: ``tokens`` at the sequence's next positions. ``decode`` sets
    ``start``, the batch row of ``tokens[0]``."""

    seq: int
    tokens: Sequence[int]
    outputs: str = "all"  # all | last | none: which rows give logits
    start: int = 0


class BatchEngine:
    """Sequences 0..n_seq-1 of a loaded ``Engine``; tokenizer and model facts are the engine's (FROM_ENGINE)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_seq = engine.n_seq
        self.slot_ctx = engine.n_ctx // self.n_seq
        self.n_ubatch = int(llama.llama_n_ubatch(engine.ctx))
        self.projector: Projector | None = None  # images and audio (load_projector), closed with the engine
        self.tokens: list[list[int]] = [[] for _ in range(self.n_seq)]
        self._batch = Batch(engine.n_batch)
        self._out_row = np.zeros(engine.n_batch, dtype=np.int64)  # batch row -> its row among the outputs
        self._n_out = 0

    @classmethod
    def load(cls, target: str | Path, drafter: str | Path | None = None, settings: RuntimeSettings | None = None,
             *, n_seq: int, k_max: int | None = None, allow_no_drafter: bool = False,
             mmproj: str | Path | None = None) -> BatchEngine:
        """``Engine.load`` with contexts for ``n_seq`` sequences; ``settings.n_ctx`` is the whole KV pool.
        ``mmproj``: a projector for the target (``load_projector``)."""
        eng = cls(Engine.load(target, drafter, settings, k_max=k_max, allow_no_drafter=allow_no_drafter,
                              n_seq=n_seq))
        if mmproj is not None:
            try:
                eng.load_projector(mmproj)
            except BaseException:
                eng.close()
                raise
        return eng

    def load_projector(self, path: str | Path) -> Projector:
        """Load the projector (multimodal.Projector: vision and/or audio, checked against the target) that builds
        this engine's ``MediaPrompt``s; it is closed with the engine."""
        from .multimodal import Projector

        if self.projector is not None:
            raise GgufMtpError(f"a projector is already loaded ({self.projector.path})")
        self.projector = Projector.load(path, self.engine)
        return self.projector

    def __getattr__(self, name: str):
        if name in FROM_ENGINE:
            return getattr(self.engine, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def close(self) -> None:
        if self.projector is not None:
            self.projector.close()
        self.engine.close()

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- per-sequence KV cache ---------------------------------------------------------------------
    def n_past(self, seq: int) -> int:
        return len(self.tokens[seq])

    def truncate(self, seq: int, n: int) -> None:
        """Forget positions >= n of sequence ``seq`` (a rejected draft; a new prompt in its slot)."""
        if n < self.n_past(seq):
            self._forget_from(seq, max(n, 0))

    def _forget_from(self, seq: int, n: int) -> None:
        llama.llama_memory_seq_rm(self.engine.mem, seq, n, -1)
        del self.tokens[seq][n:]

    def shared_prefix(self, seq: int, prompt: Sequence[int], media: MediaPrompt | None = None) -> int:
        """How much of ``prompt`` sequence ``seq`` could reuse (choosing a slot; changes nothing); with ``media``,
        never part of an image or audio chunk (``MediaPrompt.resumable``)."""
        keep = reusable_prefix(self.tokens[seq], prompt)
        if media is not None:
            keep = media.resumable(keep)
        return keep if self.engine.seq_can_rewind_to(seq, keep, self.n_past(seq)) else 0

    def reuse_prefix(self, seq: int, prompt: Sequence[int], media: MediaPrompt | None = None) -> int:
        """Keep sequence ``seq``'s cached prefix shared with ``prompt`` (Engine.reuse_prefix); returns it."""
        keep = self.shared_prefix(seq, prompt, media)
        self.truncate(seq, keep)
        return keep

    # --- batched steps -----------------------------------------------------------------------------
    def decode(self, parts: Sequence[Part]) -> None:
        """Append every part's tokens to its sequence in one target llama_decode (at most ``n_batch`` rows, one
        part per sequence). On failure no sequence changes (cells the batch may have left are dropped)."""
        n = sum(len(p.tokens) for p in parts)
        if not n:
            raise ValueError("nothing to decode")
        if n > self.engine.n_batch:
            raise ValueError(f"{n} rows exceed n_batch {self.engine.n_batch}")
        tokens, pos, seq, out = (np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32),
                                 np.zeros(n, np.int8))
        row = 0
        for p in parts:
            m, n_past = len(p.tokens), self.n_past(p.seq)
            if n_past + m > self.slot_ctx:
                raise GgufMtpError(f"sequence {p.seq}: {n_past} + {m} tokens exceed its context of {self.slot_ctx}")
            p.start = row
            tokens[row:row + m] = p.tokens
            pos[row:row + m] = np.arange(n_past, n_past + m)
            seq[row:row + m] = p.seq
            out[row:row + m] = p.outputs == "all"
            out[row + m - 1] |= p.outputs == "last"
            row += m
        rc = llama.llama_decode(self.engine.ctx, self._batch.rows(tokens, pos, seq, out))
        if rc != 0:
            for p in parts:
                self._forget_from(p.seq, self.n_past(p.seq))
            seqs = ", ".join(str(p.seq) for p in parts)
            raise GgufMtpError(f"target decode failed (code {rc}) for sequences {seqs}")
        self._out_row[:n] = np.cumsum(out) - 1
        self._n_out = int(out.sum())
        for p in parts:
            self.tokens[p.seq].extend(int(t) for t in p.tokens)

    def decode_span(self, seq: int, media: MediaPrompt, span: MediaSpan) -> None:
        """Encode the image or audio chunk ``span`` of ``media`` and decode it into sequence ``seq`` at its next
        positions, in libmtmd's own llama_decode (this sequence alone: non-causal attention over the chunk where
        the projector asks). The positions record its identity id. On failure the sequence keeps what it held."""
        n_past = self.n_past(seq)
        if n_past + span.n_tokens > self.slot_ctx:
            raise GgufMtpError(f"sequence {seq}: {span.what} of {span.n_tokens} tokens at position {n_past} exceeds "
                               f"its context of {self.slot_ctx}")
        self._n_out = 0  # the logits buffer is libmtmd's batch's now: no row of the last ``decode`` is left
        self._out_row.fill(-1)
        try:
            media.eval_span(span, self.engine.ctx, n_past, seq, self.engine.n_batch)
        except GgufMtpError:
            self._forget_from(seq, n_past)
            raise
        self.tokens[seq].extend([media.tokens[span.start]] * span.n_tokens)

    def logits(self, row: int, n: int = 1) -> np.ndarray:
        """Logits of batch rows row..row+n-1 of the last ``decode`` (all outputs), shape (n, n_vocab); a view
        valid until the next decode."""
        first = int(self._out_row[row])
        if n < 1 or first < 0 or int(self._out_row[row + n - 1]) != first + n - 1:
            raise ValueError(f"rows {row}..{row + n - 1} were not all outputs of the last decode")
        return self.engine.logits(self._n_out)[first:first + n]

    def hidden(self, row: int) -> np.ndarray:
        """The target's hidden state at batch row ``row`` of the last decode (the drafter's input)."""
        return self.engine.hidden(row)

    def draft(self, seqs: Sequence[int], tokens: Sequence[int], hidden: np.ndarray) -> np.ndarray:
        """One drafter step for several sequences in one drafter llama_decode: row i reads (tokens[i],
        hidden[i]) at the position after ``seqs[i]``'s cache; logits (len(seqs), n_vocab). ``draft_hidden(i)``
        is row i's next hidden state."""
        return self.engine.draft_rows(tokens, [self.n_past(s) for s in seqs], hidden, seqs=seqs)

    def draft_hidden(self, row: int) -> np.ndarray:
        return self.engine.draft_hidden(row)
