"""Round-overhead benchmark: K no-op schools against the real coordinator, next to plain gRPC
streaming of the same bytes.

Run:  .venv/bin/python -m benchmarks.round_bench [--ks 2,4,8,32] [--rounds N] [--repeats N]
          [--json FILE] [--cache-dir .cache/models] [--quick]

For each K, in fresh processes:

  project  `fedserver serve --config <generated toml>` (python -m fedserver.cli) on 127.0.0.1,
           port 0 (the OS picks a free one; --port-file tells us which), insecure, FedAvg,
           min_schools = quorum = K, fraction 1.0, no evaluation, no teacher, monitor off.
           K schools (benchmarks/noop_school.py) in ONE separate asyncio process: each joins
           with its enrolment token, holds its Session stream (heartbeats), and for every
           TrainCommand downloads the global adapter (sha256 checked), adds a constant to every
           tensor and uploads the result as its delta (UploadStatus + Upload). No training.
  raw      a grpc.aio server process with a generic handler and bytes identity serialisers
           (as transfer_bench's plain path) serving the same adapter bytes in the same 1 MiB
           chunks, and a client process with K channels. One raw round = K concurrent downloads
           of the adapter, the same constant added to each copy, then K concurrent uploads of
           those K payloads (same sizes as the project's). No protobuf, hashing, disk,
           validation or aggregation.

Project and raw rounds run in alternating blocks in the same run (one warm-up round of each
first, not measured; block order flipped every repeat), so machine noise hits both.

What a round's wall time is:
  project  from the moment the schools may work on round n (the first of its TrainCommands
           arrives at the schools' process, or the block's start when the command had arrived
           while that process was holding it) to the first arrival of round n+1's TrainCommand:
           one full cycle open -> K downloads -> K uploads -> close and commit -> next open.
           The benchmark runs one extra, unmeasured round so that every measured round has a
           successor. Also recorded: `close_s` (the last upload's receipt in the schools'
           hands -> the next command's arrival: the coordinator's close, commit and next open)
           and the coordinator's own stored round `seconds` (`fedserver status --json`).
  raw      the client's one round, first download started -> last upload answered.

CPU seconds per round are each process's utime + stime (/proc/PID/stat, all threads) over a
block, divided by the block's rounds: coordinator and schools for project blocks, raw server
and raw client for raw blocks. Peak RSS is each process's VmHWM (/proc/PID/status), read after
the last measured block.

The floor: after a K's blocks, with nothing else running, one more process (--role floor)
times the work that no upload to a receipt can skip, each part alone on the round-1 adapter:
the school's two digests (checking its download, naming its upload), the coordinator's durable
and checked receive, and the fold (benchmarks/transfer_bench.py floor_parts). Added K times to
the raw round's CPU, and divided by it, that gives the ratio the project would have if it did
nothing else and kept the cores as busy as plain streaming does (`floor`; `floor_with_close`
also adds the close's wall time as if it were CPU).

Internal roles (started by the benchmark itself): --role schools | raw-server | raw-client | floor.
None of this module imports torch (the coordinator process does, as in production, and so
does the floor's process, which runs the coordinator's own functions).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import json
import os
import platform
import queue
import secrets
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import print_results

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
DEFAULT_CACHE = REPO / ".cache" / "models"
DEFAULT_KS = (2, 4, 8, 32)
MAX_ROUNDS_PER_COORDINATOR = 40   # the no-op delta doubles the global adapter each round: stay far from overflow
PLAIN_SERVICE = "bench.Plain"
FLOOR_REPEATS = 5   # times each floor part is measured (after one warm-up)
MIN_CPU_S = 0.05    # a raw round's CPU below this (five /proc ticks) gives no floor ratio (--quick's tiny rounds)
PROJECT_TIMEOUT_S = 900.0   # one project round (K=32 on a busy 2-core machine takes seconds, not minutes)

# The tiny layout of --quick: a config.json is all the coordinator's layout needs (`dir:` specs read no weights).
QUICK_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "max_position_embeddings": 256, "tie_word_embeddings": True}


TORCH_MODULES = ("torch", "safetensors.torch", "transformers", "peft")   # what the schools' process may not import


class BenchError(RuntimeError):
    pass


# ====================================================================== process accounting
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, all its threads (Linux /proc)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0])
    return 0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ====================================================================== the child processes' control channel
def _emit(obj: dict[str, Any]) -> None:
    """One JSON line to the driver (stdout carries nothing else; logs go to stderr)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[dict[str, Any] | None]:
    """The driver's commands, read on a thread of their own (None at EOF)."""
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(q.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(q.put_nowait, None)

    threading.Thread(target=pump, daemon=True, name="control").start()
    return q


# ---------------------------------------------------------------------- role: the K no-op schools
def _role_schools(args: argparse.Namespace) -> int:
    from common.logs import configure_logging

    configure_logging("warning", json=False)
    return asyncio.run(_schools_main(args))


async def _schools_main(args: argparse.Namespace) -> int:
    from benchmarks.noop_school import Hooks, NoopSchool
    from common.messages import ShutdownCommand, TrainCommand, command_name

    entries = json.loads(Path(args.schools_file).read_text())
    k = len(entries)

    class Host(Hooks):
        """Holds every train command until the driver releases its round, and times the rounds."""

        def __init__(self) -> None:
            self.arrivals: dict[int, list[float]] = collections.defaultdict(list)
            self.final_arrivals: list[float] = []
            self.results: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
            self.errors: list[str] = []
            self.other: collections.Counter[str] = collections.Counter()
            self.allowed = 0
            self.released: dict[int, float] = {}
            self.gate = asyncio.Condition()
            self.changed = asyncio.Event()
            self.first: TrainCommand | None = None

        def on_command(self, school: NoopSchool, cmd: Any, at: float) -> None:
            if isinstance(cmd, TrainCommand):
                self.arrivals[cmd.round].append(at)
                self.first = self.first or cmd
            elif isinstance(cmd, ShutdownCommand) and cmd.final:
                self.final_arrivals.append(at)
            else:
                self.other[command_name(cmd) + (f" ({cmd.reason})" if isinstance(cmd, ShutdownCommand) else "")] += 1
            self.changed.set()

        async def before_work(self, school: NoopSchool, cmd: TrainCommand) -> None:
            async with self.gate:
                await self.gate.wait_for(lambda: cmd.round <= self.allowed)

        def on_result(self, school: NoopSchool, record: dict[str, Any]) -> None:
            self.results[record["round"]].append(record)
            self.changed.set()

        def on_error(self, school: NoopSchool, cmd: Any, error: BaseException) -> None:
            self.errors.append(f"{school.name}, round {cmd.round}: {error!r}"[:600])
            self.changed.set()

        async def wait_until(self, ready: Callable[[], bool]) -> None:
            while not ready() and not self.errors:
                self.changed.clear()
                await self.changed.wait()

        def complete(self, r: int) -> bool:
            return len(self.results[r]) == k and bool(self.arrivals.get(r + 1) or self.final_arrivals)

        def record(self, r: int) -> dict[str, Any]:
            arr = self.arrivals[r]
            start = max(min(arr), self.released[r])
            nxt = self.arrivals.get(r + 1)
            end = min(nxt) if nxt else min(self.final_arrivals)
            res = self.results[r]
            last_up = max(x["uploaded"] for x in res)
            return {"round": r, "final": not nxt, "wall_s": end - start,
                    "commands_spread_s": max(arr) - min(arr),
                    "held_s": max(0.0, self.released[r] - min(arr)),
                    "download_s": median([x["downloaded"] - x["start"] for x in res]),
                    "compute_s": median([x["computed"] - x["downloaded"] for x in res]),
                    "upload_s": median([x["uploaded"] - x["computed"] for x in res]),
                    "last_upload_done_s": last_up - start,
                    "close_s": end - last_up,
                    "resent": sum(1 for x in res if x["resent"]),
                    "download_bytes": res[0]["download_bytes"], "upload_bytes": res[0]["upload_bytes"]}

    host = Host()
    schools = [NoopSchool(args.coordinator, token, name=sid, constant=args.constant, hooks=host)
               for sid, token in entries]
    stop = asyncio.Event()
    runs = asyncio.gather(*(s.run(stop) for s in schools))
    control = _stdin_lines(asyncio.get_running_loop())

    async def drive() -> None:
        await host.wait_until(lambda: host.first is not None and len(host.arrivals[host.first.round]) == k)
        if host.errors:
            _emit({"event": "error", "errors": host.errors})
            return
        assert host.first is not None
        _emit({"event": "ready", "pid": os.getpid(), "round": host.first.round, "sha256": host.first.adapter.sha256,
               "size": host.first.adapter.size})
        while True:
            msg = await control.get()
            if msg is None or msg["cmd"] == "quit":
                stop.set()
                return
            n = int(msg["rounds"])
            first = host.allowed + 1
            host.allowed += n
            now = time.monotonic()
            for r in range(first, host.allowed + 1):
                host.released[r] = now
            async with host.gate:
                host.gate.notify_all()
            block = range(first, host.allowed + 1)
            await host.wait_until(lambda: all(host.complete(r) for r in block))  # noqa: B023 (awaited within the iteration)
            if host.errors:
                _emit({"event": "error", "errors": host.errors})
                return
            _emit({"event": "done", "rounds": [host.record(r) for r in block], "other_commands": dict(host.other)})
            if host.final_arrivals:   # that was the last round: the coordinator is shutting every school down
                await host.wait_until(lambda: len(host.final_arrivals) >= k)
                return

    driver = asyncio.create_task(drive())
    schools_done = asyncio.ensure_future(runs)
    done, _ = await asyncio.wait({driver, schools_done}, return_when=asyncio.FIRST_COMPLETED)
    if driver not in done:   # a school's run() ended first: it can only have failed
        driver.cancel()
        schools_done.result()
        await asyncio.wait_for(driver, timeout=30)
    driver.result()
    stop.set()
    reasons = await schools_done
    _emit({"event": "finished", "reasons": sorted(set(reasons)), "other_commands": dict(host.other)})
    return 0


# ---------------------------------------------------------------------- role: plain gRPC server and client
def _identity(b: bytes) -> bytes:
    return b


def _role_floor(args: argparse.Namespace) -> int:
    """Times the parts of transfer_bench.FLOOR_PARTS on the payload file, `--repeats` times (after
    a warm-up), and emits their median CPU and wall seconds."""
    from benchmarks.transfer_bench import FLOOR_PARTS, floor_parts, load_layout
    from common import digest

    payload = Path(args.payload_file).read_bytes()
    layout = load_layout(args.model, Path(args.cache_dir))
    algorithm = digest.upload_algorithm(digest.offered())   # what a school names its uploads by, with a coordinator here
    samples: dict[str, list[Any]] = {key: [] for key, _ in FLOOR_PARTS}
    with tempfile.TemporaryDirectory(prefix="round-bench-floor-") as tmp:
        for i in range(args.repeats + 1):
            parts = floor_parts(payload, layout, algorithm, 0.0, Path(tmp))
            if i:   # the first is a warm-up
                for key, sample in parts.items():
                    samples[key].append(sample)
    _emit({"event": "floor", "algorithm": algorithm, "repeats": args.repeats,
           "parts": {key: {"cpu_s": median([x.cpu for x in got]), "wall_s": median([x.wall for x in got])}
                     for key, got in samples.items()}})
    return 0


def round_floor(parts: dict[str, dict[str, float]], k: int, raw_cpu_s: float, close_s: float | None) -> dict[str, Any]:
    """What a round of K schools cannot do without, on top of the raw round's CPU: per school,
    the school's two digests (its download checked, its upload named), the coordinator's
    durable, checked receive and the fold. As a ratio to the raw round at the raw round's own
    use of the cores: (raw CPU + K x that) / raw CPU; `floor_with_close` adds the close. The
    ratios are None when the raw round's CPU is under MIN_CPU_S (/proc counts 10 ms ticks)."""
    per_school = 2 * parts["school_hash"]["cpu_s"] + parts["receive_work"]["cpu_s"] + parts["fold"]["cpu_s"]
    cpu = raw_cpu_s + k * per_school
    close = close_s or 0.0
    known = raw_cpu_s >= MIN_CPU_S
    return {"parts": parts, "per_school_cpu_s": per_school, "cpu_s_per_round": cpu,
            "floor": cpu / raw_cpu_s if known else None, "floor_with_close": (cpu + close) / raw_cpu_s if known else None}


def _times(ratio: float | None, unit: str = "x") -> str:
    return "-" if ratio is None else f"{ratio:.2f}{unit}"


def _role_raw_server(args: argparse.Namespace) -> int:
    return asyncio.run(_raw_server_main(args))


async def _raw_server_main(args: argparse.Namespace) -> int:
    import grpc

    from common.wire import MAX_CHUNK_BYTES, grpc_options

    payload = Path(args.payload_file).read_bytes()

    async def serve_download(request: bytes, context: Any) -> AsyncIterator[bytes]:
        view = memoryview(payload)
        for start in range(0, len(view), MAX_CHUNK_BYTES):
            yield bytes(view[start: start + MAX_CHUNK_BYTES])

    async def serve_upload(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
        received = 0
        async for chunk in request_iterator:
            received += len(chunk)
        return str(received).encode()

    server = grpc.aio.server(options=grpc_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PLAIN_SERVICE, {
        "Download": grpc.unary_stream_rpc_method_handler(serve_download, request_deserializer=_identity,
                                                         response_serializer=_identity),
        "Upload": grpc.stream_unary_rpc_method_handler(serve_upload, request_deserializer=_identity,
                                                       response_serializer=_identity),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _emit({"event": "ready", "pid": os.getpid(), "port": port, "bytes": len(payload)})
    control = _stdin_lines(asyncio.get_running_loop())
    while (msg := await control.get()) is not None and msg["cmd"] != "quit":
        pass
    await server.stop(0.5)
    return 0


def _role_raw_client(args: argparse.Namespace) -> int:
    return asyncio.run(_raw_client_main(args))


async def _raw_client_main(args: argparse.Namespace) -> int:
    import grpc

    from benchmarks.noop_school import add_constant, channel_options
    from common.wire import MAX_CHUNK_BYTES

    channels = [grpc.aio.insecure_channel(args.address, options=channel_options()) for _ in range(args.k)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=30)
    downloads = [ch.unary_stream(f"/{PLAIN_SERVICE}/Download", request_serializer=_identity,
                                 response_deserializer=_identity) for ch in channels]
    uploads = [ch.stream_unary(f"/{PLAIN_SERVICE}/Upload", request_serializer=_identity,
                               response_deserializer=_identity) for ch in channels]

    async def fetch(i: int) -> bytes:   # the chunks joined once (one copy), as the project's download()
        return b"".join([chunk async for chunk in downloads[i](b"")])

    async def send(i: int, payload: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(payload)
            for start in range(0, len(view), MAX_CHUNK_BYTES):
                yield bytes(view[start: start + MAX_CHUNK_BYTES])

        reply = await uploads[i](chunks())
        if int(reply) != len(payload):
            raise BenchError(f"raw upload: the server got {int(reply)} of {len(payload)} bytes")

    async def one_round() -> dict[str, Any]:
        t0 = time.monotonic()
        data = await asyncio.gather(*(fetch(i) for i in range(args.k)))
        t1 = time.monotonic()
        payloads = await asyncio.gather(*(asyncio.to_thread(add_constant, d, args.constant) for d in data))
        del data
        t2 = time.monotonic()
        await asyncio.gather(*(send(i, p) for i, p in enumerate(payloads)))
        t3 = time.monotonic()
        return {"wall_s": t3 - t0, "download_s": t1 - t0, "compute_s": t2 - t1, "upload_s": t3 - t2,
                "download_bytes": len(payloads[0]), "upload_bytes": len(payloads[0])}

    _emit({"event": "ready", "pid": os.getpid()})
    control = _stdin_lines(asyncio.get_running_loop())
    while (msg := await control.get()) is not None and msg["cmd"] != "quit":
        try:
            records = [await one_round() for _ in range(int(msg["rounds"]))]
        except Exception as exc:
            _emit({"event": "error", "errors": [repr(exc)]})
            break
        _emit({"event": "done", "rounds": records})
    for ch in channels:
        await ch.close()
    return 0


# ====================================================================== the driver
class Child:
    """A child process, its log file, and (for the benchmark's own roles) its JSON-lines control channel."""

    def __init__(self, name: str, argv: list[str], log_path: Path, control: bool = True) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if control else self._log, stderr=self._log)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        if control:
            threading.Thread(target=self._pump, daemon=True, name=f"{name}-stdout").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace"))
        self.lines.put(None)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def expect(self, event: str, timeout: float, watch: Sequence[Child] = ()) -> dict[str, Any]:
        """The next message of kind `event`; a BenchError on an error message, EOF, the timeout,
        or the death of any process in `watch` (the coordinator, say)."""
        end = time.monotonic() + timeout
        while True:
            for other in watch:
                if other.proc.poll() is not None:
                    raise BenchError(f"{other.name} exited with code {other.proc.returncode} while {self.name} was "
                                     f"working; its log ends:\n{other.log_tail()}")
            try:
                line = self.lines.get(timeout=min(1.0, max(0.01, end - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > end:
                    raise BenchError(f"{self.name}: no {event!r} within {timeout:.0f} s; its log ends:\n{self.log_tail()}") from None
                continue
            if line is None:
                raise BenchError(f"{self.name} ended (code {self.proc.wait()}) before {event!r}; its log ends:\n{self.log_tail()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue   # not ours
            if msg.get("event") == "error":
                raise BenchError(f"{self.name} reported: " + "; ".join(msg.get("errors", [])))
            if msg.get("event") == event:
                return msg

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask it to quit (closing stdin), then SIGTERM, then SIGKILL - this process's own child, by PID."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.send({"cmd": "quit"})
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _toml_str(s: str) -> str:
    return json.dumps(s)   # a TOML basic string accepts JSON's escapes


def write_coordinator_config(path: Path, state_dir: Path, model: str, cache_dir: Path, schools: Sequence[tuple[str, str]],
                             total_rounds: int) -> None:
    from fedserver.auth import hash_token

    k = len(schools)
    lines = [
        "# written by benchmarks/round_bench.py",
        "[server]",
        'listen = "127.0.0.1:0"',
        f"state_dir = {_toml_str(str(state_dir))}",
        'log_level = "info"',
        "session_timeout_s = 120.0   # 2 shared cores: keep a busy moment from dropping a school",
        "",
        "[server.tls]",
        "insecure = true   # plaintext gRPC with enrolment tokens, on loopback only",
        "",
        "[model]",
        f"base = {_toml_str(model)}",
        f"cache_dir = {_toml_str(str(cache_dir))}",
        "",
        "[lora]",
        "rank = 16",
        "alpha = 32.0   # all seven projections (the default target_modules)",
        "",
        "[rounds]",
        f"total = {total_rounds}",
        f"min_schools = {k}",
        f"quorum = {k}",
        "fraction = 1.0",
        "deadline_s = 3600.0",
        "# the no-op schools upload the global adapter plus a constant: its norm grows past the",
        "# shipped bound of 100 within a few rounds (the norm is computed all the same: 0 only never refuses)",
        "max_norm = 0.0",
        "",
        "[strategy]",
        'name = "fedavg"',
        "",
        "[evaluation]",
        "school_max_examples = 0   # no evaluate commands; no eval_file: no server evaluation",
        "",
        "[monitor]",
        'metrics_listen = ""',
        'dashboard_listen = ""',
        "",
    ]
    for sid, token in schools:
        lines += ["[[schools]]", f"id = {_toml_str(sid)}", f"token_sha256 = {_toml_str(hash_token(token))}", ""]
    path.write_text("\n".join(lines))


def _safetensors_info(path: Path) -> tuple[int, int]:
    """(tensors, parameters) from a safetensors file's header."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    params = 0
    for v in tensors:
        size = 1
        for d in v["shape"]:
            size *= d
        params += size
    return len(tensors), params


def coordinator_timeline(log_path: Path) -> dict[int, dict[str, float]]:
    """Per round, from the coordinator's own JSON log lines (its clock): when it opened the round,
    accepted the round's last upload, and logged the commit. {} where the log says nothing."""
    out: dict[int, dict[str, float]] = collections.defaultdict(dict)
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            ev = json.loads(line)
            rnd, name = int(ev["round"]), ev["event"]
            t = _dt.datetime.fromisoformat(ev["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if name == "round opened":
            out[rnd]["opened"] = t
        elif name == "result accepted":
            out[rnd]["last_accepted"] = max(out[rnd].get("last_accepted", t), t)
        elif name == "round committed":
            out[rnd]["committed"] = t
    return dict(out)


def _span(timeline: dict[int, dict[str, float]], a: tuple[int, str], b: tuple[int, str]) -> float | None:
    try:
        return timeline[b[0]][b[1]] - timeline[a[0]][a[1]]
    except KeyError:
        return None


def _cpu_all(procs: dict[str, Child]) -> dict[str, float]:
    return {name: cpu_seconds(c.pid) for name, c in procs.items()}


def run_k(k: int, root: Path, model: str, cache_dir: Path, rounds: int, repeats: int, warmup: int, constant: float,
          say: Callable[[str], None]) -> dict[str, Any]:
    """Everything for one K, in fresh processes under root/k<K>."""
    py = sys.executable
    me = [py, "-m", "benchmarks.round_bench"]
    wd = root / f"k{k}"
    wd.mkdir(parents=True)
    state = wd / "coordinator"
    schools = [(f"school-{i:03d}", secrets.token_urlsafe(24)) for i in range(k)]
    schools_file = wd / "schools.json"
    schools_file.touch(mode=0o600)
    schools_file.write_text(json.dumps(schools))
    total = warmup + rounds * repeats + 1   # + 1: every measured round needs a successor
    cfg = wd / "coordinator.toml"
    write_coordinator_config(cfg, state, model, cache_dir, schools, total)
    port_file = wd / "port"

    t_start = time.monotonic()
    coord = Child("coordinator", [py, "-m", "fedserver.cli", "serve", "--config", str(cfg), "--port-file", str(port_file)],
                  wd / "coordinator.log", control=False)
    children: list[Child] = [coord]
    try:
        while not port_file.exists():
            if coord.proc.poll() is not None:
                raise BenchError(f"the coordinator exited with code {coord.proc.returncode}; its log ends:\n{coord.log_tail()}")
            if time.monotonic() - t_start > 600:
                raise BenchError("the coordinator did not bind within 600 s")
            time.sleep(0.1)
        address = port_file.read_text().strip()
        say(f"K={k}: coordinator pid {coord.pid} on {address} ({time.monotonic() - t_start:.1f} s to start)")
        sch = Child("schools", [*me, "--role", "schools", "--coordinator", address, "--schools-file", str(schools_file),
                                "--constant", repr(constant)], wd / "schools.log")
        children.append(sch)
        ready = sch.expect("ready", timeout=300, watch=[coord])
        adapter = state / "artifacts" / ready["sha256"]
        if not adapter.is_file() or adapter.stat().st_size != ready["size"]:
            raise BenchError(f"the global adapter {ready['sha256'][:12]} is not at {adapter}")
        payload_file = wd / "global.safetensors"
        shutil.copyfile(adapter, payload_file)
        tensors, params = _safetensors_info(payload_file)

        procs: dict[str, Child] = {"coordinator": coord, "schools": sch}
        blocks: list[dict[str, Any]] = []
        project_rounds: list[dict[str, Any]] = []
        raw_rounds: list[dict[str, Any]] = []
        other_commands: dict[str, int] = {}

        def block(kind: str, n: int, measured: bool) -> None:
            child = sch if kind == "project" else procs["raw_client"]
            before = _cpu_all(procs)
            t0 = time.monotonic()
            child.send({"cmd": "run", "rounds": n})
            reply = child.expect("done", timeout=PROJECT_TIMEOUT_S * n, watch=list(procs.values()))
            wall = time.monotonic() - t0
            after = _cpu_all(procs)
            cpu = {name: after[name] - before[name] for name in after}
            recs = reply["rounds"]
            if kind == "project":
                other_commands.update(reply.get("other_commands", {}))
            tag = "measured" if measured else "warm-up"
            blocks.append({"kind": kind, "rounds": n, "measured": measured, "wall_s": wall, "cpu_s": cpu})
            if measured:
                (project_rounds if kind == "project" else raw_rounds).extend(recs)
            say(f"K={k}: {kind:<7} {tag:<8} " + " ".join(f"{r['wall_s']:.3f}" for r in recs) + " s"
                + ("  (close " + " ".join(f"{r['close_s']:.3f}" for r in recs) + " s)" if kind == "project" else ""))

        if warmup:
            block("project", warmup, False)
        raw_srv = Child("raw-server", [*me, "--role", "raw-server", "--payload-file", str(payload_file)], wd / "raw-server.log")
        children.append(raw_srv)
        srv_ready = raw_srv.expect("ready", timeout=120)
        raw_cli = Child("raw-client", [*me, "--role", "raw-client", "--address", f"127.0.0.1:{srv_ready['port']}",
                                       "--k", str(k), "--constant", repr(constant)], wd / "raw-client.log")
        children.append(raw_cli)
        raw_cli.expect("ready", timeout=120)
        procs.update({"raw_server": raw_srv, "raw_client": raw_cli})
        if warmup:
            block("raw", warmup, False)
        for rep in range(repeats):
            order = ("project", "raw") if rep % 2 == 0 else ("raw", "project")
            for kind in order:
                block(kind, rounds, True)
        peak = {name: status_kib(c.pid, "VmHWM") / 1024 for name, c in procs.items()}
        rss_now = {name: status_kib(c.pid, "VmRSS") / 1024 for name, c in procs.items()}
        raw_cli.stop()
        raw_srv.stop()
        # The extra round: completes the last measured one, then the coordinator shuts the schools down and exits.
        sch.send({"cmd": "run", "rounds": 1})
        sch.expect("done", timeout=PROJECT_TIMEOUT_S, watch=[])
        finished = sch.expect("finished", timeout=120)
        code = coord.proc.wait(timeout=120)
        sch_code = sch.stop()
        if code != 0:
            raise BenchError(f"the coordinator exited with code {code}; its log ends:\n{coord.log_tail()}")
        status = subprocess.run([py, "-m", "fedserver.cli", "status", "--state-dir", str(state), "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        if status.returncode != 0:
            raise BenchError(f"fedserver status failed: {status.stderr[-2000:]}")
        stored = {r["round"]: r for r in json.loads(status.stdout)["rounds"]}
    finally:
        for c in reversed(children):
            if c.proc.poll() is None:
                c.stop(timeout=10)

    floor_run = subprocess.run([py, "-m", "benchmarks.round_bench", "--role", "floor", "--payload-file", str(payload_file),
                                "--model", model, "--cache-dir", str(cache_dir), "--repeats", str(FLOOR_REPEATS)],
                               cwd=REPO, capture_output=True, text=True, timeout=600)
    floor_msgs = [json.loads(line) for line in floor_run.stdout.splitlines() if line.startswith("{")]
    if floor_run.returncode != 0 or not floor_msgs:
        raise BenchError(f"K={k}: the floor's process failed (code {floor_run.returncode}): {floor_run.stderr[-2000:]}")

    measured = [r["round"] for r in project_rounds]
    not_committed = {n: r["status"] for n, r in stored.items() if r["status"] != "committed"}
    if not_committed or len(stored) != total:
        raise BenchError(f"K={k}: expected {total} committed rounds, the coordinator's state has "
                         f"{len(stored)}; not committed: {not_committed}")
    # The coordinator's clock starts when it opens a round; a round whose commands the schools'
    # process held (the first of a block) was open that much longer: take the hold off.
    held = {r["round"]: r["held_s"] for r in project_rounds}
    coord_seconds = [stored[n]["seconds"] - held[n] for n in measured]
    timeline = coordinator_timeline(wd / "coordinator.log")
    for r in project_rounds:
        n = r["round"]
        r["close_seen_by_schools_s"] = r.pop("close_s")
        r["close_s"] = _span(timeline, (n, "last_accepted"), (n + 1, "opened"))
        r["close_commit_s"] = _span(timeline, (n, "last_accepted"), (n, "committed"))
        r["close_open_next_s"] = _span(timeline, (n, "committed"), (n + 1, "opened"))

    def med(key: str) -> float | None:
        xs = [r[key] for r in project_rounds if r.get(key) is not None]
        return median(xs) if xs else None
    project_s = median([r["wall_s"] for r in project_rounds])
    raw_s = median([r["wall_s"] for r in raw_rounds])

    def per_round(kind: str, name: str) -> float:
        return median([b["cpu_s"][name] / b["rounds"] for b in blocks if b["kind"] == kind and b["measured"]])

    cpu = {"coordinator": per_round("project", "coordinator"), "schools": per_round("project", "schools"),
           "raw_server": per_round("raw", "raw_server"), "raw_client": per_round("raw", "raw_client")}
    cpu["project_total"] = cpu["coordinator"] + cpu["schools"]
    cpu["raw_total"] = cpu["raw_server"] + cpu["raw_client"]
    floor = round_floor(floor_msgs[-1]["parts"], k, cpu["raw_total"], med("close_s"))
    say(f"K={k}: floor {_times(floor['floor'])} raw ({_times(floor['floor_with_close'])} with the close): "
        f"{floor['per_school_cpu_s'] * 1000:.1f} ms of CPU a school that no round can skip")
    return {
        "k": k,
        "project_s": project_s, "raw_s": raw_s, "ratio": project_s / raw_s,
        "project_min_s": min(r["wall_s"] for r in project_rounds), "raw_min_s": min(r["wall_s"] for r in raw_rounds),
        "overhead_s": project_s - raw_s,
        "close_s": med("close_s"),
        "close_seen_by_schools_s": med("close_seen_by_schools_s"),
        "coordinator_round_s": median(coord_seconds),
        "project_phases_s": {key: med(key) for key in ("download_s", "compute_s", "upload_s", "last_upload_done_s",
                                                       "close_s", "close_commit_s", "close_open_next_s",
                                                       "close_seen_by_schools_s")},
        "raw_phases_s": {key: median([r[key] for r in raw_rounds]) for key in ("download_s", "compute_s", "upload_s")},
        "cpu_s_per_round": cpu,
        "floor": floor,
        "peak_rss_mib": peak,
        "rss_mib_at_end": rss_now,
        "pids": {name: c.pid for name, c in procs.items()},
        "tensors": tensors, "parameters": params,
        "download_bytes": ready["size"], "upload_bytes": project_rounds[0]["upload_bytes"],
        "bytes_per_round": {"down": k * ready["size"], "up": k * project_rounds[0]["upload_bytes"]},
        "rounds_total": total, "measured_rounds": measured,
        "project_rounds": project_rounds, "raw_rounds": raw_rounds,
        "coordinator_rounds": [{"round": n, "seconds": stored[n]["seconds"], "held_s": held.get(n),
                                "accepted": stored[n]["accepted"],
                                "bytes_up": stored[n]["bytes_up"], "bytes_down": stored[n]["bytes_down"]}
                               for n in sorted(stored)],
        "blocks": blocks,
        "other_commands": {**other_commands, **finished.get("other_commands", {})},
        "exit_codes": {"coordinator": code, "schools": sch_code},
        "seconds_for_this_k": time.monotonic() - t_start,
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def run_benchmark(ks: Sequence[int] = DEFAULT_KS, rounds: int = 3, repeats: int = 2, warmup: int = 1,
                  model: str = DEFAULT_MODEL, cache_dir: Path = DEFAULT_CACHE, constant: float = 1e-3,
                  workdir: Path | None = None, keep: bool = False, quick: bool = False,
                  command: str = "", say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    if rounds < 1 or repeats < 1 or warmup < 0 or not ks or min(ks) < 1:
        raise ValueError("rounds and repeats must be >= 1, warmup >= 0, and every K >= 1")
    if warmup + rounds * repeats + 1 > MAX_ROUNDS_PER_COORDINATOR:
        raise ValueError(f"warmup + rounds x repeats + 1 must be at most {MAX_ROUNDS_PER_COORDINATOR} "
                         "(the no-op delta doubles the global adapter every round)")
    tmp = tempfile.TemporaryDirectory(prefix="round-bench-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    if quick:
        cfg_dir = root / "tiny-config"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "config.json").write_text(json.dumps(QUICK_CONFIG))
        model, cache_dir = f"dir:{cfg_dir}", root / "model-cache"
        cache_dir.mkdir(exist_ok=True)
    started = time.monotonic()
    load_start = os.getloadavg()
    out: dict[str, Any] = {}
    try:
        for k in ks:
            out[str(k)] = run_k(k, root, model, cache_dir, rounds, repeats, warmup, constant, say)
            if not keep:
                shutil.rmtree(root / f"k{k}", ignore_errors=True)
    finally:
        if tmp is not None and not keep:
            tmp.cleanup()
    first = out[str(ks[0])]
    out.update({
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "grpcio": _version("grpcio"), "protobuf": _version("protobuf"), "numpy": _version("numpy"),
                    "torch (coordinator)": _version("torch"), "loadavg_at_start": load_start,
                    "loadavg_at_end": os.getloadavg()},
        "parameters": {"ks": list(ks), "rounds": rounds, "repeats": repeats, "warmup": warmup, "constant": constant,
                       "model": model, "lora": {"rank": 16, "alpha": 32.0, "target_modules": "all seven projections"},
                       "strategy": "fedavg", "quick": quick,
                       "schools_process": "one asyncio process hosts all K schools (torch unimportable in it)"},
        "payload": {"tensors": first["tensors"], "parameters": first["parameters"],
                    "download_bytes": first["download_bytes"], "upload_bytes": first["upload_bytes"],
                    "chunk_bytes": 1024 * 1024},
        "definitions": {
            "project_s": "median over measured rounds: first TrainCommand of round n reaching the schools' process (or "
                         "the block's release if it was held) -> first TrainCommand of round n+1 arriving",
            "raw_s": "median over measured raw rounds: K concurrent plain-gRPC downloads, the constant added, K "
                     "concurrent uploads",
            "ratio": "project_s / raw_s",
            "close_s": "median, on the coordinator's clock (its JSON log): the round's last 'result accepted' -> the "
                       "next 'round opened' (split into close_commit_s up to 'round committed' and close_open_next_s)",
            "close_seen_by_schools_s": "median, in the schools' process: the last upload's receipt -> the next round's "
                                       "first command (includes delivery; the two race in one event loop, so it can "
                                       "be slightly negative on a loaded machine)",
            "coordinator_round_s": "median of the coordinator's stored round seconds (fedserver status --json: opening "
                                   "the round, its SQLite write included -> aggregate committed in memory), minus the "
                                   "time the schools' process held the round's commands between blocks",
            "cpu_s_per_round": "utime+stime per round from /proc/PID/stat over each block, median over blocks",
            "peak_rss_mib": "VmHWM from /proc/PID/status after the last measured block",
            "floor": "(raw CPU per round + K x the CPU a school's round cannot skip) / raw CPU per round: the ratio "
                     "at plain streaming's own use of the cores if the project did nothing else; per school: two "
                     "digests at the school, the coordinator's durable checked receive, the fold (each timed alone, "
                     "median of 5, in a separate process after the K's blocks); floor_with_close adds close_s",
        },
        "total_seconds": time.monotonic() - started,
    })
    return out


def format_table(result: dict[str, Any]) -> str:
    ks = [k for k in result["parameters"]["ks"]]
    p = result["payload"]
    par = result["parameters"]
    lines = [
        f"{par['model']}: {p['tensors']} tensors, {p['parameters']:,} float32 parameters = {p['upload_bytes']:,} bytes per "
        f"download and per upload; {par['rounds']} rounds x {par['repeats']} repeats per K (+{par['warmup']} warm-up), "
        "project and raw interleaved",
        "",
        f"{'K':>3} {'project s':>9} {'raw s':>7} {'ratio':>6} {'floor':>5} {'close s':>7} {'coord s':>7} | "
        f"{'CPU s/round: coord':>18} {'schools':>7} {'raw srv':>7} {'raw cli':>7} | "
        f"{'peak RSS MiB: coord':>19} {'schools':>7} {'raw srv':>7} {'raw cli':>7}",
    ]
    for k in ks:
        r = result[str(k)]
        c, m = r["cpu_s_per_round"], r["peak_rss_mib"]
        close = "-" if r["close_s"] is None else f"{r['close_s']:.3f}"
        lines.append(f"{k:>3} {r['project_s']:>9.3f} {r['raw_s']:>7.3f} {r['ratio']:>6.2f} "
                     f"{_times(r['floor']['floor_with_close'], ''):>5} {close:>7} "
                     f"{r['coordinator_round_s']:>7.3f} | {c['coordinator']:>18.3f} {c['schools']:>7.3f} "
                     f"{c['raw_server']:>7.3f} {c['raw_client']:>7.3f} | {m['coordinator']:>19.0f} {m['schools']:>7.0f} "
                     f"{m['raw_server']:>7.0f} {m['raw_client']:>7.0f}")
    lines += [
        "",
        "project s: one round, first TrainCommand at the schools -> next round's first TrainCommand (median);",
        "raw s: K plain-gRPC downloads + the same constant added + K uploads (median); ratio = project / raw;",
        "floor: the ratio if a round did only what it cannot skip (K x the schools' digests, the durable checked",
        "  receive and the fold, timed alone, plus the close) at plain streaming's own use of the cores;",
        "close s: the coordinator's last accepted upload -> its next round opened (its log);",
        "coord s: the coordinator's stored round seconds (open -> committed, hold between blocks taken off).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.round_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="numbers of schools, comma-separated (default 2,4,8,32)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per block (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="blocks of each path per K, alternating (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds of each path first (default 1)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the coordinator's [model] base (default {DEFAULT_MODEL})")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"converted-model cache (default {DEFAULT_CACHE})")
    p.add_argument("--constant", type=float, default=1e-3, help="what each school adds to every element")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny 2-layer layout (~130 KB), K=2, 2 rounds x 1 repeat unless given")
    p.add_argument("--workdir", type=Path, default=None, help="keep state and logs here (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="do not delete the work directory's per-K state and logs")
    p.add_argument("--json", type=Path, default=None, help="also write the full results here")
    p.add_argument("--quiet", action="store_true")
    # internal: the benchmark's own child processes
    p.add_argument("--role", choices=["schools", "raw-server", "raw-client", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--schools-file", help=argparse.SUPPRESS)
    p.add_argument("--payload-file", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    raw_argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw_argv)
    if args.role == "floor":   # the coordinator's own functions, torch and all
        return _role_floor(args)
    if args.role:
        # The benchmark's own processes must stay torch-free (the protocol path imports none):
        # make torch unimportable, so a torch import creeping in fails loudly instead of
        # quietly adding a few hundred MiB to the schools' peak RSS.
        for name in TORCH_MODULES:
            sys.modules[name] = None  # type: ignore[assignment]
    if args.role == "schools":
        return _role_schools(args)
    if args.role == "raw-server":
        return _role_raw_server(args)
    if args.role == "raw-client":
        return _role_raw_client(args)

    given = {a.split("=")[0] for a in raw_argv}
    if args.quick:
        if "--ks" not in given:
            args.ks = "2"
        if "--rounds" not in given:
            args.rounds = 2
        if "--repeats" not in given:
            args.repeats = 1
    ks = [int(x) for x in args.ks.split(",") if x.strip()]
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    command = "python -m benchmarks.round_bench" + (" " + shlex.join(raw_argv) if raw_argv else "")
    result = run_benchmark(ks, args.rounds, args.repeats, args.warmup, args.model, args.cache_dir.resolve(), args.constant,
                           args.workdir, args.keep, args.quick, command, say)
    print_results(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
