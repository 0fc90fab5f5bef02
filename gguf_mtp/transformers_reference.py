"""transformers 5.23.0 as the reference implementation for the tiny checkpoints (the tests and
tools/train_tiny_pair.py import this; it needs the dev extra: torch, transformers, and a source checkout for
patches/).

Everything returns numpy (float32) so tests compare against llama.cpp without caring about torch.
The fixes in patches/transformers/ are applied on import: without them a Gemma 4 drafter cannot even be
constructed (see patches/transformers/README.md).

MTP conventions (the same as llama.cpp's and transformers' candidate generator): after the target has read
``tokens`` (positions 0..n-1) and produced the next token ``t`` (position n), the drafter's first step reads
``t``, the target's post-norm hidden state at position n-1 and the target's K/V of positions 0..n-1, at
position n; every later draft step of the round keeps position n.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXES_PATH = REPO / "patches" / "transformers" / "gemma4_fixes.py"
_FIXES_MODULE = "gguf_mtp_patches_transformers_gemma4_fixes"


def apply_patches() -> list[str]:
    """Load patches/transformers/gemma4_fixes.py (not an installed package) and apply it."""
    module = sys.modules.get(_FIXES_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(_FIXES_MODULE, FIXES_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_FIXES_MODULE] = module
        spec.loader.exec_module(module)
    return module.apply()


apply_patches()

import transformers  # noqa: E402  (after the patches, on purpose)
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.set_verbosity_error()
_hf_logging.disable_progress_bar()

# Tiny models: one thread is fastest, and on a busy 2-core machine torch's second (spinning) thread made
# generate() ~20x slower in CPU time.
torch.set_num_threads(1)

ARCHITECTURES = {
    "Gemma4ForCausalLM": transformers.Gemma4ForCausalLM,
    "Gemma4ForConditionalGeneration": transformers.Gemma4ForConditionalGeneration,
    "Gemma4AssistantForCausalLM": transformers.Gemma4AssistantForCausalLM,
    # Gemma 4 12B: the same target pass and drafter step (shared_kv_states, inputs_embeds) apply unchanged
    "Gemma4UnifiedForConditionalGeneration": transformers.Gemma4UnifiedForConditionalGeneration,
    "Gemma4UnifiedAssistantForCausalLM": transformers.Gemma4UnifiedAssistantForCausalLM,
}


def _config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Target or drafter, by the architecture its config.json names; eval mode, f32 by default."""
    arch = _config(path)["architectures"][0]
    model = ARCHITECTURES[arch].from_pretrained(Path(path), dtype=dtype)
    return model.eval()


def load_pair(family_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(target, drafter) of one tiny family directory."""
    family_dir = Path(family_dir)
    return load_model(family_dir / "target", dtype), load_model(family_dir / "drafter", dtype)


def text_config(model) -> Any:
    return model.config.get_text_config()


class GgmlGelu(torch.nn.Module):
    """ggml's CPU GELU (``GGML_GELU_FP16`` in ggml-cpu/vec.h, also its fused GEGLU): tanh GELU read from a table
    at the input's f16 value, so input and result are rounded to f16; 0 at or below -10, identity at or above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().to(x.dtype)
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def use_ggml_gelu(model):
    """Give every text MLP of ``model`` ggml's CPU GELU (in place; returns the model).

    The f16 rounding of that one activation moves a deep tiny model's logits by more than all the rest of
    llama.cpp's f32 arithmetic (tiny-unified, 12 layers: 1.5% rel L2 vs transformers, 0.23% with this), so a
    comparison against this reference isolates what the exporter controls."""
    for module in model.modules():
        if hasattr(module, "gate_proj") and isinstance(getattr(module, "act_fn", None), torch.nn.Module):
            module.act_fn = GgmlGelu()
    return model


# --- target -----------------------------------------------------------------------------------------


@dataclass
class TargetPass:
    logits: np.ndarray  # [n, vocab], softcapped as the model returns them
    hidden: np.ndarray  # [n, hidden] post-final-norm hidden states (llama.cpp's nextn embedding rows)
    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> K, V [1, kv_heads, n, head_dim]


@torch.no_grad()
def target_pass(model, tokens: list[int]) -> TargetPass:
    """One forward over ``tokens`` with the KV the drafter reads (last sliding / last full layer)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    return TargetPass(
        logits=out.logits[0].float().numpy(),
        hidden=out.hidden_states[-1][0].float().numpy(),
        shared_kv={k: (v[0], v[1]) for k, v in dict(out.shared_kv_states).items()},
    )


def target_logits(model, tokens: list[int]) -> np.ndarray:
    return target_pass(model, tokens).logits


def target_hidden(model, tokens: list[int]) -> np.ndarray:
    return target_pass(model, tokens).hidden


# --- drafter ----------------------------------------------------------------------------------------


@dataclass
class DraftStep:
    logits: np.ndarray  # [vocab] (centroid drafters: unselected tokens hold min(selected) - 1)
    hidden: np.ndarray  # [target hidden] post_projection output: the next step's input hidden


@torch.no_grad()
def drafter_step(drafter, target, token: int, hidden: np.ndarray | torch.Tensor,
                 shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]], position: int,
                 sliding_kv_last: int | None = None) -> DraftStep:
    """One draft step as transformers' SinglePositionMultiTokenCandidateGenerator runs it.

    The attention mask covers the ``position + 1`` tokens generate() would hold (the K/V length + 1).
    Beyond the sliding window transformers' drafter attends the last W+1 sliding positions, llama.cpp's
    the last W-1: ``sliding_kv_last=W-1`` keeps only those, to compare with llama.cpp there.
    """
    if sliding_kv_last is not None:
        k, v = shared_kv["sliding_attention"]
        shared_kv = {**shared_kv, "sliding_attention": (k[:, :, -sliding_kv_last:], v[:, :, -sliding_kv_last:])}
    embed = target.get_input_embeddings()(torch.tensor([[token]], dtype=torch.long))
    h = torch.as_tensor(np.asarray(hidden, dtype=np.float32)).reshape(1, 1, -1).to(embed.dtype)
    out = drafter(
        inputs_embeds=torch.cat([embed, h], dim=-1),
        attention_mask=torch.ones(1, position + 1, dtype=torch.long),
        position_ids=torch.tensor([[position]], dtype=torch.long),
        shared_kv_states=shared_kv,
        use_cache=False,
    )
    return DraftStep(logits=out.logits[0, -1].float().numpy(), hidden=out.last_hidden_state[0, -1].float().numpy())


def drafter_first_logits(target, drafter, tokens: list[int], next_token: int | None = None,
                         sliding_kv_last: int | None = None) -> np.ndarray:
    """The drafter's first-step logits after the target read ``tokens`` (next token: the target's argmax)."""
    tp = target_pass(target, tokens)
    token = int(tp.logits[-1].argmax()) if next_token is None else next_token
    return drafter_step(drafter, target, token, tp.hidden[-1], tp.shared_kv, len(tokens), sliding_kv_last).logits


def draft_round(target, drafter, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts of one round after the target read ``tokens``: [t, d1..dk] with t the target's argmax."""
    tp = target_pass(target, tokens)
    token, hidden, out = int(tp.logits[-1].argmax()), tp.hidden[-1], []
    out.append(token)
    for _ in range(k):
        step = drafter_step(drafter, target, token, hidden, tp.shared_kv, len(tokens))
        token, hidden = int(step.logits.argmax()), step.hidden
        out.append(token)
    return out


# --- generation -------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(model, tokens: list[int], n: int) -> list[int]:
    """``n`` greedy tokens with a KV cache, ignoring stop tokens (a plain loop, no generate())."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    produced = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        produced.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return produced


@torch.no_grad()
def generate(model, tokens: list[int], n: int, drafter=None) -> list[int]:
    """transformers' own generate(), greedy; with ``drafter`` it runs the MTP assisted path."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    kwargs = {"assistant_model": drafter} if drafter is not None else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(tokens):].tolist()


# --- tokenizer and chat -----------------------------------------------------------------------------

_CONTROL = re.compile(r"(<[^<>\s]+>)")


def _special_ids(model_dir: Path) -> dict[str, int]:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    if "added_tokens_decoder" in cfg:
        return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}


def tokenize(model_dir: str | Path, text: str) -> list[int]:
    """Text with control tokens spelled out -> ids, with the tokenizer library the directory ships."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    special, ids = _special_ids(model_dir), []
    for piece in _CONTROL.split(text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def detokenize(model_dir: str | Path, ids: list[int]) -> str:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(list(ids), skip_special_tokens=False)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    text, run = [], []
    for i in list(ids) + [None]:
        if i is None or sp.is_control(i) or sp.is_unknown(i):
            text.append(sp.decode(run))
            run = []
            if i is not None:
                text.append(sp.id_to_piece(i))
        else:
            run.append(i)
    return "".join(text)


def render_chat(model_dir: str | Path, messages: list[dict], add_generation_prompt: bool = True,
                **kwargs: Any) -> str:
    """chat_template.jinja rendered the way transformers renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((Path(model_dir) / "chat_template.jinja").read_text())
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>",
                           eos_token="<eos>", **kwargs)


def encode_chat(model_dir: str | Path, messages: list[dict], add_generation_prompt: bool = True,
                **kwargs: Any) -> list[int]:
    return tokenize(model_dir, render_chat(model_dir, messages, add_generation_prompt, **kwargs))


# --- vision -----------------------------------------------------------------------------------------


def image_inputs(vision: dict[str, Any], height: int, width: int, seed: int = 0, image: np.ndarray | None = None):
    """A random RGB image as Gemma4ImageProcessor would hand it over (no resize): pixels in [0, 1],
    (patches, 3*p*p) rows in (row, col, channel) order, (x, y) patch positions; plus the soft-token count.
    ``image``: these (3, height, width) float32 pixels instead of random ones (media_reference's images).
    """
    p, k = vision["patch_size"], vision["pooling_kernel_size"]
    if height % (p * k) or width % (p * k):
        raise ValueError(f"image sides must be multiples of patch_size * pooling = {p * k}")
    if image is None:
        image = np.random.default_rng(seed).random((3, height, width), dtype=np.float32)
    elif image.shape != (3, height, width):
        raise ValueError(f"expected pixels of shape {(3, height, width)}, got {image.shape}")
    rows, cols = height // p, width // p
    patches = image.reshape(3, rows, p, cols, p).transpose(1, 3, 2, 4, 0).reshape(rows * cols, 3 * p * p)
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(rows * cols, 2)
    return (torch.from_numpy(patches)[None], torch.from_numpy(positions).long()[None], rows * cols // (k * k))
