"""Paired converters between common.messages dataclasses and the generated protobuf types."""

from __future__ import annotations

from common.errors import ProtocolError
from common.messages import (
    ArtifactRef, Capabilities, Command, EvalReport, Event, Failure, Heartbeat, Progress,
    SessionSettings, UploadHeader,
)
from common.pb import federation_pb2 as pb
from common.training import TrainParams


def capabilities_to_pb(c: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(model=c.model, lora_rank=c.lora_rank, num_examples=c.num_examples,
                           hardware=c.hardware, client_version=c.client_version)


def capabilities_from_pb(m: pb.Capabilities) -> Capabilities:
    return Capabilities(m.model, m.lora_rank, m.num_examples, m.hardware, m.client_version)


def settings_to_pb(s: SessionSettings) -> pb.JoinResponse:
    return pb.JoinResponse(school_id=s.school_id, session_token=s.session_token,
                           heartbeat_interval_s=s.heartbeat_interval_s, max_chunk_bytes=s.max_chunk_bytes,
                           coordinator_version=s.coordinator_version, adapter_config_json=s.adapter_config_json)


def settings_from_pb(m: pb.JoinResponse) -> SessionSettings:
    return SessionSettings(m.school_id, m.session_token, m.heartbeat_interval_s, m.max_chunk_bytes,
                           m.coordinator_version, m.adapter_config_json)


def _params_to_pb(p: TrainParams) -> pb.TrainParams:
    return pb.TrainParams(local_steps=p.local_steps, batch_size=p.batch_size, learning_rate=p.learning_rate,
                          max_seq_len=p.max_seq_len, seed=p.seed, proximal_mu=p.proximal_mu,
                          freeze=list(p.freeze), personal=list(p.personal), rank=p.rank, compression=p.compression)


def _params_from_pb(m: pb.TrainParams) -> TrainParams:
    return TrainParams(m.local_steps, m.batch_size, m.learning_rate, m.max_seq_len, m.seed, m.proximal_mu,
                       tuple(m.freeze), tuple(m.personal), m.rank, m.compression)


def _artifact_to_pb(a: ArtifactRef | None) -> pb.Artifact | None:
    return None if a is None else pb.Artifact(sha256=a.sha256, size=a.size, kind=a.kind)


def command_to_pb(c: Command) -> pb.ServerCommand:
    m = pb.ServerCommand(round=c.round, deadline_unix=c.deadline_unix)
    if c.kind == "train":
        if c.adapter is None or c.params is None:
            raise ValueError("a train command needs an adapter and params")
        m.train.CopyFrom(pb.TrainCommand(global_adapter=_artifact_to_pb(c.adapter), params=_params_to_pb(c.params)))
    elif c.kind == "evaluate":
        if c.adapter is None:
            raise ValueError("an evaluate command needs an adapter")
        m.evaluate.CopyFrom(pb.EvaluateCommand(global_adapter=_artifact_to_pb(c.adapter), max_examples=c.max_examples))
    elif c.kind == "idle":
        m.idle.CopyFrom(pb.IdleCommand(reason=c.reason))
    elif c.kind == "shutdown":
        m.shutdown.CopyFrom(pb.ShutdownCommand(reason=c.reason, final=c.final))
    else:
        raise ValueError(f"unknown command kind {c.kind!r}")
    return m


def command_from_pb(m: pb.ServerCommand) -> Command:
    which = m.WhichOneof("command")
    if which == "train":
        a = m.train.global_adapter
        return Command("train", m.round, m.deadline_unix, ArtifactRef(a.sha256, a.size, a.kind), _params_from_pb(m.train.params))
    if which == "evaluate":
        a = m.evaluate.global_adapter
        return Command("evaluate", m.round, m.deadline_unix, ArtifactRef(a.sha256, a.size, a.kind), max_examples=m.evaluate.max_examples)
    if which == "idle":
        return Command("idle", m.round, m.deadline_unix, reason=m.idle.reason)
    if which == "shutdown":
        return Command("shutdown", m.round, m.deadline_unix, reason=m.shutdown.reason, final=m.shutdown.final)
    raise ProtocolError("server command carries no command; is the client older than the coordinator?")


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
                           sha256=h.sha256, total_size=h.total_size, offset=h.offset, base_sha256=h.base_sha256,
                           encoding=h.encoding)


def header_from_pb(m: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(m.round, m.upload_id, m.num_examples, m.sha256, m.total_size, m.offset, m.base_sha256, dict(m.metrics), m.encoding)
