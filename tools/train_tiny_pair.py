"""Train the small Gemma 4 pair shipped in gguf_mtp/data/trained-pair (dev-only: needs torch + transformers).

    nice -n 10 python tools/train_tiny_pair.py                   # the whole run, ~70 minutes on 2 cores
    python tools/train_tiny_pair.py target_steps=20 drafter_steps=10 out_dir=/tmp/pair   # a smoke run
    python tools/train_tiny_pair.py reuse_target=True            # keep work_dir's target, retrain the drafter (~40 min)

Any config value below can be overridden as key=value (nanoGPT's habit). The script reads top to bottom:
corpus -> tokenizer -> token stream -> target (a Gemma 4 text model, trained from scratch, then fine-tuned with
sequence-level unlikelihood so its greedy output does not loop) -> its MTP drafter (Gemma4AssistantForCausalLM,
trained against the frozen target) -> the Hugging Face layout gguf-mtp converts.

Corpus: the Python standard library's own top-level modules (``Lib/*.py`` of the interpreter running this).
Every machine with Python has it, so training needs no download; it is real, varied text (code, docstrings,
comments) of a few MB, and code is the kind of text where MTP drafting pays off (indentation, closing brackets,
repeated identifiers). Every ``heldout_every``-th module (sorted by name) is held out: never trained on, and the
first ``heldout_chars`` of those modules are shipped as heldout.txt for the acceptance test. CPython's Lib/ is
under the PSF License v2 (see the shipped README.md).

Drafter training follows how MTP drafters run (transformers' SinglePositionMultiTokenCandidateGenerator,
llama.cpp's draft-mtp): the target is frozen; at every position t the drafter reads the target's last hidden
state h_t (post final norm) and the target's embedding of token t+1, at position t+1, attending to the target's
K/V of positions <= t (its last sliding and last full layer; on sliding layers only the last W-1 positions, as
llama.cpp's drafter does). Step j predicts the target's next-token distribution at position t+j (distillation:
cross-entropy against the target's softmax); step j+1 reads step j's post_projection output as its hidden state,
at the same position t+1, and the token a kept draft j would be: the target's own greedy token there, not the
text's (``greedy_deep``; its labels come from the target run over that greedy branch, batched with tree masks).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import sysconfig
import time
from ast import literal_eval
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gguf_mtp import transformers_reference as reference  # noqa: E402  (applies the fixes in patches/transformers)
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4ForCausalLM  # noqa: E402
from transformers import DynamicCache, Gemma4TextConfig  # noqa: E402

from gguf_mtp import bench  # noqa: E402
from gguf_mtp.tiny import configs, tokenizer, weights  # noqa: E402
from gguf_mtp.tiny.configs import F as FULL, S as SLIDING  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
# config
out_dir = str(REPO / "gguf_mtp" / "data" / "trained-pair")  # the shipped pair: target/, drafter/, heldout.txt
work_dir = str(REPO / ".work" / "train-pair")  # the trained target between runs (reuse_target)
reuse_target = False  # True: load work_dir/target-final (else work_dir/target) instead of training it again
readme_only = False  # True: only rewrite out_dir/README.md from out_dir/training.json
seed = 1337
threads = 2  # torch threads; the dev machine is 2 shared cores
# corpus
heldout_every = 10  # every 10th stdlib module (sorted by name) is held out
heldout_chars = 96_000  # held-out text shipped: the same share of each held-out module, cut at a line end
# tokenizer: Gemma 4's layout (control tokens 0..106, "\n" 107, 256 byte pieces, learned pieces after)
vocab_size = 2048
# target: a 31B-style dense text model at toy size; hidden and intermediate multiples of 256 so the k-quants
# (Q4_K, Q6_K) apply to every matrix, as they do on the real models
hidden = 256
intermediate = 512
layer_types = [SLIDING, FULL, SLIDING, FULL]  # llama.cpp's KV-reuse rule: ends sliding, full
heads = 4
kv_heads = 2
head_dim = 64  # sliding layers
global_head_dim = 128  # full layers
sliding_window = 128
# drafter (Q-only layers reading the target's last sliding / full layer); its hidden size must differ from the
# target's: llama.cpp tells a drafter's input and output widths apart by size
drafter_hidden = 128
drafter_intermediate = 512
drafter_layer_types = [SLIDING, SLIDING, SLIDING, FULL]  # as Gemma 4's drafters
drafter_heads = 4
num_assistant_tokens = 3  # generation_config.json: transformers' draft length for this drafter
# target training
block = 256  # tokens per training window (the first is <bos>)
batch = 8
target_steps = 800
lr = 1e-2
min_lr = 1e-3
warmup = 20
weight_decay = 0.1
grad_clip = 1.0
unlikelihood = 1.0  # weight of token-level unlikelihood on tokens already in the window (Welleck et al. 2019):
# a model this small, trained this briefly, otherwise falls into greedy loops ("self.data = self.datadatadata")
# target, part 2: sequence-level unlikelihood (Welleck et al. 2019), against the greedy loops a model this small
# falls into; every other step is ordinary next-token training so the loss stays where it was
seq_ul_steps = 300
seq_ul_lr = 1e-3
seq_ul_prefix = 64  # training-text tokens the target continues greedily ...
seq_ul_continuation = 64  # ... for this many tokens
seq_ul_ngram = 4  # tokens of a repeated 4-gram in its continuation are pushed down
# drafter training
drafter_steps = 2000
drafter_batch = 8
drafter_lr = 1e-2
depth = 3  # draft steps trained per position (MTP depth; later steps reuse the same weights)
greedy_deep = True  # steps after the first read the target's own greedy tokens, as kept drafts are at run time;
# False: they read the text's tokens (cheaper: no branch forwards, but not what the drafter sees when it runs)
# logging
log_every = 20
eval_windows = 16  # held-out windows for the loss printed every log_every steps
sample_every = 200  # target steps between greedy samples of held-out prompts (and a checkpoint in work_dir)
sample_tokens = 48  # greedy tokens per held-out prompt
# -----------------------------------------------------------------------------------------------------------
for arg in sys.argv[1:]:  # key=value overrides
    key, sep, value = arg.partition("=")
    if not sep or key not in globals() or key.startswith("_"):
        sys.exit(f"unknown setting {arg!r} (expected key=value with a key from the config block)")
    try:
        globals()[key] = literal_eval(value)
    except (ValueError, SyntaxError):
        globals()[key] = value
torch.manual_seed(seed)
torch.set_num_threads(threads)
rng = np.random.default_rng(seed)
out, work = Path(out_dir), Path(work_dir)
t_start = time.time()
report: dict = {"python": platform.python_version(), "torch": torch.__version__, "seed": seed}


def log(msg: str) -> None:
    print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)


def readme(r: dict) -> str:
    """gguf_mtp/data/trained-pair/README.md from the run's report (training.json) and the config above."""
    tt, dt, c = r["target_training"], r["drafter_training"], r["corpus"]
    ul = f" plus token-level unlikelihood (weight {unlikelihood})" if unlikelihood else ""
    samples = "\n".join(f"- `{p!r}` -> `{c!r}`" for p, c in r["samples"].items())
    deep = ("steps after the first reading the target's own greedy tokens" if r["drafter_training"].get("greedy_deep")
            else "every step reading the text's tokens")
    return f"""# The trained pair (written by tools/train_tiny_pair.py: do not edit)

A small Gemma 4 target and its MTP drafter, trained on a 2-core CPU, for `gguf-mtp demo` and the tests
(tests/test_trained_pair.py). Hugging Face layout, f16 safetensors; the GGUFs are built from it by our converter
at run time.

- target/: Gemma4ForCausalLM, {r['parameters']['target']:,} parameters: hidden {hidden}, intermediate {intermediate},
  layers {' '.join(t[:1].upper() for t in layer_types)}, {heads} heads ({kv_heads} KV heads), head dims {head_dim} /
  {global_head_dim}, sliding window {sliding_window}, vocabulary {vocab_size}, tied embeddings.
- drafter/: Gemma4AssistantForCausalLM, {r['parameters']['drafter']:,} parameters: hidden {drafter_hidden},
  layers {' '.join(t[:1].upper() for t in drafter_layer_types)}, reading the target's last sliding and full layer;
  generation_config.json num_assistant_tokens {num_assistant_tokens}.
- tokenizer: BPE with byte fallback and Gemma 4's control tokens at their ids (gguf_mtp.tiny.tokenizer),
  {vocab_size} pieces learned on the training text ({r['tokens']['chars_per_token']} characters per token).
- heldout.txt: the start of each held-out module (never trained on), {c['heldout_shipped_chars']:,} characters.
- training.json: everything the run measured.

Corpus: CPython {r['python']}'s standard library, top-level modules (`Lib/*.py`): {c['train_modules']} modules
({c['train_chars']:,} characters, {r['tokens']['train']:,} tokens) for training; every {heldout_every}th module
held out ({', '.join(c['heldout_modules'])}).

Training (torch {r['torch']}, {threads} threads). The target: {tt['steps']} steps of {tt['batch']} x {tt['block']}
tokens ({tt['seconds']} s), next-token cross-entropy{ul}; then {r['seq_ul']['steps']} steps alternating
sequence-level unlikelihood on its own greedy continuations with next-token training ({r['seq_ul']['seconds']} s):
greedy tokens in repeated {seq_ul_ngram}-grams (16 held-out prefixes x {seq_ul_continuation} tokens)
{r['before_seq_ul']['repetition']:.0%} -> {r['seq_ul']['repetition']:.0%}, held-out loss
{r['before_seq_ul']['heldout_loss']} -> {r['target_heldout_loss']} nats/token. The drafter: {dt['steps']} steps of
{dt['batch']} x {block}-token windows against the frozen target, {dt['depth']} draft steps deep at one position,
{deep} ({dt['seconds']} s); agreement with the target's argmax on the last training windows, by
depth: {' / '.join(f'{m:.3f}' for m in r.get('drafter_match_by_depth', []))}.

Greedy continuations of held-out prompts by the target:

{samples}

License: the training text and heldout.txt come from CPython's `Lib/`, Copyright (c) 2001-2024 Python Software
Foundation; All Rights Reserved, distributed under the PSF License Agreement version 2
(https://docs.python.org/3/license.html). The weights are derived from that text.
"""


if readme_only:  # rewrite README.md from an earlier run's training.json
    (out / "README.md").write_text(readme(json.loads((out / "training.json").read_text())), encoding="utf-8")
    sys.exit(0)


# -----------------------------------------------------------------------------------------------------------
# corpus: the standard library's top-level modules, every heldout_every-th held out
stdlib = Path(sysconfig.get_paths()["stdlib"])
modules = sorted(stdlib.glob("*.py"))
texts = [p.read_text(encoding="utf-8", errors="replace") for p in modules]
train_texts = [t for i, t in enumerate(texts) if i % heldout_every]
held_names = [p.name for i, p in enumerate(modules) if i % heldout_every == 0]
held_texts = [t for i, t in enumerate(texts) if i % heldout_every == 0]
share = heldout_chars // len(held_texts)
heldout_text = "".join(f"# Lib/{name}\n" + text[:share].rsplit("\n", 1)[0] + "\n\n"
                       for name, text in zip(held_names, held_texts))
report["corpus"] = {"source": str(stdlib), "modules": len(modules), "train_modules": len(train_texts),
                    "train_chars": sum(map(len, train_texts)), "heldout_modules": held_names,
                    "heldout_shipped_chars": len(heldout_text)}
log(f"corpus: {len(train_texts)} modules ({sum(map(len, train_texts)):,} chars) for training, "
    f"{len(held_texts)} held out ({', '.join(held_names)}); {len(heldout_text):,} chars of them shipped")

# -----------------------------------------------------------------------------------------------------------
# tokenizer (BPE with byte fallback, Gemma 4's control tokens) and the token stream
from tokenizers import Tokenizer  # noqa: E402

lines = [line for t in train_texts for line in t.split("\n") if line]
tok_json = tokenizer.bpe_tokenizer_json(lines, vocab_size, whitespace_runs=True)
tok = Tokenizer.from_str(tok_json)
BOS, EOS = 2, 1


def encode(text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


train_ids = np.concatenate([np.array(encode(t) + [EOS], dtype=np.int64) for t in train_texts])
held_ids = np.array(encode("".join(held_texts)), dtype=np.int64)
report["tokens"] = {"train": int(train_ids.size), "heldout": int(held_ids.size),
                    "chars_per_token": round(report["corpus"]["train_chars"] / train_ids.size, 3)}
log(f"tokenizer: {vocab_size} pieces; {train_ids.size:,} training tokens "
    f"({report['tokens']['chars_per_token']} chars/token), {held_ids.size:,} held-out tokens")


def windows(ids: np.ndarray, n: int, starts: np.ndarray | None = None) -> torch.Tensor:
    """n windows of ``block`` tokens: <bos> then block-1 tokens from a random (or given) offset."""
    if starts is None:
        starts = rng.integers(0, ids.size - block, size=n)
    rows = [np.concatenate([[BOS], ids[s:s + block - 1]]) for s in starts]
    return torch.from_numpy(np.stack(rows))


eval_x = windows(held_ids, eval_windows, np.linspace(0, held_ids.size - block, eval_windows).astype(int))

# -----------------------------------------------------------------------------------------------------------
# the pair's config.json files (gguf_mtp.tiny's tables, so the layout rules are checked the same way)
target_text = configs.text_fields(
    vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=hidden,
    intermediate_size=intermediate, layer_types=list(layer_types), num_attention_heads=heads,
    num_key_value_heads=kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
    sliding_window=sliding_window, max_position_embeddings=131_072)
drafter_text = configs.drafter_text_fields(
    target_text, vocab_size=vocab_size, layer_types=list(drafter_layer_types), hidden_size=drafter_hidden,
    intermediate_size=drafter_intermediate, num_attention_heads=drafter_heads)
spec = configs.FamilySpec(name="trained-pair", mimics="gemma-4-31B-style dense text target, trained on Python source",
                          target_text=target_text, drafter_text=drafter_text, dtype="float16",
                          num_assistant_tokens=num_assistant_tokens)
configs.check_layout(target_text, "target")
configs.check_layout(drafter_text, "drafter")
configs.check_pair(target_text, drafter_text)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine down to min_lr (nanoGPT's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - min_lr)


def optimizer(model: torch.nn.Module, peak: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=peak, betas=(0.9, 0.95))


# -----------------------------------------------------------------------------------------------------------
# target: train from scratch on next-token prediction
def target_loss(model: Gemma4ForCausalLM, x: torch.Tensor, ul: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy, plus ``ul`` x unlikelihood of every earlier token of the window but the right one."""
    logits = model(input_ids=x).logits[:, :-1]  # softcapped, as the model returns them
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), x[:, 1:].reshape(-1))
    if ul:
        seen = F.one_hot(x[:, :-1], vocab_size).cummax(dim=1).values.float()  # tokens up to each position
        seen.scatter_(2, x[:, 1:, None], 0.0)
        p = F.softmax(logits.float(), dim=-1).clamp(max=1 - 1e-5)
        loss = loss + ul * -(seen * torch.log1p(-p)).sum(-1).mean()
    return loss


@torch.no_grad()
def heldout_loss(model: Gemma4ForCausalLM) -> float:
    """Cross-entropy only: comparable across settings of ``unlikelihood``."""
    model.eval()
    loss = float(target_loss(model, eval_x))
    model.train()
    return loss


prompts = bench.heldout_prompts(4, heldout_text)  # the prompts demo and the tests use


def show_samples(model: Gemma4ForCausalLM) -> list[str]:
    outs = []
    for p in prompts:
        outs.append(tok.decode(reference.greedy(model, [BOS, *encode(p)], sample_tokens)))
        log(f"sample: {p!r} -> {outs[-1]!r}")
    return outs


def init_for_training(text_model: torch.nn.Module) -> None:
    """Scales that let a from-scratch model learn quickly (transformers' defaults suit loading, not training):
    embeddings of unit rms after the sqrt(hidden) scale; q/k norm gains head_dim^-1/4, so attention logits
    start at unit scale (Gemma 4 attends with scale 1 after the q/k norms); layer outputs (post-norm gains)
    1/sqrt(2 x layers), so the residual stream starts as the token embedding (GPT-2's residual scaling)."""
    layers = text_model.layers
    with torch.no_grad():
        text_model.embed_tokens.weight.normal_(0.0, text_model.config.hidden_size ** -0.5)
        for layer in layers:
            gain = layer.self_attn.q_norm.weight.numel() ** -0.25
            layer.self_attn.q_norm.weight.fill_(gain)
            if not layer.self_attn.is_kv_shared_layer:
                layer.self_attn.k_norm.weight.fill_(gain)
            layer.post_attention_layernorm.weight.fill_((2 * len(layers)) ** -0.5)
            layer.post_feedforward_layernorm.weight.fill_((2 * len(layers)) ** -0.5)


done = work / "target" / "training.json"  # written when part 1 completes
final = work / "target-final"  # the target after part 2, with what the run measured of it (report.json)
if reuse_target and (final / "report.json").exists():
    target = reference.load_model(final)
    report.update(json.loads((final / "report.json").read_text()))
    log(f"target: reused {final} after both parts ({n_params(target):,} parameters)")
elif reuse_target and done.exists():
    target = reference.load_model(work / "target")
    report["target_training"] = json.loads(done.read_text())
    log(f"target: reused {work / 'target'} ({n_params(target):,} parameters)")
else:
    target = Gemma4ForCausalLM(Gemma4TextConfig.from_dict(configs.target_config(spec)))
    init_for_training(target.model)
    log(f"target: {n_params(target):,} parameters, layers {layer_types}, training {target_steps} steps "
        f"of {batch}x{block} tokens")
    opt = optimizer(target, lr)
    target.train()
    t0 = time.time()
    for step in range(target_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, target_steps, lr)
        loss = target_loss(target, windows(train_ids, batch), unlikelihood)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == target_steps - 1:
            log(f"target step {step:4d}  loss {loss.item():.3f}  held-out {heldout_loss(target):.3f}  "
                f"{(time.time() - t0) / (step + 1):.2f} s/step")
        if (step + 1) % sample_every == 0 and step + 1 < target_steps:
            target.eval()
            show_samples(target)
            target.save_pretrained(work / "target")
            target.train()
    report["target_training"] = {"steps": target_steps, "batch": batch, "block": block,
                                 "tokens": target_steps * batch * block, "seconds": round(time.time() - t0),
                                 "final_train_loss": round(loss.item(), 3)}
    target.eval()
    target.save_pretrained(work / "target")  # for reuse_target; the shipped files are written below
    done.write_text(json.dumps(report["target_training"], indent=2) + "\n")


# -----------------------------------------------------------------------------------------------------------
# target, part 2: sequence-level unlikelihood fine-tuning
@torch.no_grad()
def greedy_batch(model: Gemma4ForCausalLM, x: torch.Tensor, n: int) -> torch.Tensor:
    """x followed by n greedy tokens per row (a KV-cached loop; every row has the same length)."""
    out = model(input_ids=x, use_cache=True)
    cont = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        out = model(input_ids=cont[-1], past_key_values=out.past_key_values, use_cache=True)
        cont.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([x, *cont], dim=1)


def repeats(seq: torch.Tensor, start: int) -> torch.Tensor:
    """True at positions >= start that belong to an n-gram seen earlier in the row."""
    mask = torch.zeros(seq.shape, dtype=torch.bool)
    for b, row in enumerate(seq.tolist()):
        seen: set[tuple[int, ...]] = set()
        for i in range(len(row) - seq_ul_ngram + 1):
            gram = tuple(row[i:i + seq_ul_ngram])
            if gram in seen and i + seq_ul_ngram > start:
                mask[b, max(i, start):i + seq_ul_ngram] = True
            seen.add(gram)
    return mask


ul_eval = windows(held_ids, eval_windows, np.linspace(0, held_ids.size - block, eval_windows).astype(int))
ul_eval = ul_eval[:, :seq_ul_prefix]


def repetition(model: Gemma4ForCausalLM) -> float:
    """Share of greedy continuation tokens (held-out prefixes) that sit in a repeated n-gram."""
    model.eval()
    seq = greedy_batch(model, ul_eval, seq_ul_continuation)
    return float(repeats(seq, seq_ul_prefix)[:, seq_ul_prefix:].float().mean())


def sequence_unlikelihood() -> None:
    """Part 2, in place on ``target``; its numbers go to the report."""
    report["before_seq_ul"] = {"heldout_loss": round(heldout_loss(target), 3), "repetition": round(repetition(target), 3)}
    log(f"sequence-level unlikelihood: {seq_ul_steps} steps; before: held-out loss {report['before_seq_ul']['heldout_loss']}, "
        f"{report['before_seq_ul']['repetition']:.0%} of greedy tokens in repeated {seq_ul_ngram}-grams")
    opt = optimizer(target, seq_ul_lr)
    t0 = time.time()
    for step in range(seq_ul_steps):
        if step % 2 == 0:  # the target continues training text greedily; its repeated n-grams become less likely
            target.eval()
            seq = greedy_batch(target, windows(train_ids, batch)[:, :seq_ul_prefix], seq_ul_continuation)
            target.train()
            bad = repeats(seq, seq_ul_prefix)[:, 1:].float()
            p = F.softmax(target(input_ids=seq).logits[:, :-1].float(), dim=-1)
            p = p.gather(2, seq[:, 1:, None])[..., 0].clamp(max=1 - 1e-5)
            loss = -(bad * torch.log1p(-p)).sum() / bad.sum().clamp(min=1.0)
        else:
            loss = target_loss(target, windows(train_ids, batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % (5 * log_every) == 0 or step == seq_ul_steps - 1:
            log(f"sequence-level unlikelihood step {step:4d}  held-out {heldout_loss(target):.3f}  repetition "
                f"{repetition(target):.0%}  {(time.time() - t0) / (step + 1):.2f} s/step")
    report["target_heldout_loss"] = round(heldout_loss(target), 3)
    report["seq_ul"] = {"steps": seq_ul_steps, "seconds": round(time.time() - t0), "repetition": round(repetition(target), 3)}


if "seq_ul" not in report:  # not reused
    sequence_unlikelihood()
    report["samples"] = dict(zip(prompts, show_samples(target)))  # greedy: the quality check a reader can judge
    target.save_pretrained(final)
    (final / "report.json").write_text(json.dumps({k: report[k] for k in (
        "target_training", "before_seq_ul", "target_heldout_loss", "seq_ul", "samples")}, indent=2) + "\n")
target.eval()
target.requires_grad_(False)  # frozen: the drafter's loss reaches the target's embedding table

# -----------------------------------------------------------------------------------------------------------
# drafter: frozen target, several draft steps deep at one position


def strict_causal_masks(n_query: int, n_key: int, window: int) -> dict[str, torch.Tensor]:
    """Query q (the token at position q+1) attends target keys 0..q; sliding layers only the last window-1."""
    q = torch.arange(n_query)[:, None]
    k = torch.arange(n_key)[None, :]
    full = k <= q
    sliding = full & (k >= q + 2 - window)
    return {FULL: full[None, None], SLIDING: sliding[None, None]}


def draft_step(drafter, embed, tokens: torch.Tensor, h: torch.Tensor, kv, positions: torch.Tensor,
               masks) -> tuple[torch.Tensor, torch.Tensor]:
    """One MTP step for every query at once: (logits, post_projection hidden for the next step)."""
    x = drafter.pre_projection(torch.cat([embed(tokens), h], dim=-1))
    last = drafter.model(inputs_embeds=x, attention_mask=masks, position_ids=positions, shared_kv_states=kv,
                         use_cache=False).last_hidden_state
    return drafter.lm_head(last), drafter.post_projection(last)


def softcapped(hidden: torch.Tensor) -> torch.Tensor:
    cap = target.config.final_logit_softcapping
    return torch.tanh(target.lm_head(hidden) / cap) * cap


@torch.no_grad()
def target_states(x: torch.Tensor):
    """The frozen target over x: post-norm hidden states, softcapped logits, the K/V the drafter reads, and
    its cache (every position of every layer: draft_targets' branches attend to it)."""
    cache = DynamicCache()  # without the config: sliding layers keep all positions, not the last window
    o = target.model(input_ids=x, past_key_values=cache, use_cache=True, return_shared_kv_states=True)
    return o.last_hidden_state, softcapped(o.last_hidden_state), dict(o.shared_kv_states), cache


def branch_masks(n: int, m: int, window: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Masks and positions for a text window followed by m branches of n tokens: branch i's token for query t
    sits at position t+1+i and sees the text up to t+1 and the query's own earlier branch tokens (tree
    attention); the text sees only itself."""
    pos = torch.cat([torch.arange(block)] + [torch.arange(n) + 1 + i for i in range(1, m + 1)])
    seen = torch.zeros(pos.numel(), pos.numel(), dtype=torch.bool)
    seen[:block, :block] = torch.ones(block, block, dtype=torch.bool).tril()
    t, text = torch.arange(n), torch.arange(block)
    for i in range(1, m + 1):
        rows = block + (i - 1) * n + t
        seen[rows[:, None], text[None]] = text[None] <= t[:, None] + 1
        for j in range(1, i + 1):
            seen[rows, block + (j - 1) * n + t] = True
    sliding = seen & (pos[None] > pos[:, None] - window)  # transformers' sliding rule
    return {FULL: seen[None, None], SLIDING: sliding[None, None]}, pos[None]


@torch.no_grad()
def draft_targets(x: torch.Tensor, t_logits: torch.Tensor, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input tokens, target logits to learn) of draft steps 1..depth at every query t. Step 1 reads the text's
    token t+1 and learns the target's distribution there. With greedy_deep, step j > 1 reads the target's greedy
    token after step j-1 (what a kept draft is) and learns the target's distribution after it: branch j-1 of
    branch_masks, run on the text's ``cache`` (which it extends). Checked against plain forwards below."""
    steps = [(x[:, 1:1 + n_query], t_logits[:, 1:1 + n_query])]
    for j in range(2, depth + 1):
        if not greedy_deep:
            steps.append((x[:, j:j + n_query], t_logits[:, j:j + n_query]))
            continue
        g = steps[-1][1].argmax(-1)
        rows = slice(block + (j - 2) * n_query, block + (j - 1) * n_query)
        hs = target.model(input_ids=g, attention_mask={k: m[..., rows, :rows.stop] for k, m in tree.items()},
                          position_ids=tree_pos[:, rows].expand(x.shape[0], -1), past_key_values=cache,
                          use_cache=True).last_hidden_state
        steps.append((g, softcapped(hs)))
    return steps


drafter = Gemma4AssistantForCausalLM(Gemma4AssistantConfig.from_dict(configs.drafter_config(spec)))
init_for_training(drafter.model)  # its embedding table is only its (tied) output head
embed = target.get_input_embeddings()  # scaled by sqrt(hidden), as llama.cpp's drafter input
n_query = block - depth
masks = strict_causal_masks(n_query, block, sliding_window)
positions = torch.arange(1, n_query + 1)[None]
tree, tree_pos = branch_masks(n_query, depth - 1, sliding_window)

# check the batched step against transformers' own one-query drafter step (gguf_mtp/transformers_reference.py)
# before training
with torch.no_grad():
    x = windows(held_ids, 1)
    h, t_logits, kv, cache = target_states(x)
    logits, _ = draft_step(drafter, embed, x[:, 1:n_query + 1], h[:, :n_query], kv, positions, masks)
    q = n_query // 2 if n_query // 2 < sliding_window - 1 else sliding_window - 2
    one = reference.drafter_step(drafter, target, int(x[0, q + 1]), h[0, q], {k: (v[0][:, :, :q + 1], v[1][:, :, :q + 1])
                                 for k, v in kv.items()}, q + 1)
    gap = float((logits[0, q] - torch.from_numpy(one.logits)).abs().max())
    assert gap < 1e-3, f"batched drafter step differs from the reference step by {gap}"
    steps = draft_targets(x, t_logits, cache)  # each step's labels against plain forwards
    for q in (3, sliding_window + 4):  # before and past the sliding window
        seq = x[0, :q + 2]
        for j, (tokens, labels) in enumerate(steps[1:], 2):
            seq = torch.cat([seq, tokens[0, q:q + 1]])
            gap = float((target(input_ids=seq[None]).logits[0, -1] - labels[0, q]).abs().max())
            assert gap < 1e-3, f"draft step {j}'s labels at {q} differ from a plain forward by {gap}"

log(f"drafter: {n_params(drafter):,} parameters, layers {drafter_layer_types}, {drafter_steps} steps, depth {depth}")
opt = optimizer(drafter, drafter_lr)
drafter.train()
t0 = time.time()
match_sum, match_steps = np.zeros(depth), 0  # target-argmax agreement on training windows
for step in range(drafter_steps):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, drafter_steps, drafter_lr)
    x = windows(train_ids, drafter_batch)
    h_target, t_logits, kv, cache = target_states(x)
    h = h_target[:, :n_query]
    loss = torch.zeros(())
    for j, (tokens, labels) in enumerate(draft_targets(x, t_logits, cache), 1):
        logits, h = draft_step(drafter, embed, tokens, h, kv, positions, masks)
        p = F.softmax(labels.float(), dim=-1)
        loss = loss + -(p * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean() / depth
        match_sum[j - 1] += float((logits.argmax(-1) == labels.argmax(-1)).float().mean())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(drafter.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    match_steps += 1
    if step % log_every == 0 or step == drafter_steps - 1:
        log(f"drafter step {step:4d}  loss {loss.item():.3f}  argmax match by depth "
            f"{' '.join(f'{m / match_steps:.2f}' for m in match_sum)}  {(time.time() - t0) / (step + 1):.2f} s/step")
        report["drafter_match_by_depth"] = [round(m / match_steps, 3) for m in match_sum]
        match_sum[:], match_steps = 0, 0
report["drafter_training"] = {"steps": drafter_steps, "batch": drafter_batch, "depth": depth, "greedy_deep": greedy_deep,
                              "seconds": round(time.time() - t0), "final_loss": round(loss.item(), 3)}
drafter.eval()

# -----------------------------------------------------------------------------------------------------------
# export: the Hugging Face layout gguf-mtp converts (f16 safetensors, tiny's config / tokenizer files)


def write_role(model: torch.nn.Module, role: str, names: list[str]) -> int:
    from safetensors.torch import save_file

    d = out / role
    d.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    missing = [n for n in names if n not in state]
    assert not missing, f"{role}: the model has no {missing[:3]}"
    tensors = {n: state[n].detach().to(torch.float16 if state[n].is_floating_point() else state[n].dtype).contiguous()
               for n in sorted(names)}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "model.safetensors").chmod(0o644)  # save_file creates it owner-only
    make_config = configs.target_config if role == "target" else configs.drafter_config
    (d / "config.json").write_text(json.dumps(make_config(spec), indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps(configs.generation_config(spec, role), indent=2) + "\n")
    (d / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer.tokenizer_config("json"), indent=2) + "\n")
    (d / "chat_template.jinja").write_text(tokenizer.CHAT_TEMPLATE, encoding="utf-8")
    return sum(f.stat().st_size for f in d.iterdir())


sizes = {"target": write_role(target, "target", [s.name for s in weights.target_specs(spec)]),
         "drafter": write_role(drafter, "drafter", [s.name for s in weights.drafter_specs(spec)])}
(out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
report["bytes"] = sizes
report["parameters"] = {"target": n_params(target), "drafter": n_params(drafter)}
report["seconds"] = round(time.time() - t_start)
(out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
(out / "README.md").write_text(readme(report), encoding="utf-8")
log(f"wrote {out}: target {sizes['target']:,} bytes, drafter {sizes['drafter']:,} bytes, "
    f"heldout.txt {len(heldout_text):,} chars; {report['seconds']} s in all")
