#!/usr/bin/env python3
"""Does MTP pay more on JSON than on prose? Both pairs, side by side in one run.

    python bench/bench_structured.py [-n 128] [--repeats 2] [--write-docs]

For the trained pair (gguf_mtp/data/trained-pair, converted to F16 in the workdir) and the speed pair
(.work/speed/pair, built on first use), greedy, same prompts: free prose (``-n`` tokens, through end-of-text)
and JSON under a schema (a list of records, until the grammar completes), each as the target alone, MTP at k = 3,
MTP adaptive, and k = 3 with the drafter not steered by the grammar (what the runtime did before steering: its
drafts are cut at the first token the grammar rejects). Per row: tokens/s and the ratio to the target alone on
the same kind of output, drafts verified / kept / cut by the grammar, tokens per target step, and whether the
output equals the target alone's. Each prompt's fastest of ``--repeats`` runs. ``--write-docs`` rewrites the
structured section of docs/bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docsection import write_section  # noqa: E402

from gguf_mtp.bench import TRAINED_PAIR, heldout_prompts  # noqa: E402
from gguf_mtp.runtime.adaptive import AdaptiveK, FixedK  # noqa: E402
from gguf_mtp.runtime.drafters import MTPDrafter  # noqa: E402
from gguf_mtp.runtime.engine import Engine  # noqa: E402
from gguf_mtp.runtime.grammar import json_schema_grammar  # noqa: E402
from gguf_mtp.runtime.loop import generate  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

DOCS = ROOT / "docs" / "bench.md"
ADAPTIVE_CAP = 8
SCHEMA = {  # records with repeated keys: the structure a drafter can predict once it is steered
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z_]{1,12}$"}, "count": {"type": "integer"},
                       "ok": {"type": "boolean"}},
        "required": ["name", "count", "ok"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}
MODES = ("target", "k=3", "adaptive", "k=3 unsteered")


@dataclass
class Row:
    pair: str
    kind: str  # prose | json
    mode: str
    tokens: int = 0
    seconds: float = 0.0
    proposed: int = 0
    accepted: int = 0
    cut: int = 0
    rounds: int = 0
    ends: int = 0  # generations ended by an end token (a target step produced it, not emitted)
    outputs: list[list[int]] = field(default_factory=list)
    ratio: float = 0.0
    same: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def per_step(self) -> float:
        """Tokens per target step: the prompt's step gives the first token, each round the rest (and the end
        token, counted here though not emitted)."""
        return (self.tokens + self.ends) / (self.rounds + len(self.outputs))


def trained_pair(workdir: Path) -> tuple[Path, Path]:
    from gguf_mtp.export import convert

    workdir.mkdir(parents=True, exist_ok=True)
    target, drafter = workdir / "target-F16.gguf", workdir / "drafter-F16.gguf"
    if not (target.exists() and drafter.exists()):
        convert(TRAINED_PAIR / "target", target)
        convert(TRAINED_PAIR / "drafter", drafter, target=target)
    return target, drafter


def speed_pair(workdir: Path) -> tuple[Path, Path]:
    target, drafter = workdir / sp.TARGET_FILE, workdir / sp.DRAFTER_FILE
    if not (target.exists() and drafter.exists()):
        sp.make_speed_pair(workdir, force=True)
    return target, drafter


def runners(eng: Engine, n: int, gbnf: str) -> dict[tuple[str, str], Callable]:
    """(kind, mode) -> run(prompt) -> Generation. Adaptive keeps one chooser per kind across prompts."""
    unsteered = MTPDrafter(eng)
    choosers = {"target": lambda: FixedK(0), "k=3": lambda: FixedK(3), "k=3 unsteered": lambda: FixedK(3)}
    out = {}
    for kind in ("prose", "json"):
        learned = AdaptiveK(ADAPTIVE_CAP)
        args = {"grammar": gbnf, "max_tokens": 4 * n} if kind == "json" else {"ignore_eog": True, "max_tokens": n}
        for mode in MODES:
            if mode == "k=3 unsteered" and kind == "prose":
                continue
            extra = {"drafter": lambda req: unsteered(dataclasses.replace(req, grammar=None))} \
                if mode == "k=3 unsteered" else {}
            make = (lambda learned=learned: learned) if mode == "adaptive" else choosers[mode]
            out[(kind, mode)] = lambda p, make=make, extra=extra, args=args: generate(
                eng, p, chooser=make(), **args, **extra)
    return out


def bench_pair(name: str, files: tuple[Path, Path], prompts: list[str], settings: RuntimeSettings, n: int,
               repeats: int) -> list[Row]:
    gbnf = json_schema_grammar(SCHEMA)
    rows: dict[tuple[str, str], Row] = {}
    with Engine.load(*files, settings, k_max=ADAPTIVE_CAP) as eng:
        encoded = [eng.tokenize(p) for p in prompts]
        runs = runners(eng, n, gbnf)
        for run in runs.values():  # warm-up: fault the weights in, let llama.cpp build its graphs
            run(encoded[0])
        for p in encoded:
            for (kind, mode), run in runs.items():
                best = min((run(p) for _ in range(repeats)), key=lambda g: g.stats.generate_time)
                r = rows.setdefault((kind, mode), Row(name, kind, mode))
                s = best.stats
                r.tokens, r.seconds, r.rounds = r.tokens + s.tokens, r.seconds + s.generate_time, r.rounds + s.rounds
                r.proposed, r.accepted, r.cut = r.proposed + s.proposed, r.accepted + s.accepted, r.cut + s.grammar_cut
                r.ends += s.stop_reason in ("eog", "stop")
                r.outputs.append(best.tokens)
    for r in rows.values():
        base = rows[(r.kind, "target")]
        r.ratio = r.tps / base.tps if base.tps else 0.0
        r.same = sum(a == b for a, b in zip(r.outputs, base.outputs))
        print(f"{name:<8} {r.kind:<5} {r.mode:<14} {r.tps:8.1f} tok/s {r.ratio:5.2f}x  acceptance {r.acceptance:.2f} "
              f"(verified {r.proposed}, kept {r.accepted}, cut {r.cut})  tokens/step {r.per_step:.2f}  "
              f"same {r.same}/{len(r.outputs)}")
    return list(rows.values())


def markdown(rows: list[Row], n: int, repeats: int, prompts: dict[str, int], threads: dict[str, int]) -> str:
    lines = [
        f"Greedy; prose: {n} tokens per prompt (end-of-text ignored); JSON: until the schema's grammar completes "
        f"(a list of 3 records `{{name, count, ok}}`); fastest of {repeats} per prompt; prompts: "
        + ", ".join(f"{k} {v} ({threads[k]} thread(s))" for k, v in prompts.items())
        + f"; {platform.machine()}, flash attention off, f32 KV cache. Ratios are against the target alone on the "
        "same kind of output, in the same run. `k=3 unsteered`: the drafter not steered by the grammar (drafts cut "
        "at the first token it rejects: the runtime before steering).",
        "",
        "| pair | output | mode | tokens/s | vs target alone | acceptance | drafts verified / kept / cut | "
        "tokens per target step | same output |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        acc = f"{r.acceptance:.2f}" if r.mode != "target" else "-"
        drafts = f"{r.proposed} / {r.accepted} / {r.cut}" if r.mode != "target" else "-"
        lines.append(f"| {r.pair} | {r.kind} | {r.mode} | {r.tps:.1f} | {r.ratio:.2f}x | {acc} | {drafts} | "
                     f"{r.per_step:.2f} | {r.same}/{len(r.outputs)} |")
    lines.append("")
    for pair in dict.fromkeys(r.pair for r in rows):
        get = {(r.kind, r.mode): r for r in rows if r.pair == pair}
        for mode in ("k=3", "adaptive"):
            j, p = get[("json", mode)].ratio, get[("prose", mode)].ratio
            lines.append(f"- {pair}, {mode}: JSON {j:.2f}x vs prose {p:.2f}x (JSON pays "
                         f"{'more' if j > p else 'less'}: {j / p:.2f})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work")
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads for the speed pair (the trained pair: 1)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    base = RuntimeSettings(n_ctx=1024, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    pairs = {  # name -> (files, prompts, threads)
        "trained": (trained_pair(args.workdir / "bench-trained"), heldout_prompts(4), 1),
        "speed": (speed_pair(args.workdir / "speed" / "pair"), sp.prompts(3), args.threads),
    }
    rows = []
    for name, (files, prompts, threads) in pairs.items():
        rows += bench_pair(name, files, prompts, base.replace(threads=threads), args.tokens, args.repeats)
    md = markdown(rows, args.tokens, args.repeats, {k: len(v[1]) for k, v in pairs.items()},
                  {k: v[2] for k, v in pairs.items()})
    print(md)
    if args.write_docs:
        write_section(DOCS, "structured", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
