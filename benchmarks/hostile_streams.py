"""Hostile HTTP/2 streams against a real coordinator: does its memory stay bounded, and are
honest schools still served?

    python -m benchmarks.hostile_streams [--streams 1000] [--scenarios all] [--json FILE] [--src DIR]

Starts `fedserver serve` (a tiny adapter layout, plaintext on 127.0.0.1, four enrolled
schools) and an honest school in this process (it joins, holds its session, and calls
UploadStatus and the health check every 0.2 s). Then, one scenario at a time (each on a
freshly started coordinator: a process reuses memory it once grew to), an attacker
process opens `--streams` HTTP/2 streams (`--per-conn` per connection) with raw frames: each
stream starts a gRPC call, announces a request message of `--announce` bytes and sends all of
it but the last byte, as fast as flow control lets it, then holds the stream for `--hold`
seconds. Scenarios:

  anon-join       no credentials, Join                (anyone who can reach the port)
  anon-health     no credentials, grpc.health.v1 Check (the one service without identity)
  anon-conns      no credentials, Join, 2 streams per connection (many connections)
  school-upload   an enrolled school's session token, Upload (a participant gone rogue)

Reported per scenario: the coordinator's resident memory (VmRSS, sampled every 50 ms) before,
at its peak and after; bytes the attacker got onto the wire; streams the coordinator ended;
and the honest school's calls (ok / failed, median latency). `--src DIR` runs the coordinator
from another copy of the code (e.g. `git worktree add /tmp/before HEAD~1`), for before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SERVICE = "/schoolfed.v1.Federation/"
HEALTH = "/grpc.health.v1.Health/Check"
SCENARIOS = ("anon-join", "anon-health", "anon-conns", "school-upload")


def token_for(i: int) -> str:
    return f"hostile-bench-token-{i:02d}"


# ============================================================================ the attacker

def attack(address: str, streams: int, per_conn: int, announce: int, path: str, hold_s: float,
           headers: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Open `streams` gRPC calls on raw HTTP/2, each announcing a message of `announce` bytes and
    never finishing it. Returns bytes sent, streams the server ended, connections it closed."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    host, port = address.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    conns: dict[socket.socket, tuple[Any, dict[int, int], bytearray]] = {}
    ended = closed = 0
    left = streams
    while left > 0:
        n = min(per_conn, left)
        left -= n
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            closed += 1
            continue
        s.setblocking(False)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        rem: dict[int, int] = {}
        for _ in range(n):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", address), ("content-type", "application/grpc"), ("te", "trailers"),
                                    *(headers or [])])
            conn.send_data(sid, b"\x00" + struct.pack(">I", announce))
            rem[sid] = announce - 1   # never the last byte
        conns[s] = (conn, rem, bytearray(conn.data_to_send()))
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    zeros = bytes(1 << 16)
    sent = 0
    end = time.monotonic() + hold_s
    while time.monotonic() < end and conns:
        for key, ev in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            conn, rem, out = conns[s]
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    sel.unregister(s)
                    s.close()
                    del conns[s]
                    closed += 1
                    continue
                if data:
                    try:
                        events = conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        events = []
                    for e in events:
                        if isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded, h2.events.TrailersReceived)):
                            if rem.pop(e.stream_id, None) is not None:
                                ended += 1
            for sid in list(rem):
                while rem[sid] > 0 and len(out) < (4 << 20):
                    try:
                        w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, rem[sid], len(zeros))
                        if w <= 0:
                            break
                        conn.send_data(sid, zeros[:w])
                    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                        rem.pop(sid, None)
                        break
                    rem[sid] -= w
                    sent += w
            out += conn.data_to_send()
            if out:
                try:
                    del out[: s.send(out)]
                except BlockingIOError:
                    pass
                except OSError:
                    sel.unregister(s)
                    s.close()
                    del conns[s]
                    closed += 1
    for s in list(conns):
        s.close()
    return {"sent_bytes": sent, "streams_ended_by_server": ended, "connections_closed_by_server": closed}


# ============================================================================ the coordinator

def write_config(work: Path, schools: int = 4, limits: dict[str, Any] | None = None, src: Path | None = None) -> Path:
    from benchmarks.scale_bench import _has_tls, write_model_config

    model = write_model_config(work / "model")
    lines = ["# generated by benchmarks/hostile_streams.py", "[server]", 'listen = "127.0.0.1:0"',
             f'state_dir = "{work / "state"}"', "heartbeat_interval_s = 1.0", "session_timeout_s = 30.0",
             *(["[server.tls]", "insecure = true   # loopback: anonymous peers reach the port"] if _has_tls(src) else []),
             *(["[server.limits]", *(f"{k} = {v!r}" for k, v in limits.items())] if limits else []),
             "[model]", f'base = "{model}"', f'cache_dir = "{work / "models"}"',
             "[lora]", "rank = 4", "alpha = 8.0", 'target_modules = ["q_proj", "v_proj"]',
             "[rounds]", "total = 1", f"min_schools = {schools}", "deadline_s = 600.0",
             "[monitor]", 'metrics_listen = ""', 'dashboard_listen = ""']
    for i in range(schools):
        lines += ["[[schools]]", f'id = "school-{i}"',
                  f'token_sha256 = "{hashlib.sha256(token_for(i).encode()).hexdigest()}"']
    path = work / "coordinator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


# ============================================================================ the honest school

class Honest:
    """School 0: joined, holding its session, and calling every 0.2 s."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ok = 0
        self.failed: list[str] = []
        self.latencies: list[float] = []
        self.session_token = ""

    async def run(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from common import PROTOCOL_VERSION
        from common.pb import federation_pb2 as pb
        from common.pb import federation_pb2_grpc as pb_grpc
        from common.wire import grpc_options

        async with grpc.aio.insecure_channel(self.address, options=grpc_options()) as ch:
            stub = pb_grpc.FederationStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                                   metadata=[("authorization", f"Bearer {token_for(0)}")], timeout=30)
            md = [("x-session-token", resp.session_token)]

            async def beats() -> Any:
                while True:
                    yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=int(time.time())))
                    await asyncio.sleep(0.5)

            session = stub.Session(beats(), metadata=md)
            ready.set()
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await stub.UploadStatus(pb.UploadStatusRequest(upload_id="probe"), metadata=md, timeout=10)
                    await health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)
                    self.ok += 1
                    self.latencies.append(time.monotonic() - t0)
                except grpc.aio.AioRpcError as exc:
                    self.failed.append(f"{exc.code().name}: {exc.details()}"[:200])
                await asyncio.sleep(0.2)
            session.cancel()

    def take(self) -> dict[str, Any]:
        out = {"ok": self.ok, "failed": len(self.failed), "failures": sorted(set(self.failed))[:5],
               "median_latency_ms": round(statistics.median(self.latencies) * 1000, 1) if self.latencies else None}
        self.ok, self.failed, self.latencies = 0, [], []
        return out


async def _session_token(address: str, school: int) -> str:
    import grpc

    from common import PROTOCOL_VERSION
    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc as pb_grpc
    from common.wire import grpc_options

    async with grpc.aio.insecure_channel(address, options=grpc_options()) as ch:
        resp = await pb_grpc.FederationStub(ch).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                                                     metadata=[("authorization", f"Bearer {token_for(school)}")],
                                                     timeout=30)
        return resp.session_token


def _attack_proc(address: str, streams: int, per_conn: int, announce: int, path: str, hold_s: float,
                 headers: list[tuple[str, str]]) -> subprocess.Popen[str]:
    spec = json.dumps({"address": address, "streams": streams, "per_conn": per_conn, "announce": announce,
                       "path": path, "hold_s": hold_s, "headers": headers})
    return subprocess.Popen([sys.executable, "-m", "benchmarks.hostile_streams", "--attacker", spec], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


async def _start_coordinator(work: Path, src: Path | None, limits: dict[str, Any] | None
                             ) -> tuple[subprocess.Popen[bytes], str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    toml = write_config(work, limits=limits, src=src)
    port_file = work / "port"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve())] + [v for v in [env.get("PYTHONPATH", "")] if v])
    log = open(work / "coordinator.log", "w")
    cmd = [sys.executable, "-c", "import sys; from fedserver.cli import main; sys.exit(main())",
           "serve", "--config", str(toml), "--port-file", str(port_file)]
    coord = subprocess.Popen(cmd, cwd=src or REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not port_file.exists():
        if coord.poll() is not None or time.monotonic() - t0 > 120:
            coord.kill()
            log.close()
            raise RuntimeError(f"coordinator did not start; see {work / 'coordinator.log'}")
        await asyncio.sleep(0.1)
    return coord, port_file.read_text().strip(), log


async def run_scenario(name: str, work: Path, streams: int, per_conn: int, announce: int, hold_s: float,
                       src: Path | None = None, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """One attack on a freshly started coordinator (a process reuses memory it was once given,
    so scenarios run one after another on one process would hide each other's growth)."""
    coord, address, log = await _start_coordinator(work, src, limits)
    stop = asyncio.Event()
    honest_task = None
    try:
        honest = Honest(address)
        ready = asyncio.Event()
        honest_task = asyncio.create_task(honest.run(stop, ready))
        await asyncio.wait_for(ready.wait(), 60)
        rogue_token = await _session_token(address, 1)
        await asyncio.sleep(2.0)
        path, headers, pc = {
            "anon-join": (SERVICE + "Join", [], per_conn),
            "anon-health": (HEALTH, [], per_conn),
            "anon-conns": (SERVICE + "Join", [], 2),
            "school-upload": (SERVICE + "Upload", [("x-session-token", rogue_token)], per_conn),
        }[name]
        honest.take()
        before = rss_kib(coord.pid)
        with Sampler(coord.pid) as sampler:
            proc = _attack_proc(address, streams, pc, announce, path, hold_s, headers)
            while proc.poll() is None:
                await asyncio.sleep(0.1)
            out, _ = proc.communicate()
            during = honest.take()
            await asyncio.sleep(2.0)   # the attacker's connections are closed: what is given back
        after = rss_kib(coord.pid)
        attack_out = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return {"rss_before_mib": round(before / 1024, 1), "rss_peak_mib": round(sampler.peak / 1024, 1),
                "rss_after_mib": round(after / 1024, 1), "peak_above_before_mib": round((sampler.peak - before) / 1024, 1),
                "attacker": attack_out, "honest_during_attack": during, "coordinator_alive": coord.poll() is None}
    finally:
        stop.set()
        if honest_task is not None:
            await asyncio.gather(honest_task, return_exceptions=True)
        coord.terminate()
        try:
            coord.wait(20)
        except subprocess.TimeoutExpired:
            coord.kill()
        log.close()


async def run(streams: int = 1000, per_conn: int = 100, announce: int = 1_000_000, hold_s: float = 10.0,
              scenarios: tuple[str, ...] = SCENARIOS, src: Path | None = None, limits: dict[str, Any] | None = None,
              work: Path | None = None) -> dict[str, Any]:
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="hostile-")
        work = Path(tmp.name)
    result: dict[str, Any] = {"streams": streams, "per_conn": per_conn, "announce_bytes": announce, "hold_s": hold_s,
                              "src": str(src) if src else "this tree", "scenarios": {}}
    try:
        for name in scenarios:
            r = await run_scenario(name, work / name, streams, per_conn, announce, hold_s, src, limits)
            result["scenarios"][name] = r
            print(f"  {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result


def format_table(r: dict[str, Any]) -> str:
    rows = [f"{r['streams']} hostile streams ({r['per_conn']} per connection, anon-conns 2), each announcing "
            f"{r['announce_bytes']:,} bytes; coordinator: {r['src']}",
            "| scenario | RSS before | peak | after | attacker bytes sent | streams ended by server | honest calls ok / failed | honest median |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["scenarios"].items():
        a, h = s["attacker"], s["honest_during_attack"]
        rows.append(f"| {name} | {s['rss_before_mib']} MiB | {s['rss_peak_mib']} MiB (+{s['peak_above_before_mib']}) | "
                    f"{s['rss_after_mib']} MiB | {a.get('sent_bytes', 0) / 1e6:,.1f} MB | {a.get('streams_ended_by_server', 0)} | "
                    f"{h['ok']} / {h['failed']} | {h['median_latency_ms']} ms |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--per-conn", type=int, default=100)
    p.add_argument("--announce", type=int, default=1_000_000, help="bytes each stream's message announces")
    p.add_argument("--hold", type=float, default=10.0, help="seconds each attack holds its streams")
    p.add_argument("--scenarios", default="all", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--src", type=Path, default=None, help="run the coordinator from this copy of the code")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--attacker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attacker:
        spec = json.loads(args.attacker)
        spec["headers"] = [tuple(h) for h in spec["headers"]]
        print(json.dumps(attack(**spec)), flush=True)
        return 0
    scenarios = SCENARIOS if args.scenarios == "all" else tuple(s.strip() for s in args.scenarios.split(","))
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    r = asyncio.run(run(args.streams, args.per_conn, args.announce, args.hold, scenarios, args.src))
    print(format_table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
