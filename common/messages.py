"""Frozen dataclasses for what crosses the wire; protobuf types never leave common/serde.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.training import TrainParams


@dataclass(frozen=True)
class Capabilities:
    model: str = ""
    lora_rank: int = 0
    num_examples: int = 0
    hardware: str = ""
    client_version: str = ""


@dataclass(frozen=True)
class SessionSettings:
    school_id: str
    session_token: str
    heartbeat_interval_s: float
    max_chunk_bytes: int
    coordinator_version: str
    adapter_config_json: str


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    size: int
    kind: str = "adapter"


@dataclass(frozen=True)
class Command:
    """kind: train | evaluate | idle | shutdown."""

    kind: str
    round: int = 0
    deadline_unix: float = 0.0
    adapter: ArtifactRef | None = None
    params: TrainParams | None = None
    max_examples: int = 0
    reason: str = ""
    final: bool = False     # shutdown only: the federation is over (else only this stream ends)


@dataclass(frozen=True)
class Progress:
    round: int
    phase: str
    fraction: float
    detail: str = ""


@dataclass(frozen=True)
class Failure:
    round: int
    phase: str
    message: str


@dataclass(frozen=True)
class EvalReport:
    round: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat:
    unix_time: float


Event = Heartbeat | Progress | Failure | EvalReport


@dataclass(frozen=True)
class UploadHeader:
    round: int
    upload_id: str
    num_examples: int
    sha256: str
    total_size: int
    offset: int = 0
    base_sha256: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    encoding: str = ""     # "" = dense float32 delta; "int8" / "topk" = common.compression codec
