"""The strategy interface: the round engine calls these hooks; a strategy only does math.

Lifecycle, per coordinator process:
    setup(ctx)                    once, before anything else (LoRA scale, layout, spill dir)
    load_state(tensors, meta)     once, if a state was saved after the last committed round
and per round:
    configure_school(...)         hyper-parameters and client-side mode for each participant
    begin_round(round, global)
    accumulate(update)*           as each upload is accepted (may be out of order, any time)
    record_failure(failure)*      stragglers, drop-outs and rejected uploads
    stream_state(sink)            optional: the next finalize() hands its new state's buffers to the engine
    finalize() -> AggregateResult once the round closes with at least a quorum
    state() -> (tensors, meta)    saved with the commit, so a restart resumes server moments
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from common.lora import LoraSettings, TensorSpec
from common.training import TrainParams
from fedserver.validation import sum_of_squares

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted upload: the school's LoRA delta against the round's global adapter."""

    school_id: str
    round: int
    num_examples: int
    delta: State
    metrics: Mapping[str, float] = field(default_factory=dict)
    path: Path | None = None     # where the engine keeps the payload (spilling buffers read it back)


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


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may know about the federation it serves."""

    settings: LoraSettings
    layout: Mapping[str, TensorSpec]
    enrolled: tuple[str, ...] = ()          # school ids in the coordinator's config
    work_dir: Path | None = None            # scratch space (spill files), inside the state dir
    product_metrics: bool = True            # product-space metrics (step_norm) for the averaging family;
                                            # the coordinator turns them off unless [strategy] product_metrics

    @property
    def scale(self) -> float:
        """s = alpha / r: the product a LoRA pair contributes is s * B @ A."""
        return self.settings.alpha / self.settings.rank


@dataclass(frozen=True)
class NoOptions:
    pass


class Strategy(ABC):
    """A registered aggregation rule. Subclasses set `name`, `summary` and, if they take
    options, `Options` (a frozen dataclass whose fields are the `[strategy.options]` keys,
    with a `problems()` method that lists bad values)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # accumulate() may be handed an update still on disk (fedserver.validation.FileDelta) and
    # reads it once; False: the engine loads the update into memory first
    folds_files: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.ctx: StrategyContext | None = None

    # ------------------------------------------------------------ set-up and config
    def setup(self, ctx: StrategyContext) -> None:
        self.ctx = ctx

    @property
    def context(self) -> StrategyContext:
        if self.ctx is None:
            raise RuntimeError(f"strategy {self.name!r} used before setup(); the round engine calls it at start")
        return self.ctx

    def configure_round(self, round_: int, params: TrainParams) -> TrainParams:
        """Hyper-parameters sent to every participant this round (default: unchanged)."""
        return params

    def configure_school(self, round_: int, school_id: str, params: TrainParams) -> TrainParams:
        """Per-school refinement of configure_round (ranks, compression, personal tensors)."""
        return params

    def min_updates(self) -> int:
        """Fewest accepted updates the rule is defined for (Krum: f + 3); checked against quorum."""
        return 1

    # ------------------------------------------------------------ the round
    @abstractmethod
    def begin_round(self, round_: int, global_state: State) -> None: ...

    @abstractmethod
    def accumulate(self, update: ClientUpdate) -> None: ...

    def record_failure(self, failure: ClientFailure) -> None:
        """Stragglers and failures are data, not exceptions; the default ignores them."""

    @abstractmethod
    def finalize(self) -> AggregateResult:
        """Called once the round closes with at least a quorum of accepted updates."""

    def stream_state(self, sink: Callable[[torch.Tensor], None] | None) -> bool:
        """Offer the next finalize()'s new state to `sink` while it is being made, each
        finished buffer in turn (its bytes the next of the state's safetensors file), so the
        engine writes and hashes it meanwhile; None withdraws the offer (and asks, offering
        nothing). True if this strategy may do so (the engine checks that the state finalize returns is exactly the buffers it
        was given, and otherwise writes it whole). A strategy or wrapper that changes a state
        in place after making it must return False. The default: False."""
        return False

    def stored(self, state: Mapping[str, torch.Tensor], path: Path) -> None:
        """The engine has stored `state`, which the last finalize() returned and whose bytes
        are exactly the buffers it gave stream_state's sink, as the file `path` (the artefact
        that becomes the global adapter if the round commits). A strategy that keeps those
        buffers may then make its next state in them without reading that global back from
        its file. The default: nothing."""

    # ------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Server-side memory carried between rounds (momentum, accountant): tensors + JSON."""
        return {}, {}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what state() returned after the last committed round."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": dataclasses.asdict(self.options)}


class Wrapper(Strategy):
    """Composes around another strategy: by default every hook is passed through."""

    def __init__(self, inner: Strategy, options: Any = None) -> None:
        super().__init__(options)
        self.inner = inner

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def compatibility(self) -> list[str]:
        """Reasons this wrapper cannot go around `inner` (checked when the config is read)."""
        return []

    def innermost(self) -> Strategy:
        s: Strategy = self.inner
        while isinstance(s, Wrapper):
            s = s.inner
        return s

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.inner.setup(ctx)

    def configure_round(self, round_: int, params: TrainParams) -> TrainParams:
        return self.inner.configure_round(round_, params)

    def configure_school(self, round_: int, school_id: str, params: TrainParams) -> TrainParams:
        return self.inner.configure_school(round_, school_id, params)

    def begin_round(self, round_: int, global_state: State) -> None:
        self.inner.begin_round(round_, global_state)

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(update)

    def record_failure(self, failure: ClientFailure) -> None:
        self.inner.record_failure(failure)

    def finalize(self) -> AggregateResult:
        return self.inner.finalize()

    def stream_state(self, sink: Callable[[torch.Tensor], None] | None) -> bool:
        return self.inner.stream_state(sink)

    def stored(self, state: Mapping[str, torch.Tensor], path: Path) -> None:
        self.inner.stored(state, path)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.inner.state()
        own_t, own_m = self.own_state()
        return {**tensors, **{f"{self.name}::{k}": v for k, v in own_t.items()}}, {**meta, **({self.name: own_m} if own_m else {})}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        prefix = f"{self.name}::"
        self.inner.load_state({k: v for k, v in tensors.items() if not k.startswith(prefix)},
                              {k: v for k, v in meta.items() if k != self.name})
        self.load_own_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta.get(self.name, {}))

    def own_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_own_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "inner": self.inner.describe()}


def flat_norm(state: State) -> float:
    """L2 norm over every tensor of a state dict, accumulated in float64."""
    total = 0.0
    for v in state.values():
        total += sum_of_squares(v.detach().reshape(-1).to(torch.float64).numpy())
    return math.sqrt(total)
