"""The school daemon's lifecycle: join, hold the session stream, and carry out commands on one
long-lived worker that survives reconnects. Transfers resume; training runs on a thread."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from common import PROTOCOL_VERSION, __version__, digest
from common.framing import TransferStub
from common.backoff import Backoff
from common.compression import CompressionSpec, ErrorFeedback
from common.files import atomic_write_bytes
from common.lora import LoraSettings
from common.logs import get_logger
from common.distill import Pack, answers_to_bytes
from common.messages import (
    ArtifactRef, Capabilities, Command, DistillCommand, EvalReport, EvaluateCommand, Event, Failure,
    Heartbeat, IdleCommand, Progress, ShutdownCommand, TeachCommand, TrainCommand, UnknownCommand, UploadHeader,
    command_name,
)
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import capabilities_to_pb, command_from_pb, event_to_pb, settings_from_pb
from common.training import TrainParams
from common.wire import bytes_to_tensors_with_metadata, grpc_options, tensors_to_bytes
from fedclient.config import SchoolConfig, load_school_identity
from fedclient.monitor import STATUS_EVERY_S, DaemonMetrics, DaemonStatus
from fedclient.transfer import DOWNLOAD_STALL_S, StalledError, download, retry_after_s, status_lost, upload
from fedclient.worker import SchoolModel

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 78   # 78 = EX_CONFIG: systemd must not restart
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAUTHENTICATED}   # UNAUTHENTICATED after Join: coordinator restarted
T = TypeVar("T")


class FatalError(Exception):
    """Configuration or credentials are wrong; restarting will not help."""


NEVER_CONNECTED_EVERY = 10   # before a first Join: the "cannot reach" warning on attempt 1, then every 10th


class SchoolDaemon:
    def __init__(self, cfg: SchoolConfig, token: str, model: SchoolModel,
                 on_ready: Callable[[], None] | None = None, on_status: Callable[[str], None] | None = None) -> None:
        """`on_ready` is called once, when the daemon is what systemd's "active" means: it joined
        the coordinator and its model is loaded (`ready` is set then too); `on_status` gets a
        line saying what it is doing or waiting for (systemd's STATUS=)."""
        self.cfg = cfg
        self.token = token
        self.model = model
        self.log = get_logger("school")
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._link: tuple[pb_grpc.FederationStub, list[tuple[str, str]]] | None = None
        self._link_ready = asyncio.Event()
        self._adapter_settings: LoraSettings | None = None
        self._upload_algorithm = digest.SHA256   # what the coordinator's JoinResponse lets uploads be named by
        self._last_params: TrainParams | None = None   # personal tensors / rank apply to evaluation too
        self._active_round = 0
        self._finished_rounds: set[int] = set()
        self._delivered_ids: dict[int, str] = {}   # round -> upload id of the result delivered (the newest few)
        self._adapters: dict[str, tuple[str, bytes]] = {}   # artefact kind -> (sha256, bytes), newest only
        self._partial: dict[str, bytearray] = {}   # sha256 -> bytes of an interrupted download
        self.shutdown_reason: str | None = None
        self.ready = asyncio.Event()
        self._on_ready = on_ready
        self._on_status = on_status or (lambda _line: None)
        self._joined_once = False
        self._failed_attempts = 0   # connection attempts that failed before the first Join
        self._preload: asyncio.Task[None] | None = None
        self._superseded: deque[float] = deque(maxlen=3)   # when the coordinator last replaced this school's stream
        self.pending_dir = cfg.school.state_dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._kind = ""   # the command the worker is on (progress reports name it)
        self.metrics = DaemonMetrics()
        self.status = DaemonStatus(cfg.school.state_dir, cfg.school.coordinator)

    # ------------------------------------------------------------ connection loop
    async def run(self, stop: asyncio.Event) -> int:
        backoff = Backoff(initial_s=0.5, max_s=self.cfg.school.max_backoff_s)
        if self.cfg.simulation.attack:
            self.log.warning("SIMULATION: this school sends attacked updates (research only)",
                             attack=self.cfg.simulation.attack, scale=self.cfg.simulation.scale)
        worker = asyncio.create_task(self._work())
        keeper = asyncio.create_task(self._keep_status())
        self._on_status(f"connecting to the coordinator at {self.cfg.school.coordinator}")
        try:
            while not stop.is_set() and self.shutdown_reason is None:
                try:
                    await self._connect_once(stop, backoff)
                except FatalError as exc:
                    self.log.error("cannot join; not retrying", error=str(exc))
                    return EXIT_CONFIG
                except grpc.aio.AioRpcError as exc:
                    if self._joined_once:
                        self.log.warning("connection lost", code=exc.code().name, detail=exc.details())
                        self._on_status(f"connection to {self.cfg.school.coordinator} lost ({exc.code().name}); reconnecting")
                    else:
                        self._never_connected(exc)
                    self.status.disconnected(f"{exc.code().name}: {exc.details()}")
                if stop.is_set() or self.shutdown_reason is not None:
                    break
                delay = backoff.next_delay()
                (self.log.info if self._joined_once else self.log.debug)("reconnecting", in_s=round(delay, 2))
                try:
                    async with asyncio.timeout(delay):   # not wait_for: 3.11's can lose a cancellation
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            self.model.stop_flag.set()
            worker.cancel()
            keeper.cancel()
            if self._preload is not None:
                self._preload.cancel()
            await asyncio.gather(worker, keeper, *([self._preload] if self._preload else []), return_exceptions=True)
            self.status.stopped(self.shutdown_reason or "signal")
        self.log.info("stopped", reason=self.shutdown_reason or "signal")
        return EXIT_OK

    def _never_connected(self, exc: grpc.aio.AioRpcError) -> None:
        """No Join has ever succeeded: say what to check, on the first attempt and then every
        NEVER_CONNECTED_EVERY attempts (the backoff keeps retrying in between)."""
        self._failed_attempts += 1
        address = self.cfg.school.coordinator
        self._on_status(f"waiting for the coordinator at {address}: never connected "
                        f"({self._failed_attempts} attempts, {exc.code().name}); see the log")
        if self._failed_attempts == 1 or self._failed_attempts % NEVER_CONNECTED_EVERY == 0:
            tls = ("and that both sides speak plaintext ([school.tls] insecure = true here and in the coordinator's "
                   "[server.tls])" if self.cfg.school.tls.insecure else
                   "and the TLS set-up: the coordinator refuses a school certificate that is expired or not issued by "
                   "its client CA without an answer (its log says why), and this daemon refuses a coordinator "
                   "certificate not issued by [school.tls] ca or not naming the host dialled (see the detail)")
            self.log.warning(
                f"cannot reach the coordinator at {address} (never connected): check the address "
                "(school.toml [school] coordinator = host:port, the coordinator's [server] listen port), "
                "that the coordinator is running, that a firewall or VPN lets this machine reach that port, "
                f"{tls}; still retrying",
                coordinator=address, attempts=self._failed_attempts, code=exc.code().name, detail=exc.details(),
                repeats_every_attempts=NEVER_CONNECTED_EVERY)

    async def _become_ready(self) -> None:
        """After the first Join (which brings the federation's LoRA settings): load the model,
        then report ready. Commands that arrive meanwhile wait for the same load."""
        self._on_status(f"joined the coordinator at {self.cfg.school.coordinator}; loading the model")
        try:
            assert self._adapter_settings is not None   # set by Join, before any command
            await asyncio.to_thread(self.model.ensure_loaded, self._adapter_settings)
        except Exception as exc:
            self.log.error("could not load the model; each command will try again", error=repr(exc), exc_info=True)
            self._on_status(f"joined, but could not load the model ({exc!r:.200}); see the log")
            return
        self.ready.set()
        self.log.info("ready: joined and model loaded", coordinator=self.cfg.school.coordinator)
        self._on_status(f"ready: joined the coordinator at {self.cfg.school.coordinator}, model loaded")
        if self._on_ready is not None:
            self._on_ready()

    def _channel(self, address: str) -> grpc.aio.Channel:
        """Mutual TLS with this school's certificate (read again at every connection, so a renewed
        certificate is picked up by the next one), or plaintext where school.toml says insecure."""
        tls = self.cfg.school.tls
        if tls.insecure:
            return grpc.aio.insecure_channel(address, options=grpc_options())
        identity, problems, _ = load_school_identity(tls)
        if identity is None:
            raise FatalError("; ".join(problems))
        options: list[tuple[str, Any]] = list(grpc_options())
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        creds = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
        return grpc.aio.secure_channel(address, creds, options=options)

    async def _connect_once(self, stop: asyncio.Event, backoff: Backoff) -> None:
        address = self.cfg.school.coordinator
        async with self._channel(address) as channel:
            stub = TransferStub(channel)   # chunks framed by hand, both ways (common/framing.py)
            caps = Capabilities(self.cfg.model.base, 0, len(self.model.train_questions),
                                self.cfg.school.hardware or f"cpu x{os.cpu_count()}", __version__)
            try:
                resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=capabilities_to_pb(caps)),
                                       metadata=[("authorization", f"Bearer {self.token}")] if self.token else None,
                                       timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION):
                    raise FatalError(f"{exc.code().name}: {exc.details()}") from None
                raise
            settings = settings_from_pb(resp)
            backoff.reset()
            self._adapter_settings = LoraSettings.from_json(settings.adapter_config_json)
            self._upload_algorithm = digest.upload_algorithm(settings.upload_digests)
            md = [("x-session-token", settings.session_token)]
            self.log.info("joined", school=settings.school_id, coordinator=address)
            self._link = (stub, md)
            self._link_ready.set()
            if not self._joined_once:
                self._joined_once = True
                self._preload = asyncio.create_task(self._become_ready())
            elif self.ready.is_set():
                self._on_status(f"ready: joined the coordinator at {address}")
            self.metrics.connected.set(1)
            self.metrics.joins.inc()
            self.status.joined(settings.school_id)
            try:
                await self._session(stub, md, settings.heartbeat_interval_s, stop)
            finally:
                self._link = None
                self._link_ready.clear()
                self.metrics.connected.set(0)
                self.status.disconnected()

    async def _session(self, stub: pb_grpc.FederationStub, md: list[tuple[str, str]], beat: float,
                       stop: asyncio.Event) -> None:
        async def outgoing():  # type: ignore[no-untyped-def]
            while True:
                try:
                    async with asyncio.timeout(beat):   # not wait_for: 3.11's can lose a cancellation
                        ev = await self.events.get()
                except TimeoutError:
                    ev = Heartbeat(time.time())
                yield event_to_pb(ev)

        call = stub.Session(outgoing(), metadata=md)

        async def incoming() -> None:
            async for msg in call:
                cmd = command_from_pb(msg)
                if isinstance(cmd, ShutdownCommand):
                    if cmd.final:
                        self.log.info("coordinator says shut down", reason=cmd.reason)
                        self.shutdown_reason = cmd.reason
                    elif cmd.reason.startswith("superseded"):
                        self._superseded.append(time.monotonic())
                        if len(self._superseded) == 3 and self._superseded[-1] - self._superseded[0] < 300:
                            self.log.error("this school's session keeps being replaced: is a second daemon running "
                                           "with the same token? Stop it; each school needs its own token",
                                           reason=cmd.reason)
                        else:
                            self.log.info("coordinator ended this stream; reconnecting", reason=cmd.reason)
                    else:   # e.g. the coordinator is stopping
                        self.log.info("coordinator ended this stream; reconnecting", reason=cmd.reason)
                    try:   # let the coordinator close the stream itself rather than cancel it under it
                        await asyncio.wait_for(call.code(), timeout=2.0)
                    except (TimeoutError, grpc.aio.AioRpcError):
                        pass
                    return
                if isinstance(cmd, IdleCommand):
                    continue
                self.commands.put_nowait(cmd)   # work, or an unknown command the worker reports back

        reader = asyncio.create_task(incoming())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            reader.cancel()
            call.cancel()

    # ------------------------------------------------------------ the worker
    async def _rpc(self, fn: Callable[[pb_grpc.FederationStub, list[tuple[str, str]]], Awaitable[T]], deadline: float) -> T:
        """Run an RPC on the current link; on a dropped link wait for the next one and retry."""
        lost = 0   # attempts whose status gRPC's client lost (status_lost): retried a few times
        while True:
            remaining = deadline - time.time() if deadline else 3600.0
            if remaining <= 0:
                raise TimeoutError("the round's deadline passed")
            async with asyncio.timeout(remaining):   # not wait_for: 3.11's can lose a cancellation
                await self._link_ready.wait()
            assert self._link is not None
            stub, md = self._link
            try:
                return await fn(stub, md)
            except StalledError as exc:   # the link may be fine: resume on it at once
                self.log.info("transfer stalled; resuming", reason=str(exc))
                self.metrics.retries.inc()
                self.status.add("transfer_retries", 1)
                await asyncio.sleep(0.2)
                continue
            except grpc.aio.AioRpcError as exc:
                wait_s = retry_after_s(exc)
                if wait_s is not None:   # the coordinator is busy (its limits): same link, a moment later
                    self.log.info("coordinator busy; will retry", code=exc.code().name, after_s=round(wait_s, 2),
                                  reason=exc.details())
                    self.metrics.retries.inc()
                    await asyncio.sleep(wait_s)
                    continue
                if status_lost(exc) and lost < 3:
                    lost += 1   # the next attempt hears the coordinator's real answer (or resumes)
                    self.log.info("the coordinator ended a call before it was sent; will retry", attempt=lost)
                    self.metrics.retries.inc()
                    await asyncio.sleep(0.5 * lost)
                    continue
                if exc.code() not in RETRYABLE:
                    raise
                self.log.info("transfer interrupted; will resume", code=exc.code().name)
                self.metrics.retries.inc()
                self.status.add("transfer_retries", 1)
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:   # the coordinator timed out a slow
                    self._link_ready.clear()                          # message: the link itself may be fine
                await asyncio.sleep(0.2)

    def _handlers(self) -> dict[type, Callable[[Any], Awaitable[None]]]:
        """What the worker does with each command it may receive (idle and shutdown are the
        session's business)."""
        return {TrainCommand: self._train, DistillCommand: self._distill, TeachCommand: self._teach,
                EvaluateCommand: self._evaluate, UnknownCommand: self._unknown}

    async def _work(self) -> None:
        handlers = self._handlers()
        while True:
            cmd = await self.commands.get()
            handler = handlers.get(type(cmd), self._unknown)
            self._kind = command_name(cmd)
            try:
                await handler(cmd)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.error("command failed", kind=command_name(cmd), round=cmd.round, error=repr(exc), exc_info=True)
                self.events.put_nowait(Failure(cmd.round, command_name(cmd), repr(exc)[:500]))
                self.metrics.rounds.labels(command_name(cmd), "failed").inc()
                self.status.finished(cmd.round, command_name(cmd), "failed", error=repr(exc)[:300])

    async def _unknown(self, cmd: Any) -> None:
        """Never drop a command silently: tell the coordinator, which fails this school's part."""
        detail = getattr(cmd, "detail", "") or f"this daemon has no handler for {type(cmd).__name__}; upgrade it"
        self.log.error("received a command this daemon does not know", round=cmd.round, detail=detail)
        self.events.put_nowait(Failure(cmd.round, "command", detail))

    def _progress(self, round_: int, phase: str) -> Callable[..., None]:
        loop = asyncio.get_running_loop()

        def report(done: float, total: float, *extra: Any) -> None:
            detail = f"loss={extra[0]:.3f}" if extra else ""
            self.status.working(round_, self._kind, phase, done / max(total, 1))
            loop.call_soon_threadsafe(self.events.put_nowait, Progress(round_, phase, done / max(total, 1), detail))
        return report

    async def _keep_status(self) -> None:
        """Rewrite status.json now and then: its age tells `fedclient status` the daemon lives."""
        while True:
            await asyncio.to_thread(self.status.write)
            await asyncio.sleep(STATUS_EVERY_S)

    async def _fetch(self, cmd: Any, ref: ArtifactRef | None = None) -> bytes:
        """An artefact of the command (its global adapter unless `ref` says otherwise), from
        the newest-of-each-kind cache or downloaded, resuming an interrupted download."""
        ref = ref or cmd.adapter
        sha = ref.sha256
        cached = self._adapters.get(ref.kind)
        if cached is not None and cached[0] == sha:
            return cached[1]
        buf = self._partial.setdefault(sha, bytearray())
        before = len(buf)
        data = await self._rpc(lambda s, md: download(s, sha, md, buf, self._progress(cmd.round, "download"), DOWNLOAD_STALL_S,
                                                      blake3=ref.blake3), cmd.deadline_unix)
        self.metrics.received.inc(len(data) - before)
        self.status.add("received_bytes", len(data) - before)
        self._partial.pop(sha, None)
        self._adapters[ref.kind] = (sha, data)   # keep only the newest artefact of each kind
        return data

    async def _train(self, cmd: TrainCommand) -> None:
        async def compute() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
            global_bytes = await self._fetch(cmd)
            assert self._adapter_settings is not None   # set by Join, before any command
            await asyncio.to_thread(self.model.ensure_loaded, self._adapter_settings)
            self.log.info("training", round=cmd.round, steps=cmd.params.local_steps, examples=len(self.model.train_questions))
            tensors, result = await asyncio.to_thread(self.model.train, global_bytes, cmd.params, self._progress(cmd.round, "train"))
            return tensors, {"loss": result.mean_loss, "final_loss": result.final_loss, "steps": float(result.steps),
                             "tokens": float(result.tokens), "seconds": result.seconds}

        await self._deliver_delta(cmd, cmd.params, compute)

    async def _distill(self, cmd: DistillCommand) -> None:
        """Server teaches: fit the adapter to the teacher's option distributions and generated
        answers on the pack."""
        async def compute() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
            global_bytes = await self._fetch(cmd)
            pack = Pack.from_bytes(await self._fetch(cmd, cmd.pack))
            if pack.kind != "labelled-pack":
                raise ValueError("a distill command needs a labelled pack; the coordinator sent an unlabelled one")
            assert self._adapter_settings is not None   # set by Join, before any command
            await asyncio.to_thread(self.model.ensure_loaded, self._adapter_settings)
            self.log.info("distilling", round=cmd.round, steps=cmd.params.local_steps, pool_questions=len(pack.questions),
                          open_prompts=len(pack.open_items()), kd_weight=cmd.kd_weight)
            tensors, result = await asyncio.to_thread(self.model.distill, global_bytes, pack, cmd.params, cmd.kd_weight,
                                                      cmd.temperature, self._progress(cmd.round, "distill"))
            return tensors, result.metrics()

        await self._deliver_delta(cmd, cmd.params, compute)

    async def _teach(self, cmd: TeachCommand) -> None:
        """Schools teach: answer the pool slice with this school's current model. What leaves
        the school: option distributions (numbers, one row per pack question) and, for open
        prompts, one short answer each, withheld when it repeats words of the school's data."""
        async def compute() -> tuple[bytes, UploadHeader]:
            global_bytes = await self._fetch(cmd)
            pack = Pack.from_bytes(await self._fetch(cmd, cmd.pack))
            assert self._adapter_settings is not None   # set by Join, before any command
            await asyncio.to_thread(self.model.ensure_loaded, self._adapter_settings)
            probs, texts, withheld = await asyncio.to_thread(self.model.answer, global_bytes, pack.questions,
                                                             cmd.temperature, self._last_params, pack.prompts,
                                                             pack.max_new_tokens)
            if withheld:
                self.log.warning("answers withheld: they repeat this school's own data", round=cmd.round, count=withheld)
            payload = answers_to_bytes(probs, texts if pack.prompts else None)
            return payload, UploadHeader(cmd.round, "", len(pack.questions), digest.of(payload, self._upload_algorithm), len(payload), 0,
                                         cmd.adapter.sha256, {}, "", "answers")

        await self._deliver(cmd, compute)

    async def _deliver_delta(self, cmd: TrainCommand | DistillCommand, params: TrainParams,
                             compute: Callable[[], Awaitable[tuple[dict[str, torch.Tensor], dict[str, float]]]]) -> None:
        self._last_params = params

        async def payload() -> tuple[bytes, UploadHeader]:
            tensors, metrics = await compute()
            tensors = self.cfg.simulation.apply(tensors)   # research only: a simulated Byzantine school
            delta, encoding = await asyncio.to_thread(self._encode, tensors, params.compression, cmd.round)
            named = await asyncio.to_thread(digest.of, delta, self._upload_algorithm)
            return delta, UploadHeader(cmd.round, "", len(self.model.train_questions), named, len(delta), 0,
                                       cmd.adapter.sha256, metrics, encoding)

        await self._deliver(cmd, payload)

    async def _deliver(self, cmd: Any, compute: Callable[[], Awaitable[tuple[bytes, UploadHeader]]]) -> None:
        """Compute a round's result once, keep it on disk until the coordinator has it (a
        restart resumes the upload instead of redoing the work), and upload it."""
        assert self._adapter_settings is not None
        if cmd.round == self._active_round:
            return   # a re-sent command after a reconnect; the work is under way
        if cmd.round in self._finished_rounds:
            if await self._still_held(cmd):
                return   # a re-sent command after a reconnect; the work is done
            # The coordinator holds no receipt for it any more: it found the file it kept
            # damaged at a restart and voided the receipt. Send the result again (kept on disk).
            self.log.warning("the coordinator asks again for a result it had accepted (it lost it); sending it again",
                             round=cmd.round, upload_id=self._delivered_ids.get(cmd.round, ""))
            self._finished_rounds.discard(cmd.round)
        self._active_round = cmd.round
        try:
            log = self.log.bind(round=cmd.round, kind=command_name(cmd))
            pending = await asyncio.to_thread(self._load_pending, cmd.round, cmd.adapter.sha256)
            if pending is not None and digest.split(pending[0].digest)[0] not in (digest.SHA256, self._upload_algorithm):
                # kept for a coordinator that took BLAKE3 names; this one does not: named again by sha256
                named = await asyncio.to_thread(digest.of, pending[1], digest.SHA256)
                pending = self._named(pending[0], named), pending[1]
                await asyncio.to_thread(self._save_pending, *pending)
            if pending is None:
                payload, header = await compute()
                header = self._named(header, header.digest)
                await asyncio.to_thread(self._save_pending, header, payload)
                log.info("result ready", bytes=len(payload), **{k: round(v, 4) for k, v in header.metrics.items() if k in ("loss", "seconds")})
            else:
                header, payload = pending
                log.info("resuming a pending upload", upload_id=header.upload_id)
            kind = command_name(cmd)
            receipt = await self._rpc(lambda s, md: upload(s, header, payload, md,
                                                           on_sent=lambda n: self.metrics.sent.labels(kind).inc(n)),
                                      cmd.deadline_unix)
            log.info("result delivered", upload_id=header.upload_id, bytes=len(payload), resent=receipt is None)
            self._finished_rounds.add(cmd.round)
            self._delivered_ids[cmd.round] = header.upload_id
            for old in sorted(self._delivered_ids)[:-8]:
                del self._delivered_ids[old]
            self._delivered(cmd.round, kind, len(payload), header.metrics)
            # Kept until a later round's result is delivered: the coordinator may ask for it again.
            await asyncio.to_thread(self._drop_pending_before, cmd.round)
        finally:
            self._active_round = 0

    async def _still_held(self, cmd: Any) -> bool:
        """Whether the coordinator still holds the receipt of this round's delivered result
        (UploadStatus); True when it cannot be asked (the command is then taken as a repeat)."""
        upload_id = self._delivered_ids.get(cmd.round)
        if not upload_id:
            return True
        try:
            status = await self._rpc(lambda s, md: s.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id), metadata=md),
                                     cmd.deadline_unix)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            self.log.info("could not ask whether a delivered result is still held; taking the command as a repeat",
                          round=cmd.round, error=repr(exc)[:200])
            return True
        return bool(status.complete)

    def _delivered(self, round_: int, kind: str, size: int, metrics: Mapping[str, float]) -> None:
        self.metrics.rounds.labels(kind, "delivered").inc()
        self.metrics.last_round.set(round_)
        info: dict[str, Any] = {"bytes": size}
        if "seconds" in metrics:
            self.metrics.work_seconds.labels(kind).observe(metrics["seconds"])
            info["seconds"] = round(float(metrics["seconds"]), 1)
        if "loss" in metrics:
            info["loss"] = round(float(metrics["loss"]), 4)
        if metrics.get("tokens") and metrics.get("seconds"):
            self.metrics.tokens.inc(metrics["tokens"])
            self.metrics.tokens_per_s.set(metrics["tokens"] / metrics["seconds"])
            info["tokens_per_s"] = round(metrics["tokens"] / metrics["seconds"], 1)
        self.status.finished(round_, kind, "delivered", **info)

    def _encode(self, delta: dict[str, torch.Tensor], compression: str, round_: int) -> tuple[bytes, str]:
        """The upload payload: dense float32, or compressed with this school's error feedback
        (its residual is kept on disk, so a restart does not lose what was not yet sent; it
        decays by feedback_decay for every round this school sat out)."""
        if not compression:
            return tensors_to_bytes(delta), ""
        spec = CompressionSpec.from_json(compression)
        if spec.kind == "none":
            return tensors_to_bytes(delta), ""
        feedback = ErrorFeedback(spec)
        path = self.cfg.school.state_dir / f"feedback-{spec.kind}.safetensors"
        try:
            if path.exists():
                state, meta = bytes_to_tensors_with_metadata(path.read_bytes())
                feedback.load_state_dict(state)
                for _ in range(max(0, round_ - int(meta.get("round", round_ - 1)) - 1)):
                    feedback.missed_round()
            encoded = feedback.compress(delta)
        except ValueError as exc:   # unreadable, or for another adapter layout: start afresh rather than refuse to train
            self.log.warning("discarding the compression residual", error=str(exc))
            feedback = ErrorFeedback(spec)
            encoded = feedback.compress(delta)
        atomic_write_bytes(path, tensors_to_bytes(feedback.state_dict(), {"round": str(round_)}))
        return tensors_to_bytes(encoded), spec.kind

    async def _evaluate(self, cmd: EvaluateCommand) -> None:
        assert self._adapter_settings is not None
        data = await self._fetch(cmd)
        await asyncio.to_thread(self.model.ensure_loaded, self._adapter_settings)
        result = await asyncio.to_thread(self.model.evaluate, data, cmd.max_examples, self._last_params)
        # Always answer (0 questions: nothing held out here), so the coordinator need not wait.
        self.events.put_nowait(EvalReport(cmd.round, result.count, result.metrics()) if result is not None
                               else EvalReport(cmd.round, 0, {}))
        self.metrics.rounds.labels("evaluate", "reported").inc()
        if result is not None:
            self.status.evaluated(cmd.round, result.accuracy, result.count)

    # ------------------------------------------------------------ pending uploads on disk
    def _pending_paths(self, round_: int) -> tuple[Path, Path]:
        return self.pending_dir / f"round-{round_}.json", self.pending_dir / f"round-{round_}.safetensors"

    @staticmethod
    def _named(h: UploadHeader, tagged: str) -> UploadHeader:
        """`h` with digest `tagged` and the upload id made from it (stable across resumes)."""
        return UploadHeader(**{**h.__dict__, "digest": tagged, "upload_id": f"r{h.round}-{digest.split(tagged)[1][:24]}"})

    def _save_pending(self, h: UploadHeader, payload: bytes) -> None:
        meta, data = self._pending_paths(h.round)
        tmp = data.with_suffix(".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, data)
        meta.write_text(json.dumps({**h.__dict__, "metrics": dict(h.metrics)}))

    def _load_pending(self, round_: int, base_sha: str) -> tuple[UploadHeader, bytes] | None:
        meta, data = self._pending_paths(round_)
        if not (meta.exists() and data.exists()):
            return None
        fields = json.loads(meta.read_text())
        if "sha256" in fields:   # kept by a daemon from before BLAKE3 names: the digest was sha256's
            fields["digest"] = fields.pop("sha256")
        h = UploadHeader(**fields)
        payload = data.read_bytes()
        if h.base_sha256 != base_sha or digest.same_algorithm(payload, h.digest) != h.digest:
            self._drop_pending(round_)
            return None
        return h, payload

    def _drop_pending(self, round_: int) -> None:
        for p in self._pending_paths(round_):
            p.unlink(missing_ok=True)

    def _drop_pending_before(self, round_: int) -> None:
        """Results of rounds before `round_`: no longer asked for."""
        for p in self.pending_dir.glob("round-*.*"):
            n = p.name.split(".", 1)[0].removeprefix("round-")
            if n.isdigit() and int(n) < round_:
                p.unlink(missing_ok=True)
