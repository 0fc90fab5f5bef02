"""Multi-turn chat over the speculative loop: the conversation re-rendered each turn, the KV cache reused.

Each ``send`` renders the whole conversation with the GGUF's own chat template (sandboxed, chat_template.py) and
hands it to ``speculative_generate``, whose prefill keeps the longest cached prefix (``engine.reuse_prefix``), so
a turn decodes only what is new: the end of the previous reply and the new user turn. When the prompt plus room
for the reply no longer fits the context, the oldest turns after the system prompt are dropped (a ``Notice``
says so) and what remains is read again. Images and audio clips go through the projector (multimodal.py) and stay
in the conversation; the cache keeps them like text, and MTP drafting goes on after them as after text.

Gemma 4 thinking: ``think=True`` sets ``enable_thinking`` (the template puts ``<|think|>`` in the system turn);
the reply's ``<|channel>thought ... <channel|>`` part comes out as ``Text(thought=True)`` and is kept out of the
conversation history (as Gemma 4's own template strips it). Nothing here prints: front ends consume events.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GgufMtpError
from .adaptive import AdaptiveK, FixedK
from .chat_template import prompt_text, prompt_tokens
from .engine import Engine
from .loop import make_chooser, speculative_generate
from .multimodal import Audio, Image, Media, MediaPrompt, Projector
from .sampling import SamplingParams
from .stats import Stats

# the media ``send`` takes, by keyword, in the order they go before the text (front ends attach by these names):
# (type, Projector method reading a file, what the projector must be)
ATTACHMENTS = {"image": (Image, "load_image", "a vision projector"),
               "audio": (Audio, "load_audio", "a projector with audio")}
STOP_TEXTS = ("<turn|>", "<eos>")  # Gemma 4 ends a reply with either (llama.cpp marks both end-of-generation)
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"


# --- events a turn yields ------------------------------------------------------------------------------
@dataclass
class Text:
    """A piece of the reply as it streams: answer text, or thinking (``thought``)."""

    text: str
    thought: bool = False


@dataclass
class Notice:
    """Something the user should be told: ``dropped`` (old turns left the context), ``context_full`` (reply cut)."""

    kind: str
    message: str


@dataclass
class Reply:
    """The end of a turn: the answer (without thoughts), what it cost, and how the prompt was read."""

    answer: str
    thoughts: str
    tokens: list[int]
    stats: Stats
    prompt: list[int]  # the whole rendered conversation; media positions hold the image's or clip's identity id
    media_tokens: int  # image and audio positions encoded and decoded this turn (0 when the cache held them)
    dropped_turns: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


ChatEvent = Text | Notice | Reply


@dataclass(eq=False)
class Turn:
    user: str
    media: tuple[Media, ...] = ()  # images and audio clips, in the order they go before the text
    answer: str | None = None  # None until the reply exists
    thoughts: str = ""

    def close_media(self, keep: list[Turn] = ()) -> None:
        """Free this turn's media, except what a turn of ``keep`` also holds."""
        held = {id(m) for t in keep for m in t.media}
        for m in self.media:
            if id(m) not in held:
                m.close()


# --- thoughts -----------------------------------------------------------------------------------------
def special_id(engine: Engine, text: str) -> int | None:
    """The id of a control token spelled ``text``, or None when the vocabulary has no such single token."""
    ids = engine.tokenize(text, add_special=False, parse_special=True)
    return ids[0] if len(ids) == 1 else None


class ThoughtSplitter:
    """Turns streamed token ids into answer and thought text at Gemma 4's channel markers.

    ``<|channel>`` opens a channel whose first line names it (``thought``); ``<channel|>`` closes it. Text is
    decoded incrementally, so a multi-byte character split across tokens comes out whole.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.open_id, self.close_id = special_id(engine, CHANNEL_OPEN), special_id(engine, CHANNEL_CLOSE)
        self.in_thought = False
        self._header: str | None = None  # the channel's name line, until its newline arrives
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.answer = self.thoughts = ""

    def feed(self, tokens: list[int]) -> list[Text]:
        out: list[Text] = []
        for t in tokens:
            if t == self.open_id or t == self.close_id:
                self._emit(self._decoder.decode(b"", final=True), out)
                self.in_thought, self._header = t == self.open_id, "" if t == self.open_id else None
                continue
            self._emit(self._decoder.decode(self.engine.piece(t)), out)
        return out

    def flush(self) -> list[Text]:
        out: list[Text] = []
        self._emit(self._decoder.decode(b"", final=True), out)
        return out

    def _emit(self, text: str, out: list[Text]) -> None:
        if self._header is not None:  # skip the channel name ("thought\n")
            self._header += text
            if "\n" not in self._header:
                return
            text, self._header = self._header.split("\n", 1)[1], None
        if not text:
            return
        if self.in_thought:
            self.thoughts += text
        else:
            self.answer += text
        if out and out[-1].thought == self.in_thought:
            out[-1].text += text
        else:
            out.append(Text(text, self.in_thought))


# --- the session --------------------------------------------------------------------------------------
@dataclass
class ChatSession:
    """A conversation with one engine (and optionally a projector for images and audio).

    ``send(text, image=None, audio=None)`` yields ``Text`` pieces as they are generated, ``Notice``s, and a final
    ``Reply``. ``stats`` is the turn in progress (updated every round: a front end can show it live), ``history``
    the Stats of every finished turn. ``reserve`` is the room kept for a reply when fitting the conversation into
    the context (default: ``max_tokens``, at most half the context).
    """

    engine: Engine
    projector: Projector | None = None
    system: str | None = None
    think: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    accept: str = "exact"
    chooser: FixedK | AdaptiveK | None = None
    max_tokens: int = 512
    reserve: int | None = None
    turns: list[Turn] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    history: list[Stats] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.engine.chat_template is None:
            raise GgufMtpError(f"{self.engine.target_path} has no chat template (tokenizer.chat_template)")
        if self.chooser is None:
            self.chooser = make_chooser(self.engine) if self.engine.has_drafter else FixedK(0)
        self.stop_ids = [i for i in (special_id(self.engine, s) for s in STOP_TEXTS) if i is not None]
        self._text = ""  # the text of the prompt last rendered
        self._last: tuple[str, list[int], str, list[int]] | None = None  # prompt text, its tokens, reply text, ids

    # --- conversation -------------------------------------------------------------------------------
    def messages(self, turns: list[Turn] | None = None) -> list[dict]:
        """The conversation as chat-template messages (a pending turn has no assistant message yet)."""
        msgs: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns if turns is None else turns:
            content = self.projector.marker * len(t.media) + t.user if t.media else t.user  # llama-server's layout
            msgs.append({"role": "user", "content": content})
            if t.answer is not None:
                msgs.append({"role": "assistant", "content": t.answer})
        return msgs

    def render(self, turns: list[Turn]) -> tuple[list[int], MediaPrompt | None]:
        """Prompt tokens for ``turns`` (and the MediaPrompt that decodes them when they hold media).

        When the new text only appends to the last prompt and its reply (the usual case), the last prompt's
        tokens and as much of the reply's own ids as spell its text are kept rather than tokenized again: the
        cache then matches to the end of the reply (text does not always tokenize back into the ids the model
        chose). The tokens still spell exactly the rendered text.
        """
        msgs, variables = self.messages(turns), {"enable_thinking": self.think}
        text = prompt_text(self.engine, msgs, **variables)
        self._text = text
        attached = [m for t in turns for m in t.media]
        if attached:
            media = self.projector.tokenize(text, attached)
            return media.tokens, media
        if self._last is not None:
            prev_text, prev_tokens, reply_text, reply_tokens = self._last
            if text.startswith(prev_text + reply_text):
                kept, spelled = self._spelled_prefix(reply_tokens, reply_text)
                rest = text[len(prev_text) + len(spelled):]
                return prev_tokens + kept + self.engine.tokenize(rest, add_special=False), None
        return prompt_tokens(self.engine, msgs, **variables), None

    def _spelled_prefix(self, tokens: list[int], text: str) -> tuple[list[int], str]:
        """The longest prefix of ``tokens`` that spells the start of ``text`` exactly (control tokens included,
        so thoughts and tokens the template would not write back end it), cut at a character boundary."""
        target, done = text.encode("utf-8"), b""
        best, best_len = 0, 0
        for i, t in enumerate(tokens):
            piece = self.engine.piece(t, special=True)
            if not target.startswith(piece, len(done)):
                break
            done += piece
            if len(done) == len(target) or (target[len(done)] & 0xC0) != 0x80:
                best, best_len = i + 1, len(done)
        return tokens[:best], target[:best_len].decode("utf-8")

    @property
    def room(self) -> int:
        """Context kept free for the reply when fitting the conversation."""
        n_ctx = self.engine.n_ctx
        return min(self.reserve if self.reserve is not None else self.max_tokens, n_ctx // 2)

    def _fit(self, turn: Turn) -> tuple[list[int], MediaPrompt | None, int]:
        """Render the conversation plus ``turn``, dropping the oldest turns until it leaves ``room`` free."""
        n_ctx = self.engine.n_ctx
        for dropped in range(len(self.turns) + 1):
            prompt, media = self.render(self.turns[dropped:] + [turn])
            if len(prompt) + self.room <= n_ctx:
                for old in self.turns[:dropped]:
                    old.close_media(self.turns[dropped:])
                del self.turns[:dropped]
                return prompt, media, dropped
            if media is not None:
                media.close()
        raise GgufMtpError(f"this message needs {len(prompt)} tokens of context and {self.room} more for the reply; "
                           f"the context holds {n_ctx} (raise --ctx, or send less)")

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays, and so does its cached prefix)."""
        for t in self.turns:
            t.close_media()
        self.turns.clear()
        self._last = None

    def close(self) -> None:
        self.reset()

    # --- one turn -----------------------------------------------------------------------------------
    def _attach(self, image: Image | str | Path | None, audio: Audio | str | Path | None) -> tuple[Media, ...]:
        """The turn's media, files read through the projector (on a failure, what was read is freed)."""
        out: list[Media] = []
        try:
            for name, item in (("image", image), ("audio", audio)):
                kind, load, needs = ATTACHMENTS[name]
                if item is None:
                    continue
                if self.projector is None:
                    raise GgufMtpError(f"{kind.what} needs {needs} (--mmproj)")
                out.append(item if isinstance(item, kind) else getattr(self.projector, load)(item))
        except BaseException:
            for m in (*out, image, audio):  # the session owns what it was given, even when the turn fails
                if isinstance(m, Media):
                    m.close()
            raise
        return tuple(out)

    def send(self, text: str, image: Image | str | Path | None = None,
             audio: Audio | str | Path | None = None) -> Iterator[ChatEvent]:
        """Generate the reply to ``text`` (with an optional image and audio clip, which go before it), streaming
        events; the turn joins the history.

        Closing the iterator early (Ctrl-C in a front end) keeps the partial reply in the conversation. The
        session owns ``image`` and ``audio`` from here on (freed when their turn leaves the conversation).
        """
        if self.projector is not None and self.projector.marker in text:
            raise GgufMtpError(f"the message contains {self.projector.marker!r}, which marks where images and audio "
                               f"clips go")
        turn = Turn(text, self._attach(image, audio))
        try:
            prompt, media, dropped = self._fit(turn)
        except BaseException:
            turn.close_media()
            raise
        text_sent = self._text
        if dropped:
            yield Notice("dropped", f"context full: dropped the {dropped} oldest turn(s) after the system prompt; "
                                    f"the rest is read again")
        stats = self.stats = Stats()
        splitter = ThoughtSplitter(self.engine)
        tokens: list[int] = []
        gen = speculative_generate(self.engine, prompt, max_tokens=self.max_tokens, sampling=self.sampling,
                                   accept=self.accept, chooser=self.chooser, stats=stats, stop_tokens=self.stop_ids,
                                   media=media)
        started = False
        try:
            for r in gen:
                started = True
                tokens += r.tokens
                yield from splitter.feed(r.tokens)
            yield from splitter.flush()
        finally:
            gen.close()
            encoded = media.encoded if media is not None else 0
            if media is not None:
                media.close()
            if started:
                turn.answer, turn.thoughts = splitter.answer, splitter.thoughts
                self._last = (text_sent, list(prompt), splitter.answer, tokens) if media is None else None
                self.turns.append(turn)
                self.history.append(stats)
            else:
                turn.close_media()
        if stats.stop_reason == "context":
            yield Notice("context_full", "the context is full: the reply was cut (older turns are dropped next turn)")
        yield Reply(splitter.answer, splitter.thoughts, tokens, stats, list(prompt), encoded, dropped)

    def ask(self, text: str, image: Image | str | Path | None = None,
            audio: Audio | str | Path | None = None) -> Reply:
        """``send`` run to the end: the Reply (notices are dropped)."""
        reply = None
        for ev in self.send(text, image, audio):
            if isinstance(ev, Reply):
                reply = ev
        return reply
