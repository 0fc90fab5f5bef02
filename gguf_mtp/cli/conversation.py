"""chat: a multi-turn REPL over the speculative loop (gguf_mtp/runtime/chat.py, multimodal.py)."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click

from ..errors import GgufMtpError
from .common import (console, decode_options, draft_settings, err_console, error_message, exit_code,
                     log_to_stderr, print_table, runtime_options, runtime_settings)


def _chat_status(s: Any, seconds: float) -> str:
    rate = s.tokens / seconds if seconds > 0 else 0.0
    drafts = (f"drafts kept {s.accepted}/{s.proposed} ({100 * s.acceptance_rate:.0f}%)" if s.proposed
              else "no drafts")
    return f"{s.tokens} tokens, {rate:.1f} tok/s, {drafts}"


def _chat_summary(reply: Any) -> str:
    s = reply.stats
    media = f", {reply.media_tokens} media tokens encoded" if reply.media_tokens else ""
    return (f"[{_chat_status(s, s.generate_time)}, {s.mean_accepted_length:.2f} tokens/round; prompt "
            f"{reply.prompt_tokens} tokens: {s.prefill_tokens} read, {s.reused_tokens} cached{media}; "
            f"stop: {s.stop_reason}]")


class _ChatView:
    """The reply as it streams. On a terminal: a rich Live region (the reply's last screenful and a live status
    line), replaced by the whole reply when the turn ends; elsewhere plain text as it comes."""

    def __init__(self, session: Any, hide_thoughts: bool) -> None:
        from rich.text import Text

        self.session, self.hide = session, hide_thoughts
        self.live_mode = console.is_terminal
        self.text = Text()
        self.t0: float | None = None
        self.live = None
        self.thinking = False

    def __enter__(self) -> _ChatView:
        if self.live_mode:
            from rich.live import Live

            self.live = Live(self._render(), console=console, transient=True, refresh_per_second=8)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            console.print(self.text, soft_wrap=True)
        elif self.text:
            click.echo("")

    def _render(self) -> Any:
        import time

        from rich.console import Group
        from rich.text import Text

        width, height = console.size
        lines, start = 0, len(self.text.plain)
        for line in reversed(self.text.plain.split("\n")):  # keep the last screenful
            lines += max(1, -(-len(line) // max(1, width)))
            if lines > max(1, height - 2):
                break
            start -= len(line) + 1
        seconds = time.perf_counter() - self.t0 if self.t0 else 0.0
        status = Text(_chat_status(self.session.stats, seconds), style="dim")
        return Group(self.text[max(0, start):], status)

    def piece(self, text: str, thought: bool) -> None:
        import time

        if self.t0 is None:
            self.t0 = time.perf_counter()
        if thought and self.hide:
            return
        if self.thinking and not thought:  # the answer starts on its own line
            text = "\n" + text.lstrip("\n")
        self.thinking = thought
        self.text.append(text, style="dim" if thought else None)
        if self.live is not None:
            self.live.update(self._render())
        else:
            click.echo(text, nl=False)


def _chat_turn(session: Any, text: str, media: dict[str, Any], hide_thoughts: bool) -> None:
    """One message and its streamed reply. Ctrl-C stops the reply; the session keeps what was generated (the
    engine trimmed its cache to exactly that) or, when no token came yet, forgets the message."""
    from ..runtime.chat import Notice, Reply, Text

    reply, finished = None, len(session.history)
    with _ChatView(session, hide_thoughts) as view:
        events = session.send(text, **media)
        try:
            for ev in events:
                if isinstance(ev, Text):
                    view.piece(ev.text, ev.thought)
                elif isinstance(ev, Notice):
                    click.echo(f"note: {ev.message}", err=True)
                elif isinstance(ev, Reply):
                    reply = ev
        except KeyboardInterrupt:
            events.close()
            kept = len(session.history) > finished
            click.echo("\n(reply stopped: what it said so far stays in the conversation)" if kept
                       else "\n(stopped before the reply began: the message is not in the conversation)", err=True)
    if reply is not None:
        err_console.print(_chat_summary(reply), style="dim", markup=False, highlight=False, soft_wrap=True)


def _chat_stats(session: Any) -> None:
    rows, total = [], [0] * 5
    for i, s in enumerate(session.history, 1):
        vals = [s.prefill_tokens, s.reused_tokens, s.tokens, s.proposed, s.accepted]
        total = [a + b for a, b in zip(total, vals)]
        rows.append([i, *vals[:3], f"{s.tokens_per_second:.1f}", *vals[3:5], f"{100 * s.acceptance_rate:.0f}%"])
    rate = f"{100 * total[4] / total[3]:.0f}%" if total[3] else "0%"
    rows.append(["all", *total[:3], "", *total[3:5], rate])
    print_table("chat turns", ["turn", "prefill", "cached", "tokens", "tok/s", "drafted", "kept", "acceptance"],
                rows)


# --- the REPL: its state and its commands (one table) -------------------------------------------------------
@dataclass
class _Repl:
    """What the chat's commands act on."""

    session: Any
    projector: Any
    hide_thoughts: bool
    pending: dict[str, Any] = field(default_factory=dict)  # "image" / "audio" -> media waiting for the next message
    exit_code: int = 0  # the first refused line's; the chat goes on, the exit status tells a script

    def send(self, text: str) -> None:
        media, self.pending = self.pending, {}  # the session owns them from here
        _chat_turn(self.session, text, media, self.hide_thoughts)

    def attach(self, kind: str, path: str) -> None:
        """Read an image or audio file (``kind``: a ``ChatSession.send`` keyword) for the next message, replacing
        one of the same kind."""
        from ..runtime.chat import ATTACHMENTS

        _, reader, needs = ATTACHMENTS[kind]
        if self.projector is None:
            raise GgufMtpError(f"/{kind} needs {needs}: restart with --mmproj FILE")
        # the projector refuses a kind it has no encoder for; no shell expanded ~ here
        item = getattr(self.projector, reader)(Path(path).expanduser())
        if kind in self.pending:
            self.pending[kind].close()
        self.pending[kind] = item
        click.echo(f"({item.describe()}: it goes with your next message)", err=True)

    def close(self) -> None:
        for item in self.pending.values():
            item.close()


def _reset(repl: _Repl, arg: str) -> None:
    repl.session.reset()
    click.echo("(conversation cleared)", err=True)


class ChatCommand(NamedTuple):
    name: str
    args: str  # what must follow the name ("" when nothing)
    help: str
    run: Callable[[_Repl, str], bool | None]  # True ends the chat
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[ChatCommand, ...] = (
    ChatCommand("/help", "", "this list", lambda repl, arg: click.echo(commands_help(), err=True)),
    ChatCommand("/image", "PATH", "attach an image to your next message (needs --mmproj)",
                lambda repl, arg: repl.attach("image", arg)),
    ChatCommand("/audio", "PATH", "attach a WAV/FLAC clip to your next message (needs --mmproj with audio)",
                lambda repl, arg: repl.attach("audio", arg)),
    ChatCommand("/reset", "", "forget the conversation (the system prompt stays)", _reset),
    ChatCommand("/stats", "", "a table of the turns so far", lambda repl, arg: _chat_stats(repl.session)),
    ChatCommand("/exit", "", "end the chat (so do Ctrl-D, and Ctrl-C at the prompt)", lambda repl, arg: True,
                ("/quit",)),
)
_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def _usage(c: ChatCommand, aliases: bool = False) -> str:
    return " ".join(filter(None, [", ".join((c.name, *c.aliases) if aliases else (c.name,)), c.args]))


CHAT_COMMANDS = ", ".join(_usage(c) for c in COMMANDS)


def commands_help() -> str:
    """The command table as text: one command a line."""
    width = max(len(_usage(c, aliases=True)) for c in COMMANDS)
    return "\n".join(f"  {_usage(c, aliases=True):<{width}}  {c.help}" for c in COMMANDS)


def _command(repl: _Repl, text: str) -> bool:
    """Run one slash command; True when it ends the chat."""
    name, arg = (text.split(maxsplit=1) + [""])[:2]
    cmd = _BY_NAME.get(name)
    if cmd is None:
        raise GgufMtpError(f"unknown command {name}; commands: {CHAT_COMMANDS}")
    if cmd.args and not arg:
        raise GgufMtpError(f"{cmd.name}: expected {cmd.args}")
    return bool(cmd.run(repl, arg))


def _read(stdin: Any, interactive: bool) -> str | None:
    """The next line; None at the end of input or on Ctrl-C at the prompt."""
    if interactive:
        console.print("[bold]>[/bold] ", end="")
    try:
        return stdin.readline() or None
    except KeyboardInterrupt:
        if interactive:
            click.echo("", err=True)
        return None


def _repl(repl: _Repl, stdin: Any, interactive: bool) -> None:
    """Read and act until /exit, the end of input, or Ctrl-C at the prompt. A line that cannot be done (an
    unknown command, a missing image, a message too long) is one error line; Ctrl-C stops only what it interrupts."""
    while (line := _read(stdin, interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        try:
            if not text.startswith("/"):
                repl.send(text)
            elif _command(repl, text):
                return
        except (GgufMtpError, OSError) as e:
            click.echo(f"error: {error_message(e)}", err=True)
            repl.exit_code = repl.exit_code or exit_code(e)
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)


@click.command("chat")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Projector GGUF (clip), for images and audio.")
@click.option("--system", help="System prompt.")
@click.option("--think", is_flag=True, help="Gemma 4 thinking mode (<|think|> in the system turn).")
@click.option("--hide-thoughts", is_flag=True, help="Do not show the thinking part of replies.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="An image for the first message "
              "(needs --mmproj; later: /image PATH).")
@click.option("--audio", "audio_path", type=click.Path(dir_okay=False), help="A WAV/FLAC clip for the first "
              "message (needs --mmproj with audio; later: /audio PATH).")
@click.option("-n", "--max-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Tokens per reply at most.")
@decode_options
@click.option("--allow-no-drafter", is_flag=True, help="Go on without the drafter if it cannot be loaded.")
@runtime_options
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr.")
def chat_cmd(target, drafter, mmproj, system, think, hide_thoughts, image_path, audio_path, max_tokens, temp, top_k,
             top_p, min_p, seed, accept, draft_max, adaptive, draft_cap, allow_no_drafter, verbose, **runtime) -> None:
    """Chat with TARGET (+ MTP DRAFTER, + projector for images and audio) in a REPL reading stdin line by line.

    The conversation is rendered with the GGUF's chat template each turn and the KV cache is reused, so a turn
    reads only what is new; when the context fills, the oldest turns after the system prompt are dropped.
    Images and audio clips go before the next message; MTP drafting goes on after them. Ctrl-C stops a reply
    and the chat goes on; a line that cannot be done prints one error line and the chat goes
    on (the exit status is then non-zero).

    \b
    Commands:
    {commands}

    \b
    Examples:
      gguf-mtp chat --target t.gguf --drafter d.gguf --system "Be brief." --think
      gguf-mtp chat --target t.gguf --drafter d.gguf --mmproj m.gguf --image cat.png --plan plan.json
      gguf-mtp chat --target t.gguf --drafter d.gguf --mmproj m.gguf --audio question.wav
      printf 'hi\\n/stats\\n' | gguf-mtp chat --target t.gguf --drafter d.gguf -n 64
    """
    from ..pairing import facts_from_gguf, require_compatible
    from ..runtime.chat import ATTACHMENTS, ChatSession
    from ..runtime.engine import Engine
    from ..runtime.multimodal import Projector
    from ..runtime.sampling import SamplingParams

    draft = draft_settings(draft_max, adaptive, draft_cap)
    first = {kind: path for kind, path in (("image", image_path), ("audio", audio_path)) if path is not None}
    for kind, path in first.items():
        if mmproj is None:
            raise GgufMtpError(f"--{kind} needs {ATTACHMENTS[kind][2]}: add --mmproj FILE")
        if not Path(path).is_file():
            raise GgufMtpError(f"{kind} {path} does not exist")
    settings = runtime_settings(**runtime, draft=draft)
    if mmproj is not None:  # the whole set, before any weights load
        require_compatible(facts_from_gguf(target), facts_from_gguf(drafter) if drafter else None,
                           facts_from_gguf(mmproj))
    stdin = sys.stdin
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD rather than end the chat
        stdin.reconfigure(errors="replace")
    with contextlib.ExitStack() as stack:
        stack.enter_context(log_to_stderr(verbose))
        eng = stack.enter_context(Engine.load(target, drafter, settings, allow_no_drafter=allow_no_drafter))
        proj = stack.enter_context(Projector.load(mmproj, eng)) if mmproj else None
        session = ChatSession(eng, projector=proj, system=system, think=think,
                              sampling=SamplingParams(temp, top_k, top_p, min_p, seed), accept=accept,
                              max_tokens=max_tokens)
        stack.callback(session.close)
        repl = _Repl(session, proj, hide_thoughts)
        stack.callback(repl.close)
        for kind, path in first.items():
            repl.attach(kind, path)
        if interactive:
            what = "MTP drafter" if eng.has_drafter else "no drafter"
            err_console.print(f"[dim]{Path(target).name} ({what}{', ' + proj.kinds if proj else ''}), context "
                              f"{eng.n_ctx}. Commands: {CHAT_COMMANDS}. Ctrl-D quits.[/dim]",
                              highlight=False)
        _repl(repl, stdin, interactive)
    if repl.exit_code:
        raise click.exceptions.Exit(repl.exit_code)


# --help lists the commands from the table (click reads the docstring when the command is made)
chat_cmd.help = inspect.cleandoc(chat_cmd.help).replace("{commands}", commands_help())
