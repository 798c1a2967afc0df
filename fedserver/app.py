"""Building and running the coordinator: create_server() binds and returns the port; serve()
runs it under systemd's lifecycle (READY, watchdog, SIGTERM -> graceful stop)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import systemd
from common.data import read_jsonl, read_pool, spread
from common.errors import ConfigError
from common.files import atomic_write_text
from common.logs import get_logger
from common.memory import tune_allocator
from common.models import load_config
from common.lora import expected_layout
from common.wire import grpc_options
from fedserver.admission import (
    MAX_REQUEST_BYTES, Admission, Limits, add_guarded, anonymous_caller, capture_handlers,
)
from fedserver.artifacts import ArtifactStore
from fedserver.downloads import federation_handlers
from fedserver.auth import Authenticator
from fedserver.config import CoordinatorConfig
from fedserver.engine import RoundEngine
from fedserver.evaluator import ServerEvaluator
from fedserver.monitor import Monitor, start_monitor
from fedserver.servicer import FederationServicer
from fedserver.store import Store
from fedserver.teacher import TeacherHost
from fedserver.transfers import UploadReceiver, sweep_crash_debris
from fedserver.tls import PeerGuard, RevocationList, ServerIdentity, end_refused_sessions
from fedserver import strategy as strategies

SERVICE = "schoolfed.v1.Federation"


@dataclass
class Coordinator:
    server: grpc.aio.Server
    port: int
    engine: RoundEngine
    store: Store
    health: health.aio.HealthServicer
    evaluator: ServerEvaluator | None
    teacher: TeacherHost | None = None
    monitor: Monitor | None = None
    tls: PeerGuard | None = None                    # mutual TLS (None: plaintext, [server.tls] insecure)
    tls_watch: asyncio.Task[None] | None = None     # ends sessions whose certificate is revoked
    housekeeping: asyncio.Task[None] | None = None  # removes abandoned uploads (fedserver/transfers.py)

    async def start_monitor(self) -> Monitor:
        """The /metrics endpoint and the dashboard, as [monitor] asks (ConfigError if a port is taken)."""
        self.monitor = await start_monitor(self.engine, self.engine.cfg.server.state_dir)
        return self.monitor

    async def stop(self, grace: float = 5.0) -> None:
        for task in (self.tls_watch, self.housekeeping):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.monitor is not None:
            await self.monitor.close()
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(self.server.stop(grace))   # refuses new RPCs at once
        await asyncio.sleep(0)
        self.engine.end_sessions("the coordinator is stopping; reconnect when it is back")
        await stopping
        await self.engine.flush_bytes()   # counted since the last flush; the open round resumes with them
        if self.evaluator is not None:
            self.evaluator.close()
        if self.teacher is not None:
            self.teacher.close()
        self.store.close()


async def create_server(cfg: CoordinatorConfig, checkpoint_dir: Path | None = None) -> Coordinator:
    """Build everything and bind the port (0 = any free port); does not start serving."""
    guard = _tls_guard(cfg)   # before anything is created: a certificate problem is a ConfigError (exit 78)
    state = cfg.server.state_dir
    state.mkdir(parents=True, exist_ok=True)
    store = Store(state / "state.sqlite")
    # what `fedserver status` and `fedserver report` name (the state holds no config otherwise)
    store.set_meta("model", cfg.model.base)
    store.set_meta("eval_file", str(cfg.evaluation.eval_file or ""))
    store.set_meta("teacher", json.dumps({"model": cfg.teacher.model, "quantization": cfg.teacher.quantization})
                   if cfg.teacher.model else "")
    artifacts = ArtifactStore(state / "artifacts")
    model_cfg = await asyncio.to_thread(load_config, cfg.model.base, cfg.model.cache_dir)
    layout = await asyncio.to_thread(expected_layout, model_cfg, cfg.lora.settings())
    evaluator = ServerEvaluator(cfg, store) if cfg.evaluation.eval_file else None
    teacher = TeacherHost(cfg.teacher, cfg.model.cache_dir) if cfg.teacher.model else None
    pool, open_pool = await asyncio.to_thread(read_pool, cfg.distill.pool_file) if cfg.distill.pool_file else ([], [])
    teacher_eval = []
    if teacher is not None and cfg.evaluation.eval_file and cfg.teacher.eval_max_examples:
        # the same kind of spread as the server's evaluation: a mix of sources, not the first few
        teacher_eval = spread(await asyncio.to_thread(read_jsonl, cfg.evaluation.eval_file), cfg.teacher.eval_max_examples)
    engine = RoundEngine(cfg, store, artifacts, layout, strategies.build(cfg.strategy),
                         checkpoint_dir or state / "rounds", state / "updates", evaluate=evaluator,
                         teacher=teacher, pool=pool, open_pool=open_pool, teacher_eval=teacher_eval)
    auth = Authenticator({s.id: s.token_sha256 for s in cfg.schools})
    servicer = FederationServicer(engine, store, artifacts, auth, state / "uploads", cfg.server.max_upload_bytes,
                                  cfg.server.heartbeat_interval_s, cfg.server.session_timeout_s, cfg.model.base,
                                  guard=guard, upload_memory_bytes=cfg.server.limits.upload_memory_mb * 1024 * 1024,
                                  request_timeout_s=cfg.server.limits.request_timeout_s,
                                  heartbeats_per_s=cfg.server.heartbeats_per_s, enrolled=len(cfg.schools))
    server = grpc.aio.server(options=server_options(cfg))
    limits = cfg.server.limits
    admission = Admission(servicer.caller, Limits(limits.calls_per_school, limits.request_timeout_s),
                          on_refusal=lambda method, status, exc: engine.metrics.refusal(method, status, exc))
    # Download also takes pre-encoded chunks (fedserver/downloads.py); every method identifies
    # its caller and reads its request under limits (fedserver/admission.py)
    add_guarded(server, SERVICE, federation_handlers(servicer), admission)
    health_servicer = health.aio.HealthServicer()
    add_guarded(server, *capture_handlers(health_pb2_grpc.add_HealthServicer_to_server, health_servicer),
                Admission(anonymous_caller(lambda method, context: servicer.caller("Health", context)), admission.limits))
    try:
        if guard is None:
            port = server.add_insecure_port(cfg.server.listen)
        else:
            port = server.add_secure_port(cfg.server.listen, guard.identity.credentials())
    except RuntimeError:   # grpc: "Failed to bind" (its C core has logged why, e.g. the address is in use)
        port = 0
    if port == 0:
        if teacher is not None:
            teacher.close()
        if evaluator is not None:
            evaluator.close()
        store.close()
        raise ConfigError(f"[server] listen = {cfg.server.listen!r}: cannot bind it (in use by another process, e.g. a "
                          "coordinator already running, or not an address of this machine); choose another port")
    coord = Coordinator(server, port, engine, store, health_servicer, evaluator, teacher, tls=guard)
    if guard is not None:
        coord.tls_watch = asyncio.create_task(end_refused_sessions(guard, engine, servicer.peers))
    servicer.uploads.is_open = lambda r: engine.current is not None and engine.current.number == r
    # temporary files older than now are debris of an earlier run; this process's own are younger
    coord.housekeeping = asyncio.create_task(_housekeeping(engine, servicer.uploads, time.time()))
    return coord


HOUSEKEEPING_S = 60.0


async def _housekeeping(engine: RoundEngine, uploads: UploadReceiver, started_at: float,
                        every_s: float = HOUSEKEEPING_S) -> None:
    """Once the engine has loaded its state: crash debris and abandoned uploads removed; then
    abandoned uploads (a round closed under them, a school that gave up) every `every_s`."""
    log = get_logger("coordinator")
    await engine.started.wait()
    first = True
    while True:
        open_round = engine.current.number if engine.current is not None else None
        try:
            if first:
                n = await asyncio.to_thread(sweep_crash_debris, engine.cfg.server.state_dir, engine.updates_dir,
                                         open_round, started_at)
                if n:
                    log.info("files left by an interrupted run removed", paths=n)
            await asyncio.to_thread(uploads.sweep, open_round)
        except OSError as exc:   # a full or read-only disk: the next pass tries again
            log.warning("housekeeping failed; will retry", error=repr(exc))
        first = False
        await asyncio.sleep(every_s)


def server_options(cfg: CoordinatorConfig) -> list[tuple[str, int]]:
    """gRPC's options for the coordinator's port: the shared ones, with a receive limit of one
    upload chunk (not 4 MiB: gRPC buffers up to it per stream before our code runs), a fixed
    HTTP/2 receive window, HTTP/2 streams per connection and connections capped ([server.limits])."""
    limits = cfg.server.limits
    connections = limits.max_connections or 4 * len(cfg.schools) + 1024
    opts = [(k, v) for k, v in grpc_options() if k != "grpc.max_receive_message_length"]
    # A fixed receive window instead of BDP probing (which grows windows, and what gRPC buffers,
    # to the measured bandwidth-delay product: on loopback several MiB per upload stream).
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", limits.receive_window_kb * 1024)] \
        if limits.receive_window_kb else []
    return opts + window + [("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                            ("grpc.max_concurrent_streams", limits.streams_per_connection),
                            ("grpc.max_allowed_incoming_connections", connections)]


def _tls_guard(cfg: CoordinatorConfig) -> PeerGuard | None:
    """Mutual TLS as [server.tls] says; None for plaintext (refused beyond loopback unless insisted on)."""
    tls = cfg.server.tls
    if tls.insecure:
        problem = cfg.server.plaintext_problem()
        if problem:
            raise ConfigError(f"[server] {problem}")
        get_logger("coordinator").warning("plaintext gRPC ([server.tls] insecure = true): enrolment tokens only, "
                                          "nothing encrypted", listen=cfg.server.listen)
        return None
    identity = ServerIdentity(tls)
    revocations = RevocationList(tls.revocation_list, lambda: identity.client_cas) if tls.revocation_list else None
    return PeerGuard(identity, revocations)


async def _status_lines(engine: RoundEngine, notify: systemd.Notify, every_s: float = 2.0) -> None:
    """systemd's STATUS= (shown by `systemctl status fedserver`): what the engine does now."""
    last = ""
    while True:
        rnd = engine.current
        line = (f"{engine.phase}" + (f" (round {rnd.number}, {rnd.kind}: {len(rnd.accepted)}/{len(rnd.participants)} "
                                     "results)" if rnd is not None else "")
                + f"; {len(engine.sessions)} of {len(engine.cfg.schools)} schools connected")
        if line != last:
            notify(f"STATUS={line}")
            last = line
        await asyncio.sleep(every_s)


async def serve(cfg: CoordinatorConfig, checkpoint_dir: Path | None = None,
                port_file: Path | None = None) -> int:
    """Run until the configured rounds are done or SIGTERM/SIGINT. Returns the exit code."""
    log = get_logger("coordinator")
    tune_allocator()   # RSS flat over rounds (common/memory.py)
    coord = await create_server(cfg, checkpoint_dir)
    await coord.engine.start()
    try:
        await coord.start_monitor()
    except BaseException:
        await coord.stop(grace=0)
        raise
    await coord.server.start()
    await coord.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await coord.health.set("", health_pb2.HealthCheckResponse.SERVING)
    host = cfg.server.listen.rsplit(":", 1)[0]
    if port_file is not None:
        atomic_write_text(port_file, f"{host}:{coord.port}\n")
    log.info("serving", address=f"{host}:{coord.port}", strategy=cfg.strategy.name, model=cfg.model.base,
             tls="mutual" if coord.tls is not None else "off (insecure)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = systemd.notifier()
    notifier("READY=1")
    watchdog = asyncio.create_task(systemd.watchdog(
        notifier, on_stall=lambda s: log.warning("event loop stalled; sessions may time out on this side", late_s=round(s, 1))))
    rounds = asyncio.create_task(coord.engine.run())
    status_line = asyncio.create_task(_status_lines(coord.engine, notifier))
    live = asyncio.create_task(coord.engine.publish_status(cfg.server.state_dir / "live.json"))
    stopper = asyncio.create_task(stop.wait())
    code = 0
    done, _ = await asyncio.wait({rounds, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if rounds in done:
        exc = rounds.exception()
        if exc is not None:
            log.error("round engine stopped", error=repr(exc))
            code = 1
        else:
            log.info("all rounds done", rounds=cfg.rounds.total)
            await asyncio.sleep(0.5)   # let the shutdown commands reach the schools
    else:
        log.info("stopping on signal; the open round resumes on restart")
        rounds.cancel()
    notifier("STOPPING=1")
    watchdog.cancel()
    status_line.cancel()
    live.cancel()
    stopper.cancel()
    await asyncio.gather(rounds, live, watchdog, stopper, return_exceptions=True)   # unwound before the store closes
    await coord.stop()
    return code
