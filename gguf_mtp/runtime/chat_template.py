"""Rendering a GGUF's chat template (Jinja, as Hugging Face writes them) into prompt tokens.

Templates come from model files, so they run in Jinja's immutable sandbox: no attribute access to Python
internals, no mutation of the values passed in. ``generate`` renders one user turn; ``chat`` renders the whole
conversation each turn and lets the engine reuse the cached prefix.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GgufMtpError

if TYPE_CHECKING:
    from jinja2 import Template

    from .engine import Engine

Message = Mapping[str, Any]  # {"role": "user" | "assistant" | "system", "content": str | [parts]}


def _raise(message: str) -> None:
    raise GgufMtpError(f"chat template: {message}")


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Template:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise GgufMtpError(f"chat template does not compile: {e}") from None


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
    """The template's text for ``messages`` (extra variables such as ``enable_thinking`` pass through)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **variables)
    except SecurityError as e:
        raise GgufMtpError(f"chat template tried something unsafe: {e}") from None
    except TemplateError as e:
        raise GgufMtpError(f"chat template failed: {e}") from None


def prompt_tokens(engine: Engine, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                  **variables: Any) -> list[int]:
    """Render with the target's own template and tokenize (special tokens parsed; BOS added once)."""
    template = engine.chat_template
    if template is None:
        raise GgufMtpError(f"{engine.target_path} has no chat template (tokenizer.chat_template); use --raw")
    bos = engine.piece(engine.bos, special=True).decode("utf-8", errors="replace")
    eos_id = engine.eos
    eos = engine.piece(eos_id, special=True).decode("utf-8", errors="replace") if eos_id >= 0 else ""
    text = render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                  **variables)
    tokens = engine.tokenize(text, add_special=False, parse_special=True)
    if engine.adds_bos and (not tokens or tokens[0] != engine.bos):
        tokens.insert(0, engine.bos)
    return tokens


def user_prompt(engine: Engine, text: str) -> list[int]:
    """One user turn with the generation prompt: what ``generate`` sends without ``--raw``."""
    return prompt_tokens(engine, [{"role": "user", "content": text}])
