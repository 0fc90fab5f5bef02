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

    python3 bench/bench_centroid_head.py [--target-layers 8] [--threads 1] [--k 3]
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
# The machine is shared: every measurement alternates between the drafters (one sample each, in turn) and reports
# medians, so a change of load hits both sides alike.

def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def _alternate(fns: dict, n: int) -> dict:
    """Median ms of each callable, sampled in turn (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            samples[name].append(_timed(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


class Bench:
    """One engine per drafter on the same target; a prompt already decoded; the first draft step's inputs."""

    def __init__(self, target: Path, drafters: dict, settings, prompt_len: int, k: int) -> None:
        from gguf_mtp.runtime.engine import Engine

        self.engines = {name: Engine.load(target, path, settings, k_max=max(k, 1)) for name, path in drafters.items()}
        eng = next(iter(self.engines.values()))
        rng = np.random.default_rng(0)
        self.prompt = [eng.bos] + rng.integers(108, 400, size=prompt_len - 1).tolist()
        self.inputs = {}
        for name, e in self.engines.items():
            e.truncate(0)
            n = e.decode(self.prompt, outputs="last")
            self.inputs[name] = (int(e.logits(1)[0].argmax()), e.hidden(n - 1).copy())

    def draft(self, name: str):
        e, (t, h) = self.engines[name], self.inputs[name]
        return lambda: e.draft_step(t, len(self.prompt), h)

    def verify(self, name: str, rows: int):
        e, (t, _) = self.engines[name], self.inputs[name]

        def run() -> None:
            e.decode([t] * rows, outputs="all")
            e.truncate(len(self.prompt))
        return run

    def generate(self, name: str, k: int, tokens: int):
        from gguf_mtp.runtime.adaptive import FixedK
        from gguf_mtp.runtime.loop import generate

        e, out = self.engines[name], {}

        def run() -> None:
            e.truncate(0)
            out["g"] = generate(e, self.prompt, tokens, chooser=FixedK(k), ignore_eog=True)
        return run, out

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def modeled_tok_s(alpha: float, k: int, draft_ms: float, verify_ms: float) -> float:
    """Expected tokens per round (1 + accepted) over its cost: k draft steps and one verify of k+1 rows."""
    per_round = (1 - alpha ** (k + 1)) / (1 - alpha)
    return 1000 * per_round / (k * draft_ms + verify_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=REPO / ".work" / "bench-centroid", help="where the GGUFs are cached")
    ap.add_argument("--target-layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (default 1: on a few shared cores the spinning workers of four contexts "
                         "fight each other)")
    ap.add_argument("--k", type=int, default=3, help="draft length of the end-to-end runs")
    ap.add_argument("--steps", type=int, default=30, help="timed samples per measurement (median)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per end-to-end run")
    ap.add_argument("--runs", type=int, default=3, help="end-to-end runs per configuration (median)")
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
    drafters = {"dense": dense}
    if info.centroid_head:
        drafters["centroid"] = centroid
    else:
        print("centroid head: skipped, the loaded runtime lacks our patch (gguf-mtp runtime build)")

    settings = RuntimeSettings(n_ctx=1024, n_batch=64, n_ubatch=64, threads=args.threads)
    print(f"llama-cpp-python {info.llama_cpp_python}, patches: {', '.join(info.patches) or 'none'}; "
          f"{args.threads} threads; target: E2B width, {args.target_layers} layers, f16; drafters f16; "
          f"medians of {args.steps} alternating samples")
    b = Bench(target, drafters, settings, args.prompt, args.k)
    try:
        step = _alternate({n: b.draft(n) for n in drafters}, args.steps)
        target_ms = _alternate({"1": b.verify("dense", 1), "k+1": b.verify("dense", args.k + 1)}, args.steps)
        runs = {"plain": b.generate("dense", 0, args.tokens)}
        runs.update({n: b.generate(n, args.k, args.tokens) for n in drafters})
        e2e_ms = _alternate({n: fn for n, (fn, _) in runs.items()}, args.runs)
        kept = {n: out["g"].stats for n, (_, out) in runs.items()}
    finally:
        b.close()

    tok_s = {n: 1000 * args.tokens / ms for n, ms in e2e_ms.items()}
    print(f"\ntarget: 1 token {target_ms['1']:.1f} ms, verify of {args.k + 1} rows {target_ms['k+1']:.1f} ms")
    print(f"{'drafter head':14} {'step ms':>8} {'e2e tok/s (k=' + str(args.k) + ')':>18} {'drafts kept':>12}")
    print(f"{'(no drafter)':14} {'':>8} {tok_s['plain']:>18.2f}")
    for n in drafters:
        print(f"{n:14} {step[n]:>8.2f} {tok_s[n]:>18.2f} {kept[n].accepted:>6}/{kept[n].proposed}")
    if "centroid" in drafters:
        print(f"\ndrafter step: centroid head {step['dense'] / step['centroid']:.2f}x faster than the dense head "
              f"({step['centroid']:.2f} vs {step['dense']:.2f} ms)")
        print(f"end-to-end, random drafts (none kept), k={args.k}: centroid {tok_s['centroid'] / tok_s['dense']:.2f}x "
              f"the dense drafter's tokens/s")
        print(f"modeled from these costs, k={args.k}: tokens/s centroid vs dense (target alone "
              f"{1000 / target_ms['1']:.2f})")
        for alpha in (0.5, 0.7, 0.9):
            tc = modeled_tok_s(alpha, args.k, step["centroid"], target_ms["k+1"])
            td = modeled_tok_s(alpha, args.k, step["dense"], target_ms["k+1"])
            print(f"  acceptance {alpha:.1f}: {tc:.2f} vs {td:.2f} ({tc / td:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
