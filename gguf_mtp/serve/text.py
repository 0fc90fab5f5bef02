"""Emitted tokens into response text: thoughts apart from the answer, stop strings, and how each piece was made.

Tokens are decoded one at a time (``ThoughtSplitter`` from the chat session: whole UTF-8 characters, Gemma 4's
channel markers), so a stream sends one token per chunk (more where a character spans tokens or text waits on
a stop string), each with how it was produced (a kept draft at
position i, or the target's own token). Answer text that could be the start of a stop string is held back until
it is not; once a stop string appears, what precedes it is the last text and ``stopped`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..runtime.chat import ThoughtSplitter


def partial_marker(text: str, markers: Iterable[str]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers`` (they wait for more)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


@dataclass
class Piece:
    text: str
    thought: bool = False
    draft: list[int | None] = field(default_factory=list)  # per token behind this text: draft position, or None


class TextStream:
    """Feed tokens (with their draft positions) in, take ``Piece``s out; ``answer`` and ``thoughts`` so far."""

    def __init__(self, engine: Any, stops: tuple[str, ...] = (), thoughts: bool = True) -> None:
        self.splitter = ThoughtSplitter(engine)
        if not thoughts:  # a plain completion: channel markers are text like any other token
            self.splitter.open_id = self.splitter.close_id = None
        self.stops = stops
        self.answer = self.thoughts = ""
        self.stopped = False
        self._held = ""  # answer text that may begin a stop string
        self._draft: list[int | None] = []  # positions of tokens whose text has not gone out yet

    def feed(self, tokens: list[int], draft: list[int | None]) -> list[Piece]:
        out: list[Piece] = []
        for t, d in zip(tokens, draft):
            if self.stopped:
                break
            self._draft.append(d)
            for text in self.splitter.feed([t]):
                self._text(text.text, text.thought, out)
        return out

    def flush(self) -> list[Piece]:
        out: list[Piece] = []
        for text in self.splitter.flush():
            self._text(text.text, text.thought, out)
        if self._held and not self.stopped:
            self._send(self._held, False, out)
            self._held = ""
        return out

    def _text(self, text: str, thought: bool, out: list[Piece]) -> None:
        if self.stopped:
            return
        if thought:
            self.thoughts += text
            self._send(text, True, out)
            return
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            if min(hits):
                self._send(held[:min(hits)], False, out)
            return
        keep = partial_marker(held, self.stops)
        self._held = held[len(held) - keep:] if keep else ""
        if len(held) > keep:
            self._send(held[:len(held) - keep], False, out)

    def _send(self, text: str, thought: bool, out: list[Piece]) -> None:
        if not thought:
            self.answer += text
        out.append(Piece(text, thought, self._draft))
        self._draft = []
