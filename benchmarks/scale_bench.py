"""How many schools one coordinator holds: sessions, heartbeats, fan-out, a 1,000-school round.

    python -m benchmarks.scale_bench [--schools 10000] [--procs 4] [--participants 1000] [--json FILE]

Starts the real coordinator (`fedserver serve --config <generated toml>`) as a subprocess on
127.0.0.1, enrols `--schools` schools (one token each, [[schools]] entries in the TOML), and
runs `--procs` client processes that each hold their share of the sessions: Join, a Session
stream, a heartbeat at the coordinator's interval (spread evenly over the interval), and the
answers a school gives (download the global adapter and upload a constant delta of its layout
when told to train; an evaluation report when told to evaluate). The clients are torch-free
(raw common.pb stubs); by default every school has its own channel, so its own TCP
connection, as real school daemons do (`--sessions-per-channel` shares them).

Everything is measured from outside the coordinator: its RSS and open descriptors (psutil),
its CPU time over a steady window with only heartbeats flowing, the time from a command's
fan-out to the last school receiving it (clients stamp receipts; the coordinator's log and the
command's own deadline stamp the start), and the measured round's duration against its
deadline (the coordinator's "round committed" log line).

How the rounds are arranged (no coordinator internals are touched):
  rounds.fraction = participants / schools, rounds.min_schools = participants.
  Round 1 opens while the schools are still joining (as soon as `participants` are connected);
  its participants hold their work until the idle measurements are done. Then they upload,
  round 1 commits, the EvaluateCommand goes to every connected school (fan-out 1), round 2
  opens with all schools connected (fan-out 2: a TrainCommand to each of `participants`; the
  schools not selected are sent nothing), its participants work at once, round 2 commits (the measured round), the
  schools' evaluations come in, and the final ShutdownCommand goes to all (fan-out 3).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import queue
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_VERSION = 1       # common.PROTOCOL_VERSION (the client side imports nothing that pulls in torch)
TOKEN_SECRET = "scale-bench"


def token_for(i: int) -> str:
    return f"{TOKEN_SECRET}-{i:06d}-0123456789abcdef"


def school_id(i: int) -> str:
    return f"s{i:06d}"


# ============================================================================ client side
# Runs in `--procs` subprocesses (`python -m benchmarks.scale_bench --client JSON`). Imports
# only grpc and the generated stubs: no torch, so a process holds thousands of sessions cheaply.

def _channel_options(keepalive_ms: int = 60_000) -> list[tuple[str, int]]:
    # common.wire.grpc_options() (not imported: common.wire imports torch), plus a local
    # subchannel pool so that every channel is its own TCP connection, as with real schools.
    return [("grpc.max_send_message_length", 4 * 1024 * 1024), ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_time_ms", keepalive_ms), ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.use_local_subchannel_pool", 1)]


def constant_delta(adapter: bytes, value: float) -> bytes:
    """A safetensors file with the adapter's header (names, shapes, float32) and every value
    set to `value`: a valid delta for the federation's layout, built without torch."""
    (n,) = struct.unpack("<Q", adapter[:8])
    header = json.loads(adapter[8 : 8 + n])
    size = len(adapter) - 8 - n
    if any(v.get("dtype") != "F32" for k, v in header.items() if k != "__metadata__"):
        raise ValueError("constant_delta expects float32 tensors")
    header.pop("__metadata__", None)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + struct.pack("<f", value) * (size // 4)


class _Client:
    def __init__(self, opts: dict[str, Any]) -> None:
        self.o = opts
        self.stats: dict[str, Any] = {"joined": 0, "join_failed": 0, "join_errors": [], "heartbeats": 0,
                                      "write_errors": 0, "ended": 0, "end_errors": [], "work_ok": 0,
                                      "work_failed": 0, "work_errors": [], "eval_reports": 0, "downloads": 0,
                                      "download_retries": 0}
        self.received: dict[str, list[float]] = {}   # "kind:round" -> [count, first, last, first deadline]
        self.sessions: list[dict[str, Any]] = []
        self.held: dict[int, list[tuple[dict[str, Any], Any]]] = {}
        self.released: set[int] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.interval = 5.0
        self.join_t: list[float] = []

    def send(self, **msg: Any) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _note(self, key: str, errors: list[str], exc: BaseException) -> None:
        self.stats[key] += 1
        if len(errors) < 5:
            errors.append(repr(exc)[:300])

    async def run(self) -> None:
        import grpc

        from common.pb import federation_pb2 as pb
        from common.pb import federation_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        o = self.o
        first, count, spc = o["first"], o["count"], max(1, o["sessions_per_channel"])
        channels = [grpc.aio.insecure_channel(o["address"], options=_channel_options(o.get("keepalive_ms", 20_000)))
                    for _ in range((count + spc - 1) // spc)]
        stubs = [pb_grpc.FederationStub(ch) for ch in channels]
        sem = asyncio.Semaphore(o["join_concurrency"])
        t0 = time.time()

        async def join(k: int) -> None:
            i = first + k
            async with sem:
                try:
                    stub = stubs[k // spc]
                    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(
                        num_examples=100, hardware="scale-bench", client_version="scale-bench")),
                        metadata=[("authorization", f"Bearer {token_for(i)}")], timeout=120)
                    self.interval = resp.heartbeat_interval_s or self.interval
                    md = [("x-session-token", resp.session_token)]
                    call = stub.Session(metadata=md)
                    await call.write(pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time())))
                except Exception as exc:   # noqa: BLE001 - counted and reported, the run goes on
                    self._note("join_failed", self.stats["join_errors"], exc)
                    return
            # one write at a time per call (gRPC refuses a second one in flight: TOO_MANY_OPERATIONS)
            sess = {"i": i, "sid": school_id(i), "stub": stub, "md": md, "call": call, "open": True,
                    "lock": asyncio.Lock()}
            self.sessions.append(sess)
            self.stats["joined"] += 1
            self.join_t.append(time.time())
            self._spawn(self._reader(sess))

        self._spawn(self._heartbeats())   # beats start with the first session, not after the last join
        await asyncio.gather(*(join(k) for k in range(count)))
        self.send(event="joined", joined=self.stats["joined"], failed=self.stats["join_failed"],
                  interval=self.interval,   # what the coordinator's Join said to beat at
                  seconds=round(time.time() - t0, 3), first_join=min(self.join_t, default=0.0),
                  last_join=max(self.join_t, default=0.0))
        await self._control()
        for ch in channels:
            await ch.close(grace=None)

    async def _heartbeats(self) -> None:
        """Each session beats once per interval, the sessions spread evenly over it."""
        pb = self.pb
        tick = 0.05
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        due, k = 0.0, 0
        while True:
            live = self.sessions
            due += len(live) * tick / self.interval
            while due >= 1 and live:
                due -= 1
                sess = live[k % len(live)]
                k += 1
                if not sess["open"]:
                    continue
                try:
                    async with sess["lock"]:
                        await sess["call"].write(pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time())))
                    self.stats["heartbeats"] += 1
                except Exception:   # noqa: BLE001 - the stream ended under us
                    self.stats["write_errors"] += 1
                    sess["open"] = False
            nxt += tick
            await asyncio.sleep(max(0.0, nxt - loop.time()))

    async def _reader(self, sess: dict[str, Any]) -> None:
        grpc = self.grpc
        call = sess["call"]
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                now = time.time()
                which = msg.WhichOneof("command") or "unknown"
                rec = self.received.setdefault(f"{which}:{msg.round}", [0, now, now, msg.deadline_unix])
                rec[0] += 1
                rec[1] = min(rec[1], now)
                rec[2] = max(rec[2], now)
                if which == "train":
                    if msg.round in self.o["hold_rounds"] and msg.round not in self.released:
                        self.held.setdefault(msg.round, []).append((sess, msg))
                    else:
                        self._spawn(self._train(sess, msg))
                elif which == "evaluate":
                    self._spawn(self._evaluate(sess, msg))
                elif which == "shutdown" and msg.shutdown.final:
                    pass   # the coordinator ends the stream next
        except Exception as exc:   # noqa: BLE001
            self._note("ended", self.stats["end_errors"], exc)
            sess["open"] = False
            return
        sess["open"] = False
        self.stats["ended"] += 1

    async def _train(self, sess: dict[str, Any], msg: Any) -> None:
        """Download the global adapter, upload a constant delta of its layout."""
        pb = self.pb
        try:
            spread = self.o["work_spread_s"]
            if spread > 0:
                await asyncio.sleep(random.uniform(0, spread))
            stub, md = sess["stub"], sess["md"]
            sha = msg.train.global_adapter.sha256
            buf = bytearray()
            for attempt in range(4):   # a call that stalls is given up after download_timeout_s and retried
                buf = bytearray()
                try:
                    await asyncio.wait_for(self._download(stub, md, sha, buf), timeout=self.o.get("download_timeout_s", 600))
                    break
                except TimeoutError:
                    self.stats["download_retries"] += 1
                    if attempt == 3:
                        raise
            if hashlib.sha256(buf).hexdigest() != sha:
                raise RuntimeError("downloaded adapter does not hash to its name")
            self.stats["downloads"] += 1
            payload = constant_delta(bytes(buf), 1e-3 * (1 + sess["i"] % 7))
            digest = hashlib.sha256(payload).hexdigest()
            header = pb.UploadHeader(round=msg.round, upload_id=f"r{msg.round}", num_examples=100 + sess["i"] % 50,
                                     sha256=digest, total_size=len(payload), base_sha256=sha, metrics={"loss": 1.0})
            status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=header.upload_id, header=header),
                                             metadata=md, timeout=600)
            if not status.complete:
                async def messages() -> Any:
                    yield pb.UploadMessage(header=header)
                    yield pb.UploadMessage(chunk=pb.Chunk(offset=0, data=payload, total_size=len(payload)))

                await stub.Upload(messages(), metadata=md, timeout=600)
            self.stats["work_ok"] += 1
        except Exception as exc:   # noqa: BLE001
            self._note("work_failed", self.stats["work_errors"], exc)

    async def _download(self, stub: Any, md: Any, sha: str, buf: bytearray) -> None:
        async for chunk in stub.Download(self.pb.DownloadRequest(sha256=sha, offset=0), metadata=md, timeout=600):
            buf.extend(chunk.data)

    async def _evaluate(self, sess: dict[str, Any], msg: Any) -> None:
        pb = self.pb
        spread = self.o["eval_spread_s"]
        if spread > 0:
            await asyncio.sleep(random.uniform(0, spread))
        if not sess["open"]:
            return
        n = min(4, msg.evaluate.max_examples)
        try:
            async with sess["lock"]:
                await sess["call"].write(pb.ClientEvent(eval_report=pb.EvalReport(
                    round=msg.round, num_examples=n, metrics={"accuracy": 0.5, "loss": 1.0})))
            self.stats["eval_reports"] += 1
        except Exception:   # noqa: BLE001
            self.stats["write_errors"] += 1

    async def _control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                return
            cmd, _, arg = line.partition(" ")
            if cmd == "release":
                r = int(arg)
                self.released.add(r)
                for sess, msg in self.held.pop(r, []):
                    self._spawn(self._train(sess, msg))
                self.send(event="released", round=r)
            elif cmd == "stats":
                cpu = resource.getrusage(resource.RUSAGE_SELF)
                self.send(event="stats", stats=self.stats, received=self.received,
                          open_sessions=sum(1 for s in self.sessions if s["open"]),
                          cpu_s=round(cpu.ru_utime + cpu.ru_stime, 2), maxrss_kb=cpu.ru_maxrss)


async def _floor_server(port_file: Path, read_api: str, keepalive_ms: int = 60_000) -> None:
    """The floor: a bare gRPC aio server with the same service and options that accepts every
    Join and reads Session streams, doing nothing else. What a session and a heartbeat cost in
    gRPC and asyncio alone, on this machine, against the same clients."""
    import grpc

    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc as pb_grpc

    class Floor(pb_grpc.FederationServicer):
        async def Join(self, request: Any, context: Any) -> Any:
            return pb.JoinResponse(school_id="x", session_token=os.urandom(16).hex(), heartbeat_interval_s=5.0)

        async def Session(self, request_iterator: Any, context: Any) -> Any:
            if read_api == "read":
                while (await context.read()) is not grpc.aio.EOF:
                    pass
            else:
                async for _ in request_iterator:
                    pass
            if False:   # an async generator, as the coordinator's handler is
                yield pb.ServerCommand()

    extra = [tuple(o) for o in json.loads(os.environ.get("SCALE_BENCH_SERVER_OPTIONS", "[]"))]   # experiments
    server = grpc.aio.server(options=_channel_options(keepalive_ms)[:-1] + extra)
    pb_grpc.add_FederationServicer_to_server(Floor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(f"127.0.0.1:{port}\n")
    await server.wait_for_termination()


def client_main(opts: dict[str, Any]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent ends us with "quit" or SIGTERM
    asyncio.run(_Client(opts).run())
    return 0


# ============================================================================ coordinator side

def write_model_config(out: Path, hidden: int = 64, layers: int = 2) -> str:
    """A config.json is all the coordinator reads of a `dir:` model (layout, no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": hidden,
           "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": hidden // 4, "max_position_embeddings": 256,
           "tie_word_embeddings": True, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return f"dir:{out}"


def write_coordinator_toml(path: Path, *, state_dir: Path, model: str, schools: int, participants: int,
                           deadline_s: float, heartbeat_s: float, session_timeout_s: float, log_level: str,
                           src: Path | None = None, heartbeats_per_s: float | None = None) -> None:
    lines = [
        "# generated by benchmarks/scale_bench.py",
        "[server]", 'listen = "127.0.0.1:0"', f'state_dir = "{state_dir}"', f"heartbeat_interval_s = {heartbeat_s}",
        f"session_timeout_s = {session_timeout_s}", f'log_level = "{log_level}"',
        *([f"heartbeats_per_s = {heartbeats_per_s}"] if heartbeats_per_s is not None else []),
        *(["[server.tls]", "insecure = true   # loopback: this measures sessions, not TLS"] if _has_tls(src) else []),
        "[model]", f'base = "{model}"', f'cache_dir = "{state_dir.parent / "models"}"',
        "[lora]", "rank = 4", "alpha = 8.0", 'target_modules = ["q_proj", "v_proj"]',
        "[rounds]", "total = 2", f"min_schools = {participants}", f"fraction = {participants / schools!r}",
        f"quorum = {max(1, participants // 2)}", f"deadline_s = {deadline_s}",
        "[evaluation]", "school_max_examples = 4", "school_timeout_s = 60.0",
        "[monitor]", 'metrics_listen = "127.0.0.1:0"', 'dashboard_listen = "127.0.0.1:0"',
    ]
    for i in range(schools):
        lines += ["[[schools]]", f'id = "{school_id(i)}"',
                  f'token_sha256 = "{hashlib.sha256(token_for(i).encode()).hexdigest()}"']
    path.write_text("\n".join(lines) + "\n")


def _has_tls(src: Path | None = None) -> bool:
    """Whether this coordinator knows [server.tls] (then plaintext must be asked for)."""
    if src is not None:
        return (src / "fedserver" / "tls.py").exists()
    import importlib.util

    return importlib.util.find_spec("fedserver.tls") is not None


def _fedserver_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fedserver"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from fedserver.cli import main; sys.exit(main())"]


def _coordinator_env(src: Path | None) -> dict[str, str]:
    """`src`: run the coordinator from another copy of the code (e.g. `git archive HEAD`), for
    before/after comparisons against the same clients."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve())] + [v for v in [env.get("PYTHONPATH", "")] if v])
    return env


def _get(url: str, timeout: float = 30.0) -> tuple[str, float]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:   # noqa: S310 - 127.0.0.1 only
        text = r.read().decode()
    return text, time.perf_counter() - t


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def _thin(rows: list[Any], n: int) -> list[Any]:
    """At most about n rows, evenly spaced, the last kept."""
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)] + [rows[-1]]


def _live_connected(path: Path) -> int:
    """Connected schools from the coordinator's live.json (older coordinators: its schools map)."""
    try:
        live = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    return int(live.get("connected", len(live.get("schools", {}))))


def _lag_buckets(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("schoolfed_event_loop_lag_probe_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("schoolfed_event_loop_lag_probe_seconds_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def _rate(n: int, joined: list[dict[str, Any]]) -> float:
    """Joins per second between the first and the last join any client saw."""
    firsts = [j["first_join"] for j in joined if j["first_join"]]
    if not n or not firsts:
        return 0.0
    return round(n / max(1e-3, max(j["last_join"] for j in joined) - min(firsts)), 1)


def _iso(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def parse_log(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The coordinator's JSON log lines, and lines/bytes per event."""
    events: list[dict[str, Any]] = []
    per: dict[str, list[int]] = {}
    nbytes = 0
    for raw in path.read_text(errors="replace").splitlines():
        nbytes += len(raw) + 1
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = {"event": raw[:60]}
        name = str(rec.get("event", ""))
        acc = per.setdefault(name, [0, 0])
        acc[0] += 1
        acc[1] += len(raw) + 1
        if "timestamp" in rec:
            rec["t"] = _iso(rec["timestamp"])
        events.append(rec)
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:12]
    return events, {"lines": len(events), "bytes": nbytes, "by_event": {k: {"lines": v[0], "bytes": v[1]} for k, v in top}}


class _Proc:
    """A client subprocess and the JSON lines it writes."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, bufsize=1, cwd=REPO)
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                self.q.put(json.loads(line))
            except ValueError:
                self.err.append(line)

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            if len(self.err) < 200:
                self.err.append(line.rstrip())

    def tell(self, line: str) -> None:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def poll(self, name: str) -> dict[str, Any] | None:
        """The event `name` if it has arrived (others are dropped), without waiting."""
        try:
            while True:
                msg = self.q.get_nowait()
                if msg.get("event") == name:
                    return msg
        except queue.Empty:
            if self.p.poll() is not None:
                raise RuntimeError(f"client process exited ({self.p.returncode}): {' | '.join(self.err[-5:])}") from None
            return None

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        end = time.time() + timeout
        while time.time() < end:
            try:
                msg = self.q.get(timeout=0.5)
            except queue.Empty:
                if self.p.poll() is not None:
                    raise RuntimeError(f"client process exited ({self.p.returncode}): {' | '.join(self.err[-5:])}") from None
                continue
            if msg.get("event") == name:
                return msg
        raise TimeoutError(f"client did not report {name!r} within {timeout:.0f} s")


def _threads(proc: Any) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def _cpu_s(proc: Any) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_bench(schools: int, procs: int, participants: int, *, workdir: Path | None = None, deadline_s: float = 300.0,
              heartbeat_s: float = 5.0, session_timeout_s: float = 30.0, cpu_window_s: float = 30.0,
              settle_s: float = 10.0, sessions_per_channel: int = 1, join_concurrency: int = 64,
              eval_spread_s: float = 10.0, work_spread_s: float = 0.0, log_level: str = "info",
              coordinator_src: Path | None = None, floor: str | None = None, keepalive_ms: int = 60_000,
              download_timeout_s: float = 600.0, heartbeats_per_s: float | None = None,
              progress: Any = print) -> dict[str, Any]:
    import psutil

    if participants > schools:
        raise ValueError("--participants must be <= --schools")
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="scale-bench-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    if state.exists():
        shutil.rmtree(state)
    model = write_model_config(work / "model")
    toml = work / "coordinator.toml"
    t = time.perf_counter()
    write_coordinator_toml(toml, state_dir=state, model=model, schools=schools, participants=participants,
                           deadline_s=deadline_s, heartbeat_s=heartbeat_s, session_timeout_s=session_timeout_s,
                           log_level=log_level, src=coordinator_src, heartbeats_per_s=heartbeats_per_s)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]},
        "schools": schools, "procs": procs, "participants": participants, "sessions_per_channel": sessions_per_channel,
        "heartbeat_interval_s": heartbeat_s, "heartbeats_per_s": heartbeats_per_s,   # None: the coordinator's default
        "deadline_s": deadline_s, "client_keepalive_ms": keepalive_ms,
        "config": {"toml_bytes": toml.stat().st_size, "write_s": round(time.perf_counter() - t, 2)},
    }
    try:
        import grpc
        result["machine"]["grpcio"] = grpc.__version__
    except ImportError:
        pass
    log_path = work / "coordinator.log"
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    logf = open(log_path, "w")
    started = time.time()
    cmd = ([sys.executable, "-m", "benchmarks.scale_bench", "--floor", floor, "--floor-server", str(port_file),
            "--keepalive-ms", str(keepalive_ms)] if floor
           else [*_fedserver_cmd(), "serve", "--config", str(toml), "--port-file", str(port_file)])
    result["server"] = f"floor ({floor})" if floor else "coordinator"
    coord = subprocess.Popen(cmd,
                             stdout=subprocess.DEVNULL, stderr=logf, cwd=REPO if floor else work,
                             env=_coordinator_env(coordinator_src))
    clients: list[_Proc] = []
    cp = psutil.Process(coord.pid)
    try:
        while not port_file.exists():
            if coord.poll() is not None:
                raise RuntimeError(f"coordinator exited ({coord.returncode}); see {log_path}:\n" + log_path.read_text()[-2000:])
            if time.time() - started > 300:
                raise TimeoutError("coordinator did not start within 300 s")
            time.sleep(0.2)
        address = port_file.read_text().strip()
        result["coordinator_start_s"] = round(time.time() - started, 2)
        urls = {"metrics": "", "dashboard": ""} if floor else json.loads((state / "monitor.json").read_text())
        metrics_url, dash_url = urls["metrics"], urls["dashboard"]
        progress(f"coordinator at {address} after {result['coordinator_start_s']} s (config load + start); "
                 f"metrics {metrics_url}")
        time.sleep(3)
        c0, w0 = _cpu_s(cp), time.time()
        time.sleep(min(10.0, cpu_window_s))
        idle_cpu = (_cpu_s(cp) - c0) / (time.time() - w0) * 100
        rss0 = cp.memory_info().rss
        fds0 = cp.num_fds()
        result["before"] = {"rss_kb": rss0 // 1024, "fds": fds0, "threads": cp.num_threads(),
                            "cpu_percent": round(idle_cpu, 2)}
        progress(f"before schools: RSS {rss0 / 2**20:.0f} MiB, {fds0} fds, CPU {idle_cpu:.2f}% of a core")

        # ---- the schools join
        per = [schools // procs + (1 if k < schools % procs else 0) for k in range(procs)]
        first = 0
        t_join = time.time()
        c_join = _cpu_s(cp)
        for k in range(procs):
            opts = {"address": address, "first": first, "count": per[k], "sessions_per_channel": sessions_per_channel,
                    "join_concurrency": join_concurrency, "hold_rounds": [1], "eval_spread_s": eval_spread_s,
                    "work_spread_s": work_spread_s, "keepalive_ms": keepalive_ms,
                    "download_timeout_s": download_timeout_s}
            clients.append(_Proc([sys.executable, "-m", "benchmarks.scale_bench", "--client", json.dumps(opts)]))
            first += per[k]
        # while they join: (seconds, connected, coordinator CPU seconds) once a second
        got: list[dict[str, Any] | None] = [None] * procs
        trace: list[tuple[float, int, float]] = []
        while any(g is None for g in got):
            for k, c in enumerate(clients):
                got[k] = got[k] or c.poll("joined")
            if time.time() - t_join > max(900.0, schools * 0.2):
                raise TimeoutError("the schools did not finish joining")
            trace.append((round(time.time() - t_join, 1), _live_connected(state / "live.json") if not floor else 0,
                          round(_cpu_s(cp) - c_join, 2)))
            time.sleep(1.0)
        joined = [g for g in got if g is not None]
        n_joined = sum(j["joined"] for j in joined)
        # the interval the schools were given, as their JoinResponses said (the coordinator's budget)
        beat_s = result["heartbeat_interval_given_s"] = max(j["interval"] for j in joined)
        join_errors = [e for c in clients for e in c.err[-3:]]
        # the coordinator has attached every session once its live.json says so (read from
        # disk: polling /metrics would cost the coordinator a scrape each time)
        connected, t_last = (float(n_joined) if floor else 0.0), time.time()
        while not floor and time.time() - t_last < 60:
            now_connected = float(_live_connected(state / "live.json"))
            if now_connected != connected:
                connected, t_last = now_connected, time.time()
            if connected >= n_joined:
                break
            time.sleep(1.0)
        ramp_s = time.time() - t_join
        result["join"] = {
            "joined": n_joined, "failed": sum(j["failed"] for j in joined), "connected": int(connected),
            "seconds": round(ramp_s, 2),
            "rate_per_s": _rate(n_joined, joined),
            "coordinator_cpu_s": round(_cpu_s(cp) - c_join, 2),
            "client_errors": join_errors[:5],
            "trace": _thin(trace, 40),   # (s since the first client started, connected, coordinator CPU s)
        }
        progress(f"{n_joined} joined ({result['join']['failed']} failed), {int(connected)} connected after "
                 f"{ramp_s:.1f} s; coordinator CPU during the ramp {result['join']['coordinator_cpu_s']} s")

        # ---- idle with N connected: memory, descriptors, heartbeat CPU
        time.sleep(settle_s)
        rss1 = cp.memory_info().rss
        fds1 = cp.num_fds()
        c1, w1, th1 = _cpu_s(cp), time.time(), _threads(cp)
        time.sleep(cpu_window_s)
        c2, w2, th2 = _cpu_s(cp), time.time(), _threads(cp)
        rss2 = cp.memory_info().rss
        if floor:
            text, scrape_s, connected_now, lag_idle, dash_s = "", 0.0, float(n_joined), {}, 0.0
        else:
            text, scrape_s = _get(metrics_url)
            connected_now = _metric(text, "schoolfed_schools_connected") or 0.0
            lag_idle = _lag_buckets(text)
            _, dash_s = _get(dash_url.rstrip("/") + "/api/state", timeout=120)
        main_s = th2.get(cp.pid, 0.0) - th1.get(cp.pid, 0.0)
        n = max(1, int(connected_now))
        result["connected"] = {
            "schools": int(connected_now), "rss_kb": rss2 // 1024, "fds": fds1, "threads": cp.num_threads(),
            "rss_per_school_kb": round((rss2 - rss0) / 1024 / n, 2),
            "rss_per_school_kb_at_settle": round((rss1 - rss0) / 1024 / n, 2),
            "fds_per_school": round((fds1 - fds0) / n, 3),
        }
        result["heartbeat"] = {
            "window_s": round(w2 - w1, 1), "beats_per_s": round(n / beat_s, 1),
            "cpu_percent": round((c2 - c1) / (w2 - w1) * 100, 2),
            "cpu_percent_before_schools": result["before"]["cpu_percent"],
            # the event loop's thread (Python: handlers, asyncio) and the rest (gRPC's C core, workers)
            "cpu_percent_event_loop_thread": round(main_s / (w2 - w1) * 100, 2),
            # the process's and the thread's CPU are read from /proc at slightly different
            # moments (clock ticks of 10 ms): a difference just under zero is 0, not negative
            "cpu_percent_other_threads": round(max(0.0, c2 - c1 - main_s) / (w2 - w1) * 100, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),   # other work on the machine during the window
            "cpu_us_per_beat": round((c2 - c1 - (w2 - w1) * idle_cpu / 100) / max(1.0, (w2 - w1) * n / beat_s) * 1e6, 1),
        }
        result["scrape"] = {"metrics_s": round(scrape_s, 4), "dashboard_state_s": round(dash_s, 4),
                            "event_loop_lag_probes_idle": lag_idle}
        progress(f"idle with {int(connected_now)} connected: RSS {rss2 / 2**20:.0f} MiB "
                 f"({result['connected']['rss_per_school_kb']} KB/school), {fds1} fds, heartbeat CPU "
                 f"{result['heartbeat']['cpu_percent']}% of a core over {cpu_window_s:.0f} s; /metrics {scrape_s:.3f} s, "
                 f"dashboard /api/state {dash_s:.3f} s")

        if floor:
            return result
        # ---- the rounds
        t_release = time.time()
        for c in clients:
            c.tell("release 1")
        peak_rss = rss2
        while coord.poll() is None:
            peak_rss = max(peak_rss, cp.memory_info().rss)
            if time.time() - t_release > 2 * deadline_s + 180:
                raise TimeoutError("the rounds did not finish in 2 deadlines")
            time.sleep(0.5)
        result["rounds_phase"] = {"seconds": round(time.time() - t_release, 2), "coordinator_exit": coord.returncode,
                                  "peak_rss_kb": peak_rss // 1024}
        stats = []
        for c in clients:
            c.tell("stats")
            stats.append(c.wait_event("stats", timeout=60))
        events, logsum = parse_log(log_path)
        result["log"] = logsum
        result.update(_analyse(events, stats, deadline_s, n_joined))
        result["client_cpu_s"] = [s["cpu_s"] for s in stats]
        progress(json.dumps({k: result[k] for k in ("fanout", "round")}, indent=1))
    finally:
        for c in clients:
            c.tell("quit")
        for c in clients:
            try:
                c.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                c.p.kill()
        if coord.poll() is None:
            coord.send_signal(signal.SIGTERM)
            try:
                coord.wait(timeout=30)
            except subprocess.TimeoutExpired:
                coord.kill()
        logf.close()
        if own_tmp and not os.environ.get("SCALE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["workdir"] = str(work)
    return result


def _analyse(events: list[dict[str, Any]], stats: list[dict[str, Any]], deadline_s: float, schools: int) -> dict[str, Any]:
    rec: dict[str, list[float]] = {}
    for s in stats:
        for key, (count, first, last, deadline) in s["received"].items():
            r = rec.setdefault(key, [0, first, last, deadline])
            r[0] += count
            r[1], r[2] = min(r[1], first), max(r[2], last)
            r[3] = r[3] or deadline

    def first_event(name: str, **match: Any) -> dict[str, Any] | None:
        for e in events:
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    fan: dict[str, Any] = {}
    c1 = first_event("round committed", round=1)
    if c1 is not None and "evaluate:1" in rec:
        r = rec["evaluate:1"]
        fan["evaluate_after_round_1"] = {"receivers": r[0], "seconds": round(r[2] - c1["t"], 3),
                                         "start": "the 'round committed' log line of round 1"}
    o2 = first_event("round opened", round=2)
    train2, idle2 = rec.get("train:2"), rec.get("idle:2")
    if train2 is not None:
        start = train2[3] - deadline_s   # the deadline is set as the round opens, before the command is queued
        last = max(train2[2], idle2[2] if idle2 else 0.0)
        fan["round_2_open"] = {"receivers": train2[0] + (idle2[0] if idle2 else 0), "train": train2[0],
                               "idle": idle2[0] if idle2 else 0, "seconds": round(last - start, 3),
                               "seconds_from_log_line": round(last - o2["t"], 3) if o2 else None,
                               "start": "round 2's deadline minus deadline_s (set when it opens)"}
    c2 = first_event("round committed", round=2)
    if c2 is not None and "evaluate:2" in rec:
        r = rec["evaluate:2"]
        fan["evaluate_after_round_2"] = {"receivers": r[0], "seconds": round(r[2] - c2["t"], 3),
                                         "start": "the 'round committed' log line of round 2"}
    done = first_event("all rounds done")
    sd = [v for k, v in rec.items() if k.startswith("shutdown:")]
    if done is not None and sd:
        fan["final_shutdown"] = {"receivers": sum(v[0] for v in sd), "seconds": round(max(v[2] for v in sd) - done["t"], 3),
                                 "start": "the 'all rounds done' log line (just after the commands are queued)"}
    rounds: dict[str, Any] = {}
    for number in (1, 2):
        o, c = first_event("round opened", round=number), first_event("round committed", round=number)
        failed = first_event("round failed", round=number)
        rounds[str(number)] = {
            "participants": len(o["participants"]) if o and isinstance(o.get("participants"), list) else (o or {}).get("participants"),
            "committed": c is not None, "accepted": (c or failed or {}).get("accepted"),
            "seconds": (c or {}).get("seconds"), "deadline_s": deadline_s,
            "closed_within_deadline": bool(c is not None and float(c.get("seconds", 1e9)) <= deadline_s),
        }
    agg: dict[str, Any] = {}
    for s in stats:
        for k, v in s["stats"].items():
            if isinstance(v, list):
                agg.setdefault(k, [])
                agg[k] += v[: max(0, 5 - len(agg[k]))]
            else:
                agg[k] = agg.get(k, 0) + v
    return {"fanout": fan, "round": rounds["2"], "round_1": rounds["1"], "clients": agg}


def format_summary(r: dict[str, Any]) -> str:
    if r.get("server", "coordinator") != "coordinator":
        return (f"{r['server']}: {r['schools']} schools, {r['connected']['rss_per_school_kb']} KB each, heartbeats "
                f"{r['heartbeat']['beats_per_s']}/s at {r['heartbeat']['cpu_percent']}% of a core "
                f"(event loop {r['heartbeat']['cpu_percent_event_loop_thread']}%, other threads "
                f"{r['heartbeat']['cpu_percent_other_threads']}%; ~{r['heartbeat']['cpu_us_per_beat']} us/beat)")
    f = r.get("fanout", {})
    lines = [
        f"schools {r['schools']} ({r['procs']} client processes, {r['sessions_per_channel']} session(s) per connection)",
        f"  joined {r['join']['joined']} (failed {r['join']['failed']}) in {r['join']['seconds']} s "
        f"({r['join']['rate_per_s']}/s), coordinator CPU {r['join']['coordinator_cpu_s']} s",
        f"  RSS {r['before']['rss_kb'] // 1024} MiB -> {r['connected']['rss_kb'] // 1024} MiB: "
        f"{r['connected']['rss_per_school_kb']} KB per connected school; fds {r['before']['fds']} -> {r['connected']['fds']}",
        f"  heartbeats {r['heartbeat']['beats_per_s']}/s (each school every {r.get('heartbeat_interval_given_s', 0):g} s): "
        f"coordinator CPU {r['heartbeat']['cpu_percent']}% of a core "
        f"(before schools {r['heartbeat']['cpu_percent_before_schools']}%; ~{r['heartbeat']['cpu_us_per_beat']} us/beat; "
        f"event loop thread {r['heartbeat']['cpu_percent_event_loop_thread']}%, other threads "
        f"{r['heartbeat']['cpu_percent_other_threads']}%)",
    ]
    for name, v in f.items():
        lines.append(f"  fan-out {name}: {v['receivers']} schools, last received after {v['seconds']} s")
    rd = r.get("round", {})
    lines.append(f"  round 2: {rd.get('participants')} participants, accepted {rd.get('accepted')}, "
                 f"committed={rd.get('committed')} in {rd.get('seconds')} s of a {rd.get('deadline_s')} s deadline")
    lines.append(f"  log: {r['log']['lines']} lines, {r['log']['bytes'] / 1e6:.2f} MB; /metrics {r['scrape']['metrics_s']} s, "
                 f"dashboard {r['scrape']['dashboard_state_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schools", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=4, help="client processes holding the sessions")
    p.add_argument("--participants", type=int, default=1000, help="schools sampled per round")
    p.add_argument("--deadline", type=float, default=300.0, help="rounds.deadline_s")
    p.add_argument("--heartbeat", type=float, default=5.0, help="server.heartbeat_interval_s (5 s is the default)")
    p.add_argument("--heartbeats-per-s", type=float, default=None,
                   help="server.heartbeats_per_s (default: the coordinator's own; 0: no budget)")
    p.add_argument("--cpu-window", type=float, default=30.0, help="seconds of steady heartbeats measured")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the last join before measuring")
    p.add_argument("--sessions-per-channel", type=int, default=1, help="1: every school its own TCP connection")
    p.add_argument("--join-concurrency", type=int, default=64, help="Joins in flight per client process")
    p.add_argument("--eval-spread", type=float, default=10.0, help="schools report evaluations over this many seconds")
    p.add_argument("--work-spread", type=float, default=0.0, help="participants start their upload over this many seconds")
    p.add_argument("--log-level", default="info")
    p.add_argument("--coordinator-src", type=Path, default=None,
                   help="run the coordinator from this copy of the code (before/after comparisons)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the config, state and coordinator log here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--floor", choices=("iterator", "read"), default=None,
                   help="instead of the coordinator, a bare gRPC server that only reads the streams (the floor)")
    p.add_argument("--keepalive-ms", type=int, default=60_000,
                   help="the clients' (and the floor server's) HTTP/2 keepalive; the coordinator's is common.wire's")
    p.add_argument("--download-timeout", type=float, default=600.0,
                   help="a participant gives up a Download call after this long and retries (up to 3 times)")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor-server", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client is not None:
        return client_main(json.loads(args.client))
    if args.floor_server is not None:
        asyncio.run(_floor_server(args.floor_server, args.floor or "iterator", args.keepalive_ms))
        return 0
    result = run_bench(args.schools, args.procs, args.participants, workdir=args.workdir, deadline_s=args.deadline,
                       heartbeat_s=args.heartbeat, session_timeout_s=max(30.0, 4 * args.heartbeat),
                       cpu_window_s=args.cpu_window, settle_s=args.settle,
                       sessions_per_channel=args.sessions_per_channel, join_concurrency=args.join_concurrency,
                       eval_spread_s=args.eval_spread, work_spread_s=args.work_spread, log_level=args.log_level,
                       coordinator_src=args.coordinator_src, floor=args.floor, keepalive_ms=args.keepalive_ms,
                       download_timeout_s=args.download_timeout, heartbeats_per_s=args.heartbeats_per_s)
    result["command"] = "python -m benchmarks.scale_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
