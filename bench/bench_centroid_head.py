#!/usr/bin/env python3
"""Drafter step time with the centroid-clustered head vs the dense head, at the real E2B drafter shape.

Synthetic GGUFs with random weights (written here with gguf-py, cached under --dir):
- drafter: vocab 262144, hidden 256, 4 layers [S,S,S,F], FFN 2048, 4 heads; dense head, and the same drafter with
  the centroid head (2048 clusters, top 32) which needs our patched runtime (gguf-mtp runtime build);
- target: E2B's width (hidden 1536, FFN 6144, 8 heads, 1 KV head, head dims 256/512, window 512, vocab 262144,
  tied head) with --target-layers layers [S,...,S,F], no per-layer embeddings, no KV sharing.

Prints per-step times side by side and their ratio, the target's decode / verify times, an end-to-end greedy MTP
run with each drafter (random weights accept ~no drafts, so it measures the overhead a round pays) and the
tokens/s a round would give at a few acceptance rates from the measured costs.

    python3 bench/bench_centroid_head.py [--target-layers 8] [--threads 2] [--k 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB, N_CLUSTERS, TOP_K = 262144, 2048, 32
TARGET = dict(hidden=1536, ffn=6144, heads=8, kv=1, hd_swa=256, hd_full=512, window=512)
DRAFTER = dict(hidden=256, ffn=2048, heads=4, layers="SSSF")


# --- synthetic GGUFs ---------------------------------------------------------------------------------
def _tokenizer_kv(w, template: Path) -> None:
    """The tiny tokenizer's metadata, its token list padded to 262144 with unused tokens."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(str(template))
    for name, f in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = f.contents()
        if name == "tokenizer.ggml.tokens":
            value = value + [f"<unused_{i}>" for i in range(len(value), VOCAB)]
        elif name == "tokenizer.ggml.scores":
            value = value + [0.0] * (VOCAB - len(value))
        elif name == "tokenizer.ggml.token_type":
            value = value + [5] * (VOCAB - len(value))  # UNUSED
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, f.types[0], sub_type=sub)


def _tiny_tokenizer_gguf(out: Path) -> Path:
    from gguf_mtp.export import convert
    from gguf_mtp.tiny import make_tiny_models

    path = out / "tiny-tokenizer.gguf"
    if not path.exists():
        hf = make_tiny_models(out / "tiny-hf", families=["tiny-dense"], force=True)["tiny-dense"]
        convert(hf / "target", path)
    return path


def _add_kv(w, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, list):
        w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)  # only bool arrays here
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, value)


class Writer:
    """Stream tensors into a GGUF one at a time (the 262144-row embeddings never sit in memory twice)."""

    def __init__(self, path: Path, arch: str, kv: dict, template: Path) -> None:
        from gguf import GGUFWriter

        self.path, self.w, self.tensors = path, GGUFWriter(str(path) + ".tmp", arch=arch), []
        for k, v in kv.items():
            _add_kv(self.w, k, v)
        _tokenizer_kv(self.w, template)

    def add(self, name: str, shape: tuple[int, ...], kind: str, dtype=np.float16) -> None:
        """shape in numpy order; kind: embed, linear, norm, one, ordering, rope."""
        self.tensors.append((name, shape, kind, dtype))

    def write(self, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        for name, shape, kind, dtype in self.tensors:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        for name, shape, kind, dtype in self.tensors:
            self.w.write_tensor_data(_values(rng, shape, kind, dtype))
        self.w.close()
        Path(str(self.path) + ".tmp").rename(self.path)
        return self.path


def _values(rng: np.random.Generator, shape: tuple[int, ...], kind: str, dtype) -> np.ndarray:
    if kind == "ordering":
        return rng.permutation(shape[0]).astype(np.int32)
    if kind == "one":
        return np.ones(shape, dtype)
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    if kind == "rope":
        n = shape[0]
        return np.where(np.arange(n) < n // 4, 1.0, 1e30).astype(np.float32)  # partial rotation 0.25
    scale = 1.0 if kind == "embed" else 1.0 / np.sqrt(shape[-1])
    out = np.empty(shape, dtype)
    rows = max(1, (1 << 24) // int(shape[-1]))
    for i in range(0, shape[0], rows):  # chunked: f32 scratch stays small
        out[i:i + rows] = (scale * rng.standard_normal((min(rows, shape[0] - i), *shape[1:]), dtype=np.float32))
    return out


def _common_kv(prefix: str, hidden: int, ffn: int, pattern: str, heads: int) -> dict:
    t = TARGET
    return {
        f"{prefix}.block_count": len(pattern), f"{prefix}.context_length": 131072,
        f"{prefix}.embedding_length": hidden, f"{prefix}.feed_forward_length": ffn,
        f"{prefix}.attention.head_count": heads, f"{prefix}.attention.head_count_kv": t["kv"],
        f"{prefix}.rope.freq_base": 1000000.0, f"{prefix}.rope.freq_base_swa": 10000.0,
        f"{prefix}.attention.layer_norm_rms_epsilon": 1e-6, f"{prefix}.attention.key_length": t["hd_full"],
        f"{prefix}.attention.value_length": t["hd_full"], "general.file_type": 1,
        f"{prefix}.final_logit_softcapping": 30.0, f"{prefix}.attention.sliding_window": t["window"],
        f"{prefix}.attention.sliding_window_pattern": [c == "S" for c in pattern],
        f"{prefix}.attention.key_length_swa": t["hd_swa"], f"{prefix}.attention.value_length_swa": t["hd_swa"],
        f"{prefix}.rope.dimension_count": t["hd_full"], f"{prefix}.rope.dimension_count_swa": t["hd_swa"],
    }


def _layer(w: Writer, i: int, hidden: int, ffn: int, heads: int, full: bool, kv: bool) -> None:
    hd = TARGET["hd_full"] if full else TARGET["hd_swa"]
    b = f"blk.{i}."
    for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
        w.add(b + n + ".weight", (hidden,), "norm", np.float32)
    w.add(b + "layer_output_scale.weight", (1,), "one", np.float32)
    w.add(b + "attn_q.weight", (heads * hd, hidden), "linear")
    w.add(b + "attn_q_norm.weight", (hd,), "norm", np.float32)
    w.add(b + "attn_output.weight", (hidden, heads * hd), "linear")
    if kv:
        w.add(b + "attn_k.weight", (TARGET["kv"] * hd, hidden), "linear")
        w.add(b + "attn_v.weight", (TARGET["kv"] * hd, hidden), "linear")
        w.add(b + "attn_k_norm.weight", (hd,), "norm", np.float32)
    w.add(b + "ffn_gate.weight", (ffn, hidden), "linear")
    w.add(b + "ffn_up.weight", (ffn, hidden), "linear")
    w.add(b + "ffn_down.weight", (hidden, ffn), "linear")


def write_target(path: Path, layers: int, template: Path) -> Path:
    t = TARGET
    pattern = "S" * (layers - 1) + "F"
    kv = _common_kv("gemma4", t["hidden"], t["ffn"], pattern, t["heads"])
    kv.update({"gemma4.attention.shared_kv_layers": 0, "gemma4.embedding_length_per_layer_input": 0})
    w = Writer(path, "gemma4", kv, template)
    w.add("rope_freqs.weight", (t["hd_full"] // 2,), "rope", np.float32)
    w.add("token_embd.weight", (VOCAB, t["hidden"]), "embed")
    for i, c in enumerate(pattern):
        _layer(w, i, t["hidden"], t["ffn"], t["heads"], c == "F", kv=True)
    w.add("output_norm.weight", (t["hidden"],), "norm", np.float32)
    return w.write(seed=1)


def write_drafter(path: Path, centroids: bool, template: Path) -> Path:
    d, t = DRAFTER, TARGET
    kv = _common_kv("gemma4-assistant", d["hidden"], d["ffn"], d["layers"], d["heads"])
    kv.update({"gemma4-assistant.attention.shared_kv_layers": len(d["layers"]),
               "gemma4-assistant.embedding_length_per_layer_input": 0,
               "gemma4-assistant.embedding_length_out": t["hidden"],
               "gemma4-assistant.nextn_predict_layers": len(d["layers"])})
    if centroids:
        kv.update({"gemma4-assistant.centroid_count": N_CLUSTERS, "gemma4-assistant.centroid_top_k": TOP_K})
    w = Writer(path, "gemma4-assistant", kv, template)
    w.add("rope_freqs.weight", (t["hd_full"] // 2,), "rope", np.float32)
    w.add("token_embd.weight", (VOCAB, d["hidden"]), "embed")
    for i, c in enumerate(d["layers"]):
        _layer(w, i, d["hidden"], d["ffn"], d["heads"], c == "F", kv=False)
    w.add("output_norm.weight", (d["hidden"],), "norm", np.float32)
    w.add("nextn.pre_projection.weight", (d["hidden"], 2 * t["hidden"]), "linear")
    w.add("nextn.post_projection.weight", (t["hidden"], d["hidden"]), "linear")
    if centroids:
        w.add("masked_embd_centroids.weight", (N_CLUSTERS, d["hidden"]), "linear")
        w.add("masked_embd_ordering", (VOCAB,), "ordering", np.int32)
    return w.write(seed=2)  # same seed: the dense and centroid drafters share every other weight


# --- measurements ------------------------------------------------------------------------------------
def _median_ms(fn, n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(target: Path, drafter: Path | None, settings, prompt_len: int, steps: int, k: int, tokens: int) -> dict:
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    with Engine.load(target, drafter, settings, k_max=max(k, 1)) as eng:
        rng = np.random.default_rng(0)
        prompt = [eng.bos] + rng.integers(108, 400, size=prompt_len - 1).tolist()
        eng.truncate(0)
        n = eng.decode(prompt, outputs="last")
        t = int(eng.logits(1)[0].argmax())
        res = {}
        if drafter is not None:
            h = eng.hidden(n - 1).copy()
            res["draft_ms"] = _median_ms(lambda: eng.draft_step(t, len(prompt), h), steps)

        def verify(m: int) -> None:
            eng.decode([t] * m, outputs="all")
            eng.truncate(len(prompt))

        res["target_1_ms"] = _median_ms(lambda: verify(1), steps)
        res["verify_ms"] = _median_ms(lambda: verify(k + 1), steps)
        eng.truncate(0)
        t0 = time.perf_counter()
        g = generate(eng, prompt, tokens, chooser=FixedK(k if drafter is not None else 0), ignore_eog=True)
        res["e2e_tok_s"] = len(g.tokens) / (time.perf_counter() - t0)
        res["accepted"] = f"{g.stats.accepted}/{g.stats.proposed}"
    return res


def modeled_tok_s(alpha: float, k: int, draft_ms: float, verify_ms: float) -> float:
    """Expected tokens per round (1 + accepted) over its cost: k draft steps and one verify of k+1 rows."""
    per_round = (1 - alpha ** (k + 1)) / (1 - alpha)
    return 1000 * per_round / (k * draft_ms + verify_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=REPO / ".work" / "bench-centroid", help="where the GGUFs are cached")
    ap.add_argument("--target-layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=3, help="draft length of the end-to-end runs")
    ap.add_argument("--steps", type=int, default=30, help="timed repetitions per measurement (median)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per end-to-end run")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length")
    args = ap.parse_args()

    from gguf_mtp.runtime_build import runtime_info
    from gguf_mtp.settings import RuntimeSettings

    info = runtime_info()
    args.dir.mkdir(parents=True, exist_ok=True)
    template = _tiny_tokenizer_gguf(args.dir)
    target = args.dir / f"target-e2b-width-{args.target_layers}l-f16.gguf"
    dense, centroid = args.dir / "drafter-e2b-dense-f16.gguf", args.dir / "drafter-e2b-centroids-f16.gguf"
    for path, make in ((target, lambda p: write_target(p, args.target_layers, template)),
                       (dense, lambda p: write_drafter(p, False, template)),
                       (centroid, lambda p: write_drafter(p, True, template))):
        if not path.exists():
            print(f"writing {path.name} ...", flush=True)
            make(path)

    settings = RuntimeSettings(n_ctx=1024, n_batch=64, n_ubatch=64, threads=args.threads)
    print(f"llama-cpp-python {info.llama_cpp_python}, patches: {', '.join(info.patches) or 'none'}; "
          f"{args.threads} threads; target: E2B width, {args.target_layers} layers, f16; drafters f16")
    rows = {"plain": measure(target, None, settings, args.prompt, args.steps, args.k, args.tokens),
            "dense": measure(target, dense, settings, args.prompt, args.steps, args.k, args.tokens)}
    if info.centroid_head:
        rows["centroid"] = measure(target, centroid, settings, args.prompt, args.steps, args.k, args.tokens)
    else:
        print("centroid head: skipped, the loaded runtime lacks our patch (gguf-mtp runtime build)")

    d = rows["dense"]
    print(f"\ntarget: 1 token {d['target_1_ms']:.1f} ms, verify of {args.k + 1} rows {d['verify_ms']:.1f} ms")
    print(f"{'drafter head':14} {'step ms':>8} {'e2e tok/s (k=' + str(args.k) + ')':>18} {'drafts kept':>12}")
    print(f"{'(none)':14} {'':>8} {rows['plain']['e2e_tok_s']:>18.1f}")
    for name in ("dense", "centroid"):
        if name in rows:
            r = rows[name]
            print(f"{name:14} {r['draft_ms']:>8.2f} {r['e2e_tok_s']:>18.1f} {r['accepted']:>12}")
    if "centroid" in rows:
        c = rows["centroid"]
        print(f"\ndrafter step: centroid head {d['draft_ms'] / c['draft_ms']:.2f}x faster than the dense head "
              f"({c['draft_ms']:.2f} vs {d['draft_ms']:.2f} ms)")
        print(f"end-to-end with random drafts (no acceptance): {c['e2e_tok_s'] / d['e2e_tok_s']:.2f}x")
        print(f"\nmodeled from the measured costs, k={args.k} (tokens/s, centroid vs dense):")
        for alpha in (0.5, 0.7, 0.9):
            tc = modeled_tok_s(alpha, args.k, c["draft_ms"], c["verify_ms"])
            td = modeled_tok_s(alpha, args.k, d["draft_ms"], d["verify_ms"])
            print(f"  acceptance {alpha:.1f}: {tc:.1f} vs {td:.1f} ({tc / td:.2f}x); target alone "
                  f"{1000 / d['target_1_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
