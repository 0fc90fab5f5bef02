"""``GET /metrics``: Prometheus text format (version 0.0.4), written by hand (a dozen series need no library).

Engine-side numbers (slots, queue, totals, acceptance by draft position) come from the scheduler's
``snapshot()``; the server adds what only it sees: HTTP requests by route and status, tokens per second over a
sliding window, and time to first token.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

WINDOW_S = 10.0  # tokens/s is measured over this many seconds

ENGINE_SERIES = (  # name, type, help, value from the snapshot
    ("slots", "gauge", "Sequences the engine decodes together (--parallel).", lambda s: s.slots),
    ("slots_busy", "gauge", "Slots holding a running request.", lambda s: s.busy),
    ("queue_depth", "gauge", "Requests waiting for a slot.", lambda s: s.queued),
    ("queue_capacity", "gauge", "Requests that may wait before the server answers 503.", lambda s: s.max_queue),
    ("requests_finished_total", "counter", "Requests the engine finished (any reason).", lambda s: s.requests),
    ("generated_tokens_total", "counter", "Tokens generated.", lambda s: s.stats.tokens),
    ("prompt_tokens_total", "counter", "Prompt tokens decoded (cached ones not counted).",
     lambda s: s.stats.prefill_tokens),
    ("cached_prompt_tokens_total", "counter", "Prompt tokens found in a slot's cache.", lambda s: s.stats.reused_tokens),
    ("verify_rounds_total", "counter", "Target verify steps after the prompt.", lambda s: s.stats.rounds),
    ("draft_proposed_total", "counter", "Draft tokens verified.", lambda s: s.stats.proposed),
    ("draft_accepted_total", "counter", "Draft tokens kept.", lambda s: s.stats.accepted),
)
PREFIX = "gguf_mtp_"


class Metrics:
    """What the HTTP side counts; thread-safe (handlers and the engine thread's sinks both report)."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._http: Counter[tuple[str, int]] = Counter()
        self._tokens: deque[tuple[float, int]] = deque()
        self._ttft_sum, self._ttft_count = 0.0, 0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self._http[(route, status)] += 1

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._tokens.append((now, n))
            self._trim(now)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft_sum += seconds
            self._ttft_count += 1

    def _trim(self, now: float) -> None:
        while self._tokens and self._tokens[0][0] < now - self.window:
            self._tokens.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._tokens) / self.window

    def render(self, snapshot: Any) -> str:
        lines: list[str] = []

        def series(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}"])
            lines.extend(f"{PREFIX}{name}{labels} {value:g}" for labels, value in samples)

        series("tokens_per_second", "gauge", f"Tokens generated per second over the last {self.window:g} s.",
               [("", self.tokens_per_second())])
        for name, kind, help, value in ENGINE_SERIES:
            series(name, kind, help, [("", value(snapshot))])
        st = snapshot.stats
        proposed, accepted = st.proposed_by_position, st.accepted_by_position
        for name, kind, help, values in (
            ("draft_proposed_by_position_total", "counter", "Rounds that drafted a token at this position.",
             proposed),
            ("draft_accepted_by_position_total", "counter", "Rounds that kept the draft at this position.", accepted),
            ("draft_acceptance_by_position", "gauge", "Kept / drafted at this position since the start.",
             [a / p if p else 0.0 for p, a in zip(proposed, accepted)]),
        ):
            series(name, kind, help, [(f'{{position="{i}"}}', v) for i, v in enumerate(values)])
        with self._lock:
            http = sorted(self._http.items())
            ttft = [("_sum", self._ttft_sum), ("_count", self._ttft_count)]
        series("http_requests_total", "counter", "HTTP requests by route and status.",
               [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in http])
        lines.extend([f"# HELP {PREFIX}time_to_first_token_seconds Seconds from a request's arrival to its first "
                      f"token.", f"# TYPE {PREFIX}time_to_first_token_seconds summary"])
        lines.extend(f"{PREFIX}time_to_first_token_seconds{suffix} {v:g}" for suffix, v in ttft)
        return "\n".join(lines) + "\n"
