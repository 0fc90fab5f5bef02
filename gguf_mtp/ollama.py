"""Ollama Modelfiles: build one from a target + drafter (+ projector) and a plan, render it, and check it.

The checker follows Ollama's own Modelfile grammar (parser/parser.go in ollama/ollama; see docs/ollama.md):
directives are case-insensitive, a value runs to the end of its line unless it opens a ``"`` or ``\"\"\"``
quote, which may span lines and ends at the first line end where the trimmed value closes it; ``#`` starts
a comment only where a directive could start; PARAMETER names are checked against the table Ollama's
``api.FormatParams`` accepts, with their value types. Every Modelfile we write is parsed back with this
checker before ``render_modelfile`` returns it, so a quoting mistake is a bug we see, not a file Ollama misreads.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, render
from .errors import GgufMtpError, IncompatiblePair
from .pairing import ModelFacts, check_set
from .settings import RuntimeSettings

# --- what Ollama accepts (tables) ---------------------------------------------------------------------

# Modelfile directive -> the command name Ollama's parser gives it (PARAMETER lines are named by parameter).
DIRECTIVES = {
    "from": "model", "draft": "draft", "adapter": "adapter", "template": "template", "system": "system",
    "license": "license", "renderer": "renderer", "parser": "parser", "requires": "requires",
    "parameter": None, "message": "message",
}
COMMAND_DIRECTIVE = {name: d.upper() for d, name in DIRECTIVES.items() if name}
MESSAGE_ROLES = ("system", "user", "assistant")
PATH_COMMANDS = ("model", "draft", "adapter")

# PARAMETER name -> value type, from the json tags of api.Options / api.Runner (api/types.go).
PARAMETER_TYPES = {
    # load time (Runner)
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "use_mmap": "bool",
    "num_thread": "int",
    # per request
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float", "min_p": "float",
    "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "stop": "str[]",
    # speculative decoding: draft length for a DRAFT model (0 disables)
    "draft_num_predict": "int",
}
# Accepted by `ollama create` with a warning and then dropped (parser.go deprecatedParameters).
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta")

# Go's strconv.ParseBool spellings.
GO_BOOLS = ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False")
_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?i:inf|infinity)|(?i:nan)")
_FLOAT32_MAX = 3.4028234663852886e38
_SEMVER = re.compile(r"v?[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")
GLOB_CHARS = "*?["  # newer Ollama expands FROM/DRAFT paths as glob patterns

GEMMA4_STOP = "<turn|>"

# Gemma 4's chat format (models/templates/google-gemma-4-31B-it.jinja, without tools or thinking) in
# Ollama's Go-template syntax. Only for Ollama versions that lack the built-in gemma4 renderer.
GEMMA4_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|turn>system
{{ .Content }}<turn|>
{{ else if eq .Role "user" }}<|turn>user
{{ .Content }}<turn|>
{{ else if eq .Role "assistant" }}<|turn>model
{{ .Content }}{{ if not $last }}<turn|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|turn>model
<|channel>thought
<channel|>
{{- end }}
{{- end }}"""


class ModelfileError(GgufMtpError):
    """A Modelfile Ollama's parser would reject; ``kind`` names the rule, ``line`` where it broke (0: none)."""

    def __init__(self, kind: str, line: int = 0, detail: str = "") -> None:
        self.kind, self.line = kind, line
        where = f"(line {line}) " if line else ""
        super().__init__(f"Modelfile {where}{kind}" + (f": {detail}" if detail else ""))


# Parser error kinds (Ollama's wording).
NO_FROM = "no FROM line"
INVALID_COMMAND = "invalid command"
INVALID_ROLE = "invalid message role"
UNEXPECTED_EOF = "unexpected end of file"


@dataclass(frozen=True)
class Command:
    """One parsed command, named as Ollama's parser names it: "model" for FROM, "draft", "system", ...,
    or the parameter name for PARAMETER; a MESSAGE's args are "role: content"."""

    name: str
    args: str


# --- the parser ---------------------------------------------------------------------------------------

_SPACES = " \t"
_NEWLINES = "\r\n"


def _unquote(s: str) -> str | None:
    """The value inside ``\"\"\"...\"\"\"`` or ``"..."`` (None while the quote is still open)."""
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


def _ascii_alpha(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def decode(data: bytes) -> str:
    """A Modelfile's bytes as text: UTF-16 with a byte-order mark (as Ollama accepts), else UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig", errors="replace")


def parse(text: str) -> list[Command]:
    """Parse a Modelfile as Ollama does; raise ModelfileError naming the rule and line it breaks."""
    commands: list[Command] = []
    state, buf, name, role, line = "start", "", "", "", 1
    for ch in text.removeprefix("\ufeff"):
        if ch in _NEWLINES:
            line += 1
        if state == "start":
            if ch == "#":
                state = "comment"
            elif ch not in _SPACES + _NEWLINES:
                state, buf = "directive", ch if ch.isprintable() else ""
        elif state == "comment":
            if ch in _NEWLINES:
                state = "start"
        elif state == "directive":
            if _ascii_alpha(ch):
                buf += ch
                continue
            word = buf.lower()
            if ch not in _SPACES or word not in DIRECTIVES:
                raise ModelfileError(INVALID_COMMAND, line, f"{buf!r} is not one of {', '.join(DIRECTIVES)}")
            state = {"parameter": "parameter", "message": "role"}.get(word, "value")
            name, buf = DIRECTIVES[word] or "", ""
        elif state == "parameter":
            if ch.isascii() and (ch.isalnum() or ch == "_"):
                buf += ch
            elif ch in _SPACES:
                state, name, buf = "value", buf, ""
            else:
                raise ModelfileError(UNEXPECTED_EOF, line, f"PARAMETER {buf} has no value")
        elif state == "role":
            if _ascii_alpha(ch):
                buf += ch
            elif ch in _SPACES:
                if buf not in MESSAGE_ROLES:
                    raise ModelfileError(INVALID_ROLE, line, f"{buf!r} is not one of {', '.join(MESSAGE_ROLES)}")
                state, role, buf = "value", buf, ""
            else:
                raise ModelfileError(UNEXPECTED_EOF, line, f"MESSAGE {buf} has no content")
        else:  # value: runs to a line end where the trimmed text is complete (quotes closed)
            if ch in _SPACES or ch in _NEWLINES:
                value = _unquote(buf.strip())
                if value is None or ch in _SPACES:
                    buf += ch
                    continue
                commands.append(Command(name, f"{role}: {value}" if role else value))
                state, buf, role = "start", "", ""
            elif ch.isprintable():
                buf += ch  # other control characters are dropped, as Ollama drops them
    if state == "value":
        value = _unquote(buf.strip())
        if value is None:
            raise ModelfileError(UNEXPECTED_EOF, line, f"unclosed quote in {buf.strip()[:40]!r}")
        commands.append(Command(name, f"{role}: {value}" if role else value))
    elif state not in ("start", "comment"):
        raise ModelfileError(UNEXPECTED_EOF, line, f"{buf!r} has no value")
    if not any(c.name == "model" for c in commands):
        raise ModelfileError(NO_FROM)
    return commands


# --- values: types and quoting ------------------------------------------------------------------------


def value_problem(name: str, value: str) -> str | None:
    """Why ``PARAMETER name value`` would fail ``ollama create`` (None: it would not)."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        if name in DEPRECATED_PARAMETERS:
            return f"parameter '{name}' is deprecated (Ollama ignores it)"
        return f"unknown parameter '{name}' (Ollama accepts: {', '.join(sorted(PARAMETER_TYPES))})"
    if kind == "int" and not (_GO_INT.fullmatch(value) and -(2**63) <= int(value) < 2**63):
        return f"parameter '{name}': expected an integer, got {value!r}"
    if kind == "float":
        overflow = _GO_FLOAT.fullmatch(value) and abs(float(value)) > _FLOAT32_MAX and "inf" not in value.lower()
        if not _GO_FLOAT.fullmatch(value) or overflow:
            return f"parameter '{name}': expected a float32 number, got {value!r}"
    if kind == "bool" and value not in GO_BOOLS:
        return f"parameter '{name}': expected true or false, got {value!r}"
    return None


def format_value(value: object) -> str:
    """A Python value as Ollama's parameter parser reads it (bools as true/false, no float noise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GgufMtpError(f"expected a finite number, got {value}")
        return repr(value)
    return str(value)


def quote(value: str, always: bool = False) -> str:
    """A spelling of ``value`` that Ollama's parser reads back exactly.

    Bare text when possible (unless ``always``), then ``"..."`` (``\"\"\"...\"\"\"`` first for text with quotes or
    line breaks, easier to read); each candidate is proven by parsing it. A value none of them can carry
    (control characters, a line ending in a quote that would close the string early) is refused rather
    than written wrong.
    """
    quoted = [f'"{value}"', f'"""{value}"""']
    if '"' in value or "\n" in value:
        quoted.reverse()
    for candidate in ([] if always else [value]) + quoted:
        try:
            back = parse(f"FROM x\nSYSTEM {candidate}\n")
        except ModelfileError:
            continue
        if back == [Command("model", "x"), Command("system", value)]:
            return candidate
    raise GgufMtpError(f"cannot write {value[:60]!r} in a Modelfile: Ollama's parser would not read it back "
                       "(control characters, or a line ending in a quote mark)")


# --- the Modelfile model ------------------------------------------------------------------------------


@dataclass
class Modelfile:
    """Commands plus comment lines: ``header`` before the commands, ``notes`` after them."""

    commands: list[Command]
    header: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> list[str]:
        return [c.args for c in self.commands if c.name == name]


def render_command(cmd: Command) -> str:
    """One command line as Ollama's Modelfile syntax writes it."""
    if cmd.name == "message":
        role, _, content = cmd.args.partition(": ")
        return f"MESSAGE {role} {quote(content)}"
    if cmd.name in COMMAND_DIRECTIVE:
        always = cmd.name in ("system", "template", "license")
        return f"{COMMAND_DIRECTIVE[cmd.name]} {quote(cmd.args, always)}"
    return f"PARAMETER {cmd.name} {quote(cmd.args, always=cmd.name == 'stop')}"


def _comment(text: str) -> str:
    return "# " + " ".join(text.split())  # one line, whatever the text held


def render_modelfile(mf: Modelfile) -> str:
    """The Modelfile text; parsed back and compared before it is returned."""
    lines = [_comment(h) for h in mf.header]
    lines += [render_command(c) for c in mf.commands]
    if mf.notes:
        lines += ["", *(_comment(n) for n in mf.notes)]
    text = "\n".join(lines) + "\n"
    if parse(text) != mf.commands:  # pragma: no cover - a quoting bug, never user input
        raise AssertionError("rendered Modelfile does not parse back to its commands")
    return text


# --- checking a whole Modelfile -----------------------------------------------------------------------


def local_path(arg: str, base_dir: str | os.PathLike) -> Path:
    """Where Ollama looks for a FROM/DRAFT/ADAPTER path: ~ expanded, relative to the Modelfile's folder."""
    p = Path(arg).expanduser()
    return Path(os.path.realpath(p if p.is_absolute() else Path(base_dir) / p))


def _template_problems(text: str) -> list[str]:
    """Unbalanced ``{{ }}`` actions or if/range/with/define/block without their end."""
    actions = re.findall(r"{{-?\s*(.*?)\s*-?}}", text, flags=re.S)
    if text.count("{{") != len(actions) or text.count("}}") != len(actions):
        return ["TEMPLATE: unbalanced {{ }}"]
    depth = 0
    for a in actions:
        word = a.split(maxsplit=1)[0] if a.split() else ""
        depth += word in ("if", "range", "with", "define", "block")
        depth -= word == "end"
        if depth < 0:
            return ["TEMPLATE: {{ end }} without an opening action"]
    return ["TEMPLATE: an action is missing its {{ end }}"] if depth else []


def validate(commands: Iterable[Command], base_dir: str | os.PathLike | None = None) -> list[str]:
    """Everything ``ollama create`` (run from ``base_dir``) would refuse after parsing, plus paths it would
    misread; an empty list means the Modelfile is fine."""
    problems = []
    froms, drafts = [], []
    for c in commands:
        if c.name in PATH_COMMANDS:
            if any(ch in c.args for ch in GLOB_CHARS):
                problems.append(f"{COMMAND_DIRECTIVE[c.name]} {c.args}: contains a glob character ({GLOB_CHARS}), "
                                "which newer Ollama expands as a pattern")
            if base_dir is not None and c.name in ("model", "draft"):
                (froms if c.name == "model" else drafts).append(local_path(c.args, base_dir))
        elif c.name == "template":
            problems += _template_problems(c.args)
        elif c.name == "requires":
            if not _SEMVER.fullmatch(c.args):
                problems.append(f"REQUIRES {c.args}: expected a version like 0.14.0")
        elif c.name not in COMMAND_DIRECTIVE:
            problem = value_problem(c.name, c.args)
            if problem:
                problems.append(problem)
    for d in drafts:
        if d in froms:
            problems.append(f"DRAFT must not reference the same local path as FROM: {d}")
    return problems


def check_text(text: str, base_dir: str | os.PathLike | None = None) -> list[Command]:
    """Parse and validate a Modelfile; raise ModelfileError / GgufMtpError with every problem."""
    commands = parse(text)
    problems = validate(commands, base_dir)
    if problems:
        raise GgufMtpError("Modelfile: " + "; ".join(problems))
    return commands


# --- building one for a target + drafter (+ projector) --------------------------------------------------


def check_set_for_ollama(target: ModelFacts, drafter: ModelFacts | None, projector: ModelFacts | None) -> None:
    """Refuse a set that Ollama's bundled llama.cpp cannot run, saying what to do instead."""
    problems = check_set(target, drafter, projector, runtime_centroids=False)
    lines = []
    for p in problems:
        if p.field == "centroid_support":
            lines.append("centroid_support: the drafter has the centroid-clustered head, which the llama.cpp inside "
                         "Ollama cannot load; re-export the drafter without --centroids")
        else:
            lines.append(str(p))
    if lines:
        raise IncompatiblePair("incompatible set for Ollama: " + "; ".join(lines))


def modelfile_path(path: str | os.PathLike, base_dir: str | os.PathLike | None) -> str:
    """How a GGUF path is written: ``./name`` when it lies under the Modelfile's folder, else absolute."""
    p = Path(os.path.abspath(path))
    if base_dir is not None:
        base = Path(os.path.abspath(base_dir))
        if p.is_relative_to(base):
            return "./" + p.relative_to(base).as_posix()
    return str(p)


def check_paths(target: str | os.PathLike, drafter: str | os.PathLike | None = None,
                mmproj: str | os.PathLike | None = None) -> None:
    """Refuse paths Ollama would misread: glob characters, or a DRAFT that is a FROM file (Ollama refuses it)."""
    named = {"target": target, "mmproj": mmproj, "drafter": drafter}
    for what, p in named.items():
        if p is not None and any(ch in str(p) for ch in GLOB_CHARS):
            raise GgufMtpError(f"{what} path {p} contains a glob character ({GLOB_CHARS}); newer Ollama reads FROM "
                               "and DRAFT paths as patterns: rename the file or link it under a plain name")
    drafter = named.get("drafter")
    if drafter is not None:
        for what in ("target", "mmproj"):
            other = named.get(what)
            if other is not None and os.path.realpath(drafter) == os.path.realpath(other):
                raise GgufMtpError(f"DRAFT and FROM would be the same file ({os.path.realpath(drafter)}): Ollama "
                                   f"refuses that; pass the gemma4-assistant drafter GGUF as --drafter, not the {what}")


def build_modelfile(
    settings: RuntimeSettings,
    target: str | os.PathLike,
    drafter: str | os.PathLike | None = None,
    mmproj: str | os.PathLike | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    n_layers: int | None = None,
    draft_default: int | None = None,
    sampling: Mapping[str, object] | None = None,
    system: str | None = None,
    template: bool = False,
    header: Iterable[str] = (),
) -> Modelfile:
    """The Modelfile for this set: FROM target, FROM projector, DRAFT drafter, the plan's PARAMETERs.

    ``base_dir`` is the folder the Modelfile will live in (paths under it are written relative, as Ollama
    resolves them against that folder); ``sampling`` holds extra PARAMETERs by Ollama name; ``template``
    adds Gemma 4's chat template for Ollama versions without the built-in gemma4 renderer.
    """
    check_paths(target, drafter, mmproj)
    commands = [Command("model", modelfile_path(target, base_dir))]
    if mmproj:
        commands.append(Command("model", modelfile_path(mmproj, base_dir)))
    if drafter:
        commands.append(Command("draft", modelfile_path(drafter, base_dir)))
    if template:
        commands.append(Command("template", GEMMA4_TEMPLATE))
    if system is not None:
        commands.append(Command("system", system))
    extra = dict(sampling or {})
    stops = [GEMMA4_STOP, *_as_list(extra.pop("stop", []))]
    params = {**render.ollama_parameters(settings, drafter=bool(drafter), n_layers=n_layers,
                                         draft_default=draft_default), **extra}
    commands += [Command(k, format_value(v)) for k, v in params.items()]
    commands += [Command("stop", s) for s in dict.fromkeys(stops)]
    problems = validate(commands)
    if problems:
        raise GgufMtpError("; ".join(problems))
    notes = unexpressible_notes(settings)
    if notes:
        notes.insert(0, "Not expressible in a Modelfile (Ollama server settings instead):")
    head = [f"Modelfile written by gguf-mtp {__version__} for Ollama: ollama create NAME -f Modelfile", *header]
    return Modelfile(commands, head, notes)


def _as_list(v: object) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list | tuple) else [str(v)]


def unexpressible_notes(settings: RuntimeSettings) -> list[str]:
    """One line per setting a Modelfile cannot hold: the server variable that controls it, and what is lost."""
    notes = []
    for o in render.ollama_unexpressible(settings):
        how = f": set {o.env} on the Ollama server" if o.env else ""
        lost = f"; {'without it, ' if o.env else ''}lost: {o.lost}" if o.lost else ""
        notes.append(f"{o.comment}{how}{lost}")
    return notes


# --- ollama create --------------------------------------------------------------------------------------


def create_command(name: str, modelfile: str | os.PathLike) -> list[str]:
    if not name or any(ch.isspace() for ch in name):
        raise GgufMtpError(f"model name: expected a name like gemma4-mtp:31b, got {name!r}")
    return ["ollama", "create", name, "-f", str(modelfile)]


def run_create(name: str, modelfile: str | os.PathLike) -> tuple[list[str], int | None]:
    """Run ``ollama create`` when ``ollama`` is on PATH; returns (argv, exit code or None when not run)."""
    argv = create_command(name, modelfile)
    exe = shutil.which("ollama")
    if exe is None:
        return argv, None
    return argv, subprocess.run([exe, *argv[1:]], check=False).returncode


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)
