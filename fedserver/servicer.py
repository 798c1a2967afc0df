"""The Federation gRPC service. Thin: unpack, call the engine/store, map errors in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from common import PROTOCOL_VERSION, __version__, digest
from common.errors import (
    AuthenticationError, FederationError, IncompatibleSchoolError, ProtocolError, UnavailableError,
)
from common.logs import LineBudget, get_logger, school_text
from common.messages import (
    Capabilities, Command, EvalReport, Failure, IdleCommand, Progress, SessionSettings, ShutdownCommand,
    UploadHeader,
)
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.tls import CertInfo
from common.serde import capabilities_from_pb, command_to_pb, event_from_pb, header_from_pb, digest_fields, settings_to_pb
from common.framing import RawChunk
from common.wire import MAX_CHUNK_BYTES
from fedserver.admission import CALLER, LOCAL, ByteBudget, retry_metadata
from fedserver.artifacts import ArtifactStore
from fedserver.auth import Authenticator
from fedserver.downloads import frame_scratch, read_chunk
from fedserver import inputs
from fedserver.engine import RoundEngine
from fedserver.store import Store
from fedserver.tls import Peer, PeerGuard
from fedserver.transfers import UploadReceiver

log = get_logger("servicer")

# Queued on a Session's own queue, this object (compared by identity, never sent) wakes the
# handler to look at its stream: the school's side ended, or it may have gone silent.
_LOOK = IdleCommand(0, "look at the session")


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.5"), to budget log lines by."""
    try:
        return str(context.peer() or "?").rsplit(":", 1)[0]
    except Exception:   # a test double, a closed call
        return "?"


def _abort_on_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the domain exception tree to a gRPC status, for unary and streaming handlers."""

    async def _abort(self: Any, context: grpc.aio.ServicerContext, exc: Exception, name: str) -> None:
        if isinstance(exc, FederationError):
            # who is knocking with a wrong or revoked token is the operator's business: a warning.
            # The refusal's text may quote what the school sent: cut short, escaped.
            (log.warning if isinstance(exc, AuthenticationError) else log.info)(
                "rpc refused", rpc=name, status=exc.status, error=school_text(str(exc)))
            self.engine.metrics.refusal(name, exc.status, exc)
            await context.abort(grpc.StatusCode[exc.status], str(exc), trailing_metadata=retry_metadata(exc))
        # A bug, not bad input: keep the traceback here (plain, no local variables), tell the
        # school only that it happened; a caller hitting it in a loop gets a few tracebacks a
        # minute into the log, the rest counted (common.logs.LineBudget).
        self.log_budget.log(log, "error", "rpc failed", _peer_host(context), rpc=name, error=school_text(repr(exc)),
                            exc_info=exc)
        self.engine.metrics.refusal(name, "INTERNAL", exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"coordinator error in {name}; the operator can find it in the coordinator's log")

    passthrough = (grpc.aio.AbortError, asyncio.CancelledError)

    if getattr(fn, "_streaming", False):
        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except passthrough:
                raise
            except Exception as exc:
                await _abort(self, context, exc, fn.__name__)
        return gen_wrapper

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except passthrough:
            raise
        except Exception as exc:
            await _abort(self, context, exc, fn.__name__)
    return wrapper


def _streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn._streaming = True  # type: ignore[attr-defined]
    return fn


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, engine: RoundEngine, store: Store, artifacts: ArtifactStore, auth: Authenticator,
                 uploads_dir: Path, max_upload_bytes: int, heartbeat_interval_s: float, session_timeout_s: float,
                 base_model: str = "", guard: PeerGuard | None = None,
                 upload_memory_bytes: int = 160 * 1024 * 1024, request_timeout_s: float = 60.0,
                 heartbeats_per_s: float = 0.0, enrolled: int = 0) -> None:
        self.engine = engine
        self.store = store
        self.artifacts = artifacts
        self.auth = auth
        self.uploads = UploadReceiver(store, uploads_dir, max_upload_bytes, lambda n: engine.count_bytes(up=n))
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session_timeout_s = session_timeout_s
        self.heartbeats_per_s = heartbeats_per_s   # all schools' heartbeats together (0: no budget)
        self.enrolled = enrolled
        self._intervals: dict[str, float] = {}     # school -> the heartbeat interval its Join was given
        self._caps: dict[str, Capabilities] = {}
        self.base_model = base_model   # schools must train the same base (heterogeneous federations: later)
        self.guard = guard             # mutual TLS: the school id from the verified peer certificate; None: plaintext
        self.peers: dict[str, CertInfo] = {}   # school -> the certificate it joined with (revocation watch)
        # commands fanned out to all (by object); an entry holds its command, so its id is not reused
        self._pb_cache: dict[int, tuple[Command, pb.ServerCommand]] = {}
        # uploads' payload bytes held at once ([server.limits] upload_memory_mb; fedserver/admission.py)
        self.upload_budget = ByteBudget(upload_memory_bytes, request_timeout_s)
        self.log_budget = LineBudget()   # "rpc failed" lines (tracebacks), per caller's host (common/logs.py)

    def _peer(self, context: grpc.aio.ServicerContext) -> Peer | None:
        """The caller's certificate identity (TLS), checked against the revocation list on every call."""
        return self.guard.peer(context) if self.guard is not None else None

    def _school(self, context: grpc.aio.ServicerContext) -> str:
        admitted = CALLER.get()   # identified by admission for this very call (fedserver/admission.py)
        if admitted and admitted != LOCAL:
            return admitted
        peer = self._peer(context)
        return self.auth.school_for(context.invocation_metadata() or (), peer.school_id if peer else None)

    def caller(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """Who is calling, from the call's headers and connection alone (fedserver/admission.py
        asks before it reads a request byte): the enrolment token (or certificate) for Join, the
        session token for everything else. Raises AuthenticationError."""
        if method == "Join":
            peer = self._peer(context)
            return self.auth.identify(context.invocation_metadata() or (), peer.school_id if peer else None)
        return self._school(context)

    @_abort_on_error
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        peer = self._peer(context)
        school = self.auth.identify(context.invocation_metadata() or (), peer.school_id if peer else None)
        if request.protocol_version != PROTOCOL_VERSION:
            raise IncompatibleSchoolError(f"protocol version {request.protocol_version} is not supported (coordinator speaks "
                                          f"{PROTOCOL_VERSION}); upgrade the school daemon")
        caps = inputs.capabilities(capabilities_from_pb(request.capabilities))
        if caps.model and self.base_model and not inputs.same_model(caps.model, inputs.spec_text(self.base_model)):
            raise IncompatibleSchoolError(f"school runs base model {caps.model!r} but this federation trains {self.base_model!r}; "
                                  "set [model] base in school.toml to match")
        # The join's row first: if it cannot be written, nothing is changed (no session, the
        # school's live one kept) and the school is told to retry.
        try:
            await asyncio.to_thread(self.store.record_join, school, caps.__dict__)
        except (sqlite3.Error, OSError) as exc:
            log.warning("join not recorded; the school will retry", school=school, error=repr(exc)[:300])
            raise UnavailableError("the coordinator could not record this join (its database is busy or full); "
                                   "nothing was changed, retry shortly") from exc
        self._caps[school] = caps
        if peer is not None:
            self.peers[school] = peer.cert
        info = self.auth.open_session(school)
        self.engine.note_session("school joined", school, log, model=school_text(caps.model), examples=caps.num_examples)
        self._intervals[school] = interval = self.heartbeat_interval(len(self.engine.sessions) + 1)
        return settings_to_pb(SessionSettings(school, info.token, interval, MAX_CHUNK_BYTES,
                                              __version__, self.engine.settings.to_json(), digest.offered()))

    def heartbeat_interval(self, connected: int) -> float:
        """The interval a joining school is asked to beat at: heartbeat_interval_s, lengthened so
        that all the schools (enrolled, or connected if more) together send at most
        heartbeats_per_s. A school keeps what its Join said until it joins again."""
        if self.heartbeats_per_s <= 0:
            return self.heartbeat_interval_s
        return max(self.heartbeat_interval_s, max(self.enrolled, connected) / self.heartbeats_per_s)

    def session_timeout(self, school: str) -> float:
        """How long this school may be silent: session_timeout_s, scaled with its interval."""
        interval = self._intervals.get(school, self.heartbeat_interval_s)
        return self.session_timeout_s * interval / self.heartbeat_interval_s

    def _command_pb(self, cmd: Command) -> pb.ServerCommand:
        """A command fanned out to every school is one object (the engine queues the same
        EvaluateCommand, IdleCommand, ShutdownCommand to all): converted once, not per school."""
        hit = self._pb_cache.get(id(cmd))
        if hit is not None and hit[0] is cmd:
            return hit[1]
        m = command_to_pb(cmd)
        if len(self._pb_cache) >= 8:
            self._pb_cache.clear()
        self._pb_cache[id(cmd)] = (cmd, m)
        return m

    @_abort_on_error
    @_streaming
    async def Session(self, request_iterator: AsyncIterator[pb.ClientEvent], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ServerCommand]:
        school = self._school(context)
        sess = self.engine.attach(school, self._caps.get(school, Capabilities()))

        async def read_events() -> None:
            async for msg in request_iterator:
                sess.last_seen = time.monotonic()
                if msg.WhichOneof("event") == "heartbeat":
                    continue   # the common case, thousands a second: nothing to build
                ev = inputs.event(event_from_pb(msg))   # a field out of bounds ends the stream: INVALID_ARGUMENT
                if isinstance(ev, Failure):
                    await self.engine.report_failure(school, ev)
                elif isinstance(ev, EvalReport):
                    await self.engine.report_eval(school, ev)
                elif isinstance(ev, Progress):
                    sess.progress = f"{ev.phase} {ev.fraction:.0%}"

        # Nothing per heartbeat but the read: the handler sleeps on its queue, woken by a
        # command, by the reader ending, or by one timer per session that fires when the
        # school's silence would reach the timeout (re-armed to the newest heartbeat, so about
        # once per session_timeout_s). A task and a timeout per session per heartbeat interval
        # were about a quarter of the coordinator's CPU with only heartbeats flowing (docs/SCALING.md).
        loop = asyncio.get_running_loop()
        timeout = self.session_timeout(school)
        timer: asyncio.TimerHandle   # the silence timer, armed below

        def look(_: object = None) -> None:
            sess.queue.put_nowait(_LOOK)

        def check_silence() -> None:
            nonlocal timer
            left = sess.last_seen + timeout - time.monotonic()
            if left <= 0:
                look()
            else:
                timer = loop.call_later(left, check_silence)

        reader = asyncio.create_task(read_events())
        reader.add_done_callback(look)
        timer = loop.call_later(timeout, check_silence)
        try:
            while True:
                cmd = await sess.queue.get()
                if cmd is _LOOK:
                    if reader.done():
                        refused = None if reader.cancelled() else reader.exception()
                        if refused is not None:
                            # an event out of bounds: the stream ends with its status; a coordinator
                            # bug handling an event: INTERNAL and logged, never OK with the event dropped
                            raise refused
                        break  # the school closed its side
                    if time.monotonic() - sess.last_seen > timeout:
                        # One more beat before giving up: after a stall on this side, events the
                        # school sent in time may still be queued behind it.
                        await asyncio.sleep(min(1.0, self.heartbeat_interval_s))
                        if time.monotonic() - sess.last_seen > timeout:
                            self.engine.note_session("session timed out", school, log, warn=True,
                                                     silent_s=round(time.monotonic() - sess.last_seen, 1))
                            break
                    timer.cancel()
                    check_silence()   # heard from in time: re-armed to the newest heartbeat
                    continue
                yield self._command_pb(cmd)
                if isinstance(cmd, ShutdownCommand):
                    break
        finally:
            timer.cancel()
            reader.cancel()
            self.engine.detach(sess)

    @_abort_on_error
    @_streaming
    async def Download(self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        self._school(context)
        await self.engine.check_served(inputs.text("sha256", request.sha256))   # never serves a damaged file
        size = self.artifacts.size(request.sha256)
        if request.offset > size:
            raise ProtocolError(f"offset {request.offset} is past the end of the artefact ({size} bytes)")
        offset = request.offset
        scratch = frame_scratch()
        with open(self.artifacts.path(request.sha256), "rb") as fh:
            while offset < size:   # each chunk framed around the bytes read, handed to gRPC as is
                encoded = read_chunk(fh, offset, size, scratch=scratch)
                n = min(MAX_CHUNK_BYTES, size - offset)
                yield encoded   # type: ignore[misc]  # Download's serialiser passes bytes through
                offset += n
                self.engine.count_bytes(down=n)

    async def _preflight(self, school: str, h: UploadHeader) -> None:
        """Checks that need no payload: size, form, replay, then the round's own (kind, participant)."""
        await self.uploads.check_header(school, h)
        self.engine.check_upload_allowed(school, h)

    @_abort_on_error
    async def UploadStatus(self, request: pb.UploadStatusRequest, context: grpc.aio.ServicerContext) -> pb.UploadStatusResponse:
        school = self._school(context)
        received, complete = await self.uploads.status(school, inputs.text("upload_id", request.upload_id))
        if not complete and request.HasField("header"):
            await self._preflight(school, inputs.header(header_from_pb(request.header)))
        return pb.UploadStatusResponse(received_bytes=received, complete=complete)

    @_abort_on_error
    async def Upload(self, request_iterator: AsyncIterator[pb.UploadMessage], context: grpc.aio.ServicerContext) -> pb.UploadReceipt:
        school = self._school(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or isinstance(first, RawChunk) or first.WhichOneof("message") != "header":
            raise ProtocolError("an upload must start with an UploadHeader")
        h = inputs.header(header_from_pb(first.header))
        await self._preflight(school, h)

        async def chunks() -> AsyncIterator[tuple[int, bytes | memoryview]]:
            async for msg in request_iterator:   # chunks come as RawChunk (decode_upload_message)
                if isinstance(msg, RawChunk):
                    yield msg.offset, msg.data
                elif msg.WhichOneof("message") != "chunk":
                    raise ProtocolError("only chunks may follow the header")
                else:
                    yield msg.chunk.offset, msg.chunk.data   # each access to a bytes field copies it: once

        # The bytes are checked as they arrive and written a chunk at a time: in hand, a chunk or
        # two while receiving; the whole payload only when it must be read back to be checked
        # (compressed or partial uploads). Both are taken from the coordinator's budget first (a
        # caller that does not fit waits, sending nothing).
        check = self.engine.stream_check(school, h)
        async with self.upload_budget.hold(min(h.total_size, 2 * MAX_CHUNK_BYTES), f"upload {h.upload_id}"):
            part, digest = await self.uploads.receive(school, h, chunks(), check)
        whole = 0 if check is not None and check.packed else h.total_size
        async with self.upload_budget.hold(whole, f"upload {h.upload_id}") if whole else contextlib.nullcontext():
            try:
                rc = await self.engine.accept_upload(school, h, part, digest, check)
            except FederationError:
                await self.uploads.discard(school, h.upload_id)
                raise
        return pb.UploadReceipt(round=rc.round, upload_id=h.upload_id, received_bytes=h.total_size, **digest_fields(rc.digest))
