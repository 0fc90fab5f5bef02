"""The GGUF vocabulary (tokenizer.ggml.*) of a Gemma 4 checkpoint, without transformers.

Sources, in order: ``tokenizer.json`` (a BPE model with byte fallback, as Google ships it), else a sentencepiece
``tokenizer.model`` (BPE), whose merges we derive, because llama.cpp's ``gemma4`` tokenizer refuses a file
without merges. Token types: ``<0xNN>`` pieces are BYTE, the tokenizer's special tokens and every added token
flagged special CONTROL (upstream types in-vocabulary added tokens that tokenizer_config does not name as
NORMAL, so llama.cpp would split ``<|turn>`` into pieces; see docs/export.md), other added tokens USER_DEFINED,
and the chat-parser tokens below USER_DEFINED so that llama.cpp renders them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType

from .. import keys
from ..errors import GgufMtpError

# always rendered, so that a chat parser can read them (upstream's list)
VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                            "<tool_response|>", '<|"|>'})
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")  # the ids GGUF has keys for (metadata.SPECIAL_ID_KEYS)
# transformers' GemmaTokenizer constructor defaults: special even when tokenizer_config.json omits them
GEMMA_DEFAULTS = {"unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "mask": "<mask>"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
UPSTREAM_SCORE = -1000.0  # tokenizer.json has no scores; upstream writes this placeholder
MAX_TOKEN_ID = (1 << 24) - 1  # ids are checked against this before any per-id work (Gemma 4 has 262144 tokens)
MAX_PIECE_CHARS = 4096  # deriving sentencepiece merges costs len(piece)^2; real pieces are < 100 characters


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_eos: bool | None = None
    chat_template: str | None = None
    source: str = "tokenizer.json"

    def __len__(self) -> int:
        return len(self.tokens)

    def token_bytes(self) -> list[bytes]:
        return [t.encode("utf-8") for t in self.tokens]

    def sha256(self) -> str:
        return keys.vocab_sha256(self.tokens)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a tokenizer file (anything else, or JSON nested too deep to parse, is refused)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints of > 4300 digits
        raise GgufMtpError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GgufMtpError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID


def _content(entry: Any) -> str | None:
    """A tokenizer_config token entry: a string or an AddedToken object."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def special_tokens(tok_config: dict[str, Any]) -> set[str]:
    """transformers' ``all_special_tokens``: named, model-specific ``*_token`` keys and extra special tokens."""
    out: set[str] = set()
    if str(tok_config.get("tokenizer_class", "GemmaTokenizer")).startswith("GemmaTokenizer"):
        out |= {v for k, v in GEMMA_DEFAULTS.items() if f"{k}_token" not in tok_config}
    for key, value in tok_config.items():
        if key.endswith("_token") and (text := _content(value)):
            out.add(text)
    extra = tok_config.get("extra_special_tokens") or tok_config.get("additional_special_tokens") or []
    values = extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else []
    out |= {t for t in (_content(v) for v in values) if t}
    return out


def _chat_template(directory: Path, tok_config: dict[str, Any]) -> str | None:
    tmpl = tok_config.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    if (directory / "chat_template.jinja").is_file():
        try:
            return (directory / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GgufMtpError(f"{directory / 'chat_template.jinja'}: not UTF-8 text ({e.reason} at byte "
                               f"{e.start})") from None
    if (directory / "chat_template.json").is_file():
        tmpl = _read_json(directory / "chat_template.json").get("chat_template")
        return tmpl if isinstance(tmpl, str) else None
    return None


def _special_ids(tok_config: dict, added: dict[str, int], config: dict, n_vocab: int) -> dict[str, int]:
    """tokenizer_config's named tokens (looked up among added tokens), then config.json's *_token_id."""
    ids: dict[str, int] = {}
    for typ in SPECIAL_TYPES:
        text = _content(tok_config.get(f"{typ}_token"))
        if text is not None and text in added:
            ids[typ] = added[text]
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for typ in SPECIAL_TYPES:
        if typ in ids:
            continue
        tid = config.get(f"{typ}_token_id", text_cfg.get(f"{typ}_token_id"))
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab:
            ids[typ] = tid
    return ids


def _add_eos(tok_json: dict, tok_config: dict, eos: str | None) -> bool | None:
    if isinstance(tok_config.get("add_eos_token"), bool):
        return tok_config["add_eos_token"]
    post = tok_json.get("post_processor")
    procs = post.get("processors", [post]) if isinstance(post, dict) else []
    for proc in procs if isinstance(procs, list) else []:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single")
        if isinstance(single, list) and len(single) > 1 and isinstance(single[-1], dict):
            special = single[-1].get("SpecialToken")
            if isinstance(special, dict) and (last := special.get("id")):
                return last == eos
    return None


def _merges(raw: Any, path: Path) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise GgufMtpError(f"{path}: the BPE model has no merges; llama.cpp's gemma4 tokenizer needs them")
    if all(isinstance(m, str) for m in raw):
        return list(raw)
    if all(isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m) for m in raw):
        # pairs (tokenizers >= 0.20): a space inside a part is written as U+0120, as upstream does
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in raw]
    raise GgufMtpError(f"{path}: unknown merges format")


def from_tokenizer_json(directory: Path, config: dict[str, Any]) -> Vocab:
    path = directory / "tokenizer.json"
    tok = _read_json(path)
    model = tok.get("model")
    model = model if isinstance(model, dict) else {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GgufMtpError(f"{path}: expected a BPE model with byte_fallback (got {model.get('type')!r}, "
                           f"byte_fallback={model.get('byte_fallback')!r}); llama.cpp's gemma4 tokenizer is that")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise GgufMtpError(f"{path}: model.vocab is missing")
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    bad = next(((t, i) for t, i in vocab.items() if not _is_id(i)), None)
    if bad is not None:
        raise GgufMtpError(f"{path}: model.vocab[{bad[0]!r}]: expected a token id 0..{MAX_TOKEN_ID}, got {bad[1]!r}")
    n_base = len(vocab)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    if len(by_id) != n_base:
        raise GgufMtpError(f"{path}: model.vocab gives two tokens the same id")
    added_raw = tok.get("added_tokens", [])
    if not isinstance(added_raw, list):
        raise GgufMtpError(f"{path}: added_tokens: expected a list, got {type(added_raw).__name__}")
    added_list = [a for a in added_raw
                  if isinstance(a, dict) and isinstance(a.get("content"), str) and _is_id(a.get("id"))]
    added = {a["content"]: a["id"] for a in added_list}
    for text, i in sorted(added.items(), key=lambda kv: kv[1]):
        if i >= n_base:
            by_id[i] = text
    n = len(by_id)  # distinct ids >= 0: contiguous exactly when the largest is n - 1
    if n and max(by_id) != n - 1:
        hole = next(i for i in range(n) if i not in by_id)
        raise GgufMtpError(f"{path}: token ids are not contiguous (no token has id {hole})")
    # CONTROL: the tokenizer's special tokens (transformers' list) and added tokens flagged special;
    # USER_DEFINED: other added tokens. Both are matched whole by llama.cpp, as HF matches added tokens.
    special_text = special_tokens(tok_config)
    control = {i for t, i in {**vocab, **added}.items() if t in special_text}
    control |= {a["id"] for a in added_list if a.get("special")}
    user = {a["id"] for a in added_list if not a.get("special")}
    tokens, types = [], []
    for i in range(n):
        text = by_id[i]
        if BYTE_TOKEN.fullmatch(text):
            ttype = TokenType.BYTE
        elif i in control:
            ttype = TokenType.CONTROL
        elif i in user or i >= n_base:
            ttype = TokenType.USER_DEFINED
        else:
            ttype = TokenType.NORMAL
        if text in VISIBLE_TOKENS:
            ttype = TokenType.USER_DEFINED
        tokens.append(text)
        types.append(int(ttype))
    eos = _content(tok_config.get("eos_token"))
    return Vocab(
        tokens=tokens,
        scores=[UPSTREAM_SCORE] * n,
        types=types,
        merges=_merges(model.get("merges"), path),
        special_ids=_special_ids(tok_config, added, config, n),
        add_eos=_add_eos(tok, tok_config, eos),
        chat_template=_chat_template(directory, tok_config),
        source="tokenizer.json",
    )


def sentencepiece_merges(pieces: list[str]) -> list[str]:
    """BPE merges of a sentencepiece BPE model, ordered as transformers derives them for tokenizer.json.

    A sentencepiece BPE model stores no merges, only pieces in merge order. Every piece yields the pairs
    (left, right) of pieces that concatenate to it; merges rank by the merged piece's id, then by the
    halves' lengths, then by the halves' ids (transformers' ``generate_merges``, so HF and llama.cpp agree).
    """
    ids = {p: i for i, p in enumerate(pieces)}
    merges: list[tuple[int, int, int, int, int, str]] = []
    for i, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((i, len(left), len(right), ids[left], ids[right], f"{left} {right}"))
    merges.sort(key=lambda m: m[:5])
    return [m[5] for m in merges]


# sentencepiece ModelProto, read with a few lines of protobuf wire format (no protobuf dependency):
# field 1 = pieces {1: piece, 2: score (float), 3: type}, field 2 = trainer_spec {3: model_type}
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_TYPES = {SP_NORMAL: TokenType.NORMAL, SP_UNKNOWN: TokenType.UNKNOWN, SP_CONTROL: TokenType.CONTROL,
            SP_USER_DEFINED: TokenType.USER_DEFINED, SP_UNUSED: TokenType.UNUSED, SP_BYTE: TokenType.BYTE}
SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message; varints as int, fixed32 as its 4 bytes."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field_no, varint()))
        elif wire == 2:
            n = varint()
            out.append((field_no, buf[pos:pos + n]))
            pos += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            out.append((field_no, buf[pos:pos + n]))
            pos += n
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated")
    return out


def read_sentencepiece(path: Path) -> tuple[str, list[tuple[str, float, int]]]:
    """(model type, [(piece, score, sentencepiece type)]) of a tokenizer.model."""
    import struct

    try:
        pieces, model_type = [], 1
        for no, value in _proto_fields(path.read_bytes()):
            if no == 1 and isinstance(value, bytes):
                piece, score, ptype = "", 0.0, SP_NORMAL
                for f, v in _proto_fields(value):
                    if f == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif f == 2 and isinstance(v, bytes):
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and isinstance(v, int):
                        ptype = v
                pieces.append((piece, score, ptype))
            elif no == 2 and isinstance(value, bytes):
                model_type = next((v for f, v in _proto_fields(value) if f == 3 and isinstance(v, int)), 1)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        raise GgufMtpError(f"{path}: not a sentencepiece model") from None
    if not pieces or any(t not in SP_TYPES for _, _, t in pieces):
        raise GgufMtpError(f"{path}: not a sentencepiece model")
    long = next((p for p, _, _ in pieces if len(p) > MAX_PIECE_CHARS), None)
    if long is not None:
        raise GgufMtpError(f"{path}: a piece of {len(long)} characters (at most {MAX_PIECE_CHARS} expected)")
    return SP_MODEL_TYPES.get(model_type, str(model_type)), pieces


def from_sentencepiece(directory: Path, config: dict[str, Any]) -> Vocab:
    path = directory / "tokenizer.model"
    model_type, pieces = read_sentencepiece(path)
    if model_type != "bpe":
        raise GgufMtpError(f"{path}: a sentencepiece {model_type} model; llama.cpp's gemma4 tokenizer is BPE")
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    tokens = [p for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [int(TokenType.USER_DEFINED if p in VISIBLE_TOKENS else SP_TYPES[t]) for p, _, t in pieces]
    by_text = {t: i for i, t in enumerate(tokens)}
    ids = _special_ids(tok_config, by_text, config, len(tokens))
    for typ, want in (("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"), ("pad", "<pad>")):
        if typ not in ids and want in by_text:
            ids[typ] = by_text[want]
    if "unk" not in ids and SP_UNKNOWN in [t for _, _, t in pieces]:
        ids["unk"] = [t for _, _, t in pieces].index(SP_UNKNOWN)
    add_eos = tok_config.get("add_eos_token") if isinstance(tok_config.get("add_eos_token"), bool) else None
    return Vocab(tokens, scores, types, sentencepiece_merges(tokens), ids, add_eos,
                 _chat_template(directory, tok_config), source="tokenizer.model")


def load_vocab(directory: Path, config: dict[str, Any]) -> Vocab:
    """The checkpoint's vocabulary from tokenizer.json, else tokenizer.model."""
    if (directory / "tokenizer.json").is_file():
        return from_tokenizer_json(directory, config)
    if (directory / "tokenizer.model").is_file():
        return from_sentencepiece(directory, config)
    raise GgufMtpError(f"{directory}: no tokenizer.json or tokenizer.model")
