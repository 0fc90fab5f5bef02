"""Choosing the draft length k each round (0 = plain decoding), to maximize expected tokens per second.

With a_i the chance that draft i is kept given drafts 0..i-1 were, a round with k drafts yields
``1 + a_0 + a_0 a_1 + ... + a_0...a_{k-1}`` tokens on average and costs ``k * t_draft + t_verify(k + 1)``.
``best_k`` picks the k with the best ratio; ``AdaptiveK`` feeds it running (exponentially decayed) acceptance by
position and measured costs. ``FixedK`` is ``--draft-max K``. ``BatchAdaptiveK`` makes the same choice for the
sequences of a batched round (scheduler.py), on the batch's costs.

Timing noise on a shared machine is one-sided (a stall only adds time) and a single slow k=0 step would otherwise
make drafting look cheap until k=0 is tried again, so costs are the minimum of recent measurements. (A batch of
more rows can really be cheaper: llama.cpp's CPU matmul for one row is slower than for two.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence

START_K = 3  # llama.cpp's default draft length: where to begin before anything is measured
RECHECK_ZERO = 4  # while not drafting, re-run the choice every 4th round (only step costs change meanwhile)
EXPLORE_EVERY = 8  # with measured costs, every 8th drafting round tries a neighbour of the best k (above, then
# below): costs are the minimum of recent measurements of each k, so one stalled measurement of k+1 would rule
# it out for good if it were never measured again; near the best k the rate is flat, so a neighbour costs little


def expected_tokens(accept: Sequence[float], k: int) -> float:
    """Mean tokens a round with k drafts emits (kept drafts + the target's own token)."""
    return 1.0 + sum(_reach(accept, k))


def best_k(accept: Sequence[float], t_draft: float, t_verify: Callable[[int], float], cap: int) -> int:
    """The k in 0..cap with the most expected tokens per second (ties: the smaller k)."""
    best, best_rate, tokens, run = 0, 1.0 / t_verify(1), 1.0, 1.0
    for k in range(1, cap + 1):
        run *= accept[min(k - 1, len(accept) - 1)] if len(accept) else 0.0
        tokens += run
        rate = tokens / (k * t_draft + t_verify(k + 1))
        if rate > best_rate:
            best, best_rate = k, rate
    return best


class FixedK:
    """Always draft k tokens (as llama-server's --spec-draft-n-max does)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, limit: int) -> int:
        return min(self.k, limit)

    def observe(self, k: int, kept: int, draft_time: float, verify_time: float) -> None:
        pass


class RecentMin:
    """The minimum of the last ``window`` measurements."""

    def __init__(self, window: int = 8) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def __bool__(self) -> bool:
        return bool(self.values)

    def get(self) -> float:
        return min(self.values)


class VerifyCost:
    """Time of a target batch of n rows: recent minima where measured, a least-squares line elsewhere."""

    def __init__(self, fixed: Mapping[int, float] | Callable[[int], float] | None = None, window: int = 8) -> None:
        self.fixed = fixed
        self.window = window
        self.recent: dict[int, RecentMin] = {}
        self.est: dict[int, float] = dict(fixed) if isinstance(fixed, Mapping) else {}
        self._line: tuple[float, float] | None = None  # (intercept, slope)
        self._refit()

    def observe(self, n: int, seconds: float) -> None:
        self.recent.setdefault(n, RecentMin(self.window)).add(seconds)
        t = self.recent[n].get()
        if self.est.get(n) != t:
            self.est[n] = t
            self._refit()

    def _refit(self) -> None:
        if len(self.est) < 2:
            self._line = None
            return
        ns, ts = list(self.est), list(self.est.values())
        mn, mt = sum(ns) / len(ns), sum(ts) / len(ts)
        var = sum((n - mn) ** 2 for n in ns)
        slope = max(sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / var, 0.0)
        self._line = (mt - slope * mn, slope)

    def __call__(self, n: int) -> float:
        if callable(self.fixed):
            return self.fixed(n)
        if not self.est:
            return 1.0 + 0.1 * (n - 1)  # relative units until something is measured
        t = self.est.get(n)
        if t is not None:
            return t
        if self._line is None:
            (n0, t0), = self.est.items()
            return t0 * (1.0 + 0.1 * (n - n0))  # a verify row costs ~10% of a step until measured
        return max(self._line[0] + self._line[1] * n, 1e-9)

    def slope(self) -> float:
        """Seconds one more row adds: the line's slope (10% of a one-row batch until two sizes are measured)."""
        if callable(self.fixed):
            return max(self.fixed(2) - self.fixed(1), 0.0)
        return self._line[1] if self._line is not None else 0.1 * self(1)


class PositionAcceptance:
    """Decayed counts of rounds that reached draft position i and of those that kept the draft there."""

    def __init__(self, cap: int, decay: float = 0.95, prior: tuple[float, float] = (1.0, 1.0)) -> None:
        self.decay = decay
        self.prior = prior
        self.tried = [0.0] * cap  # decayed counts of rounds that reached position i
        self.kept = [0.0] * cap  # ... and kept the draft there

    def observe(self, k: int, kept: int) -> None:
        """A round with k drafts of which the first ``kept`` matched."""
        for i in range(min(kept + 1, k)):  # positions whose fate we learned
            self.tried[i] = self.tried[i] * self.decay + 1.0
            self.kept[i] = self.kept[i] * self.decay + (1.0 if i < kept else 0.0)

    def estimate(self) -> list[float]:
        """Estimated a_i per position; untried positions inherit the deepest tried one's estimate."""
        a, b = self.prior
        est = [(kept + a) / (tried + a + b) for kept, tried in zip(self.kept, self.tried)]
        deepest = max((i for i, t in enumerate(self.tried) if t > 0), default=None)
        if deepest is not None:
            est[deepest + 1:] = [est[deepest]] * (len(est) - deepest - 1)
        return est


class AdaptiveK:
    """Pick k each round from acceptance by position and measured costs.

    ``t_draft`` / ``t_verify`` fix the costs instead of measuring them (tests, or a plan that knows them).
    After ``probe_every`` rounds at k=0 it drafts one token to notice when drafts start to agree again; each
    probe that fails doubles the wait (up to 16x), a kept draft resets it. With measured costs, every
    ``EXPLORE_EVERY``-th drafting round tries a neighbour of the best k to keep the costs around it measured.
    """

    def __init__(self, cap: int, *, decay: float = 0.95, prior: tuple[float, float] = (1.0, 1.0),
                 probe_every: int = 16, t_draft: float | None = None,
                 t_verify: Mapping[int, float] | Callable[[int], float] | None = None) -> None:
        self.cap = cap
        self.probe_every = probe_every
        self.positions = PositionAcceptance(cap, decay, prior)
        self.fixed_draft = t_draft
        self.t_draft = RecentMin(16)
        self.t_verify = VerifyCost(t_verify)
        self.rounds = 0
        self.zero_run = 0
        self.probe_gap = probe_every
        self.probing = False
        self.drafting = 0  # drafting rounds chosen (EXPLORE_EVERY)

    def acceptance(self) -> list[float]:
        return self.positions.estimate()

    def draft_cost(self) -> float:
        if self.fixed_draft is not None:
            return self.fixed_draft
        if self.t_draft:
            return self.t_draft.get()
        return 0.3 * self.verify_cost(1)  # an MTP step is a small fraction of a target step

    def verify_cost(self, n: int) -> float:
        return self.t_verify(n)

    def measured(self) -> bool:
        """Whether costs are measured (then neighbours of the best k are explored now and then)."""
        return self.fixed_draft is None and self.t_verify.fixed is None

    def choose(self, limit: int) -> int:
        cap = min(self.cap, limit)
        if cap <= 0:
            return 0
        if self.rounds == 0 and self.fixed_draft is None:
            return min(START_K, cap)
        if self.zero_run % RECHECK_ZERO:  # k=0 rounds teach nothing about acceptance: recheck now and then
            k = 0
        else:
            k = best_k(self.acceptance(), self.draft_cost(), self.verify_cost, cap)
        self.probing = False
        if k == 0:
            self.zero_run += 1
            if self.zero_run >= self.probe_gap:
                self.zero_run = 0
                self.probing = True
                return 1
            return 0
        self.zero_run = 0
        if self.measured():
            self.drafting += 1
            if self.drafting % EXPLORE_EVERY == 0:
                k = min(max(k + (1 if self.drafting // EXPLORE_EVERY % 2 else -1), 1), cap)
        return k

    def observe(self, k: int, kept: int, draft_time: float, verify_time: float) -> None:
        """One round: k drafts, the first ``kept`` matched; measured seconds of drafting and of verifying."""
        self.observe_outcome(kept)
        self.positions.observe(k, kept)
        if k > 0 and self.fixed_draft is None:
            self.t_draft.add(draft_time / k)
        if self.t_verify.fixed is None:
            self.t_verify.observe(k + 1, verify_time)

    def observe_outcome(self, kept: int) -> None:
        """A round chosen by ``choose`` ended with ``kept`` drafts kept (a kept probe resumes drafting)."""
        self.rounds += 1
        if kept > 0:
            self.probe_gap = self.probe_every
        elif self.probing:
            self.probe_gap = min(2 * self.probe_gap, 16 * self.probe_every)


class BatchAdaptiveK(AdaptiveK):
    """The draft length of a batched round for its adaptive sequences, from their acceptance and the batch's costs.

    A round where n sequences draft k tokens each costs k drafter steps of n rows and one target decode of
    ``other + n (k + 1)`` rows (``other``: rows of sequences with a fixed k), and yields the sum of the sequences'
    expected tokens. Divided by n that is ``AdaptiveK``'s trade-off for one sequence, so its rule (start, k = 0
    with probes, neighbour exploration) runs unchanged on: acceptance = the per-position ratios of the sequences'
    mean chance to keep drafts 0..i; draft cost = a drafter step / n; verify cost of k + 1 rows = the batch
    decode / n. The costs are measured on the batched decodes (``observe_costs``); k = 0 switches drafting off
    for the whole batch. ``trim`` then shortens, per sequence, drafts that yield less than their rows cost.
    """

    def __init__(self, cap: int, *, probe_every: int = 16) -> None:
        super().__init__(cap, probe_every=probe_every)
        self.decode_cost = VerifyCost()  # seconds of a target decode of n rows (all sequences of a round)
        self.step_cost = VerifyCost()  # seconds of a drafter step of n rows
        self._reach: list[float] = [0.0] * cap  # mean over the round's sequences of P(drafts 0..i all kept)
        self._n, self._other = 1, 0

    def choose_batch(self, acceptances: Sequence[Sequence[float]], other_rows: int, limit: int) -> int:
        """k for the sequences whose per-position acceptance estimates are ``acceptances``."""
        self._n, self._other = max(len(acceptances), 1), other_rows
        reach = [_reach(a, self.cap) for a in acceptances] or [[0.0] * self.cap]
        self._reach = [sum(col) / len(reach) for col in zip(*reach)]
        return self.choose(limit)

    def acceptance(self) -> list[float]:
        out, before = [], 1.0
        for r in self._reach:
            out.append(r / before if before > 0 else 0.0)
            before = r
        return out

    def draft_cost(self) -> float:
        if self.step_cost.est:
            return self.step_cost(self._n) / self._n
        return 0.3 * self.verify_cost(1)

    def verify_cost(self, n: int) -> float:
        return self.decode_cost(self._other + self._n * n) / self._n

    def measured(self) -> bool:
        return True

    def trim(self, acceptance: Sequence[float], k: int) -> int:
        """Drafts worth verifying for one sequence when the round drafts k: the first always (its acceptance is
        learnt from it), each further one while its chance to be kept exceeds the tokens its drafter and verify
        rows cost at the round's rate."""
        if k <= 1 or self.probing:
            return k
        rate = expected_tokens(self.acceptance(), k) / (k * self.draft_cost() + self.verify_cost(k + 1))
        row = (self.decode_cost.slope() + self.step_cost.slope()) * rate  # tokens one more row forgoes
        reach = _reach(acceptance, k)
        return max(1, sum(1 for r in reach if r >= row))

    def observe_costs(self, steps: Sequence[tuple[int, float]], rows: int, verify_time: float) -> None:
        """A round's measured costs: (rows, seconds) of each drafter step; the target decode of ``rows`` rows."""
        for n, t in steps:
            self.step_cost.observe(n, t)
        self.decode_cost.observe(rows, verify_time)


def _reach(acceptance: Sequence[float], n: int) -> list[float]:
    """P(drafts 0..i all kept) for i < n."""
    out, run = [], 1.0
    for i in range(n):
        run *= acceptance[min(i, len(acceptance) - 1)] if len(acceptance) else 0.0
        out.append(run)
    return out
