"""The strategy interface: the round engine calls these hooks; a strategy only does math."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from common.training import TrainParams

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted upload: the school's LoRA delta against the round's global adapter."""

    school_id: str
    round: int
    num_examples: int
    delta: State
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientFailure:
    """A participant that did not deliver: dropped, failed to train, or sent a bad update."""

    school_id: str
    round: int
    reason: str


@dataclass(frozen=True)
class AggregateResult:
    state: dict[str, torch.Tensor]   # the new global adapter
    metrics: dict[str, float]


class Strategy(ABC):
    """Lifecycle per round: configure_round -> begin_round -> (accumulate | record_failure)* ->
    finalize. `accumulate` is called as each upload is accepted, so a strategy whose math
    allows it keeps only a running sum: memory O(adapter), not O(schools x adapter)."""

    name: ClassVar[str]

    def configure_round(self, round_: int, params: TrainParams) -> TrainParams:
        """Hyper-parameters sent to the schools this round (default: unchanged)."""
        return params

    @abstractmethod
    def begin_round(self, round_: int, global_state: State) -> None: ...

    @abstractmethod
    def accumulate(self, update: ClientUpdate) -> None: ...

    def record_failure(self, failure: ClientFailure) -> None:
        """Stragglers and failures are data, not exceptions; the default ignores them."""

    @abstractmethod
    def finalize(self) -> AggregateResult:
        """Called once the round closes with at least a quorum of accepted updates."""
