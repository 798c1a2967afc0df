"""Capped exponential backoff with full jitter, for reconnects and retries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt: uniform in [0, min(max, initial*factor^n)]."""
        cap = min(self.max_s, self.initial_s * self.factor**self._attempt)
        self._attempt += 1
        return self.rng.uniform(0.1 * cap, cap)

    def reset(self) -> None:
        self._attempt = 0
