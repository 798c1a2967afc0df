"""The DP-FedAvg privacy accountant against opacus' own RDP accountant; no mocks."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import RDPAccountant

from fedserver.privacy import PrivacyAccountant, noise_for_epsilon

DELTA = 1e-5


def run(sigma: float, q: float, rounds: int, delta: float = DELTA) -> PrivacyAccountant:
    acc = PrivacyAccountant(delta)
    for _ in range(rounds):
        acc.step(sigma, q)
    return acc


def test_no_noise_yet_is_infinite_epsilon():
    acc = PrivacyAccountant(DELTA)
    assert acc.epsilon() == math.inf
    assert acc.history == [] and acc.rounds == 0


def test_epsilon_grows_with_rounds():
    acc = PrivacyAccountant(DELTA)
    eps = []
    for _ in range(40):
        acc.step(1.1, 0.3)
        eps.append(acc.epsilon())
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert acc.history == [(1.1, 0.3, 40)] and acc.rounds == 40


def test_epsilon_falls_with_more_noise_and_rises_with_sampling_rate():
    by_sigma = [run(s, 0.2, 20).epsilon() for s in (0.7, 1.0, 1.5, 2.5)]
    assert all(b < a for a, b in zip(by_sigma, by_sigma[1:]))
    by_rate = [run(1.0, q, 20).epsilon() for q in (0.05, 0.2, 0.5, 1.0)]
    assert all(b > a for a, b in zip(by_rate, by_rate[1:]))


def test_matches_opacus_rdp_accountant_on_a_changing_history():
    ours, theirs = PrivacyAccountant(DELTA), RDPAccountant()
    phases = [(1.0, 0.3, 5), (1.2, 0.25, 3), (1.0, 0.3, 4), (0.8, 1.0, 2), (1.0, 2 / 3, 1), (1.0, 0.3, 1)]
    for sigma, q, rounds in phases:
        for _ in range(rounds):
            ours.step(sigma, q)
            theirs.step(noise_multiplier=sigma, sample_rate=q)
        assert ours.history == theirs.history
        assert ours.epsilon() == theirs.get_epsilon(delta=DELTA)  # bit for bit, not approximately
    assert ours.history == [(s, q, n) for s, q, n in phases]
    assert ours.rounds == sum(n for _, _, n in phases)


def test_full_participation_matches_the_closed_form_gaussian_rdp():
    # q = 1: RDP_a = T a / (2 sigma^2); eps = min_a RDP_a + log((a-1)/a) - (log delta + log a)/(a-1).
    sigma, rounds = 2.0, 10
    alphas = RDPAccountant.DEFAULT_ALPHAS
    expect = min(rounds * a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(DELTA) + math.log(a)) / (a - 1)
                 for a in alphas)
    assert run(sigma, 1.0, rounds).epsilon() == pytest.approx(expect, rel=1e-12)


def test_json_round_trip_keeps_epsilon_and_keeps_counting():
    acc = PrivacyAccountant(1e-6)
    for sigma, q in [(1.0, 0.3)] * 4 + [(1.3, 0.2)] * 2:
        acc.step(sigma, q)
    text = acc.to_json()
    json.loads(text)  # plain JSON an operator can read
    back = PrivacyAccountant.from_json(text)
    assert back.delta == acc.delta and back.history == acc.history
    assert back.epsilon() == acc.epsilon()
    # a restarted coordinator keeps counting exactly as an uninterrupted one
    acc.step(1.3, 0.2)
    back.step(1.3, 0.2)
    assert back.history == acc.history and back.epsilon() == acc.epsilon()
    assert PrivacyAccountant.from_json(PrivacyAccountant(0.01).to_json()).epsilon() == math.inf


@pytest.mark.parametrize("target,q,rounds", [(8.0, 0.3, 100), (1.0, 1.0, 10)])
def test_noise_for_epsilon_inverts_epsilon(target, q, rounds):
    sigma = noise_for_epsilon(target, DELTA, q, rounds)
    assert sigma > 0
    eps = run(sigma, q, rounds).epsilon()
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    assert run(sigma * 0.97, q, rounds).epsilon() > target  # and it is (close to) the smallest such sigma


@pytest.mark.parametrize("sigma,q,match", [
    (0.0, 0.5, "sigma must be a finite number > 0"),
    (-1.0, 0.5, "sigma must be a finite number > 0"),
    (math.nan, 0.5, "sigma"),
    (1.0, 0.0, r"sample rate q must be in \(0, 1\]"),
    (1.0, 1.5, r"sample rate q must be in \(0, 1\]"),
    (1.0, -0.1, "sample rate"),
])
def test_bad_step_arguments(sigma, q, match):
    acc = PrivacyAccountant(DELTA)
    with pytest.raises(ValueError, match=match):
        acc.step(sigma, q)
    assert acc.history == []


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan, True])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        PrivacyAccountant(delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        noise_for_epsilon(8.0, delta, 0.5, 10)


@pytest.mark.parametrize("args,match", [
    ((0.0, DELTA, 0.5, 10), "target epsilon"),
    ((-1.0, DELTA, 0.5, 10), "target epsilon"),
    ((8.0, DELTA, 0.0, 10), "sample rate"),
    ((8.0, DELTA, 1.01, 10), "sample rate"),
    ((8.0, DELTA, 0.5, 0), "rounds must be an integer >= 1"),
    ((8.0, DELTA, 0.5, 2.5), "rounds must be an integer >= 1"),
])
def test_bad_noise_for_epsilon_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        noise_for_epsilon(*args)


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ("[]", "exactly 'delta' and 'history'"),
    ('{"delta": 1e-5}', "exactly 'delta' and 'history'"),
    ('{"delta": 1e-5, "history": [[1.0, 0.5]]}', r"must be \[sigma, q, steps\]"),
    ('{"delta": 1e-5, "history": [[1.0, 0.5, 0]]}', "steps must be an integer >= 1"),
    ('{"delta": 1e-5, "history": [[0, 0.5, 3]]}', "sigma"),
    ('{"delta": 1e-5, "history": [[1.0, 2, 3]]}', "sample rate"),
    ('{"delta": 5, "history": []}', "delta"),
])
def test_from_json_refuses_corrupt_state(text, match):
    with pytest.raises(ValueError, match=match):
        PrivacyAccountant.from_json(text)
