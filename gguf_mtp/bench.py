"""Side-by-side speed of a target alone and with its MTP drafter: the library behind ``gguf-mtp bench``.

Every mode generates the same number of tokens from the same prompts (end-of-generation ignored, so the
lengths match) and modes are interleaved prompt by prompt, so drift in machine load hits them alike; each
timing is the fastest of ``repeats`` runs. Tokens/s is generated tokens over generation time (the prompt's
prefill is not counted). One engine serves every mode: the target alone is the same engine with drafting off
(loading a 31B target twice would not fit a 24 GB card; what the drafter's presence costs a plain step is
reading one hidden-state row per token). Modes:

- ``target``: plain decoding (the baseline every speed-up is relative to);
- ``k=K``: MTP with a fixed draft length (llama-server's ``--spec-draft-n-max K``);
- ``adaptive``: MTP with the draft length chosen each round (``runtime.adaptive.AdaptiveK``);
- ``oracle k=K`` / ``oracle adaptive`` (opt-in): drafts are the target's own greedy output, so every draft is
  kept and drafting costs nothing: the ceiling any drafter could reach on this machine (greedy only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GgufMtpError
from .settings import RuntimeSettings

DEFAULT_KS = (1, 2, 3, 4)
ADAPTIVE_CAP = 8  # draft lengths the adaptive chooser may pick (RuntimeSettings.draft_cap's default)
TRAINED_PAIR = Path(__file__).with_name("data") / "trained-pair"
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPE = re.compile(r"\\([nt\\])")
Run = Callable[[list[int], list[int], int], Any]  # (prompt, target-alone output, max tokens) -> Generation


# --- prompts -----------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line; ``\\n``, ``\\t`` and ``\\\\`` escapes are decoded (multi-line prompts)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GgufMtpError(f"{p}: expected UTF-8 text, one prompt per line") from None
    prompts = [_ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], line) for line in raw.splitlines() if line.strip()]
    if not prompts:
        raise GgufMtpError(f"{p}: no prompts (expected one prompt per non-empty line)")
    return prompts


def heldout_prompts(n: int = 4, text: str | None = None) -> list[str]:
    """``n`` prompts from the trained pair's held-out Python text: a function's first line and the line after.

    Spread evenly over the file, so they come from different modules. The default prompts of ``bench`` and
    ``demo``.
    """
    text = text if text is not None else (TRAINED_PAIR / "heldout.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines[:-1]) if line.lstrip().startswith("def ") and lines[i + 1].strip()]
    if len(starts) < n:
        raise GgufMtpError(f"held-out text has {len(starts)} function definitions, {n} prompts wanted")
    picks = [starts[round(j * (len(starts) - 1) / max(n - 1, 1))] for j in range(n)]
    return ["\n".join(lines[i:i + 2]) + "\n" for i in picks]


# --- results -----------------------------------------------------------------------------------------------
@dataclass
class ModeResult:
    """One mode over every prompt (counters summed over the fastest run of each prompt)."""

    mode: str
    k: int | None  # fixed draft length (0: no drafting), None: adaptive
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    generations: int = 0
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    k_histogram: dict[int, int] = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    same_output: int | None = None  # prompts whose tokens equal the target alone's (greedy only)
    speedup: float = 0.0

    def add(self, stats: Any, tokens: list[int]) -> None:
        self.tokens += stats.tokens
        self.seconds += stats.generate_time
        self.rounds += stats.rounds
        self.generations += 1
        for i, (p, a) in enumerate(zip(stats.proposed_by_position, stats.accepted_by_position)):
            if i == len(self.proposed_by_position):
                self.proposed_by_position.append(0)
                self.accepted_by_position.append(0)
            self.proposed_by_position[i] += p
            self.accepted_by_position[i] += a
        for k, n in stats.k_histogram.items():
            self.k_histogram[k] = self.k_histogram.get(k, 0) + n
        self.outputs.append(tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        proposed = sum(self.proposed_by_position)
        return sum(self.accepted_by_position) / proposed if proposed else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Kept / drafted at each draft position (rounds that drafted that far)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target verify batch (kept drafts + the target's own token); 1.0 = drafting never helped."""
        return (self.tokens - self.generations) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "k": self.k, "tokens": self.tokens, "seconds": round(self.seconds, 6),
                "tokens_per_second": round(self.tokens_per_second, 2), "speedup": round(self.speedup, 3),
                "acceptance": round(self.acceptance, 4),
                "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position],
                "proposed_by_position": self.proposed_by_position, "accepted_by_position": self.accepted_by_position,
                "mean_accepted_length": round(self.mean_accepted_length, 3), "rounds": self.rounds,
                "k_histogram": {str(k): v for k, v in sorted(self.k_histogram.items())},
                "same_output": self.same_output}


@dataclass
class BenchResult:
    target: str
    drafter: str | None
    prompts: int
    max_tokens: int
    repeats: int
    temperature: float
    accept: str
    settings: RuntimeSettings
    modes: list[ModeResult]

    def mode(self, name: str) -> ModeResult:
        for m in self.modes:
            if m.mode == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "drafter": self.drafter, "prompts": self.prompts,
                "max_tokens": self.max_tokens, "repeats": self.repeats, "temperature": self.temperature,
                "accept": self.accept, "settings": self.settings.to_dict(),
                "modes": [m.to_dict() for m in self.modes]}


# --- running -----------------------------------------------------------------------------------------------
def run_bench(
    target: str | Path,
    drafter: str | Path | None,
    prompts: Sequence[str],
    *,
    max_tokens: int = 128,
    ks: Sequence[int] = DEFAULT_KS,
    adaptive: bool = True,
    oracle: bool = False,
    settings: RuntimeSettings | None = None,
    repeats: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    accept: str = "exact",
    chat: bool = False,
) -> BenchResult:
    """Run every mode over every prompt; speed-ups are relative to the target alone.

    ``chat`` renders each prompt as one user turn of the target's chat template (else the text is sent as is,
    after BOS). ``oracle`` adds the oracle modes (greedy only: the oracle replays the target's greedy output).
    """
    from .runtime.adaptive import AdaptiveK, FixedK
    from .runtime.chat_template import user_prompt
    from .runtime.drafters import OracleDrafter
    from .runtime.engine import Engine
    from .runtime.loop import generate
    from .runtime.sampling import SamplingParams

    if not prompts:
        raise GgufMtpError("no prompts to benchmark")
    if repeats < 1 or max_tokens < 1:
        raise GgufMtpError(f"expected repeats >= 1 and max_tokens >= 1, got {repeats} and {max_tokens}")
    if oracle and temperature > 0:
        raise GgufMtpError("the oracle replays greedy output: it needs temperature 0")
    if drafter is None and (ks or adaptive):
        raise GgufMtpError("MTP modes need a drafter")
    settings = settings or RuntimeSettings()
    k_max = max([*ks, ADAPTIVE_CAP if adaptive or oracle else 0, 1])
    sampling = SamplingParams(temperature=temperature, seed=seed)

    with Engine.load(target, drafter, settings, k_max=k_max) as eng:
        encoded = [user_prompt(eng, p) if chat else eng.tokenize(p) for p in prompts]
        need = max(map(len, encoded)) + max_tokens + 1
        if need > eng.n_ctx:
            raise GgufMtpError(f"prompt + {max_tokens} tokens need a context of {need}, settings give {eng.n_ctx}")

        def run_with(chooser: Callable[[], Any], replay: bool = False) -> Run:
            if replay:  # the oracle: replays the target's own output (greedy, exact acceptance)
                return lambda p, ref, n: generate(eng, p, n, chooser=chooser(), ignore_eog=True,
                                                  drafter=OracleDrafter(p + ref, eng.n_vocab))
            return lambda p, ref, n: generate(eng, p, n, chooser=chooser(), sampling=sampling, accept=accept,
                                              ignore_eog=True)

        modes: list[tuple[ModeResult, Run]] = [(ModeResult("target", 0), run_with(lambda: FixedK(0)))]
        modes += [(ModeResult(f"k={k}", k), run_with(lambda k=k: FixedK(k))) for k in ks]
        if adaptive:  # one chooser for the run: it keeps what it learns across prompts, as across a chat's turns
            learned = AdaptiveK(ADAPTIVE_CAP)
            modes.append((ModeResult("adaptive", None), run_with(lambda: learned)))
        if oracle:
            modes += [(ModeResult(f"oracle k={k}", k), run_with(lambda k=k: FixedK(k), replay=True)) for k in ks]
            oracle_learned = AdaptiveK(ADAPTIVE_CAP)
            modes.append((ModeResult("oracle adaptive", None), run_with(lambda: oracle_learned, replay=True)))

        for result, run in modes:  # warm-up: fault the weights in, let llama.cpp build its graphs
            if not result.mode.startswith("oracle"):
                run(encoded[0], [], 8)
        for p in encoded:
            ref: list[int] = []  # the target alone's output for this prompt (what the oracle replays)
            for result, run in modes:
                best = min((run(p, ref, max_tokens) for _ in range(repeats)), key=lambda g: g.stats.generate_time)
                result.add(best.stats, best.tokens)
                if result.mode == "target":
                    ref = best.tokens
    base = modes[0][0]
    for result, _ in modes:
        result.speedup = result.tokens_per_second / base.tokens_per_second if base.tokens_per_second else 0.0
        if temperature <= 0:
            result.same_output = sum(a == b for a, b in zip(result.outputs, base.outputs))
    return BenchResult(str(target), str(drafter) if drafter else None, len(prompts), max_tokens, repeats,
                       temperature, accept, settings, [m for m, _ in modes])


def teacher_forced_acceptance(engine: Any, tokens: Sequence[int], k: int = 3, start: int = 16,
                              stride: int = 1, stats: Any = None) -> Any:
    """Drafter acceptance on a fixed text: at every ``stride``-th position p >= ``start`` the target has read
    ``tokens[:p]``, the drafter drafts k tokens after ``tokens[p]``, and the target verifies them in one batch
    (greedy, as a round of the loop). The text, not the target's own output, decides what comes next, so the
    number measures the drafter on that text alone. Returns runtime ``Stats`` (per-position counts; ``stats``:
    add to these instead of new ones).
    """
    import numpy as np

    from .runtime.drafters import DraftRequest, MTPDrafter
    from .runtime.sampling import SamplingParams, accept_greedy
    from .runtime.stats import Stats

    if not engine.has_drafter:
        raise GgufMtpError("teacher-forced acceptance needs an engine with its drafter")
    if not 0 < start < len(tokens) - 1:
        raise GgufMtpError(f"expected 0 < start < {len(tokens) - 1}, got {start}")
    if len(tokens) + k > engine.n_ctx:
        raise GgufMtpError(f"{len(tokens)} tokens + {k} drafts do not fit the context of {engine.n_ctx}")
    drafter, stats, rng = MTPDrafter(engine), stats if stats is not None else Stats(), np.random.default_rng(0)
    engine.truncate(0)
    rows = engine.decode(tokens[:start])
    h = engine.hidden(rows - 1).copy()
    for p in range(start, len(tokens) - 1, stride):
        y = tokens[p]
        d = drafter(DraftRequest(tokens[:p + 1], p, h, k, SamplingParams(), False, rng)).tokens
        engine.decode([y, *d], outputs="all")
        kept, _ = accept_greedy(engine.logits(len(d) + 1), d)
        stats.record_round(len(d), kept)
        engine.truncate(p)
        rows = engine.decode(tokens[p:p + stride])
        h = engine.hidden(rows - 1).copy()
    engine.truncate(0)
    stats.accepted = sum(stats.accepted_by_position)  # record_round counts by position; the loop counts emitted
    return stats


def heldout_acceptance(engine: Any, text: str, k: int = 3, windows: int = 8, window: int = 256) -> Any:
    """``teacher_forced_acceptance`` over ``windows`` windows of ``window`` tokens spread evenly over ``text``
    (each starts with BOS), counts summed: the whole text is represented, not just its beginning."""
    tokens = engine.tokenize(text, add_special=False)
    if len(tokens) < window:
        raise GgufMtpError(f"the text has {len(tokens)} tokens, a window needs {window}")
    from .runtime.stats import Stats

    stats = Stats()
    for i in range(windows):
        start = (len(tokens) - window + 1) * i // max(windows - 1, 1)
        teacher_forced_acceptance(engine, [engine.bos, *tokens[start:start + window - 1]], k, stats=stats)
    return stats


def table_rows(result: BenchResult) -> list[list[str]]:
    """Mode, tokens/s, speed-up, acceptance (and by position), tokens per round, same output: for printing."""
    rows = []
    for m in result.modes:
        by_pos = " ".join(f"{a:.2f}" for a in m.acceptance_by_position) or "-"
        same = "-" if m.same_output is None else f"{m.same_output}/{result.prompts}"
        drafted = m.k != 0 or m.mode.startswith("oracle")
        rows.append([m.mode, f"{m.tokens_per_second:.1f}", f"{m.speedup:.2f}x",
                     f"{m.acceptance:.2f}" if drafted else "-", by_pos, f"{m.mean_accepted_length:.2f}", same])
    return rows


TABLE_COLUMNS = ["mode", "tok/s", "speed-up", "acceptance", "by draft position", "tokens/round", "same output"]
