"""What one generation did: drafts proposed and kept, by position, and where the time went.

Invariant: ``tokens == accepted + bonus`` — every emitted token is either a kept draft or a token the target
sampled itself (the first one after the prompt, and one per round: the correction or the token after the last
kept draft). ``accepted`` counts kept drafts that were emitted (a stop token or the token limit can cut a round
short); ``proposed`` counts every draft verified. Under a grammar, drafts it rejects are cut before verification:
``grammar_cut`` counts them (they are not in ``proposed``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    rounds: int = 0  # target verify batches after the prompt
    proposed: int = 0
    accepted: int = 0
    bonus: int = 0
    tokens: int = 0
    proposed_by_position: list[int] = field(default_factory=list)  # [i]: rounds that drafted a token at i
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: rounds that kept the draft at i
    k_histogram: dict[int, int] = field(default_factory=dict)  # draft length -> rounds
    grammar_cut: int = 0  # drafts the request's grammar rejected before verification (never verified)
    prefill_tokens: int = 0  # prompt tokens decoded (a reused cache prefix is not counted)
    reused_tokens: int = 0  # prompt tokens found in the cache
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    generate_time: float = 0.0  # wall time after the prompt, drafting and verifying included
    stop_reason: str = ""  # eog | stop | max_tokens | context (| cancelled: the batched scheduler)
    stop_token: int | None = None  # the end-of-generation / stop token that ended it (not emitted)

    def record_round(self, k: int, kept: int) -> None:
        """A verify round with k drafts of which the first ``kept`` matched (before any stop cut)."""
        self.rounds += 1
        self.proposed += k
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        grow = k - len(self.proposed_by_position)
        if grow > 0:
            self.proposed_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(k):
            self.proposed_by_position[i] += 1
        for i in range(kept):
            self.accepted_by_position[i] += 1

    def add(self, other: Stats) -> None:
        """Add another generation's counts and times (totals over requests: a server's metrics)."""
        for name in ("rounds", "proposed", "accepted", "bonus", "tokens", "grammar_cut", "prefill_tokens",
                     "reused_tokens", "prefill_time", "draft_time", "verify_time", "generate_time"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.proposed_by_position, other.proposed_by_position),
                             (self.accepted_by_position, other.accepted_by_position)):
            mine += [0] * (len(theirs) - len(mine))
            for i, v in enumerate(theirs):
                mine[i] += v
        for k, v in other.k_histogram.items():
            self.k_histogram[k] = self.k_histogram.get(k, 0) + v

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify round (kept drafts + the target's own token): 1.0 means drafting never helped."""
        return (self.tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.generate_time if self.generate_time > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_time if self.prefill_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["k_histogram"] = {str(k): v for k, v in sorted(self.k_histogram.items())}
        for name in ("acceptance_rate", "mean_accepted_length", "tokens_per_second", "prefill_tokens_per_second"):
            d[name] = round(getattr(self, name), 4)
        for name in ("prefill_time", "draft_time", "verify_time", "generate_time"):
            d[name] = round(d[name], 6)
        return d
