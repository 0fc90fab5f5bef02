"""Rendering a GGUF's chat template (Jinja, as Hugging Face writes them) into prompt tokens.

Templates come from model files, so they run in Jinja's immutable sandbox: no attribute access to Python
internals (an attempt raises at once instead of rendering as empty), no mutation of the values passed in. On top
of the sandbox, ``Limits`` bound what a hostile template can cost: output size, the size of any string or list it
builds (``+``, ``*``, ``~`` through a variable), integer arguments (``center(10**9)``), format widths
(``'%0999999999d' % 1``, ``'{:>999999999}'.format(1)``), ``**``, and wall time
(checked on every attribute access, call and output piece, so nested loops cannot spin unchecked).
``generate`` renders one user turn; ``chat`` renders the whole conversation each turn and lets the engine reuse
the cached prefix.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import string
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import GgufMtpError

if TYPE_CHECKING:
    from jinja2 import Template

    from .engine import Engine

Message = Mapping[str, Any]  # {"role": "user" | "assistant" | "system", "content": str | [parts]}


@dataclass(frozen=True)
class Limits:
    """What one render may cost. A real chat template over a long conversation needs a few ms and < 1 MB."""

    max_output: int = 8 << 20  # characters of rendered text
    max_value: int = 8 << 20  # length of any string or list the template builds or reads back
    max_seconds: float = 5.0
    max_range: int = 100_000  # items of range() (Jinja's own sandbox limit)


DEFAULT_LIMITS = Limits()


class TemplateLimit(Exception):
    """A chat template went over a ``Limits`` bound."""


_active = threading.local()  # the Limits and deadline of the render running on this thread


def _check_time() -> Limits:
    lim: Limits = _active.limits
    if time.monotonic() > _active.deadline:
        raise TemplateLimit(f"rendering took longer than {lim.max_seconds:g} s")
    return lim


def _check_value(value: Any) -> Any:
    if isinstance(value, str | list | tuple | dict | bytes) and len(value) > _active.limits.max_value:
        raise TemplateLimit(f"a value of {len(value)} items (limit {_active.limits.max_value})")
    return value


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    lim = _active.limits
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > lim.max_value:
            raise TemplateLimit(f"an argument of {v} (limit {lim.max_value})")


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d*))?")


def _check_widths(fmt: Any, brace: bool = False) -> None:
    """Widths and precisions in a format string (``'%0999999999d' % 1``, ``'{:>999999999}'.format(1)``) build
    their padding in one C call, before any size check could see the result: refuse big ones up front."""
    if not isinstance(fmt, str):
        return
    lim = _active.limits.max_value
    if brace:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    else:
        specs = [f"{m[1]} {m[2] or ''}" for m in _PRINTF_SPEC.finditer(fmt)]
    for spec in specs:
        for digits in re.findall(r"\d+", spec):
            if len(digits) > 9 or int(digits) > lim:
                raise TemplateLimit(f"a format width of {digits[:12]} (limit {lim})")


def _raise(message: str) -> None:
    raise GgufMtpError(f"chat template: {message}")


def _sandbox_class():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["+", "*", "**", "%"])

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

        def wrap_str_format(self, value: Any) -> Any:
            sandboxed = super().wrap_str_format(value)  # ``'...'.format``: checked when called, like ``%``
            if sandboxed is None:
                return None

            def checked(*args: Any, **kwargs: Any) -> str:
                _check_widths(value.__self__, brace=True)
                return sandboxed(*args, **kwargs)

            return checked

        def getattr(self, obj: Any, attribute: str) -> Any:
            _check_time()
            return _check_value(super().getattr(obj, attribute))

        def getitem(self, obj: Any, argument: Any) -> Any:
            _check_time()
            return _check_value(super().getitem(obj, argument))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_time()
            _check_args(args, kwargs)
            return _check_value(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            lim = _check_time()
            sized = (str, list, tuple)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, sized) and isinstance(n, int) and len(seq) * n > lim.max_value:
                        raise TemplateLimit(f"a repetition of {len(seq)} x {n} items (limit {lim.max_value})")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * abs(left).bit_length() > 4096:
                    raise TemplateLimit(f"{left} ** {right} is too large")
            elif operator == "%" and isinstance(left, str):
                _check_widths(left)
                _check_args(right if isinstance(right, tuple) else (right,), {})
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                if len(left) + len(right) > lim.max_value:
                    raise TemplateLimit(f"a value of {len(left) + len(right)} items (limit {lim.max_value})")
            return super().call_binop(context, operator, left, right)

    return Sandbox


def _filter(f):
    """Filters bypass the sandbox's ``call``: give them the same argument and size checks."""

    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the context/environment, then the filtered value

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args(args[skip:], kwargs)
        if f.__name__ == "do_format" and len(args) >= skip:  # the ``format`` filter: ``value % args``
            _check_widths(args[skip - 1])
        return _check_value(f(*args, **kwargs))

    return wrapped


def _range(*args: int) -> range:
    lim = _check_time()
    r = range(*args)
    if len(r) > lim.max_range:
        raise TemplateLimit(f"range() of {len(r)} items (limit {lim.max_range})")
    return r


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Template:
    from jinja2 import TemplateError

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.filters = {name: _filter(f) for name, f in env.filters.items()}
    env.globals["range"] = _range
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise GgufMtpError(f"chat template does not compile: {e}") from None


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", limits: Limits = DEFAULT_LIMITS, **variables: Any) -> str:
    """The template's text for ``messages`` (extra variables such as ``enable_thinking`` pass through)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    compiled = _compile(template)
    _active.limits, _active.deadline = limits, time.monotonic() + limits.max_seconds
    out: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **variables):
            size += len(piece)
            if size > limits.max_output:
                raise TemplateLimit(f"more than {limits.max_output} characters of output")
            _check_time()
            out.append(piece)
    except SecurityError as e:
        raise GgufMtpError(f"chat template tried something unsafe: {e}") from None
    except TemplateLimit as e:
        raise GgufMtpError(f"chat template went over a limit: {e}") from None
    except TemplateError as e:
        raise GgufMtpError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        raise GgufMtpError(f"chat template failed: {type(e).__name__}: {e}") from None
    return "".join(out)


@functools.lru_cache(maxsize=8)
def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from outside (``tools``: it renders tool declarations itself)."""
    from jinja2 import meta

    template = _compile(source)
    return frozenset(meta.find_undeclared_variables(template.environment.parse(source)))


def prompt_text(engine: Engine, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """The target's own template rendered for ``messages`` (with the model's BOS/EOS spellings)."""
    template = engine.chat_template
    if template is None:
        raise GgufMtpError(f"{engine.target_path} has no chat template (tokenizer.chat_template); use --raw")
    bos = engine.piece(engine.bos, special=True).decode("utf-8", errors="replace")
    eos_id = engine.eos
    eos = engine.piece(eos_id, special=True).decode("utf-8", errors="replace") if eos_id >= 0 else ""
    return render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                  **variables)


def prompt_tokens(engine: Engine, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                  **variables: Any) -> list[int]:
    """Render with the target's own template and tokenize (special tokens parsed; BOS added once)."""
    return text_tokens(engine, prompt_text(engine, messages, add_generation_prompt=add_generation_prompt,
                                           **variables))


def text_tokens(engine: Engine, text: str) -> list[int]:
    """Rendered template text as tokens (special tokens parsed; BOS added once)."""
    tokens = engine.tokenize(text, add_special=False, parse_special=True)
    if engine.adds_bos and (not tokens or tokens[0] != engine.bos):
        tokens.insert(0, engine.bos)
    return tokens


def user_prompt(engine: Engine, text: str) -> list[int]:
    """One user turn with the generation prompt: what ``generate`` sends without ``--raw``."""
    return prompt_tokens(engine, [{"role": "user", "content": text}])
