"""The repo's own fault and attack suite: crashes, damaged state, bad input and hostile streams
against real coordinator processes, checked against an independent recomputation.

    python -m benchmarks.fault_suite [--json FILE] [--quick] [--seed N] [--keep DIR] [--parts ...]

Parts (all by default; `--parts crash,corrupt,inputs,hostile` picks some):

  crash    A real coordinator (`fedserver serve`, a tiny layout, plaintext on 127.0.0.1, FedAvg,
           quorum = all schools) and K torch-free no-op schools, one process each
           (benchmarks/noop_school.py's NoopSchool, run by this module's `--school` role: every
           upload is a constant delta c_i with its own example count n_i). The coordinator is
           SIGKILLed at seeded random moments and at targeted ones found in its JSON log (a
           round just opened, an upload on the wire, the first receipt, the last receipt, i.e.
           the round's close, just after a commit, in the middle of a restart; once a SIGTERM)
           and restarted on the same state directory each time. While it is down, a byte of a
           receipted update file is flipped (once) and the global adapter's artefact truncated
           (once). A school process is SIGKILLed in the middle of an upload (half its bytes
           sent) and restarted. Schools acknowledge an update only when the
           coordinator has answered its Upload with a receipt (or UploadStatus says "already
           accepted"). At the end, for every committed round, the global adapter must equal
           the round's input adapter plus the example-weighted mean of the constant deltas of
           exactly the schools receipted in it (sha256-checked artefacts, numpy, float64).
  corrupt  Damaged state while the coordinator is stopped, one fresh federation per case: a
           flipped byte, NaN written (with its recorded sha256 rewritten to match), or a missing
           file, in a receipted update; the global adapter truncated, alone and with its second
           copy. Restart; record whether it started, what was quarantined, what the log said,
           and check every committed round as above (no non-finite value aggregated).
  inputs   A catalogue of bad requests over real gRPC against a live coordinator with an open
           round (raw bytes that are no protobuf, for every method; wrong shapes, NaN/Inf,
           oversized, wrong sha256, unknown tokens, replays, wrong rounds, out-of-order chunks,
           absurd numbers, huge maps and strings...). Outcome by status code; the coordinator's
           rounds and receipts must be unchanged by each, and it must still serve afterwards
           (health check, every participant's good update accepted, the round committed to the
           recomputed value).
  hostile  benchmarks/hostile_streams.run(): memory under many half-sent HTTP/2 streams.

Prints markdown tables; `--json FILE` writes everything. `--quick` is the test suite's size
(tests/test_fault_suite.py: fewer faults and rounds, no separate damage cases beyond the crash
run's own, 200 hostile streams; its parts run in two lanes at once, `--sequential` to not).
docs/RELIABILITY.md has the promises these figures check and a full run's figures. Internal
role: `--school JSON` (one no-op school process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PARTS = ("crash", "corrupt", "inputs", "hostile")


def token_for(i: int) -> str:
    return f"fault-suite-token-{i:03d}-5f0c8e1d"


def school_id(i: int) -> str:
    return f"school-{i:02d}"


def constant_for(i: int) -> float:
    """School i's delta: every element of every tensor is this (float32)."""
    return float(np.float32(1e-3 * (i + 1) + 2.5e-4 * i * i))


def examples_for(i: int) -> int:
    return 10 * (i + 1) + 3 * i * i


def say(msg: str) -> None:
    print(f"[fault_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ safetensors, by hand

def st_parse(data: bytes) -> dict[str, np.ndarray]:
    """float32 safetensors -> numpy arrays (ValueError when it is not one)."""
    if len(data) < 8:
        raise ValueError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError("header past the end")
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {info['dtype']}")
        a, b = info["data_offsets"]
        if 8 + n + b > len(data):
            raise ValueError(f"{name}: data past the end")
        out[name] = np.frombuffer(data, dtype="<f4", count=(b - a) // 4, offset=8 + n + a).reshape(info["shape"])
    return out


def st_build(tensors: dict[str, tuple[str, list[int], bytes]], header_extra: dict[str, Any] | None = None) -> bytes:
    """name -> (dtype, shape, raw bytes): a safetensors file, offsets in order."""
    header: dict[str, Any] = dict(header_extra or {})
    body = bytearray()
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + bytes(body)


def constant_like(adapter: bytes, value: float, dtype: str = "<f4") -> bytes:
    """The adapter's layout with every element `value` (a valid delta when finite)."""
    arrays = st_parse(adapter)
    return st_build({k: ("F32", list(v.shape), np.full(v.shape, value, dtype=dtype).tobytes()) for k, v in arrays.items()})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ============================================================================ the coordinator

def write_model(out: Path, hidden: int = 64, layers: int = 2) -> str:
    """A `dir:` model with only a config.json: all the coordinator reads of it (the layout)."""
    from benchmarks.scale_bench import write_model_config

    return write_model_config(out, hidden=hidden, layers=layers)


def write_toml(path: Path, *, state_dir: Path, model: str, port: int, schools: int, total: int, quorum: int,
               min_schools: int | None = None, deadline_s: float = 600.0, server_extra: tuple[str, ...] = ()) -> Path:
    lines = ["# generated by benchmarks/fault_suite.py", "[server]", f'listen = "127.0.0.1:{port}"',
             f'state_dir = "{state_dir}"', 'log_level = "info"', "heartbeat_interval_s = 1.0",
             "session_timeout_s = 60.0", *server_extra,
             "[server.tls]", "insecure = true   # loopback only: enrolment tokens, no certificates",
             "[model]", f'base = "{model}"', f'cache_dir = "{path.parent / "models"}"',
             "[lora]", "rank = 4", "alpha = 8.0", 'target_modules = ["q_proj", "v_proj"]',
             "[rounds]", f"total = {total}", f"min_schools = {min_schools or schools}", f"quorum = {quorum}",
             "fraction = 1.0", f"deadline_s = {deadline_s}", "max_failed_rounds = 0",
             "[strategy]", 'name = "fedavg"',
             "[evaluation]", "school_max_examples = 0",
             "[monitor]", 'metrics_listen = ""', 'dashboard_listen = ""']
    for i in range(schools):
        lines += ["[[schools]]", f'id = "{school_id(i)}"',
                  f'token_sha256 = "{hashlib.sha256(token_for(i).encode()).hexdigest()}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM (by PID), then SIGKILL if it has not exited after `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    return proc.returncode


class LogTail:
    """New JSON lines of a growing file, parsed (other lines kept as {'event': text})."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.buf = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        self.buf += data
        *full, self.buf = self.buf.split(b"\n")
        new = []
        for raw in full:
            text = raw.decode(errors="replace").strip()
            if not text:
                continue
            try:
                ev = json.loads(text)
                if not isinstance(ev, dict):
                    ev = {"event": text}
            except ValueError:
                ev = {"event": text}
            new.append(ev)
        self.lines += new
        return new


class Coordinator:
    """`fedserver serve` on a fixed port, started and killed as often as asked; one log per run."""

    def __init__(self, work: Path, toml: Path) -> None:
        self.work = work
        self.toml = toml
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.tail: LogTail | None = None
        self.start_seconds: list[float] = []

    @property
    def log_path(self) -> Path:
        return self.work / f"coordinator-{self.runs}.log"

    def spawn(self) -> None:
        self.runs += 1
        port_file = self.work / f"port-{self.runs}"
        port_file.unlink(missing_ok=True)
        self.port_file = port_file
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([PY, "-m", "fedserver.cli", "serve", "--config", str(self.toml),
                                      "--port-file", str(port_file)], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.tail = LogTail(self.log_path)
        self.spawned_at = time.monotonic()

    async def wait_serving(self, timeout: float = 180.0) -> bool:
        """True once the port file is written; False if the process exited first."""
        assert self.proc is not None
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() - self.spawned_at > timeout:
                raise RuntimeError(f"the coordinator did not start in {timeout:.0f} s; see {self.log_path}")
            await asyncio.sleep(0.05)
        self.address = self.port_file.read_text().strip()
        self.start_seconds.append(round(time.monotonic() - self.spawned_at, 2))
        return True

    async def start(self, timeout: float = 180.0) -> bool:
        self.spawn()
        return await self.wait_serving(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int | None:
        """SIGKILL (by PID); returns the exit code (None: it had exited already)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(30)
        self.log.close()
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self.log.close()
        return code

    async def wait_log(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                       also: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The first new log line matching `pred` (None on timeout, exit, or `also()` true)."""
        assert self.tail is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ev in self.tail.poll():
                if pred(ev):
                    return ev
            if not self.alive() or (also is not None and also()):
                for ev in self.tail.poll():
                    if pred(ev):
                        return ev
                return None
            await asyncio.sleep(0.005)
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        """Lines with this event in every run's log."""
        out = []
        for n in range(1, self.runs + 1):
            for ev in LogTail(self.work / f"coordinator-{n}.log").poll():
                if ev.get("event") == name:
                    out.append({**ev, "run": n})
        return out

    def error_lines(self) -> list[dict[str, Any]]:
        out = []
        for n in range(1, self.runs + 1):
            for ev in LogTail(self.work / f"coordinator-{n}.log").poll():
                if ev.get("level") in ("error", "critical") or "Traceback" in str(ev.get("event", "")):
                    out.append({**ev, "run": n})
        return out


# ============================================================================ the schools

class SchoolProc:
    """One no-op school in its own process (`--school` role); events in a JSON-lines file."""

    def __init__(self, work: Path, i: int, address: str, **opts: Any) -> None:
        self.i = i
        self.sid = school_id(i)
        self.work = work
        self.address = address
        self.opts = opts
        self.events_path = work / f"{self.sid}.events"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail = LogTail(self.events_path)
        self.starts = 0

    def start(self, **extra: Any) -> None:
        self.starts += 1
        spec = {"address": self.address, "token": token_for(self.i), "name": self.sid, "constant": constant_for(self.i),
                "num_examples": examples_for(self.i), "events": str(self.events_path), **self.opts, **extra}
        log = open(self.work / f"{self.sid}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([PY, "-m", "benchmarks.fault_suite", "--school", json.dumps(spec)], cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 10.0) -> int | None:
        return terminate(self.proc, timeout) if self.proc is not None else None

    def all_events(self) -> list[dict[str, Any]]:
        return LogTail(self.events_path).poll()


def _school_role(spec: dict[str, Any]) -> int:
    """One no-op school (benchmarks/noop_school.NoopSchool with scale 0: its delta is the
    constant alone) that also
      - writes what happens to `events` (JSON lines): download, upload-start (and from which
        byte it resumes), stalled, ack (a receipt in hand, or UploadStatus: already accepted),
        cut (the connection went away mid-work), refused;
      - never reports a transfer cut by a coordinator going away as a failure: the command the
        coordinator sends again when the school reconnects does the work again (the upload id
        is the same, so the upload resumes where the coordinator's bytes end);
      - does a round's work again whenever the coordinator sends its command again (after a
        restart that voided a damaged receipt, for example);
      - paces its upload (`chunk_bytes` per message, `chunk_delay_s` between them), and with
        `stall_file` present sends half its payload and then hangs (to be killed mid-upload)."""
    import grpc

    from benchmarks.noop_school import NoopSchool, add_constant
    from common.logs import configure_logging
    from common.messages import Failure, TrainCommand, UploadHeader
    from common.pb import federation_pb2 as pb
    from common.serde import header_to_pb
    from common.wire import iter_chunks
    from fedclient.transfer import download, retry_after_s

    transient = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAUTHENTICATED}   # UNAUTHENTICATED: a session of a dead coordinator
    events = open(spec["events"], "a", buffering=1)

    def note(ev: str, **fields: Any) -> None:
        events.write(json.dumps({"ev": ev, "school": spec["name"], "t": time.time(), "pid": os.getpid(), **fields}) + "\n")

    class SuiteSchool(NoopSchool):
        async def _train(self, stub: Any, md: Any, cmd: TrainCommand) -> None:
            try:
                data = await download(stub, cmd.adapter.sha256, md, bytearray())
                note("download", round=cmd.round, sha256=cmd.adapter.sha256)
                payload = add_constant(data, self.constant, 0.0)
                digest = hashlib.sha256(payload).hexdigest()
                header = UploadHeader(cmd.round, f"r{cmd.round}-{digest[:24]}", self.num_examples, digest, len(payload), 0,
                                      cmd.adapter.sha256, {})
                while True:
                    try:
                        receipt, offset = await self._upload(stub, header, payload, md)
                        break
                    except grpc.aio.AioRpcError as exc:
                        wait_s = retry_after_s(exc)
                        if wait_s is None:
                            raise
                        await asyncio.sleep(wait_s)
                if receipt is not None and (receipt.sha256 != digest or receipt.round != cmd.round):
                    note("bad-receipt", round=cmd.round, receipt=str(receipt))
                else:
                    note("ack", round=cmd.round, sha256=digest, base=cmd.adapter.sha256, resent=receipt is None,
                         resumed_from=offset, num_examples=self.num_examples, constant=self.constant)
            except asyncio.CancelledError:
                note("cut", round=cmd.round, error="cancelled")
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() in transient:
                    note("cut", round=cmd.round, code=exc.code().name, error=(exc.details() or "")[:200])
                else:
                    note("refused", round=cmd.round, code=exc.code().name, error=(exc.details() or "")[:300])
                    self.events.put_nowait(Failure(cmd.round, "train", f"{exc.code().name}: {exc.details()}"[:500]))
            except Exception as exc:   # noqa: BLE001 - recorded; the coordinator is told
                note("error", round=cmd.round, error=repr(exc)[:300])
                self.events.put_nowait(Failure(cmd.round, "train", f"fault-suite school: {exc!r}"[:500]))
            finally:
                self._rounds_seen.discard(cmd.round)   # a command sent again is done again

        async def _upload(self, stub: Any, header: UploadHeader, payload: bytes, md: Any) -> tuple[Any, int]:
            status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=header.upload_id, header=header_to_pb(header)),
                                             metadata=md, timeout=60)
            if status.complete:
                return None, -1
            offset = min(status.received_bytes, len(payload))
            stall_at = len(payload) // 2 if spec.get("stall_file") and Path(spec["stall_file"]).exists() else None
            note("upload-start", round=header.round, offset=offset, total=len(payload))
            chunk, delay = int(spec.get("chunk_bytes", 1 << 20)), float(spec.get("chunk_delay_s", 0.0))

            async def messages() -> Any:
                h = header_to_pb(header)
                h.offset = offset
                yield pb.UploadMessage(header=h)
                for start, data in iter_chunks(payload, offset, chunk):
                    if stall_at is not None and start >= stall_at:
                        note("stalled", round=header.round, sent=start, total=len(payload))
                        await asyncio.sleep(3600)
                    msg = pb.UploadMessage()
                    msg.chunk.SetInParent()
                    msg.chunk.offset, msg.chunk.data, msg.chunk.total_size = start, data, len(payload)
                    yield msg
                    if delay:
                        await asyncio.sleep(delay)

            return await stub.Upload(messages(), metadata=md, timeout=120), offset

    async def run() -> str:
        school = SuiteSchool(spec["address"], spec["token"], name=spec["name"], constant=spec["constant"],
                             num_examples=spec["num_examples"], max_backoff_s=float(spec.get("max_backoff_s", 1.0)),
                             scale=0.0)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        note("start")
        reason = await school.run(stop)
        note("end", reason=reason)
        return reason

    configure_logging("warning", json=True)
    print(asyncio.run(run()), flush=True)
    return 0


# ============================================================================ state, read independently

def read_state(state_dir: Path) -> dict[str, Any]:
    """Rounds, receipts, unfinished uploads and recovery notes, read with plain sqlite3 (read-only)."""
    db = sqlite3.connect(f"file:{state_dir / 'state.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        rounds = [dict(zip(("round", "status", "participants", "global_in", "global_out", "metrics", "failures", "kind"), r))
                  for r in db.execute("SELECT round,status,participants,global_in,global_out,metrics,failures,kind "
                                      "FROM rounds ORDER BY round")]
        for r in rounds:
            r["participants"] = json.loads(r["participants"])
            r["metrics"] = json.loads(r["metrics"])
            r["failures"] = json.loads(r["failures"])
        receipts: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for rnd, sid, uid, sha, n, path, fsha in db.execute(
                "SELECT round,school_id,upload_id,sha256,num_examples,path,file_sha256 FROM receipts ORDER BY round, received_at"):
            receipts[rnd].append({"school": sid, "upload_id": uid, "sha256": sha, "num_examples": n, "path": path,
                                  "file_sha256": fsha or sha})
        uploads = [dict(zip(("upload_id", "school", "round", "total", "received"), r))
                   for r in db.execute("SELECT upload_id,school_id,round,total_size,received FROM uploads")]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()
    return {"rounds": rounds, "receipts": dict(receipts), "uploads": uploads,
            "recoveries": json.loads(meta.get("state_recoveries", "[]")), "global_sha256": meta.get("global_sha256")}


class ArtefactCache:
    """Artefact bytes by sha256, kept by the harness whenever it sees them intact (so damage
    done later, or a quarantine, does not stop the recomputation)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def scan(self, state_dir: Path) -> None:
        folder = state_dir / "artifacts"
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            if p.name in self.data or len(p.name) != 64:
                continue
            try:
                b = p.read_bytes()
            except OSError:
                continue
            if sha256_hex(b) == p.name:
                self.data[p.name] = b

    def get(self, sha: str) -> bytes | None:
        return self.data.get(sha)


def _mean(weights: list[tuple[int, float]]) -> float | None:
    tot = sum(n for n, _ in weights)
    return sum(n * c for n, c in weights) / tot if tot else None


def _multiplicities(names: list[str], receipted: set[str]) -> Any:
    """0, 1 or 2 per school: every combination for a few schools; for many, the receipted
    vector with at most two schools changed."""
    if len(names) <= 8:
        yield from itertools.product((0, 1, 2), repeat=len(names))
        return
    base = [1 if s in receipted else 0 for s in names]
    yield tuple(base)
    for a, b in itertools.combinations_with_replacement(range(len(names)), 2):
        for va in (0, 1, 2):
            for vb in (0, 1, 2):
                m = list(base)
                m[a], m[b] = va, vb
                yield tuple(m)


def verify(state_dir: Path, cache: ArtefactCache, acks: list[dict[str, Any]], schools: int) -> dict[str, Any]:
    """Every committed round against the recomputation, and every acknowledgement against the rounds.

    round r committed:  out == in + sum_i n_i c_i / sum_i n_i over exactly the schools receipted in r
    (elementwise, |diff| <= 1e-6 + 1e-6 |value|). A mismatch is explained, if it can be, by some
    schools counted 0 or 2 times: that is what "lost" and "applied twice" count when the values
    say so; "lost" also counts acknowledged updates with no receipt in a committed round."""
    cache.scan(state_dir)
    st = read_state(state_dir)
    const = {school_id(i): constant_for(i) for i in range(schools)}
    acked: dict[int, set[str]] = defaultdict(set)
    for a in acks:
        acked[int(a["round"])].add(a["school"])
    rows = {r["round"]: r for r in st["rounds"]}
    out: dict[str, Any] = {"rounds": [], "committed": 0, "failed": 0, "open": 0, "mismatching_rounds": 0,
                           "updates_lost": 0, "updates_applied_twice": 0, "acked_in_failed_rounds": 0,
                           "acked_in_no_round": 0, "nonfinite_globals": 0, "unverifiable_rounds": 0,
                           "chain_breaks": 0, "updates_metric_mismatch": 0}
    prev_out = None
    for r in st["rounds"]:
        n = r["round"]
        rc = st["receipts"].get(n, [])
        receipted = {x["school"]: x for x in rc}
        info: dict[str, Any] = {"round": n, "status": r["status"], "receipted": sorted(receipted),
                                "acked": sorted(acked.get(n, set()))}
        out[r["status"]] = out.get(r["status"], 0) + 1
        if r["status"] == "failed":
            out["acked_in_failed_rounds"] += len(acked.get(n, set()))
            info["failures"] = r["failures"]
        if r["status"] != "committed":
            out["rounds"].append(info)
            continue
        if prev_out is not None and r["global_in"] != prev_out:
            out["chain_breaks"] += 1
            info["chain_break"] = f"global_in {r['global_in'][:12]} is not the previous commit's {prev_out[:12]}"
        prev_out = r["global_out"]
        lost = acked.get(n, set()) - set(receipted)
        in_b, out_b = cache.get(r["global_in"]), cache.get(r["global_out"])
        if in_b is None or out_b is None:
            out["unverifiable_rounds"] += 1
            info["verdict"] = "unverifiable: an artefact was never seen intact"
            out["updates_lost"] += len(lost)
            out["rounds"].append(info)
            continue
        a_in, a_out = st_parse(in_b), st_parse(out_b)
        finite = all(np.isfinite(v).all() for v in a_out.values())
        if not finite:
            out["nonfinite_globals"] += 1
        diffs = np.concatenate([(a_out[k].astype(np.float64) - a_in[k].astype(np.float64)).ravel() for k in a_in])
        scale = np.concatenate([np.abs(a_out[k].astype(np.float64)).ravel() for k in a_in])
        observed = float(np.median(diffs))
        tol = 1e-6 + 1e-6 * float(scale.max())
        expected = _mean([(x["num_examples"], const.get(s, float("nan"))) for s, x in receipted.items()])
        ok = expected is not None and bool(np.all(np.abs(diffs - expected) <= tol))
        info.update(observed=observed, expected=expected, ok=ok)
        metric = r["metrics"].get("updates")
        if metric is not None and int(metric) != len(receipted):
            out["updates_metric_mismatch"] += 1
            info["updates_metric"] = metric
        twice: set[str] = set()
        if not ok:
            out["mismatching_rounds"] += 1
            # which multiplicities (0, 1 or 2 per school) explain the observed step?
            names = sorted(set(receipted) | acked.get(n, set()))
            nums = {s: receipted[s]["num_examples"] if s in receipted else examples_for(int(s.split("-")[1])) for s in names}
            best = None
            for mult in _multiplicities(names, set(receipted)):
                m = _mean([(k * nums[s], const[s]) for s, k in zip(names, mult)])
                if m is not None and abs(m - observed) <= tol:
                    dist = sum(abs(k - (1 if s in receipted else 0)) for s, k in zip(names, mult))
                    if best is None or dist < best[0]:
                        best = (dist, dict(zip(names, mult)))
            info["explained_by"] = best[1] if best else None
            if best:
                lost |= {s for s, k in best[1].items() if k == 0 and s in acked.get(n, set())}
                twice = {s for s, k in best[1].items() if k == 2}
        out["updates_lost"] += len(lost)
        out["updates_applied_twice"] += len(twice)
        if lost:
            info["lost"] = sorted(lost)
        if twice:
            info["applied_twice"] = sorted(twice)
        out["rounds"].append(info)
    out["acked_in_no_round"] = sum(len(v) for k, v in acked.items() if k not in rows)
    out["updates_lost"] += out["acked_in_no_round"]
    out["recoveries"] = st["recoveries"]
    out["quarantined"] = sorted(p.name for p in (state_dir / "quarantine").iterdir()) if (state_dir / "quarantine").is_dir() else []
    return out


def acks_of(schools: list[SchoolProc]) -> list[dict[str, Any]]:
    return [e for s in schools for e in s.all_events() if e.get("ev") == "ack"]


# ============================================================================ part 1: crashes

# kind -> what the SIGKILL is aimed at (the docs' table uses these words)
FAULTS = {
    "random": "a seeded random moment (0.2-3 s after the coordinator serves)",
    "open": "just after a round opened (its TrainCommands going out)",
    "upload": "an upload on the wire (a school's chunks arriving)",
    "receipt": "just after the round's first receipt (the answer may not have reached the school)",
    "close": "just after the round's last receipt: the close (aggregation, checkpoint, commit) running",
    "commit": "just after a commit was logged (before the next round opens)",
    "restart": "during a restart, just after the interrupted round was re-folded (before it serves)",
    "sigterm": "a graceful stop (SIGTERM) while results arrive",
    "school": "a school process, half of its upload sent (SIGKILL, then restarted)",
}
QUICK_PLAN: list[tuple[str, dict[str, Any]]] = [
    ("receipt", {"corrupt": "update-flip"}), ("upload", {}), ("school", {}), ("random", {"corrupt": "global-truncated"}),
    ("close", {}),
]
FULL_PLAN: list[tuple[str, dict[str, Any]]] = [
    ("open", {}), ("upload", {}), ("receipt", {"corrupt": "update-flip"}), ("school", {}), ("close", {}),
    ("random", {"corrupt": "global-truncated"}), ("commit", {}), ("restart", {}), ("upload", {}), ("random", {}), ("close", {}),
    ("receipt", {}), ("sigterm", {}), ("school", {}), ("random", {}), ("close", {}), ("random", {}), ("upload", {}),
]


def flip_byte(path: Path, rng: random.Random) -> dict[str, Any]:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    at = rng.randrange(8 + n, len(data))   # in the tensor data: the file still parses
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    return {"path": str(path), "offset": at}


def _state_at_kill(state_dir: Path) -> dict[str, Any]:
    try:
        st = read_state(state_dir)
    except sqlite3.Error as exc:
        return {"error": repr(exc)}
    open_rounds = [r["round"] for r in st["rounds"] if r["status"] == "open"]
    parts = sorted((p.name, p.stat().st_size) for p in (state_dir / "uploads").glob("*.part")) if (state_dir / "uploads").is_dir() else []
    return {"open_round": open_rounds[-1] if open_rounds else None,
            "receipts_in_open_round": len(st["receipts"].get(open_rounds[-1], [])) if open_rounds else 0,
            "committed": sum(r["status"] == "committed" for r in st["rounds"]), "partial_uploads": parts}


def truncate_half(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "r+b") as fh:   # in place: a file sharing the inode (a hard link) is damaged with it
        fh.truncate(size // 2)
    return {"path": str(path), "size": size, "truncated_to": size // 2}


def _damage_while_down(what: str, state: Path, rec: dict[str, Any], rng: random.Random) -> bool:
    """Damage the state of a killed coordinator (False: nothing to damage yet; tried at the next kill).
    update-flip: a byte of a receipted update of the open round. global-truncated: the global
    adapter's artefact cut to half (only once its second copy exists: the copy is made just
    after a commit, and a kill in between plus damage would be two faults at once)."""
    st = read_state(state)
    if what == "update-flip":
        open_r = rec["at_kill"].get("open_round")
        cands = [x for x in st["receipts"].get(open_r, []) if Path(x["path"]).is_file()] if open_r else []
        if not cands:
            return False
        victim = cands[0]
        rec["corrupted"] = {"what": what, "school": victim["school"], "round": open_r, **flip_byte(Path(victim["path"]), rng)}
        return True
    if what == "global-truncated":
        sha = st["global_sha256"]
        art, copy = state / "artifacts" / str(sha), state / "artifact-copies" / str(sha)
        committed = any(r["status"] == "committed" for r in st["rounds"])
        if not committed or not art.is_file() or not copy.is_file():
            return False
        rec["corrupted"] = {"what": what, "global_sha256": sha, **truncate_half(art)}
        return True
    raise ValueError(f"unknown damage {what!r}")


async def _wait_school_event(schools: list[SchoolProc], pred: Callable[[dict[str, Any]], bool], timeout: float,
                             also: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for s in schools:
            for ev in s.tail.poll():
                if pred(ev):
                    return ev
        if also is not None and also():
            return None
        await asyncio.sleep(0.005)
    return None


async def crash_part(work: Path, quick: bool, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    k = 3 if quick else 4
    plan = QUICK_PLAN if quick else FULL_PLAN
    total = 12 if quick else 30
    state = work / "state"
    toml = write_toml(work / "coordinator.toml", state_dir=state, model=write_model(work / "model"), port=free_port(),
                      schools=k, total=total, quorum=k)
    coord = Coordinator(work, toml)
    cache = ArtefactCache()
    t0 = time.monotonic()
    if not await coord.start():
        raise RuntimeError(f"the coordinator did not start; see {coord.log_path}")
    schools = [SchoolProc(work, i, coord.address, chunk_bytes=1024, chunk_delay_s=0.01, stall_file=str(work / f"stall-{i}"))
               for i in range(k)]
    for s in schools:
        s.start()
    faults: list[dict[str, Any]] = []
    pending_corruption: str | None = None
    restarts_failed = 0
    timeout = 90.0
    finished_ok, exit_code = False, None
    try:
        for kind, opts in plan:
            if not coord.alive():
                faults.append({"kind": kind, "skipped": "the federation had finished"})
                continue
            for s in schools:
                s.tail.poll()   # only what happens from now on triggers
            coord.tail.poll()
            rec: dict[str, Any] = {"kind": kind}
            pending_corruption = opts.get("corrupt") or pending_corruption
            finished = lambda: not coord.alive()   # noqa: E731
            if kind == "school":
                victim = schools[rng.randrange(k)]
                stall = Path(victim.opts["stall_file"])
                stall.touch()
                ev = await _wait_school_event([victim], lambda e: e.get("ev") == "stalled", timeout, finished)
                if ev is None:
                    stall.unlink(missing_ok=True)
                    rec["skipped"] = "no upload of this school reached its middle"
                    faults.append(rec)
                    continue
                await asyncio.sleep(0.3)   # its chunks are on the coordinator's disk (fsync when the stream ends)
                victim.kill()
                stall.unlink()
                await asyncio.sleep(0.3)
                rec.update(school=victim.sid, round=ev["round"], sent_bytes=ev["sent"], total_bytes=ev["total"],
                           at_kill=_state_at_kill(state))
                victim.start()
                stalled_round = ev["round"]
                ack = await _wait_school_event([victim], lambda e, r=stalled_round: e.get("ev") == "ack" and e.get("round") == r,
                                               timeout, finished)
                rec["after_restart"] = ({"acknowledged": True, "resumed_from_byte": ack["resumed_from"],
                                         "resent": ack["resent"]} if ack else {"acknowledged": False})
                faults.append(rec)
                say(f"fault school: {json.dumps(rec)}")
                continue
            # ---- the coordinator
            trigger: dict[str, Any] | None = None
            if kind == "random":
                delay = rng.uniform(0.2, 3.0)
                rec["delay_s"] = round(delay, 3)
                end = time.monotonic() + delay
                while time.monotonic() < end and coord.alive():
                    await asyncio.sleep(0.01)
                trigger = {"event": f"{delay:.2f} s after serving"} if coord.alive() else None
            elif kind in ("open", "commit", "receipt", "close", "sigterm", "restart"):
                preds: dict[str, Callable[[dict[str, Any]], bool]] = {
                    "open": lambda e: e.get("event") == "round opened",
                    "commit": lambda e: e.get("event") == "round committed",
                    "receipt": lambda e: e.get("event") == "result accepted" and e.get("accepted") == 1,
                    "restart": lambda e: e.get("event") == "result accepted",
                    "sigterm": lambda e: e.get("event") == "result accepted",
                    "close": lambda e: e.get("event") == "result accepted" and e.get("accepted") == e.get("participants"),
                }
                trigger = await coord.wait_log(preds[kind], timeout)
            elif kind == "upload":
                ev = await _wait_school_event(schools, lambda e: e.get("ev") == "upload-start" and e.get("offset", 0) == 0,
                                              timeout, finished)
                if ev is not None:
                    await asyncio.sleep(rng.uniform(0.0, 0.05))
                    trigger = {"event": f"{ev['school']} started uploading round {ev['round']}"}
            if trigger is None or not coord.alive():
                rec["skipped"] = "trigger not seen (the federation had finished?)"
                faults.append(rec)
                continue
            rec["trigger"] = {k2: trigger.get(k2) for k2 in ("event", "round", "accepted", "participants") if k2 in trigger}
            if kind == "sigterm":
                rec["exit_code"] = coord.stop(60)
            else:
                rec["exit_code"] = coord.kill()
            rec["at_kill"] = _state_at_kill(state)
            cache.scan(state)
            if pending_corruption is not None:
                done = _damage_while_down(pending_corruption, state, rec, rng)
                if done:
                    pending_corruption = None
            if kind == "restart":   # kill it again in the middle of its restart
                coord.spawn()
                ev = await coord.wait_log(lambda e: e.get("event") in ("resumed open round", "serving"), timeout)
                code = coord.kill()
                rec["restart_killed_at"] = ev.get("event") if ev else None
                rec["restart_exit_code"] = code
            started = await coord.start()
            rec["restarted"] = started
            rec["start_s"] = coord.start_seconds[-1] if started else None
            if not started:
                restarts_failed += 1
                rec["exit"] = coord.proc.returncode if coord.proc else None
                rec["log_tail"] = coord.log_path.read_text(errors="replace")[-1500:]
                say(f"fault {kind}: the coordinator did not restart: {rec['log_tail'][-300:]}")
                faults.append(rec)
                break
            faults.append(rec)
            say(f"fault {kind}: {json.dumps(rec)}")
        # ---- the rest of the federation runs to its end
        end = time.monotonic() + (240 if quick else 600)
        while coord.alive() and time.monotonic() < end:
            cache.scan(state)
            await asyncio.sleep(0.2)
        finished_ok = not coord.alive() and coord.proc is not None and coord.proc.returncode == 0
        exit_code = coord.proc.returncode if coord.proc is not None else None
    finally:
        for p in work.glob("stall-*"):
            p.unlink(missing_ok=True)
        alive_at_end = coord.alive()
        coord.stop(30)
        await asyncio.sleep(1.0)
        for s in schools:
            s.stop()
    cache.scan(state)
    acks = acks_of(schools)
    check = verify(state, cache, acks, k)
    school_events = Counter(e.get("ev") for s in schools for e in s.all_events())
    injected = Counter(f["kind"] for f in faults if "skipped" not in f)
    corruption = [f["corrupted"] for f in faults if "corrupted" in f]
    return {"schools": k, "rounds_total": total, "seed": seed, "seconds": round(time.monotonic() - t0, 1),
            "faults": faults, "injected_by_kind": dict(injected), "skipped": sum("skipped" in f for f in faults),
            "restarts": coord.runs - 1, "restarts_failed": restarts_failed, "start_seconds": coord.start_seconds,
            "corruption": corruption, "finished": finished_ok, "exit_code": exit_code, "alive_at_end": alive_at_end,
            "acks": len(acks), "school_events": dict(school_events),
            "error_log_lines": [{k2: e.get(k2) for k2 in ("run", "event", "what", "problem", "round") if k2 in e}
                                for e in coord.error_lines()][:20],
            "check": check}


# ============================================================================ part 3: damaged state

CORRUPTIONS = {
    "update-flip": "one byte flipped in a receipted update file (state/updates/round-N/)",
    "update-nan-rehashed": "a NaN written into a receipted update, its recorded sha256 rewritten to match",
    "update-missing": "a receipted update file deleted",
    "global-truncated": "the global adapter artefact truncated to half (its checkpoint shares the bytes)",
    "global-and-copy-truncated": "the global adapter artefact and its second copy both truncated",
}
QUICK_CORRUPTIONS: tuple[str, ...] = ()   # --quick: the crash run's own damage (update-flip, global-truncated) only


async def _run_to_end(coord: Coordinator, schools: list[SchoolProc], cache: ArtefactCache, state: Path,
                      timeout: float) -> bool:
    end = time.monotonic() + timeout
    while coord.alive() and time.monotonic() < end:
        cache.scan(state)
        await asyncio.sleep(0.2)
    return not coord.alive() and coord.proc is not None and coord.proc.returncode == 0


async def corrupt_case(work: Path, case: str, seed: int) -> dict[str, Any]:
    """One fresh federation of 3 schools: damage `case` while the coordinator is stopped, restart, run to the end."""
    rng = random.Random(seed)
    k = 3
    state = work / "state"
    model = write_model(work / "model")
    port = free_port()
    update_case = case.startswith("update")
    toml = write_toml(work / "coordinator.toml", state_dir=state, model=model, port=port, schools=k, total=1, quorum=k)
    coord = Coordinator(work, toml)
    cache = ArtefactCache()
    t0 = time.monotonic()
    rec: dict[str, Any] = {"case": case, "what": CORRUPTIONS[case]}
    stall = work / "stall-2"
    schools = [SchoolProc(work, i, f"127.0.0.1:{port}", chunk_bytes=1024, stall_file=str(work / f"stall-{i}")) for i in range(k)]
    try:
        if not await coord.start():
            raise RuntimeError(f"the coordinator did not start; see {coord.log_path}")
        if update_case:   # two of three schools deliver round 1, the third stalls; the coordinator is killed with the round open
            stall.touch()
            for s in schools:
                s.start()
            ev = await coord.wait_log(lambda e: e.get("event") == "result accepted" and e.get("accepted") == 2, 120)
            if ev is None:
                raise RuntimeError(f"round 1 did not get two receipts; see {coord.log_path}")
            if await _wait_school_event([schools[2]], lambda e: e.get("ev") == "stalled", 120) is None:
                raise RuntimeError("the third school did not reach the middle of its upload")
            coord.kill()
            stall.unlink()
            cache.scan(state)
            st = read_state(state)
            victim = st["receipts"][1][rng.randrange(2)]
            path = Path(victim["path"])
            rec["damaged"] = {"school": victim["school"], "round": 1, "path": str(path.relative_to(state))}
            if case == "update-flip":
                rec["damaged"].update(flip_byte(path, rng))
            elif case == "update-missing":
                path.unlink()
            else:   # a NaN, and the receipt's recorded sha256 made to match: only re-validation can catch it
                data = bytearray(path.read_bytes())
                (n,) = struct.unpack("<Q", data[:8])
                data[8 + n:8 + n + 4] = struct.pack("<f", float("nan"))
                path.write_bytes(bytes(data))
                digest = sha256_hex(bytes(data))
                db = sqlite3.connect(state / "state.sqlite")
                with db:
                    db.execute("UPDATE receipts SET file_sha256=? WHERE round=1 AND school_id=?", (digest, victim["school"]))
                db.close()
        else:   # round 1 commits and the federation ends; then the global adapter is damaged and it is restarted for round 2
            for s in schools:
                s.start()
            if not await _run_to_end(coord, schools, cache, state, 180):
                raise RuntimeError(f"round 1 did not finish; see {coord.log_path}")
            for s in schools:
                s.stop()
            cache.scan(state)
            sha = read_state(state)["global_sha256"]
            victims = [state / "artifacts" / sha] + ([state / "artifact-copies" / sha] if case == "global-and-copy-truncated" else [])
            for p in victims:
                truncate_half(p)
            rec["damaged"] = {"global_sha256": sha, "paths": [str(p.relative_to(state)) for p in victims]}
            write_toml(toml, state_dir=state, model=model, port=port, schools=k, total=2, quorum=k)
        started = await coord.start()
        rec["restarted"] = started
        if not started:
            rec["log_tail"] = coord.log_path.read_text(errors="replace")[-1500:]
        else:
            if update_case:   # all three still run and reconnect: asked again, a school delivers again
                pass
            else:
                schools = [SchoolProc(work, i, f"127.0.0.1:{port}") for i in range(k)]
                for s in schools:
                    s.start()
            rec["finished"] = await _run_to_end(coord, schools, cache, state, 180)
            rec["alive_after"] = coord.alive()
    finally:
        coord.stop(30)
        for s in schools:
            s.stop()
    acks = [e for i in range(k) for e in LogTail(work / f"{school_id(i)}.events").poll() if e.get("ev") == "ack"]
    check = verify(state, cache, acks, k)
    rec.update(seconds=round(time.monotonic() - t0, 1), check=check,
               quarantined=check["quarantined"],
               recoveries=[_recovery_text(r, state) for r in check["recoveries"]],
               error_log=[e.get("event", "")[:200] for e in coord.error_lines()][:6])
    return rec


def _recovery_text(note: dict[str, Any], state: Path) -> dict[str, Any]:
    if note.get("what") == "global_adapter_fallback":
        action = (f"continued from round {note.get('from_round')}'s global adapter; the training of rounds "
                  f"{note.get('rounds_lost')} is lost")
    else:
        action = str(note.get("action", ""))
    return {"what": note.get("what"), "action": action.replace(str(state), "STATE_DIR"), "round": note.get("round")}


async def corrupt_part(work: Path, quick: bool, seed: int) -> dict[str, Any]:
    cases = QUICK_CORRUPTIONS if quick else tuple(CORRUPTIONS)
    out = []
    for n, case in enumerate(cases):
        d = work / case
        d.mkdir(parents=True)
        say(f"corruption case {case}")
        r = await corrupt_case(d, case, seed + n)
        say(f"  -> started={r.get('restarted')} finished={r.get('finished')} quarantined={r['quarantined']} "
            f"mismatching={r['check']['mismatching_rounds']} lost={r['check']['updates_lost']}")
        out.append(r)
    return {"cases": out}


# ============================================================================ part 4: bad inputs

SERVICE = "/schoolfed.v1.Federation/"
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f garbage, not a protobuf message"   # a field announcing 4 GB, then junk


def _utf8_bad_join() -> bytes:
    """A JoinRequest whose capabilities.model is not UTF-8 (protobuf strings must be)."""
    inner = b"\x0a\x04\xff\xfe\xfd\xfc"
    return b"\x08\x01" + b"\x12" + bytes([len(inner)]) + inner


class Catalogue:
    """Bad requests against a live coordinator with round 1 open; each outcome recorded with
    whether the state (rounds, receipts, global adapter) stayed as it was."""

    def __init__(self, address: str, state: Path, participants: int) -> None:
        import grpc

        from common.pb import federation_pb2 as pb
        from common.pb import federation_pb2_grpc as pb_grpc
        from common.wire import grpc_options

        self.grpc, self.pb = grpc, pb
        self.address = address
        self.state = state
        self.participants = participants
        # one connection per school, as real schools have (the coordinator caps streams per connection)
        self.options = [*grpc_options(), ("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.aio.insecure_channel(address, options=self.options)   # anonymous and short calls
        self.stub = pb_grpc.FederationStub(self.channel)
        self.channels: dict[int, Any] = {}
        self.stubs: dict[int, Any] = {}
        self._stub_cls = pb_grpc.FederationStub
        self.md: dict[int, list[tuple[str, str]]] = {}
        self.sessions: dict[int, Any] = {}
        self.results: list[dict[str, Any]] = []
        self._next = 1   # school 0 is kept for the good upload and the replays
        self.round = 0
        self.global_sha = ""
        self.adapter = b""

    # ---- plumbing
    def stub_for(self, i: int) -> Any:
        if i not in self.stubs:
            self.channels[i] = self.grpc.aio.insecure_channel(self.address, options=self.options)
            self.stubs[i] = self._stub_cls(self.channels[i])
        return self.stubs[i]

    def fresh(self) -> int:
        """A participant not used by an upload case yet (each school may leave two unfinished uploads)."""
        i = self._next
        self._next += 1
        if i >= self.participants:
            raise RuntimeError("the catalogue ran out of fresh participants; enrol more")
        return i

    async def join(self, i: int) -> list[tuple[str, str]]:
        pb = self.pb
        from common import PROTOCOL_VERSION

        resp = await self.stub_for(i).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                          capabilities=pb.Capabilities(num_examples=examples_for(i))),
                                    metadata=[("authorization", f"Bearer {token_for(i)}")], timeout=30)
        self.md[i] = [("x-session-token", resp.session_token)]
        return self.md[i]

    async def open_session(self, i: int) -> Any:
        pb = self.pb

        async def beats() -> Any:
            while True:
                yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time()))
                await asyncio.sleep(1.0)

        call = self.stub_for(i).Session(beats(), metadata=self.md[i])
        self.sessions[i] = call
        return call

    def snapshot(self) -> Any:
        st = read_state(self.state)
        return ([(r["round"], r["status"], r["global_out"]) for r in st["rounds"]],
                sorted((n, x["school"], x["sha256"]) for n, xs in st["receipts"].items() for x in xs), st["global_sha256"])

    async def case(self, method: str, name: str, fn: Callable[[], Any], timeout: float = 20.0,
                   expect_change: bool = False) -> dict[str, Any]:
        """`expect_change`: a good update is part of the request (its receipt is the expected change)."""
        grpc = self.grpc
        before = self.snapshot()
        t = time.monotonic()
        try:
            r = await asyncio.wait_for(fn(), timeout)
            code, detail = "OK", (r if isinstance(r, str) else "")
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code().name, exc.details() or ""
        except TimeoutError:
            code, detail = "NO STATUS", f"no answer within {timeout:.0f} s"
        after = self.snapshot()
        rec = {"method": method, "case": name, "code": code, "detail": detail[:200],
               "state_unchanged": before == after, "ms": round((time.monotonic() - t) * 1000, 1)}
        if expect_change:
            rec["expected_change"] = True
        self.results.append(rec)
        return rec

    def header(self, payload: bytes, **kw: Any) -> Any:
        from common.messages import UploadHeader

        f = dict(round=self.round, upload_id="u-" + sha256_hex(payload)[:16], num_examples=10, digest=sha256_hex(payload),
                 total_size=len(payload), offset=0, base_sha256=self.global_sha)
        f.update(kw)
        return UploadHeader(**f)

    async def upload_msgs(self, i: int, msgs: list[Any]) -> Any:
        async def gen() -> Any:
            for m in msgs:
                yield m

        return await self.stub_for(i).Upload(gen(), metadata=self.md[i], timeout=30)

    def hmsg(self, h: Any) -> Any:
        from common.serde import header_to_pb

        return self.pb.UploadMessage(header=header_to_pb(h))

    def cmsg(self, offset: int, data: bytes, total: int) -> Any:
        m = self.pb.UploadMessage()
        m.chunk.SetInParent()
        m.chunk.offset, m.chunk.data, m.chunk.total_size = offset, data, total
        return m

    async def send(self, i: int, payload: bytes, chunk: int = 1 << 20, **kw: Any) -> Any:
        """A whole upload (header + chunks) from school i, with header fields overridden by kw."""
        h = self.header(payload, **kw)
        msgs = [self.hmsg(h)] + [self.cmsg(o, payload[o:o + chunk], h.total_size) for o in range(0, len(payload), chunk)]
        return await self.upload_msgs(i, msgs)

    async def raw_unary(self, method: str, data: bytes, md: Any = None) -> Any:
        call = self.channel.unary_unary(method)
        return await call(data, metadata=md, timeout=15)

    async def raw_unary_stream(self, method: str, data: bytes, md: Any = None) -> Any:
        call = self.channel.unary_stream(method)
        return [m async for m in call(data, metadata=md, timeout=15)]

    async def raw_stream_unary(self, method: str, msgs: list[bytes], md: Any = None) -> Any:
        async def gen() -> Any:
            for m in msgs:
                yield m

        call = self.channel.stream_unary(method)
        return await call(gen(), metadata=md, timeout=15)

    async def raw_stream_stream(self, method: str, msgs: list[bytes], md: Any = None, hold: float = 3.0) -> str:
        async def gen() -> Any:
            for m in msgs:
                yield m
            await asyncio.sleep(hold)

        call = self.channel.stream_stream(method)(gen(), metadata=md, timeout=15)
        got = 0
        try:
            async for _ in call:
                got += 1
        except self.grpc.aio.AioRpcError:
            raise
        return f"stream ended normally after {got} commands"

    async def session_events(self, i: int, events: list[Any], hold: float = 2.0) -> str:
        """Send events on a new Session of school i; report whether the stream stays open."""
        pb = self.pb

        async def gen() -> Any:
            for e in events:
                yield e
            while True:
                await asyncio.sleep(0.5)
                yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time()))

        call = self.stub_for(i).Session(gen(), metadata=self.md[i])

        async def read() -> None:
            async for _ in call:
                pass

        task = asyncio.ensure_future(read())
        done, _ = await asyncio.wait({task}, timeout=hold)
        if task in done:
            task.result()   # raises the status if the coordinator ended the stream with one
            return "stream ended normally"
        call.cancel()
        with contextlib.suppress(BaseException):
            await task
        return f"events taken, stream kept open ({hold:.0f} s)"

    # ---- the catalogue
    async def run_all(self, max_upload_bytes: int) -> None:
        pb, grpc = self.pb, self.grpc
        from common import PROTOCOL_VERSION
        from common.serde import header_to_pb
        from common.wire import MAX_CHUNK_BYTES
        from fedclient.transfer import status_lost

        good0 = constant_like(self.adapter, constant_for(0))
        arrays = st_parse(self.adapter)
        names = list(arrays)
        first = names[0]

        def delta(value: float = 1e-3, **over: tuple[str, list[int], bytes] | None) -> bytes:
            t: dict[str, tuple[str, list[int], bytes]] = {
                k: ("F32", list(v.shape), np.full(v.shape, value, dtype="<f4").tobytes()) for k, v in arrays.items()}
            for k, v in over.items():
                if v is None:
                    t.pop(k, None)
                else:
                    t[k] = v
            return st_build(t)

        def with_value(value: float) -> bytes:
            a = np.full(arrays[first].shape, 1e-3, dtype="<f4")
            a.flat[0] = value
            return delta(**{first: ("F32", list(a.shape), a.tobytes())})

        tok = lambda i: [("authorization", f"Bearer {token_for(i)}")]   # noqa: E731
        c = self.case
        S = SERVICE
        # -- bytes that are no protobuf message, for every method
        await c("Join", "raw bytes, not protobuf (no token)", lambda: self.raw_unary(S + "Join", GARBAGE))
        await c("Join", "raw bytes, not protobuf (valid token)", lambda: self.raw_unary(S + "Join", GARBAGE, tok(self.participants + 1)))
        await c("Join", "string field not UTF-8", lambda: self.raw_unary(S + "Join", _utf8_bad_join(), tok(self.participants + 1)))
        await c("UploadStatus", "raw bytes, not protobuf", lambda: self.raw_unary(S + "UploadStatus", GARBAGE, self.md[0]))
        await c("Download", "raw bytes, not protobuf", lambda: self.raw_unary_stream(S + "Download", GARBAGE, self.md[0]))
        i = self.fresh()
        await c("Upload", "raw bytes, not protobuf", lambda: self.raw_stream_unary(S + "Upload", [GARBAGE], self.md[i]))
        i = self.fresh()
        await c("Session", "raw bytes, not protobuf", lambda: self.raw_stream_stream(S + "Session", [GARBAGE], self.md[i]))
        await c("Health", "raw bytes, not protobuf", lambda: self.raw_unary("/grpc.health.v1.Health/Check", GARBAGE))
        await c("(none)", "a method that does not exist", lambda: self.raw_unary(S + "Nope", b"", self.md[0]))
        # -- Join
        await c("Join", "no enrolment token", lambda: self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=15))
        await c("Join", "unknown enrolment token", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", "Bearer not-a-token")], timeout=15))
        await c("Join", "token of 8 KB", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", "Bearer " + "x" * 8000)], timeout=15))
        await c("Join", "protocol version 99", lambda: self.stub.Join(pb.JoinRequest(protocol_version=99),
                                                                      metadata=tok(self.participants + 1), timeout=15))
        await c("Join", "capabilities.model of 100 KB", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(model="m" * 100_000)),
            metadata=tok(self.participants + 1), timeout=15))
        await c("Join", "capabilities.hardware of 900 KB", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(hardware="h" * 900_000)),
            metadata=tok(self.participants + 1), timeout=15))
        await c("Join", "capabilities.client_version of 3 MB (over the message limit)", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(client_version="v" * 3_000_000)),
            metadata=tok(self.participants + 1), timeout=15))
        await c("Join", "num_examples 2^64-1, lora_rank 2^32-1", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                           capabilities=pb.Capabilities(num_examples=2**64 - 1, lora_rank=2**32 - 1)),
            metadata=tok(self.participants + 1), timeout=15))
        await c("Join", "control characters and NUL in strings", lambda: self.stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(
                hardware="\x00\x1b[2J\r\nlevel=critical", client_version="\u202e\x00")),
            metadata=tok(self.participants + 1), timeout=15))
        # -- Session
        await c("Session", "no session token", lambda: self.raw_stream_stream(S + "Session", [], None))
        await c("Session", "forged session token", lambda: self.raw_stream_stream(S + "Session", [], [("x-session-token", "forged")]))
        i = self.fresh()
        await c("Session", "eval report never asked for (NaN, 10^18 examples)", lambda: self.session_events(i, [
            pb.ClientEvent(eval_report=pb.EvalReport(round=self.round, num_examples=10**18,
                                                     metrics={"accuracy": float("nan"), "loss": -1.0}))]))
        i = self.fresh()
        await c("Session", "failure report with a 900 KB message", lambda: self.session_events(i, [
            pb.ClientEvent(failure=pb.Failure(round=self.round, phase="train", message="f" * 900_000))]))
        i = self.fresh()
        await c("Session", "progress with fraction NaN and a 64 KB phase", lambda: self.session_events(i, [
            pb.ClientEvent(progress=pb.Progress(round=self.round, phase="p" * 65536, fraction=float("nan")))]))
        i = self.fresh()
        await c("Session", "5,000 heartbeats at once", lambda: self.session_events(i, [
            pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time())) for _ in range(5000)], hold=3.0))
        # -- Download
        md0 = self.md[0]
        await c("Download", "unknown sha256", lambda: self.raw_list(self.stub.Download(pb.DownloadRequest(sha256="0" * 64), metadata=md0, timeout=15)))
        await c("Download", "path traversal as sha256", lambda: self.raw_list(self.stub.Download(
            pb.DownloadRequest(sha256="../state.sqlite"), metadata=md0, timeout=15)))
        await c("Download", "offset past the end", lambda: self.raw_list(self.stub.Download(
            pb.DownloadRequest(sha256=self.global_sha, offset=10**9), metadata=md0, timeout=15)))
        await c("Download", "offset 2^64-1", lambda: self.raw_list(self.stub.Download(
            pb.DownloadRequest(sha256=self.global_sha, offset=2**64 - 1), metadata=md0, timeout=15)))
        await c("Download", "no session token", lambda: self.raw_list(self.stub.Download(
            pb.DownloadRequest(sha256=self.global_sha), timeout=15)))
        # -- UploadStatus (pre-flight of a header)
        def status(upload_id: str, h: Any = None) -> Any:
            req = pb.UploadStatusRequest(upload_id=upload_id)
            if h is not None:
                req.header.CopyFrom(header_to_pb(h))
            return self.stub.UploadStatus(req, metadata=md0, timeout=15)

        await c("UploadStatus", "upload_id with path traversal", lambda: status("../../etc/passwd"))
        await c("UploadStatus", "upload_id of 10,000 characters", lambda: status("u" * 10_000))
        await c("UploadStatus", "header: total_size 0", lambda: status("s1", self.header(good0, upload_id="s1", total_size=0)))
        await c("UploadStatus", "header: total_size 2^63", lambda: status("s2", self.header(good0, upload_id="s2", total_size=2**63)))
        await c("UploadStatus", "header: num_examples 2^63", lambda: status("s3", self.header(good0, upload_id="s3", num_examples=2**63)))
        await c("UploadStatus", "header: 10,000 metrics", lambda: status("s4", self.header(
            good0, upload_id="s4", metrics={f"m{j}": 1.0 for j in range(10_000)})))
        await c("UploadStatus", "header: metric NaN", lambda: status("s5", self.header(good0, upload_id="s5", metrics={"loss": float("nan")})))
        await c("UploadStatus", "header: metric name of 50 KB", lambda: status("s6", self.header(good0, upload_id="s6", metrics={"l" * 50_000: 1.0})))
        await c("UploadStatus", "header: sha256 not hex", lambda: status("s7", self.header(good0, upload_id="s7", digest="z" * 64)))
        await c("UploadStatus", "header: the wrong round", lambda: status("s8", self.header(good0, upload_id="s8", round=self.round + 5)))
        await c("UploadStatus", "header: kind 'answers' in a train round", lambda: status("s9", self.header(good0, upload_id="s9", kind="answers")))
        await c("UploadStatus", "header: encoding 'bogus'", lambda: status("s10", self.header(good0, upload_id="s10", encoding="bogus")))
        # -- Upload: the stream itself
        i = self.fresh()
        await c("Upload", "a chunk before any header", lambda: self.upload_msgs(i, [self.cmsg(0, good0[:1024], len(good0))]))
        i = self.fresh()
        await c("Upload", "two headers", lambda: self.upload_msgs(i, [self.hmsg(self.header(good0))] * 2))
        i = self.fresh()
        await c("Upload", "header only, no chunks", lambda: self.upload_msgs(i, [self.hmsg(self.header(good0))]))
        i = self.fresh()
        await c("Upload", "chunks out of order (offset 4096 first)", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(good0)), self.cmsg(4096, good0[4096:], len(good0)), self.cmsg(0, good0[:4096], len(good0))]))
        i = self.fresh()
        await c("Upload", "chunk offset past the announced size", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(good0)), self.cmsg(len(good0) * 4, good0, len(good0))]))
        i = self.fresh()
        await c("Upload", "more bytes than announced", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(good0)), self.cmsg(0, good0 + b"\0" * 64, len(good0))]))
        i = self.fresh()
        big = good0 + b"\0" * MAX_CHUNK_BYTES
        await c("Upload", "one chunk over 1 MiB", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(big)), self.cmsg(0, big[:MAX_CHUNK_BYTES + 1], len(big))]))
        i = self.fresh()
        await c("Upload", "announced size over the coordinator's limit", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(good0, total_size=max_upload_bytes + 1)), self.cmsg(0, good0, max_upload_bytes + 1)]))
        i = self.fresh()
        await c("Upload", "resume header at a wrong offset", lambda: self.upload_msgs(i, [
            self.hmsg(self.header(good0, offset=999)), self.cmsg(999, good0[999:], len(good0))]))
        # -- Upload: the payload
        bad_payloads: list[tuple[str, bytes, dict[str, Any]]] = [
            ("wrong sha256 (the payload is another)", good0, {"digest": sha256_hex(b"another payload")}),
            ("NaN in the delta", with_value(float("nan")), {}),
            ("+Inf in the delta", with_value(float("inf")), {}),
            ("-Inf in the delta", with_value(float("-inf")), {}),
            ("a tensor of the wrong shape", delta(**{first: ("F32", [3, 3], np.zeros(9, "<f4").tobytes())}), {}),
            ("a tensor missing", delta(**{first: None}), {}),
            ("an extra tensor", delta(**{"base_model.model.lm_head.weight": ("F32", [4], np.zeros(4, "<f4").tobytes())}), {}),
            ("float16 instead of float32", delta(**{first: ("F16", list(arrays[first].shape),
                                                            np.zeros(arrays[first].shape, "<f2").tobytes())}), {}),
            ("not safetensors at all", b"garbage, not safetensors " * 40, {}),
            ("safetensors header length 2^60", struct.pack("<Q", 2**60) + good0[8:], {}),
            ("safetensors header not JSON", struct.pack("<Q", 16) + b"{not json at all" + good0[24:], {}),
            ("data offsets overlapping / past the end", st_build({
                k: ("F32", list(v.shape), b"") for k, v in arrays.items()}, {}) + b"\0" * 64, {}),
            ("norm far over max_norm (every element 1e6)", delta(1e6), {}),
            ("num_examples 0", good0, {"num_examples": 0}),
            ("num_examples 2^63", good0, {"num_examples": 2**63}),
            ("encoding 'int8' with a payload that is not int8", good0, {"encoding": "int8"}),
            ("encoding 'bogus'", good0, {"encoding": "bogus"}),
            ("computed on a stale adapter (base_sha256)", good0, {"base_sha256": "ab" * 32}),
            ("for the wrong round", good0, {"round": self.round + 3}),
        ]
        for name, payload, kw in bad_payloads:
            i = self.fresh()
            await c("Upload", name, lambda p=payload, kw=kw, i=i: self.send(i, p, **kw))
        nonpart = self.participants   # joined after the round opened: not a participant
        await self.join(nonpart)
        await c("Upload", "from a school that is not a participant", lambda: self.send(nonpart, good0))
        await c("Upload", "no session token", lambda: self.raw_stream_unary(S + "Upload", [
            self.hmsg(self.header(good0)).SerializeToString()], None))
        # upload id reused with another payload
        i = self.fresh()
        first_part = [self.hmsg(self.header(good0, upload_id="reused")), self.cmsg(0, good0[:1024], len(good0))]
        await c("Upload", "(setup) half an upload, the stream closed", lambda: self.upload_msgs(i, first_part))
        other = constant_like(self.adapter, 2e-3)
        await c("Upload", "upload id reused for another payload", lambda: self.send(i, other, upload_id="reused"))
        # two streams for the same upload at once
        i = self.fresh()
        own = constant_like(self.adapter, constant_for(i))   # this school's own good update: one stream may deliver it

        async def two_streams() -> str:
            h = self.header(own, upload_id="twice", num_examples=examples_for(i))

            async def slow(k: int) -> Any:
                async def gen() -> Any:
                    yield self.hmsg(h)
                    for o in range(0, len(own), 1024):
                        yield self.cmsg(o, own[o:o + 1024], len(own))
                        await asyncio.sleep(0.02)
                return await self.stub_for(i).Upload(gen(), metadata=self.md[i], timeout=30)

            res = await asyncio.gather(slow(0), slow(1), return_exceptions=True)
            codes = sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in res)
            bad = [r for r in res if isinstance(r, grpc.aio.AioRpcError)]
            if bad and all(status_lost(r) for r in bad):
                # gRPC's asyncio client loses the status of a stream the coordinator ends while the
                # client still writes (grpc/grpc#36066): ask the coordinator what became of it
                st = await self.stub_for(i).UploadStatus(pb.UploadStatusRequest(upload_id=h.upload_id),
                                                         metadata=self.md[i], timeout=15)
                if st.complete and codes.count("OK") == 1:
                    return "one OK; the other's status lost by gRPC's client (grpc/grpc#36066), the upload complete once"
            if bad:
                raise bad[0]
            return f"both: {codes}"

        await c("Upload", "the same good upload on two streams at once (one accepted, the other refused)", two_streams,
                expect_change=True)
        # -- the control: a good upload, then replays
        await c("Upload", "(control) a good update", lambda: self.send(0, good0, num_examples=examples_for(0)))
        await c("Upload", "replay: the same upload again", lambda: self.send(0, good0, num_examples=examples_for(0)))
        await c("Upload", "replay: the same update under a new upload id", lambda: self.send(0, good0, upload_id="again",
                                                                                            num_examples=examples_for(0)))
        await c("UploadStatus", "replay pre-flight: UploadStatus of the accepted upload",
                lambda: status(self.header(good0).upload_id, self.header(good0, num_examples=examples_for(0))))
        await c("Upload", "for a round that closed long ago (round 0)", lambda: self.send(0, good0, round=0, upload_id="old"))

    async def raw_list(self, call: Any) -> str:
        n = 0
        async for _ in call:
            n += 1
        return f"{n} chunks"

    async def close(self) -> None:
        for call in self.sessions.values():
            call.cancel()
        for ch in [self.channel, *self.channels.values()]:
            await ch.close()


async def inputs_part(work: Path, quick: bool, seed: int) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedclient.transfer import download

    participants = 48
    enrolled = participants + 2
    state = work / "state"
    max_upload = 4 << 20   # small, to be exceeded (a chunk is at most 1 MiB)
    toml = write_toml(work / "coordinator.toml", state_dir=state, model=write_model(work / "model"), port=free_port(),
                      schools=enrolled, total=1, quorum=participants, min_schools=participants,
                      server_extra=(f"max_upload_bytes = {max_upload}",))
    coord = Coordinator(work, toml)
    t0 = time.monotonic()
    if not await coord.start():
        raise RuntimeError(f"the coordinator did not start; see {coord.log_path}")
    cat = Catalogue(coord.address, state, participants)
    out: dict[str, Any] = {}
    acks: list[dict[str, Any]] = []
    try:
        first_cmd: dict[int, Any] = {}
        for i in range(participants):
            await cat.join(i)
            await cat.open_session(i)

        async def train_cmd(i: int) -> Any:
            async for cmd in cat.sessions[i]:
                if cmd.WhichOneof("command") == "train":
                    return cmd
            return None

        cmd = await asyncio.wait_for(train_cmd(0), 120)
        first_cmd[0] = cmd
        cat.round, cat.global_sha = cmd.round, cmd.train.global_adapter.sha256
        cat.adapter = await download(cat.stub_for(0), cat.global_sha, cat.md[0], bytearray())
        await cat.run_all(max_upload)
        # ---- still serving? health, then every participant delivers its good update and the round commits
        health = health_pb2_grpc.HealthStub(cat.channel)
        h = await health.Check(health_pb2.HealthCheckRequest(), timeout=15)
        out["health_after"] = health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)
        out["alive_after_catalogue"] = coord.alive()
        accepted_before = {x[1] for x in cat.snapshot()[1]}
        for i in range(participants):
            sid = school_id(i)
            if sid in accepted_before:
                acks.append({"round": cat.round, "school": sid})
                continue
            await cat.join(i)   # a fresh session (some were used by the Session cases)
            payload = constant_like(cat.adapter, constant_for(i))
            try:
                r = await cat.send(i, payload, num_examples=examples_for(i), upload_id=f"final-{i}")
                if r.round == cat.round:
                    acks.append({"round": cat.round, "school": sid})
            except grpc.aio.AioRpcError as exc:
                out.setdefault("final_upload_errors", []).append(f"{sid}: {exc.code().name}: {exc.details()}"[:200])
        out["final_acks"] = len(acks)
        end = time.monotonic() + 120
        while coord.alive() and time.monotonic() < end:
            await asyncio.sleep(0.2)
        out["finished"] = not coord.alive() and coord.proc is not None and coord.proc.returncode == 0
    finally:
        await cat.close()
        coord.stop(30)
    cache = ArtefactCache()
    cache.scan(state)
    cache.data.setdefault(cat.global_sha, cat.adapter)
    check = verify(state, cache, acks, enrolled)
    by_code = Counter(r["code"] for r in cat.results if not r["case"].startswith("(control)") and not r["case"].startswith("(setup)"))
    out.update(cases=cat.results, by_code=dict(sorted(by_code.items(), key=lambda kv: -kv[1])),
               unknown_or_internal=sum(r["code"] in ("UNKNOWN", "INTERNAL") for r in cat.results),
               state_changed=[r["case"] for r in cat.results if not r["state_unchanged"] and not r["case"].startswith("(control)")
                              and not r.get("expected_change")],
               check=check, seconds=round(time.monotonic() - t0, 1),
               error_log=[e.get("event", "")[:200] for e in coord.error_lines()][:10])
    return out


# ============================================================================ part 5: hostile streams

async def hostile_part(work: Path, quick: bool, seed: int) -> dict[str, Any]:
    from benchmarks import hostile_streams

    kw: dict[str, Any] = (dict(streams=200, per_conn=50, hold_s=3.0, scenarios=("anon-join", "school-upload")) if quick
                          else dict(streams=1000, per_conn=100, hold_s=10.0, scenarios=hostile_streams.SCENARIOS))
    t0 = time.monotonic()
    r = await hostile_streams.run(work=work, **kw)
    r["seconds"] = round(time.monotonic() - t0, 1)
    r["table"] = hostile_streams.format_table(r)
    return r


# ============================================================================ the report

def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def format_report(res: dict[str, Any]) -> str:
    lanes = ", two lanes at once" if res.get("parallel") else ""
    out = [f"# Fault and attack suite ({res['mode']}{lanes}, seed {res['seed']}, {res['date']})", "",
           f"`{res['command']}` on {res['machine']['cpus']} cores, Python {res['machine']['python']}, "
           f"{res['seconds']} s in all.", ""]
    cr = res.get("crash")
    if cr:
        ck = cr["check"]
        out += ["## Crashes", "",
                f"{cr['schools']} no-op schools (own processes), FedAvg, quorum = all, {cr['rounds_total']} rounds; "
                f"{cr['restarts']} coordinator restarts on the same state directory ({cr['seconds']} s).", "",
                "| fault (SIGKILL unless said) | aimed at | injected |", "|---|---|---:|"]
        for kind, what in FAULTS.items():
            if cr["injected_by_kind"].get(kind):
                out.append(f"| {kind} | {what} | {cr['injected_by_kind'][kind]} |")
        out.append(f"| **all** | | **{sum(cr['injected_by_kind'].values())}** |")
        n_corrupt = len(cr["corruption"])
        out += ["", "| committed rounds | acknowledged updates | updates lost | applied twice | rounds not matching the "
                    "recomputation | acknowledged in failed rounds | non-finite globals | restarts that failed | "
                    "damaged files found and recovered | finished |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| {ck['committed']} | {cr['acks']} | {ck['updates_lost']} | {ck['updates_applied_twice']} | "
                f"{ck['mismatching_rounds']} | {ck['acked_in_failed_rounds']} | {ck['nonfinite_globals']} | "
                f"{cr['restarts_failed']} | {len(ck['recoveries'])} of {n_corrupt} | "
                f"{'yes, exit 0' if cr['finished'] else 'NO: exit ' + _cell(cr['exit_code'])} |", ""]
        kills = [f for f in cr["faults"] if "at_kill" in f and f["kind"] != "school"]
        if kills:
            out += ["What each coordinator kill found on disk, and the restart:", "",
                    "| # | kind | trigger | open round | its receipts | partial uploads | restart (s) |", "|---:|---|---|---:|---:|---:|---:|"]
            for n, f in enumerate(kills, 1):
                a = f["at_kill"]
                trig = f.get("trigger", {}).get("event", "")
                extra = {"update-flip": " + a byte flipped in a receipted update", "global-truncated":
                         " + the global adapter truncated"}.get(f.get("corrupted", {}).get("what", ""), "")
                extra += f" + killed again at '{f.get('restart_killed_at')}'" if f["kind"] == "restart" else ""
                out.append(f"| {n} | {f['kind']}{extra} | {trig} | {_cell(a.get('open_round'))} | "
                           f"{a.get('receipts_in_open_round', 0)} | {len(a.get('partial_uploads', []))} | "
                           f"{f.get('start_s') if f.get('restarted') else 'FAILED'} |")
        sk = [f for f in cr["faults"] if f["kind"] == "school" and "skipped" not in f]
        if sk:
            out += ["", "School processes killed mid-upload and restarted:", "",
                    "| school | round | bytes sent of total | bytes the coordinator held | resumed from byte | accepted once |",
                    "|---|---:|---:|---:|---:|---|"]
            for f in sk:
                held = sum(sz for name, sz in f["at_kill"].get("partial_uploads", []) if name.startswith(f["school"] + "."))
                a = f["after_restart"]
                once = "yes" if a.get("acknowledged") and f["school"] in next(
                    (r["receipted"] for r in ck["rounds"] if r["round"] == f["round"]), []) else "NO"
                out.append(f"| {f['school']} | {f['round']} | {f['sent_bytes']} of {f['total_bytes']} | {held} | "
                           f"{a.get('resumed_from_byte', '-')} | {once} |")
        out.append("")
    co = res.get("corrupt")
    if co and co["cases"]:
        out += ["## Damaged state on restart", "",
                "| damage (coordinator stopped) | restarted | quarantined | what the coordinator did | rounds checked | "
                "not matching | updates lost | non-finite aggregated | a round's input not the previous commit | finished |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for c in co["cases"]:
            ck = c["check"]
            did = "; ".join(f"{r['what']}: {r['action']}" for r in c["recoveries"]) or "nothing noted"
            out.append(f"| {c['what']} | {'yes' if c.get('restarted') else 'NO'} | {len(c['quarantined'])} file(s) | {did} | "
                       f"{ck['committed']} | {ck['mismatching_rounds']} | {ck['updates_lost']} | {ck['nonfinite_globals']} | "
                       f"{ck['chain_breaks']} | {'yes' if c.get('finished') else 'NO'} |")
        out.append("")
    inp = res.get("inputs")
    if inp:
        n = sum(inp["by_code"].values())
        out += ["## Bad inputs by outcome", "",
                f"{n} bad requests over real gRPC against a live coordinator with a round open; every one's effect on "
                "rounds, receipts and the global adapter checked.", "",
                "| status | requests |", "|---|---:|"]
        out += [f"| {code} | {cnt} |" for code, cnt in inp["by_code"].items()]
        ck = inp["check"]
        out += ["", f"UNKNOWN or INTERNAL: {inp['unknown_or_internal']}. State changed by a bad request: "
                    f"{len(inp['state_changed'])}{' (' + '; '.join(inp['state_changed']) + ')' if inp['state_changed'] else ''}. "
                    f"Afterwards: health {inp.get('health_after')}, {inp.get('final_acks')} participants' good updates "
                    f"accepted, round committed and matching the recomputation: "
                    f"{'yes' if ck['committed'] == 1 and ck['mismatching_rounds'] == 0 else 'NO'}.", "",
                "| method | bad request | status | the coordinator's words (start) | state unchanged |", "|---|---|---|---|---|"]
        for r in inp["cases"]:
            words = " ".join(r["detail"].split())[:90].replace("|", "\\|")
            same = "yes" if r["state_unchanged"] else ("changed (its own good update)" if r.get("expected_change")
                                                         or r["case"].startswith("(control)") else "NO")
            out.append(f"| {r['method']} | {r['case']} | {r['code']} | {words} | {same} |")
        out.append("")
    ho = res.get("hostile")
    if ho:
        out += ["## Memory under hostile streams", "", ho["table"], ""]
    return "\n".join(out)


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The figures the test asserts on."""
    s: dict[str, Any] = {"updates_lost": 0, "updates_applied_twice": 0, "mismatching_rounds": 0, "nonfinite_globals": 0,
                         "acked_in_failed_rounds": 0, "updates_metric_mismatch": 0, "chain_breaks": 0, "unknown_or_internal": 0,
                         "coordinator_alive": True}
    checks = []
    if "crash" in res:
        checks.append(res["crash"]["check"])
        s["chain_breaks"] = res["crash"]["check"]["chain_breaks"]   # (a lost global adapter, by design, breaks the corrupt part's)
        s["coordinator_alive"] &= res["crash"]["finished"] and res["crash"]["restarts_failed"] == 0
    for c in res.get("corrupt", {}).get("cases", []):
        checks.append(c["check"])
        s["coordinator_alive"] &= bool(c.get("restarted")) and bool(c.get("finished"))
    if "inputs" in res:
        checks.append(res["inputs"]["check"])
        s["unknown_or_internal"] = res["inputs"]["unknown_or_internal"]
        s["coordinator_alive"] &= res["inputs"].get("health_after") == "SERVING" and bool(res["inputs"].get("finished"))
    for ck in checks:
        for key in ("updates_lost", "updates_applied_twice", "mismatching_rounds", "nonfinite_globals", "acked_in_failed_rounds",
                    "updates_metric_mismatch"):
            s[key] += ck[key]
    if "hostile" in res:
        s["hostile_alive"] = all(v["coordinator_alive"] for v in res["hostile"]["scenarios"].values())
        s["coordinator_alive"] &= s["hostile_alive"]
    return s


async def run(quick: bool = False, seed: int = 8, parts: tuple[str, ...] = PARTS, keep: Path | None = None,
              command: str = "", parallel: bool | None = None) -> dict[str, Any]:
    """`parallel` (default: with `quick`): the crash and corruption parts in one lane, bad inputs
    and hostile streams in another, at the same time (their timings then share the CPU)."""
    parallel = quick if parallel is None else parallel
    tmp = None
    if keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="fault-suite-")
        root = Path(tmp.name)
    else:
        root = keep
        root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res: dict[str, Any] = {"mode": "quick" if quick else "full", "seed": seed, "parallel": parallel,
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command or f"python -m benchmarks.fault_suite{' --quick' if quick else ''}",
                           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                       "python": platform.python_version()}}
    fns = {"crash": crash_part, "corrupt": corrupt_part, "inputs": inputs_part, "hostile": hostile_part}

    async def lane(names: tuple[str, ...]) -> None:
        for part in names:
            if part not in parts:
                continue
            d = root / part
            d.mkdir(parents=True, exist_ok=True)
            say(f"part {part}")
            t = time.monotonic()
            res[part] = await fns[part](d, quick, seed)
            say(f"part {part} done in {time.monotonic() - t:.1f} s")

    try:
        if parallel:   # two lanes at once (each part has its own coordinator and port)
            await asyncio.gather(lane(("crash", "corrupt")), lane(("inputs", "hostile")))
        else:
            await lane(PARTS)
    finally:
        if tmp is not None:
            tmp.cleanup()
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["summary"] = summary(res)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fault_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write every figure and case here")
    p.add_argument("--quick", action="store_true", help="the test suite's size (about 2 minutes)")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--keep", type=Path, default=None, help="work here and keep the state, logs and events")
    p.add_argument("--sequential", action="store_true", help="with --quick: one part at a time (full runs always are)")
    p.add_argument("--school", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.school:
        return _school_role(json.loads(args.school))
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    command = "python -m benchmarks.fault_suite " + " ".join(argv if argv is not None else sys.argv[1:])
    res = asyncio.run(run(args.quick, args.seed, parts, args.keep, command.strip(), False if args.sequential else None))
    print(format_report(res))
    print("\nsummary: " + json.dumps(res["summary"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
