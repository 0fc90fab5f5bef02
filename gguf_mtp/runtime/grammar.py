"""Grammar-constrained decoding with MTP kept on: llama.cpp's grammar sampler (GBNF) through the bindings.

A request's ``Grammar`` is the parser state after every emitted token (``advance``: only emitted tokens move it).
In a round:

- ``check(draft, stats)`` runs the drafts through a clone of the state and cuts them at the first token the
  grammar rejects (those are never verified; ``Stats.grammar_cut`` counts them). It returns the state at every
  verify row (``Rows``: row i is the state after the first i drafts), freed with ``close``.
- The target's token at verify row i is chosen under row i's state (sampling.accept_drafts / pick take the
  states): greedy keeps a draft while it is the row's best allowed token (``argmax``; the row's plain argmax
  when that is the draft: an allowed token that is the argmax of all logits is the argmax of the allowed ones
  too) and the row where the drafts end takes ``argmax``; sampling masks the row (``mask``: disallowed -> -inf)
  before the usual transform. So a constrained greedy run with MTP emits what the target alone emits under the same grammar.
- The drafter is steered (``Steer``): each draft is the drafter's best token the grammar allows after the drafts
  before it, and the chain stops where the grammar is complete or allows nothing. Steered drafts always pass
  ``check`` (``grammar_cut`` counts only what other drafters, e.g. oracles, propose against the grammar).
- Under a grammar the drafts are that argmax (q one-hot) for both acceptance rules: a sampled draft the grammar
  cuts would have to be rejected into the residual max(p - q, 0), which a cut never verifies.

Control tokens: llama.cpp's grammar reads a token as its text with special tokens rendered (``<turn|>``), so a
JSON string could swallow one. Here a control token is never allowed, and the end tokens (end-of-generation, and
the request's stop tokens) only where the grammar is complete.
"""

from __future__ import annotations

import ctypes
import json
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GgufMtpError
from ..llama_ext import LLAMA_LOG, error_lines
from .bindings import llama
from .drafters import Draft

if TYPE_CHECKING:
    from .stats import Stats

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
FAST_CANDIDATES = 64  # argmax tries the best this many tokens before masking the whole vocabulary


def json_object_grammar() -> str:
    """GBNF for any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: Any) -> str:
    """GBNF for JSON matching ``schema`` (a dict, or its JSON text), by llama-cpp-python's converter; an
    unusable schema raises ``GgufMtpError`` naming the problem."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GgufMtpError(f"JSON schema: not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GgufMtpError(f"JSON schema: expected an object, got {type(schema).__name__}")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter asserts / fails on what it cannot turn into a grammar
        raise GgufMtpError(f"JSON schema: cannot be turned into a grammar: {type(e).__name__}: {e}") from None


_kinds_lock = threading.Lock()
_kinds: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(engine) -> its vocabulary's token kinds


def _token_kinds(engine: Any) -> tuple[np.ndarray, np.ndarray]:
    """(control, end-of-generation) flags per token of ``engine``'s vocabulary (read once per engine: a freed
    model's vocabulary pointer may be reused, so the engine object is the key)."""
    with _kinds_lock:
        key = id(engine)
        if key not in _kinds:
            vocab, n = engine.vocab, engine.n_vocab
            control = np.array([llama.llama_vocab_get_attr(vocab, t) & llama.LLAMA_TOKEN_ATTR_CONTROL
                                for t in range(n)], dtype=bool)
            eog = np.array([llama.llama_vocab_is_eog(vocab, t) for t in range(n)], dtype=bool)
            _kinds[key] = control, eog
            weakref.finalize(engine, _kinds.pop, key, None)
        return _kinds[key]


class Grammar:
    """One parser state of a GBNF grammar over ``engine``'s vocabulary; ``stops`` end generation like
    end-of-generation tokens (allowed only where the grammar is complete)."""

    def __init__(self, engine: Any, gbnf: str, stops: Iterable[int] = (), root: str = "root") -> None:
        self.engine = engine
        with LLAMA_LOG.capture() as lines:
            sampler = llama.llama_sampler_init_grammar(engine.vocab, gbnf.encode(), root.encode())
        if not sampler:
            raise GgufMtpError(f"grammar: llama.cpp cannot parse it ({error_lines(lines) or 'no reason logged'})")
        self._own(sampler)
        control, eog = _token_kinds(engine)
        self._end = eog.copy()
        self._end[[t for t in stops if 0 <= t < engine.n_vocab]] = True
        self._banned = control & ~self._end

    def _own(self, sampler: Any) -> None:
        self._sampler = sampler
        self._free = weakref.finalize(self, llama.llama_sampler_free, sampler)

    def clone(self) -> Grammar:
        """An independent copy of this state (the token tables are shared: they never change)."""
        twin = object.__new__(Grammar)
        twin.engine, twin._end, twin._banned = self.engine, self._end, self._banned
        twin._own(llama.llama_sampler_clone(self._sampler))
        return twin

    def close(self) -> None:
        self._free()

    def steer(self) -> Steer:
        """A draft chain starting from this state (``Steer``)."""
        return Steer(self)

    # --- what the grammar allows here ----------------------------------------------------------------
    def allows(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per token: may it come next?"""
        ids = np.asarray(tokens, dtype=np.int32)
        ok = self._apply(ids, np.zeros(ids.size, dtype=np.float32)) & ~self._banned[ids]
        ends = self._end[ids]
        if ends.any():  # stop tokens the vocabulary does not mark end-of-generation: the grammar must be complete
            ok[ends] = self.complete()
        return ok

    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar (llama.cpp then allows end-of-generation)."""
        return bool(self._apply(np.array([self.engine.eos], np.int32), np.zeros(1, np.float32))[0])

    def _apply(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        data = np.empty(ids.size, dtype=TOKEN_DATA)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        arr = llama.llama_token_data_array(data.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)), ids.size,
                                           -1, False)
        llama.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        return np.isfinite(data["logit"])

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one row of logits with every token the grammar rejects at -inf."""
        x = np.asarray(logits, dtype=np.float32)
        ok = self.allows(np.arange(x.size))
        if not ok.any():
            raise GgufMtpError("grammar: no token of the vocabulary can continue the text here")
        return np.where(ok, x, -np.inf)

    def argmax(self, logits: np.ndarray) -> int:
        """The best token the grammar allows (np.argmax's tie rule: the lowest id)."""
        best = self.best(logits)
        if best is None:
            raise GgufMtpError("grammar: no token of the vocabulary can continue the text here")
        return best

    def best(self, logits: np.ndarray) -> int | None:
        """``argmax``, or None where the grammar allows no token. Tries the best ``FAST_CANDIDATES`` tokens first:
        the winner among them is the answer when its logit beats every other."""
        x = np.asarray(logits)
        if x.size > FAST_CANDIDATES:
            top = np.argpartition(-x, FAST_CANDIDATES)[:FAST_CANDIDATES]
            top = top[np.lexsort((top, -x[top]))]  # best first, lower id first among equals
            ok = self.allows(top)
            if ok.any():
                best = top[int(np.argmax(ok))]
                if x[best] > x[top[-1]]:
                    return int(best)
        ok = self.allows(np.arange(x.size))
        return int(np.argmax(np.where(ok, x.astype(np.float32), -np.inf))) if ok.any() else None

    # --- moving through a round --------------------------------------------------------------------
    def advance(self, tokens: Iterable[int]) -> None:
        """Feed emitted tokens. Each is checked first: llama.cpp aborts the process on a token its grammar
        rejects, and a server must fail one request instead."""
        for t in tokens:
            if not self.allows([t])[0]:
                raise GgufMtpError(f"grammar: token {t} does not fit the grammar here")
            self._accept(t)

    def _accept(self, token: int) -> None:
        """Move past ``token``, already known to be allowed here (``advance`` checks it first)."""
        llama.llama_sampler_accept(self._sampler, int(token))

    def check(self, draft: Draft, stats: Stats | None = None) -> tuple[Draft, Rows]:
        """``draft`` cut before the first token the grammar rejects (counted in ``stats.grammar_cut``), and the
        state at each verify row of what is left."""
        states = [self.clone()]
        for t in draft.tokens:
            if not states[-1].allows([t])[0]:
                break
            nxt = states[-1].clone()
            nxt._accept(t)  # allowed: checked just above
            states.append(nxt)
        n = len(states) - 1
        if stats is not None:
            stats.grammar_cut += len(draft.tokens) - n
        if n == len(draft.tokens):
            return draft, Rows(states)
        return Draft(draft.tokens[:n], draft.probs[:n] if draft.probs is not None else None), Rows(states)


class Steer:
    """Grammar-steered drafting: the grammar state along one round's draft chain, from the request's state (after
    every emitted token: verify row 0's). ``choose`` takes each draft step's drafter logits and returns the
    drafter's best token the state allows (``best``), moving the state past it; the chain stops (``stopped``;
    ``choose`` then returns None) where the grammar is complete or allows nothing. So every draft passes ``check``
    (``grammar_cut`` stays 0 for steered drafts), and the drafts are a deterministic function of the drafter's
    logits (q one-hot: rejection sampling stays exact)."""

    def __init__(self, grammar: Grammar) -> None:
        self._state = grammar.clone()
        self.stopped = self._state.complete()

    def choose(self, logits: np.ndarray) -> int | None:
        token = None if self.stopped else self._state.best(logits)
        if token is None:
            self.stopped = True
            return None
        self._state._accept(token)  # ``best`` allowed it: no second check
        self.stopped = self._state.complete()
        return token

    def close(self) -> None:
        self._state.close()


class Rows(list):
    """The grammar state at each verify row of a round (row i: after the first i drafts)."""

    def close(self) -> None:
        for g in self:
            g.close()


def check_grammar(engine: Any, gbnf: str) -> str | None:
    """Why ``gbnf`` cannot be used on ``engine``'s vocabulary, or None."""
    try:
        Grammar(engine, gbnf).close()
    except GgufMtpError as e:
        return str(e)
    return None
