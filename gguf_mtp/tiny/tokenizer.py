"""The tiny vocabulary: Gemma 4's layout at 512 tokens, trained on the bundled corpus.

Layout (both flavours): ids 0..106 control tokens (the real ids of ``<pad> <eos> <bos> <unk> <mask>``,
``<|turn>`` 105, ``<turn|>`` 106, tool/thinking/channel markers, multimodal markers relocated to 39..45,
``<unusedN>`` elsewhere), ``"\\n"`` 107, byte-fallback pieces ``<0x00>..<0xFF>`` 108..363, then 148
learned pieces. Spaces are ``▁`` (SentencePiece style, no dummy prefix), merges never cross a word or a
newline, so llama.cpp's gemma4 pre-tokenizer (split on newlines, BPE over the rest) tokenizes like HF.

Two flavours: ``tokenizer.json`` (BPE trained with the ``tokenizers`` library, the published Gemma 4 form)
and ``tokenizer.model`` (BPE with byte fallback trained with ``sentencepiece``). Both trainers are
deterministic (single-threaded, fixed input order).
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from .configs import FIRST_BYTE_ID, NEWLINE_ID, VOCAB_SIZE, control_token_table

CORPUS = Path(__file__).with_name("corpus.txt")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

CHAT_TEMPLATE = """\
{#- Gemma 4 chat format (tiny checkpoints): role assistant renders as model; <|think|> in the system turn
    turns thinking on; image/audio/video parts render as their placeholder tokens. -#}
{%- macro render(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}
{%- if part['type'] == 'text' -%}{{ part['text'] }}
{%- elif part['type'] == 'image' -%}{{ '<|image|>' }}
{%- elif part['type'] == 'audio' -%}{{ '<|audio|>' }}
{%- elif part['type'] == 'video' -%}{{ '<|video|>' }}
{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set loop_messages = messages[1:] -%}
{{- '<|turn>system\\n' -}}{%- if enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{{- render(messages[0]['content']) -}}{{- '<turn|>\\n' -}}
{%- elif enable_thinking -%}
{{- '<|turn>system\\n<|think|><turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' -}}{{- render(message['content']) -}}{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").split("\n") if line]


# --- tokenizer.json ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The serialized tokenizers.Tokenizer (same for every seed: the vocabulary is not random)."""
    return bpe_tokenizer_json(corpus_lines())


def bpe_tokenizer_json(lines: Iterable[str], vocab_size: int = VOCAB_SIZE, whitespace_runs: bool = False) -> str:
    """A Gemma 4-layout BPE tokenizer.json trained on ``lines`` (text without newlines).

    ``whitespace_runs``: pieces may hold runs of spaces (``▁▁▁▁``) and a word after them, which source code
    needs; by default every space starts a new piece, as in the tiny vocabulary. Either way no piece ends in a
    space after a non-space or crosses a newline, so BPE over a whole line (llama.cpp's gemma4 pre-tokenizer)
    gives what the pieces were trained on.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_learned = vocab_size - FIRST_BYTE_ID - len(BYTE_TOKENS)
    words = (pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), "isolated") if whitespace_runs
             else pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True))
    trainer_tok = Tokenizer(models.BPE(byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n+"), "isolated"), words])
    trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=2, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].__getitem__)
    if len(learned) != n_learned:
        raise RuntimeError(f"expected {n_learned} learned pieces, got {len(learned)}")

    pieces = control_token_table(vocab_size) + BYTE_TOKENS + learned
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>",
                               dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces[:NEWLINE_ID]])
    return tok.to_str(pretty=True)


# --- tokenizer.model --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def sentencepiece_model() -> bytes:
    """A serialized SentencePiece BPE model with byte fallback and the same control-token layout."""
    import sentencepiece as spm

    table = control_token_table()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=out, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=table[0], eos_piece=table[1], bos_piece=table[2],
        unk_piece=table[3], control_symbols=table[4:NEWLINE_ID], user_defined_symbols=["\n"],
        num_threads=1, minloglevel=2,
    )
    model = out.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    got = [sp.id_to_piece(i) for i in range(FIRST_BYTE_ID + 256)]
    if got != table + BYTE_TOKENS:
        raise RuntimeError("sentencepiece placed the control or byte pieces at unexpected ids")
    return model


# --- tokenizer_config.json --------------------------------------------------------------------------


def tokenizer_config(kind: str) -> dict[str, Any]:
    """No BOS added by the tokenizer: the chat template writes ``<bos>`` itself (as the reference does)."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "extra_special_tokens": {
            "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
            "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
        },
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": 1_000_000,
    }
    if kind == "spm":
        # without tokenizer.json, transformers learns which pieces are special from here
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(control_token_table()[:NEWLINE_ID])
        }
    return cfg


def write_tokenizer(directory: Path, kind: str) -> None:
    """tokenizer.json or tokenizer.model, plus tokenizer_config.json and chat_template.jinja."""
    if kind == "json":
        (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    elif kind == "spm":
        (directory / "tokenizer.model").write_bytes(sentencepiece_model())
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(kind), indent=2) + "\n",
                                                     encoding="utf-8")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
