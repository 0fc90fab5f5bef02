"""Hostile metadata: chat templates that reach for Python internals or try to exhaust time and memory, token
lists that claim more than the file holds, tokenizer files with absurd ids or pieces. Each is refused with one
clear error, quickly, having allocated little (tracemalloc), before llama.cpp sees the file.

test_chat.py pins the template limits one by one; here are the cases found while hardening (format widths
build their padding in one C call) and the paths end to end: a GGUF carrying a hostile template through
``generate`` and ``chat``.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.gguffile import MAX_ARRAY, read_gguf
from gguf_mtp.runtime.chat_template import Limits, render

MAX_PEAK = 64 << 20  # bytes of traced memory any refusal here may cost


def bounded(fn, seconds: float = 2.0, peak: int = MAX_PEAK) -> GgufMtpError:
    """Run ``fn``, which must raise GgufMtpError within ``seconds`` and ``peak`` bytes; returns the error."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GgufMtpError) as e:
            fn()
    finally:
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < seconds
    assert used < peak, f"{used} bytes"
    assert "\n" not in str(e.value)
    return e.value


# --- chat templates ------------------------------------------------------------------------------------------
TEMPLATES = {
    "printf width": ("{{ '%0999999999d' % 1 }}", "format width"),
    "printf star width": ("{{ '%*d' % (999999999, 1) }}", "an argument"),
    "printf named width": ("{{ '%(a)999999999d' % {'a': 1} }}", "format width"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "format width"),
    "format nested width": ("{{ '{:>{w}}'.format(1, w=999999999) }}", "an argument"),
    "format filter width": ("{{ '%0999999999d'|format(1) }}", "format width"),
    "format attribute": ("{{ '{0.__class__}'.format(1) }}", "unsafe"),
    "template reference": ("{{ self._TemplateReference__context }}", "unsafe"),
    "lipsum globals": ("{{ lipsum.__globals__ }}", "unsafe"),
    "joiner globals": ("{{ joiner.__init__.__globals__ }}", "unsafe"),
    "attr filter": ("{{ ''|attr('__class__') }}", "unsafe"),
    "subscript dunder": ("{{ ''['__class__'] }}", "unsafe"),
    "subclasses": ("{{ ().__class__.__base__.__subclasses__() }}", "unsafe"),
    "tojson indent": ("{{ messages|tojson(indent=100000000) }}", "an argument"),
    "recursive loop": ("{% for x in messages recursive %}{{ loop([x, x]) }}{% endfor %}", "RecursionError"),
    "float overflow": ("{{ 10.0 ** 400 }}", "OverflowError"),
    "wide join": ("{% set l = ['x'] * 1000 %}{{ l|join('y' * 10000) }}", "a value"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_hostile_template(case):
    source, message = TEMPLATES[case]
    err = bounded(lambda: render(source, [{"role": "user", "content": "hi"}], limits=Limits(max_seconds=1.0)))
    assert message in str(err) and str(err).startswith("chat template"), err


@pytest.fixture(scope="module")
def hostile_template_pair(tiny_root, tiny_ggufs, tmp_path_factory) -> tuple[Path, Path]:
    """tiny-dense's target converted with a template that reaches for Python internals, and its drafter."""
    from gguf_mtp.export import convert

    d = tmp_path_factory.mktemp("hostile-template")
    ckpt = shutil.copytree(tiny_root / "tiny-dense" / "target", d / "ckpt")
    (ckpt / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.system('echo pwned') }}")
    convert(ckpt, d / "target.gguf")
    return d / "target.gguf", tiny_ggufs[("tiny-dense", "drafter")]


FAST = ["--threads", "1", "--ctx", "256", "--flash-attn", "off"]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_hostile_template_in_a_gguf(hostile_template_pair, command, capfd):
    t, d = hostile_template_pair
    args = [command, "--target", str(t), "--drafter", str(d), "-n", "4", *FAST]
    r = CliRunner().invoke(main, args + (["-p", "hi"] if command == "generate" else []), input="hi\n")
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.count("error: ") == 1 and "chat template tried something unsafe" in r.stderr, r.stderr
    assert "pwned" not in r.output + capfd.readouterr().out


# --- token lists in GGUF files ---------------------------------------------------------------------------------
def _gguf(kvs: list[bytes], pad: int = 0) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    return head + b"\0" * (-len(head) % 32 + pad)


def _s(text: bytes, n: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if n is None else n) + text


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key.encode()) + struct.pack("<I", vtype) + payload


ARCH = _kv("general.architecture", 8, _s(b"gemma4"))
TOKENS = "tokenizer.ggml.tokens"
BAD_TOKENS = {  # name -> the tokenizer.ggml.tokens entry
    "count beyond the file": _kv(TOKENS, 9, struct.pack("<IQ", 8, 2**40) + _s(b"a")),
    "count beyond the limit": _kv(TOKENS, 9, struct.pack("<IQ", 8, MAX_ARRAY + 1)),
    "string length beyond the file": _kv(TOKENS, 9, struct.pack("<IQ", 8, 2) + _s(b"a") + _s(b"b", 2**62)),
    "numbers, not strings": _kv(TOKENS, 9, struct.pack("<IQ", 4, 3) + struct.pack("<3I", 1, 2, 3)),
    "not an array": _kv(TOKENS, 8, _s(b"abc")),
    "nested arrays": _kv(TOKENS, 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 8, 1) + _s(b"a")),
    "twice": [_kv(TOKENS, 9, struct.pack("<IQ", 8, 1) + _s(b"a"))] * 2,
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_token_list_refused_before_allocation(case, tmp_path):
    p = tmp_path / "t.gguf"
    entry = BAD_TOKENS[case]
    p.write_bytes(_gguf([ARCH, *(entry if isinstance(entry, list) else [entry])], pad=4096))
    err = bounded(lambda: read_gguf(p), seconds=0.5, peak=1 << 20)
    assert "corrupt GGUF header" in str(err)
    for args in (["inspect", str(p)], ["check", str(p), str(p)], ["generate", "--target", str(p), "-p", "x"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output


# --- tokenizer files in checkpoints ----------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


TOKENIZER_EDITS = {
    "id far beyond the vocabulary": ("tokenizer.json", lambda d: d["model"]["vocab"].update({"x": 10**12}),
                                     "expected a token id"),
    "negative id": ("tokenizer.json", lambda d: d["model"]["vocab"].update({"x": -1}), "expected a token id"),
    "two tokens, one id": ("tokenizer.json", lambda d: d["model"]["vocab"].update({"x": 5}), "same id"),
    "a hole in the ids": ("tokenizer.json", lambda d: d["model"]["vocab"].update({"x": len(d["model"]["vocab"]) + 7}),
                          "not contiguous"),
    "added tokens not a list": ("tokenizer.json", lambda d: d.update(added_tokens=7), "added_tokens"),
    "model not an object": ("tokenizer.json", lambda d: d.update(model=[1]), "expected a BPE model"),
    "config not an object": ("tokenizer_config.json", lambda d: (d.clear(), d.update({"x": 1})) and None, None),
}


@pytest.mark.parametrize("case", list(TOKENIZER_EDITS))
def test_bad_tokenizer_json(case, tiny_root, tmp_path):
    from gguf_mtp.export import describe

    name, edit, message = TOKENIZER_EDITS[case]
    ckpt = shutil.copytree(tiny_root / "tiny-dense" / "target", tmp_path / "ckpt",
                           ignore=shutil.ignore_patterns("*.safetensors"))
    _edit_json(ckpt / name, edit)
    if message is None:  # an odd but harmless file: accepted
        describe(ckpt)
        return
    err = bounded(lambda: describe(ckpt), seconds=1.0)
    assert message in str(err), err


@pytest.mark.parametrize("content", [b"[" * 100_000, b"1" * 5000, b'{"a": ' * 3000])
def test_json_too_deep_or_too_long_a_number(content, tiny_root, tmp_path):
    """json.loads raises RecursionError / ValueError (not JSONDecodeError) for these: still one clean error."""
    from gguf_mtp.export import describe

    ckpt = shutil.copytree(tiny_root / "tiny-dense" / "target", tmp_path / "ckpt",
                           ignore=shutil.ignore_patterns("*.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        original = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(content)
        assert "not valid JSON" in str(bounded(lambda: describe(ckpt)))
        (ckpt / name).write_bytes(original)


def test_sentencepiece_piece_too_long(tiny_root, tmp_path):
    """Deriving merges costs len(piece)^2: a 100k-character piece is refused, not worked through."""
    from gguf_mtp.export import describe
    from gguf_mtp.export.tokenizer import MAX_PIECE_CHARS

    ckpt = shutil.copytree(tiny_root / "tiny-moe" / "target", tmp_path / "ckpt",
                           ignore=shutil.ignore_patterns("*.safetensors"))
    piece = b"a" * (MAX_PIECE_CHARS * 25)
    entry = b"\x0a" + _varint(len(piece)) + piece  # SentencePiece { piece: ... }
    model = ckpt / "tokenizer.model"
    model.write_bytes(model.read_bytes() + b"\x0a" + _varint(len(entry)) + entry)
    assert "a piece of" in str(bounded(lambda: describe(ckpt), seconds=1.0))


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out
