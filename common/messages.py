"""Frozen dataclasses for what crosses the wire; protobuf types never leave common/serde.py.
Imports no torch: a protocol-level client (benchmarks/noop_school.py) runs without it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainParams:
    """What a train or distill command asks of a school (common.training re-exports it)."""

    local_steps: int = 16
    batch_size: int = 8
    learning_rate: float = 3e-4
    max_seq_len: int = 256      # tokens; longer examples are cut from the left of the prompt
    seed: int = 0
    proximal_mu: float = 0.0    # FedProx: (mu/2)·||w - w_global||² over the LoRA tensors
    freeze: tuple[str, ...] = ()    # adapter tensors whose name contains one of these stay fixed (FFA: "lora_A")
    personal: tuple[str, ...] = ()  # tensors the school keeps for itself across rounds (FedSA: "lora_B")
    rank: int = 0                   # LoRA rank this school trains at; 0 = the federation's (HetLoRA)
    compression: str = ""           # JSON CompressionSpec for the upload; "" = dense float32


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
    upload_digests: tuple[str, ...] = ()   # accepted besides sha256 (common/digest.py)


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    size: int
    kind: str = "adapter"
    blake3: str = ""   # of the same bytes, when the coordinator offers it (a faster download check)


@dataclass(frozen=True)
class TrainCommand:
    round: int
    deadline_unix: float
    adapter: ArtifactRef
    params: TrainParams


@dataclass(frozen=True)
class DistillCommand:
    """Server teaches: fit the adapter to the teacher's option distributions on a pool slice."""

    round: int
    deadline_unix: float
    adapter: ArtifactRef
    pack: ArtifactRef          # labelled pack: public questions + teacher distributions
    params: TrainParams
    kd_weight: float = 1.0     # share of the loss from distillation; the rest from the school's own data
    temperature: float = 1.0


@dataclass(frozen=True)
class TeachCommand:
    """Schools teach: answer a pool slice with the current model; upload distributions only."""

    round: int
    deadline_unix: float
    adapter: ArtifactRef
    pack: ArtifactRef          # pool pack: public questions only
    temperature: float = 1.0


@dataclass(frozen=True)
class EvaluateCommand:
    round: int
    deadline_unix: float
    adapter: ArtifactRef
    max_examples: int = 0


@dataclass(frozen=True)
class IdleCommand:
    round: int = 0
    reason: str = ""


@dataclass(frozen=True)
class ShutdownCommand:
    reason: str = ""
    final: bool = False     # the federation is over (else only this stream ends)
    round: int = 0


@dataclass(frozen=True)
class UnknownCommand:
    """A command this side cannot read (a newer coordinator); reported back, never dropped."""

    round: int = 0
    detail: str = ""


Command = TrainCommand | DistillCommand | TeachCommand | EvaluateCommand | IdleCommand | ShutdownCommand | UnknownCommand


def command_name(c: Command) -> str:
    """'train', 'distill', ... for logs and failure reports."""
    return type(c).__name__.removesuffix("Command").lower()


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
    digest: str            # of the payload, tagged (common/digest.py): sha256 hex, or "blake3:<hex>"
    total_size: int
    offset: int = 0
    base_sha256: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    encoding: str = ""     # "" = dense float32 delta; "int8" / "topk" = common.compression codec
    kind: str = ""         # "" = adapter delta; "answers" = option distributions (teach rounds)
