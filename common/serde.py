"""Paired converters between common.messages dataclasses and the generated protobuf types."""

from __future__ import annotations

from collections.abc import Callable

from common import digest
from common.errors import ProtocolError
from common.messages import (
    ArtifactRef, Capabilities, Command, DistillCommand, EvalReport, EvaluateCommand, Event, Failure, Heartbeat,
    IdleCommand, Progress, SessionSettings, ShutdownCommand, TeachCommand, TrainCommand, TrainParams, UnknownCommand,
    UploadHeader,
)
from common.pb import federation_pb2 as pb


def capabilities_to_pb(c: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(model=c.model, lora_rank=c.lora_rank, num_examples=c.num_examples,
                           hardware=c.hardware, client_version=c.client_version)


def capabilities_from_pb(m: pb.Capabilities) -> Capabilities:
    return Capabilities(m.model, m.lora_rank, m.num_examples, m.hardware, m.client_version)


def settings_to_pb(s: SessionSettings) -> pb.JoinResponse:
    return pb.JoinResponse(school_id=s.school_id, session_token=s.session_token,
                           heartbeat_interval_s=s.heartbeat_interval_s, max_chunk_bytes=s.max_chunk_bytes,
                           coordinator_version=s.coordinator_version, adapter_config_json=s.adapter_config_json,
                           upload_digests=list(s.upload_digests))


def settings_from_pb(m: pb.JoinResponse) -> SessionSettings:
    return SessionSettings(m.school_id, m.session_token, m.heartbeat_interval_s, m.max_chunk_bytes,
                           m.coordinator_version, m.adapter_config_json, tuple(m.upload_digests))


def _params_to_pb(p: TrainParams) -> pb.TrainParams:
    return pb.TrainParams(local_steps=p.local_steps, batch_size=p.batch_size, learning_rate=p.learning_rate,
                          max_seq_len=p.max_seq_len, seed=p.seed, proximal_mu=p.proximal_mu,
                          freeze=list(p.freeze), personal=list(p.personal), rank=p.rank, compression=p.compression)


def _params_from_pb(m: pb.TrainParams) -> TrainParams:
    return TrainParams(m.local_steps, m.batch_size, m.learning_rate, m.max_seq_len, m.seed, m.proximal_mu,
                       tuple(m.freeze), tuple(m.personal), m.rank, m.compression)


def _artifact_to_pb(a: ArtifactRef | None) -> pb.Artifact | None:
    return None if a is None else pb.Artifact(sha256=a.sha256, size=a.size, kind=a.kind, blake3=a.blake3)


def _artifact_from_pb(m: pb.Artifact) -> ArtifactRef:
    return ArtifactRef(m.sha256, m.size, m.kind, m.blake3)


def command_to_pb(c: Command) -> pb.ServerCommand:
    deadline = getattr(c, "deadline_unix", 0.0)
    m = pb.ServerCommand(round=c.round, deadline_unix=deadline)
    if isinstance(c, TrainCommand):
        m.train.CopyFrom(pb.TrainCommand(global_adapter=_artifact_to_pb(c.adapter), params=_params_to_pb(c.params)))
    elif isinstance(c, DistillCommand):
        m.distill.CopyFrom(pb.DistillCommand(global_adapter=_artifact_to_pb(c.adapter), pack=_artifact_to_pb(c.pack),
                                             params=_params_to_pb(c.params), kd_weight=c.kd_weight,
                                             temperature=c.temperature))
    elif isinstance(c, TeachCommand):
        m.teach.CopyFrom(pb.TeachCommand(global_adapter=_artifact_to_pb(c.adapter), pack=_artifact_to_pb(c.pack),
                                         temperature=c.temperature))
    elif isinstance(c, EvaluateCommand):
        m.evaluate.CopyFrom(pb.EvaluateCommand(global_adapter=_artifact_to_pb(c.adapter), max_examples=c.max_examples))
    elif isinstance(c, IdleCommand):
        m.idle.CopyFrom(pb.IdleCommand(reason=c.reason))
    elif isinstance(c, ShutdownCommand):
        m.shutdown.CopyFrom(pb.ShutdownCommand(reason=c.reason, final=c.final))
    else:
        raise TypeError(f"not a command the wire can carry: {c!r}")
    return m


def _train_from_pb(m: pb.ServerCommand) -> TrainCommand:
    return TrainCommand(m.round, m.deadline_unix, _artifact_from_pb(m.train.global_adapter), _params_from_pb(m.train.params))


def _distill_from_pb(m: pb.ServerCommand) -> DistillCommand:
    d = m.distill
    return DistillCommand(m.round, m.deadline_unix, _artifact_from_pb(d.global_adapter), _artifact_from_pb(d.pack),
                          _params_from_pb(d.params), d.kd_weight, d.temperature)


def _teach_from_pb(m: pb.ServerCommand) -> TeachCommand:
    t = m.teach
    return TeachCommand(m.round, m.deadline_unix, _artifact_from_pb(t.global_adapter), _artifact_from_pb(t.pack), t.temperature)


def _evaluate_from_pb(m: pb.ServerCommand) -> EvaluateCommand:
    return EvaluateCommand(m.round, m.deadline_unix, _artifact_from_pb(m.evaluate.global_adapter), m.evaluate.max_examples)


# One reader per oneof member: adding a command is one line here and one in command_to_pb.
_COMMAND_READERS: dict[str, Callable[[pb.ServerCommand], Command]] = {
    "train": _train_from_pb,
    "distill": _distill_from_pb,
    "teach": _teach_from_pb,
    "evaluate": _evaluate_from_pb,
    "idle": lambda m: IdleCommand(m.round, m.idle.reason),
    "shutdown": lambda m: ShutdownCommand(m.shutdown.reason, m.shutdown.final, m.round),
}


def command_from_pb(m: pb.ServerCommand) -> Command:
    """Never raises for a command this side does not know (a newer coordinator): it becomes
    UnknownCommand, which the daemon reports back as a failure instead of dropping it."""
    which = m.WhichOneof("command")
    reader = _COMMAND_READERS.get(which or "")
    if reader is None:
        return UnknownCommand(m.round, "a command this school daemon does not know (none of "
                              f"{sorted(_COMMAND_READERS)}); upgrade the school daemon")
    return reader(m)


def event_to_pb(e: Event) -> pb.ClientEvent:
    if isinstance(e, Heartbeat):
        return pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=e.unix_time))
    if isinstance(e, Progress):
        return pb.ClientEvent(progress=pb.Progress(round=e.round, phase=e.phase, fraction=e.fraction, detail=e.detail))
    if isinstance(e, Failure):
        return pb.ClientEvent(failure=pb.Failure(round=e.round, phase=e.phase, message=e.message))
    if isinstance(e, EvalReport):
        return pb.ClientEvent(eval_report=pb.EvalReport(round=e.round, num_examples=e.num_examples, metrics=dict(e.metrics)))
    raise TypeError(f"not an event: {e!r}")


def event_from_pb(m: pb.ClientEvent) -> Event:
    which = m.WhichOneof("event")
    if which == "heartbeat":
        return Heartbeat(m.heartbeat.unix_time)
    if which == "progress":
        p = m.progress
        return Progress(p.round, p.phase, p.fraction, p.detail)
    if which == "failure":
        f = m.failure
        return Failure(f.round, f.phase, f.message)
    if which == "eval_report":
        r = m.eval_report
        return EvalReport(r.round, r.num_examples, dict(r.metrics))
    raise ProtocolError("client event carries no event")


def header_to_pb(h: UploadHeader) -> pb.UploadHeader:
    return pb.UploadHeader(round=h.round, upload_id=h.upload_id, num_examples=h.num_examples, metrics=dict(h.metrics),
                           total_size=h.total_size, offset=h.offset, base_sha256=h.base_sha256,
                           encoding=h.encoding, kind=h.kind, **digest_fields(h.digest))


def header_from_pb(m: pb.UploadHeader) -> UploadHeader:
    if m.sha256 and m.blake3:
        raise ProtocolError("the upload header names the payload by both sha256 and blake3; set exactly one")
    if ":" in m.sha256:   # "blake3:<hex>" is the coordinator's own tagged form, never a sha256 field's value
        raise ProtocolError("sha256: holds characters that are not allowed; allowed: a sha256 hex digest (64 lower-case hex digits)")
    return UploadHeader(m.round, m.upload_id, m.num_examples, named_digest(m), m.total_size, m.offset, m.base_sha256, dict(m.metrics), m.encoding, m.kind)


def named_digest(m: pb.UploadHeader | pb.UploadReceipt) -> str:
    """The tagged digest (common/digest.py) an UploadHeader or UploadReceipt names."""
    return digest.tag(digest.BLAKE3, m.blake3) if m.blake3 else m.sha256


def digest_fields(tagged: str) -> dict[str, str]:
    """The digest field of an UploadHeader or UploadReceipt for a tagged digest: {"sha256": hex}
    or {"blake3": hex}."""
    algorithm, hex_digest = digest.split(tagged)
    return {"blake3": hex_digest} if algorithm == digest.BLAKE3 else {"sha256": hex_digest}
