"""School-level (user-level) privacy accounting for DP-FedAvg.

Each round the coordinator samples schools with rate q = participants / enrolled, clips every
school's update to L2 norm C and adds N(0, (σC)² I) to the sum: one step of the Sampled
Gaussian Mechanism with noise multiplier σ. Its Rényi DP at order α is RDP_α(q, σ)
(Mironov et al. 2019), steps compose additively, and the total converts to (ε, δ)-DP by

    ε = min_α  Σ_steps RDP_α(q, σ) + log((α-1)/α) - (log δ + log α) / (α - 1)

(Balle et al. 2020, Thm. 21). Both come from opacus' RDP analysis over opacus' default
orders, so `epsilon()` equals `opacus.accountants.RDPAccountant` on the same history.
A guarantee only exists once noise has been added: before the first step ε is reported as inf.
opacus is imported lazily (it takes seconds) so the coordinator starts fast without DP.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from typing import Any


def _check_sigma(noise_multiplier: float) -> None:
    if not _real(noise_multiplier) or noise_multiplier <= 0:
        raise ValueError(f"noise multiplier sigma must be a finite number > 0, got {noise_multiplier!r} "
                         "(sigma = 0 means no privacy; do not account rounds without noise)")


def _check_rate(sample_rate: float) -> None:
    if not _real(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate q must be in (0, 1] (participants / enrolled schools), got {sample_rate!r}")


def _check_delta(delta: float) -> None:
    if not _real(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), typically below 1 / number of schools, got {delta!r}")


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@functools.lru_cache(maxsize=4096)
def _rdp_one_round(sigma: float, q: float) -> Any:
    """RDP of one round at opacus' default orders (read-only numpy array). Cached: it costs
    ~0.1 s for q < 1, and q = participants / enrolled repeats the same few values."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    out = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    out.flags.writeable = False
    return out


class PrivacyAccountant:
    """(ε, δ) spent so far by DP-FedAvg rounds; `history` holds (sigma, q, steps) runs, with
    consecutive rounds of equal sigma and q merged, exactly as opacus' RDPAccountant keeps them."""

    def __init__(self, delta: float) -> None:
        _check_delta(delta)
        self.delta = float(delta)
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one round: schools sampled with rate `sample_rate`, noise σ = `noise_multiplier`."""
        _check_sigma(noise_multiplier)
        _check_rate(sample_rate)
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + 1)
        else:
            self.history.append((sigma, q, 1))

    @property
    def rounds(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self) -> float:
        """ε of the (ε, δ) guarantee after the recorded rounds; math.inf before any noise."""
        if not self.history:
            return math.inf
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        # Exactly RDPAccountant.get_privacy_spent (x * 1 * steps == x * steps in floating point),
        # with the per-round RDP cached so long histories of varying q stay cheap.
        rdp = sum([_rdp_one_round(sigma, q) * steps for sigma, q, steps in self.history])
        eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
        return float(eps)

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "history": [list(h) for h in self.history]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccountant:
        """Restore an accountant saved with to_json(); malformed input raises ValueError."""
        try:
            d: Any = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"privacy accountant state is not valid JSON: {exc}") from exc
        if not isinstance(d, dict) or set(d) != {"delta", "history"} or not isinstance(d["history"], list):
            raise ValueError("privacy accountant state must be an object with exactly 'delta' and 'history' (a list)")
        acc = cls(d["delta"])
        for entry in d["history"]:
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"privacy history entry {entry!r} must be [sigma, q, steps]")
            sigma, q, steps = entry
            _check_sigma(sigma)
            _check_rate(q)
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"privacy history entry {entry!r}: steps must be an integer >= 1")
            acc.history.append((float(sigma), float(q), steps))
        return acc


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest σ (to within 0.1% of ε) with ε(σ) <= target_epsilon after `rounds` rounds at
    sampling rate `sample_rate`: "which sigma gives epsilon = 8 after 100 rounds"."""
    if not _real(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_delta(delta)
    _check_rate(sample_rate)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The bisection probes extreme sigmas (20, 40, ...) whose optimal RDP order is the
        # largest one opacus tries; opacus warns about each probe though only the answer counts.
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha", category=UserWarning)
        return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                          sample_rate=float(sample_rate), steps=rounds, accountant="rdp",
                                          epsilon_tolerance=1e-3 * float(target_epsilon)))
