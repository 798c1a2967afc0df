"""The coordinator's configuration (coordinator.toml), typed and documented per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from common.errors import ConfigError
from common.lora import ALL_PROJECTIONS, LoraSettings
from common.training import TrainParams

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerSection:
    listen: str = "127.0.0.1:50051"       # host:port; port 0 picks a free port (tests)
    state_dir: Path = Path("/var/lib/fedserver")  # SQLite state, artefacts, uploads, checkpoints
    max_upload_bytes: int = 64 * 1024 * 1024     # bytes; larger uploads are refused up front
    heartbeat_interval_s: float = 5.0     # seconds between school heartbeats
    session_timeout_s: float = 30.0       # seconds without a heartbeat before a school is dropped
    log_level: str = "info"

    def problems(self) -> list[str]:
        out = []
        if ":" not in self.listen:
            out.append(f"listen: expected host:port, got {self.listen!r}")
        if self.max_upload_bytes <= 0:
            out.append("max_upload_bytes: must be > 0")
        if self.heartbeat_interval_s <= 0 or self.session_timeout_s <= self.heartbeat_interval_s:
            out.append("session_timeout_s must exceed heartbeat_interval_s > 0")
        if self.log_level.lower() not in LOG_LEVELS:
            out.append(f"log_level: one of {', '.join(LOG_LEVELS)}")
        return out


@dataclass(frozen=True)
class ModelSection:
    base: str = "packaged:smollm2-135m-instruct"  # the schools' base model (spec: see common/models.py)
    cache_dir: Path | None = None                 # converted-model cache; default ~/.cache/school-federation


@dataclass(frozen=True)
class LoraSection:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    seed: int = 0            # seeds the round-0 adapter; every party can reproduce it

    def settings(self) -> LoraSettings:
        return LoraSettings(self.rank, self.alpha, self.dropout, self.target_modules)

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append("rank: must be >= 1")
        if not self.target_modules:
            out.append("target_modules: must name at least one module")
        return out


@dataclass(frozen=True)
class RoundsSection:
    total: int = 3            # rounds to run, then shut the schools down and exit; 0 = forever
    min_schools: int = 2      # connected schools needed before a round starts
    fraction: float = 1.0     # share of connected schools asked to train each round
    quorum: int = 2           # accepted updates needed to commit a round
    deadline_s: float = 900.0 # seconds a round may stay open
    max_norm: float = 0.0     # L2 bound on an update (all tensors); 0 disables
    start_timeout_s: float = 0.0  # give up if min_schools have not joined by then; 0 = wait forever
    max_failed_rounds: int = 3    # stop (exit 1) after this many failed rounds in a row; 0 = never

    def problems(self) -> list[str]:
        out = []
        if self.total < 0:
            out.append("total: must be >= 0")
        if self.min_schools < 1:
            out.append("min_schools: must be >= 1")
        if not 0 < self.fraction <= 1:
            out.append("fraction: must be in (0, 1]")
        if self.quorum < 1 or self.quorum > self.min_schools:
            out.append("quorum: must be in 1..min_schools")
        if self.deadline_s <= 0:
            out.append("deadline_s: must be > 0")
        return out


@dataclass(frozen=True)
class TrainSection:
    local_steps: int = 16
    batch_size: int = 8
    learning_rate: float = 3e-4
    max_seq_len: int = 256
    proximal_mu: float = 0.0

    def params(self, round_: int) -> TrainParams:
        return TrainParams(self.local_steps, self.batch_size, self.learning_rate, self.max_seq_len,
                           seed=round_, proximal_mu=self.proximal_mu)

    def problems(self) -> list[str]:
        out = []
        if self.local_steps < 1 or self.batch_size < 1 or self.max_seq_len < 8:
            out.append("local_steps, batch_size must be >= 1 and max_seq_len >= 8")
        if self.learning_rate <= 0:
            out.append("learning_rate: must be > 0")
        return out


@dataclass(frozen=True)
class StrategySection:
    """`name` picks a registered strategy (`fedserver strategies` lists them), `options` are
    its keys, and each `[[strategy.wrappers]]` table (name + its keys) composes around it,
    the first listed innermost."""

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class EvaluationSection:
    eval_file: Path | None = None   # public held-out questions (JSONL) the coordinator scores
    max_examples: int = 200
    school_max_examples: int = 32   # questions each school scores locally per round; 0 = skip
    school_timeout_s: float = 120.0  # after the last round, how long to wait for the schools' reports
    threads: int = 0                # torch threads for the coordinator's evaluation; 0 = default

    def problems(self) -> list[str]:
        out = []
        if self.max_examples < 0 or self.school_max_examples < 0:
            out.append("max_examples and school_max_examples must be >= 0")
        if self.school_timeout_s < 0:
            out.append("school_timeout_s must be >= 0 (0 = do not wait for the schools' last evaluation)")
        if self.threads < 0:
            out.append("threads must be >= 0 (0 = torch's default)")
        return out


@dataclass(frozen=True)
class SchoolEntry:
    id: str
    token_sha256: str   # sha256 hex of the school's enrolment token (`fedserver token` makes one)

    def problems(self) -> list[str]:
        out = []
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            out.append(f"id {self.id!r}: use letters, digits, '-', '_' or '.'")
        if len(self.token_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.token_sha256.lower()):
            out.append(f"token_sha256 for {self.id!r}: expected 64 hex characters")
        return out


@dataclass(frozen=True)
class CoordinatorConfig:
    server: ServerSection = field(default_factory=ServerSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    schools: tuple[SchoolEntry, ...] = ()

    def problems(self) -> list[str]:
        ids = [s.id for s in self.schools]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        out = [f"schools: duplicate ids {dup}"] if dup else []
        hashes = [s.token_sha256.lower() for s in self.schools]
        if len(set(hashes)) != len(hashes):
            out.append("schools: two schools share a token; give each school its own")
        if not self.schools:
            out.append("schools: no school is enrolled; add [[schools]] entries (fedserver token --school ID)")
        from fedserver.strategy import StrategyContext, build

        try:
            strategy = build(self.strategy)
            strategy.setup(StrategyContext(self.lora.settings(), {}, tuple(ids)))   # rank- and school-dependent checks
        except ConfigError as exc:
            out.append(str(exc))
        else:
            need = strategy.min_updates()
            if self.rounds.quorum < need:
                out.append(f"rounds.quorum: {self.strategy.name} needs at least {need} updates per round "
                           f"(options {self.strategy.options}); raise quorum and min_schools to {need} or change its options")
        return out
