"""The draft-length chooser on injected costs and acceptance."""

from __future__ import annotations

import pytest

from gguf_mtp.runtime.adaptive import AdaptiveK, FixedK, VerifyCost, best_k, expected_tokens


def linear(base: float, per_row: float):
    return lambda n: base + per_row * (n - 1)


@pytest.mark.parametrize("accept,k,want", [
    ([], 0, 1.0),
    ([1.0], 3, 4.0),
    ([0.5], 2, 1.75),
    ([0.8, 0.5, 0.0], 3, 1 + 0.8 + 0.4 + 0.0),
])
def test_expected_tokens(accept, k, want):
    assert expected_tokens(accept, k) == pytest.approx(want)


@pytest.mark.parametrize("accept,t_draft,verify,cap,want", [
    ([0.0] * 8, 0.1, linear(1.0, 0.05), 8, 0),  # drafts never kept: drafting cannot pay
    ([0.9] * 8, 0.9, linear(1.0, 0.5), 8, 0),  # a drafter as slow as the target: cannot pay
    ([1.0] * 8, 0.01, linear(1.0, 0.05), 8, 8),  # an oracle with cheap verify rows: the cap
    ([1.0] * 8, 0.01, linear(1.0, 0.05), 5, 5),
    ([0.7] * 8, 0.05, linear(1.0, 0.05), 8, 4),  # in between (expected tokens saturate at 1/(1-a))
])
def test_best_k(accept, t_draft, verify, cap, want):
    assert best_k(accept, t_draft, verify, cap) == want


def feed(chooser: AdaptiveK, rounds: int, kept_of) -> list[int]:
    ks = []
    for _ in range(rounds):
        k = chooser.choose(100)
        ks.append(k)
        chooser.observe(k, kept_of(k), 0.0, 0.0)
    return ks


def test_oracle_drives_adaptive_to_its_cap():
    chooser = AdaptiveK(6, t_draft=0.01, t_verify=linear(1.0, 0.05))
    ks = feed(chooser, 30, lambda k: k)
    assert ks[-10:] == [6] * 10


def test_useless_drafts_drive_adaptive_to_zero_with_backing_off_probes():
    chooser = AdaptiveK(6, t_draft=0.1, t_verify=linear(1.0, 0.1), probe_every=8)
    ks = feed(chooser, 400, lambda k: 0)
    probes = [i for i, k in enumerate(ks) if k == 1 and i > 5]
    assert set(ks[5:]) == {0, 1}
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:4] == [16, 32, 64, 128]  # the wait doubles after each failed probe


def test_adaptive_recovers_when_drafts_start_agreeing():
    chooser = AdaptiveK(6, t_draft=0.01, t_verify=linear(1.0, 0.05), probe_every=4)
    feed(chooser, 40, lambda k: 0)
    ks = feed(chooser, 120, lambda k: k)
    assert ks[-5:] == [6] * 5


def test_limit_caps_the_choice():
    chooser = AdaptiveK(6, t_draft=0.01, t_verify=linear(1.0, 0.05))
    feed(chooser, 20, lambda k: k)
    assert chooser.choose(2) == 2 and chooser.choose(0) == 0
    assert FixedK(4).choose(3) == 3 and FixedK(4).choose(10) == 4


def test_measured_costs_are_learned():
    """Without injected costs: start at k=3, then learn drafter and verify costs from what rounds report."""
    chooser = AdaptiveK(8)
    assert chooser.choose(100) == 3
    for _ in range(50):
        k = chooser.choose(100)
        chooser.observe(k, 0, 0.5 * k, 1.0 + 0.1 * k)  # drafter step = half a target step, nothing kept
    assert chooser.draft_cost() == pytest.approx(0.5)
    assert chooser.choose(100) in (0, 1)  # 1 only as a probe


def test_verify_cost_is_robust_to_stalls():
    """Recent minimum per batch size (a stall does not count), a line where unmeasured."""
    cost = VerifyCost()
    for t in (1.0, 5.0, 1.1):
        cost.observe(1, t)
    cost.observe(4, 1.3)
    assert cost(1) == pytest.approx(1.0) and cost(4) == pytest.approx(1.3) and cost(7) == pytest.approx(1.6)
    for _ in range(8):  # old measurements leave the window
        cost.observe(1, 1.2)
    assert cost(1) == pytest.approx(1.2)
    assert VerifyCost({1: 2.0, 3: 3.0})(2) == pytest.approx(2.5)


def test_one_slow_plain_step_does_not_lock_in_drafting():
    chooser = AdaptiveK(6, probe_every=8)
    ks = []
    for r in range(200):
        k = chooser.choose(100)
        ks.append(k)
        stall = 50.0 if r == 60 else 0.0
        chooser.observe(k, 0, 0.5 * k, 1.0 + 0.1 * k + stall)  # useless drafts; one stalled round
    assert ks[-40:].count(0) >= 34


def test_a_stalled_measurement_does_not_rule_a_draft_length_out():
    """Measured costs where every k up to the cap pays; the first round at k=4 stalls. Exploring the best k's
    neighbours re-measures it, and the chooser still climbs to the cap (without that it stays at 3 for good)."""
    chooser = AdaptiveK(8)
    ks: list[int] = []
    stalled = False
    for _ in range(300):
        k = chooser.choose(100)
        ks.append(k)
        stall = 50.0 if k == 4 and not stalled else 0.0
        stalled = stalled or k == 4
        chooser.observe(k, k, 0.05 * k, 1.0 + 0.05 * (k + 1) + stall)  # every draft kept
    assert stalled
    assert ks[-40:].count(8) >= 36, ks[-40:]
