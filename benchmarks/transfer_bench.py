"""Transfer benchmark: the project's Download/Upload path against plain gRPC streaming.

Run:  .venv/bin/python -m benchmarks.transfer_bench [--repeats N] [--json out.json]

Measured side by side in one process and one event loop, interleaved (A, B, A, B, ... with
the order flipped every repeat) so machine noise hits both paths alike:

  (A) project  a real coordinator from fedserver.app.create_server() on 127.0.0.1:0
               (insecure), schools that Join with enrolment tokens and hold a Session
               stream; fedclient.transfer.download() of the global adapter artefact named in
               the train command, and fedclient.transfer.upload() of a delta through
               UploadStatus + Upload to an accepted receipt (the coordinator's disk writes,
               fsync, sha256 and validation included). Each repeat uploads as a different
               school, so every upload is a first, accepted update of the one open round.
  (B) plain    a grpc.aio server with a generic handler and bytes identity serialisers
               that streams the same bytes in the same 1 MiB chunks; no hashing, no
               validation, no disk.

Both sides use common.wire.grpc_options(). The adapter is the real one the federation trains
on SmolLM2-135M (rank 16 on all seven projections; layout from the model config only).
fedserver.validation.validate_update is also timed on the same payload, to say how much of
an upload is the coordinator's validation.

--floor also times, alone and on the same payload in every repeat, the work an upload to its
receipt cannot skip beyond what plain streaming does (FLOOR_PARTS): the school's digest of the
payload, the coordinator's per-chunk write + writeback + hash + check and the fsync (the
receiver's own functions), and the fold into FedAvg's float64 sums (fold_file). Plain
streaming's CPU plus that work, spread perfectly over every core, is a lower bound on A's
upload time; the table says whether the 80% target is under it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks import print_results, timed
from common import PROTOCOL_VERSION, __version__, digest
from common.framing import TransferStub
from common.lora import LoraSettings, TensorSpec, expected_layout
from common.messages import Capabilities, TrainCommand, UploadHeader
from common.models import load_config
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import capabilities_to_pb, command_from_pb, named_digest
from common.wire import MAX_CHUNK_BYTES, grpc_options, tensors_to_bytes
from fedclient.transfer import download, upload
from fedserver.auth import hash_token
from fedserver.config import (
    CoordinatorConfig, LoraSection, ModelSection, RoundsSection, SchoolEntry, ServerSection, ServerTLSSection,
)
from fedserver.strategy.fedavg import fold_file, segmented_empty_like
from fedserver.transfers import _sync, _write_and_hash
from fedserver.validation import FileDelta, StreamCheck, validate_update

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"
# the targets: the project's path at >= 90% of plain streaming for downloads, >= 80% for
# uploads to a receipt (throughput at the medians)
TARGET_RATIO = {"download": 0.90, "upload": 0.80}

PLAIN_SERVICE = "bench.Plain"
PLAIN_DOWNLOAD = f"/{PLAIN_SERVICE}/Download"
PLAIN_UPLOAD = f"/{PLAIN_SERVICE}/Upload"


@dataclass(frozen=True)
class Sample:
    """One transfer: wall seconds, and CPU seconds of this whole process (client, server and
    gRPC's threads together; steadier than wall time on a busy machine)."""

    wall: float
    cpu: float


class _Clock:
    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample = Sample(time.perf_counter() - self._w, time.process_time() - self._c)


# ------------------------------------------------------------------ layout and payload
def load_layout(model_spec: str, cache_dir: Path | None, settings: LoraSettings | None = None) -> dict[str, TensorSpec]:
    """The adapter's tensor names and shapes from the model config alone (no weights)."""
    cfg = load_config(model_spec, cache_dir)
    return expected_layout(cfg, settings or LoraSettings())


def make_delta(layout: Mapping[str, TensorSpec], seed: int = 1, scale: float = 1e-3) -> bytes:
    """Safetensors bytes of a plausible update: small Gaussian noise in every tensor."""
    gen = torch.Generator().manual_seed(seed)
    return tensors_to_bytes({name: torch.randn(spec.shape, generator=gen, dtype=spec.dtype) * scale
                             for name, spec in sorted(layout.items())})


def num_params(layout: Mapping[str, TensorSpec]) -> int:
    return sum(math.prod(s.shape) for s in layout.values())


# ------------------------------------------------------------------ (A) the project's path
@dataclass
class _School:
    school_id: str
    token: str
    metadata: list[tuple[str, str]] = field(default_factory=list)
    call: Any = None   # the Session stream


SESSIONS_PER_CONNECTION = 16   # below the coordinator's streams_per_connection (32 by default)


class ProjectPath:
    """A real coordinator with round 1 open for `uploads + 1` schools that joined over gRPC
    and hold Session streams; each upload comes from a school that has not uploaded yet, and
    the last school never uploads, so the round stays open for the whole run."""

    def __init__(self, workdir: Path, model_spec: str, cache_dir: Path | None, uploads: int) -> None:
        self.workdir = workdir
        self.model_spec = model_spec
        self.cache_dir = cache_dir
        self.schools = [_School(f"bench-{i:03d}", secrets.token_urlsafe(24)) for i in range(uploads + 1)]
        self._next_uploader = 0
        self._hold = asyncio.Event()
        self.coord: Any = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.FederationStub | None = None
        self.session_channels: list[grpc.aio.Channel] = []
        self.run_task: asyncio.Task[None] | None = None
        self.round = 0
        self.global_sha = ""
        self.global_blake3 = ""
        self.upload_algorithm = digest.SHA256
        self.global_size = 0
        self.cfg: CoordinatorConfig | None = None

    def config(self) -> CoordinatorConfig:
        n = len(self.schools)
        return CoordinatorConfig(
            # Heartbeats are not what is measured: long intervals keep the idle Session streams quiet.
            server=ServerSection(listen="127.0.0.1:0", state_dir=self.workdir / "coordinator",
                                 heartbeat_interval_s=3600.0, session_timeout_s=7200.0,
                                 # plaintext, as the plain-gRPC baseline it is compared with
                                 tls=ServerTLSSection(insecure=True)),
            model=ModelSection(base=self.model_spec, cache_dir=self.cache_dir),
            lora=LoraSection(),   # rank 16, alpha 32, all seven projections: the federation's adapter
            # Every school takes part; the round needs them all, so it stays open while the
            # benchmark uploads as one fresh school after another.
            rounds=RoundsSection(total=1, min_schools=n, quorum=n, fraction=1.0, deadline_s=86_400.0),
            schools=tuple(SchoolEntry(s.school_id, hash_token(s.token)) for s in self.schools),
        )

    async def start(self) -> None:
        from fedserver.app import create_server

        self.cfg = self.config()
        self.coord = await create_server(self.cfg)
        await self.coord.engine.start()
        await self.coord.server.start()
        self.run_task = asyncio.create_task(self.coord.engine.run())
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.coord.port}", options=grpc_options())
        self.stub = TransferStub(self.channel)   # as the school daemon does
        caps = capabilities_to_pb(Capabilities(self.model_spec, 16, 100, "benchmark", __version__))
        for i, s in enumerate(self.schools):
            resp = await self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=caps),
                                        metadata=[("authorization", f"Bearer {s.token}")], timeout=30)
            s.metadata = [("x-session-token", resp.session_token)]
            # The idle Session streams go over connections of their own, SESSIONS_PER_CONNECTION
            # each (the coordinator caps the streams open on one connection); the transfers
            # measured run on self.channel, which carries nothing else.
            if i % SESSIONS_PER_CONNECTION == 0:
                self.session_channels.append(grpc.aio.insecure_channel(
                    f"127.0.0.1:{self.coord.port}", options=[*grpc_options(), ("grpc.use_local_subchannel_pool", 1)]))
            s.call = TransferStub(self.session_channels[-1]).Session(self._quiet_events(), metadata=s.metadata)
        for s in self.schools:   # the round opens once all have attached; each gets a train command
            cmd = command_from_pb(await asyncio.wait_for(s.call.read(), timeout=60))
            if not isinstance(cmd, TrainCommand):
                raise RuntimeError(f"{s.school_id} expected a train command, got {type(cmd).__name__}")
            self.round, self.global_sha, self.global_size = cmd.round, cmd.adapter.sha256, cmd.adapter.size
            self.global_blake3 = cmd.adapter.blake3   # the school checks its download by it, as the daemon does
        self.upload_algorithm = digest.upload_algorithm(resp.upload_digests)

    async def _quiet_events(self) -> AsyncIterator[pb.ClientEvent]:
        await self._hold.wait()   # keep the client side of the Session open, send nothing
        return
        yield  # pragma: no cover - makes this an async generator

    def artefact_bytes(self) -> bytes:
        return self.coord.engine.artifacts.get(self.global_sha)

    async def download(self) -> Sample:
        assert self.stub is not None
        md = self.schools[0].metadata
        buf = bytearray()
        with _Clock() as clock:
            data = await download(self.stub, self.global_sha, md, buf, blake3=self.global_blake3)
        if len(data) != self.global_size:
            raise RuntimeError(f"downloaded {len(data)} of {self.global_size} bytes")
        return clock.sample

    async def upload(self, payload: bytes, named: str) -> Sample:
        """One accepted upload, as the next school that has not uploaded yet. `named`: the
        payload's tagged digest in `upload_algorithm` (common/digest.py)."""
        assert self.stub is not None
        if self._next_uploader >= len(self.schools) - 1:
            raise RuntimeError("no school left that may upload in the open round")
        s = self.schools[self._next_uploader]
        self._next_uploader += 1
        header = UploadHeader(self.round, f"bench-{s.school_id}-{digest.split(named)[1][:16]}", 100, named,
                              len(payload), 0, self.global_sha, {"loss": 1.0})
        with _Clock() as clock:
            receipt = await upload(self.stub, header, payload, s.metadata)
        if receipt is None or receipt.received_bytes != len(payload) or named_digest(receipt) != named:
            raise RuntimeError(f"upload by {s.school_id} not accepted as expected: {receipt}")
        return clock.sample

    async def stop(self) -> None:
        self._hold.set()
        for s in self.schools:
            if s.call is not None:
                s.call.cancel()
        if self.run_task is not None:
            self.run_task.cancel()
            await asyncio.gather(self.run_task, return_exceptions=True)
        for ch in self.session_channels:
            await ch.close()
        if self.channel is not None:
            await self.channel.close()
        if self.coord is not None:
            await self.coord.stop(grace=0.5)


# ------------------------------------------------------------------ (B) plain gRPC streaming
def _identity(b: bytes) -> bytes:
    return b


class PlainPath:
    """The same bytes in the same chunks through a bare grpc.aio generic handler."""

    def __init__(self, download_bytes: bytes) -> None:
        self.download_bytes = download_bytes
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def _serve_download(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        view = memoryview(self.download_bytes)
        for start in range(0, len(view), MAX_CHUNK_BYTES):
            yield bytes(view[start : start + MAX_CHUNK_BYTES])

    async def _serve_upload(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        received = 0
        async for chunk in request_iterator:
            received += len(chunk)
        return str(received).encode()

    async def start(self) -> None:
        self.server = grpc.aio.server(options=grpc_options())
        handler = grpc.method_handlers_generic_handler(PLAIN_SERVICE, {
            "Download": grpc.unary_stream_rpc_method_handler(self._serve_download, request_deserializer=_identity,
                                                             response_serializer=_identity),
            "Upload": grpc.stream_unary_rpc_method_handler(self._serve_upload, request_deserializer=_identity,
                                                           response_serializer=_identity),
        })
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options())
        self._download = self.channel.unary_stream(PLAIN_DOWNLOAD, request_serializer=_identity, response_deserializer=_identity)
        self._upload = self.channel.stream_unary(PLAIN_UPLOAD, request_serializer=_identity, response_deserializer=_identity)

    async def download(self) -> Sample:
        with _Clock() as clock:   # the chunks joined once (one copy), as the project's download()
            data = b"".join([chunk async for chunk in self._download(b"")])
        if len(data) != len(self.download_bytes):
            raise RuntimeError(f"plain download got {len(data)} of {len(self.download_bytes)} bytes")
        return clock.sample

    async def upload(self, payload: bytes) -> Sample:
        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(payload)
            for start in range(0, len(view), MAX_CHUNK_BYTES):
                yield bytes(view[start : start + MAX_CHUNK_BYTES])

        with _Clock() as clock:
            reply = await self._upload(chunks())
        if int(reply) != len(payload):
            raise RuntimeError(f"plain upload: server got {int(reply)} of {len(payload)} bytes")
        return clock.sample

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0.5)


# ------------------------------------------------------------------ an upload's stages
STAGES = (("receive", "bytes in, written, hashed and checked as they arrive (UploadReceiver.receive)"),
          ("fsync", "the received file made durable (part of receive)"),
          ("accept", "validation, receipt and fold (RoundEngine.accept_upload)"),
          ("fold", "the fold into the strategy's sums (part of accept)"))


@contextlib.contextmanager
def stage_timers(times: dict[str, list[float]]) -> Iterator[None]:
    """Wall time of each of an upload's stages on the coordinator (STAGES), appended to
    `times` while the block runs: the coordinator's own functions wrapped, in this process,
    and put back after. For --stages: where the project's upload time goes."""
    from fedserver import rounds, transfers
    from fedserver.engine import RoundEngine

    saved = [(owner, name, timed(owner, name, key, times))
             for owner, name, key in ((transfers.UploadReceiver, "receive", "receive"), (transfers, "_sync", "fsync"),
                                      (RoundEngine, "accept_upload", "accept"), (rounds.TrainKind, "fold", "fold"))]
    try:
        yield
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


# ------------------------------------------------------------------ an upload's floor
FLOOR_PARTS = (("school_hash", "the school's digest of its payload (named in the header before the first byte)"),
               ("receive_work", "the coordinator's per-chunk write, writeback, hash and check, and the fsync"),
               ("fold", "the fold into FedAvg's float64 sums (fold_file)"))


def floor_parts(payload: bytes, layout: Mapping[str, TensorSpec], algorithm: str, max_norm: float,
                workdir: Path) -> dict[str, Sample]:
    """Each part of FLOOR_PARTS alone, on `payload`, with the coordinator's own functions: what
    any upload to a receipt costs on top of moving its bytes. The fold is timed as a second
    upload's (into sums the first filled), as in a round."""
    parts: dict[str, Sample] = {}
    with _Clock() as clock:
        digest.of(payload, algorithm)
    parts["school_hash"] = clock.sample
    path = workdir / "floor.part"
    check = StreamCheck(layout, len(payload), max_norm)
    hasher = digest.hasher(algorithm)
    view = memoryview(payload)
    try:
        with _Clock() as clock:
            with open(path, "wb") as fh:
                for start in range(0, len(view), MAX_CHUNK_BYTES):
                    _write_and_hash(fh, hasher, check, view[start:start + MAX_CHUNK_BYTES], start)
                _sync(fh)
        parts["receive_work"] = clock.sample
        packed = check.result(path)
        if packed is None:
            raise RuntimeError("the floor's payload is not a packed update of the layout")
        delta = FileDelta(packed, layout)
        sums = segmented_empty_like({name: torch.empty(layout[name].shape, dtype=layout[name].dtype, device="meta")
                                     for _, _, name in packed.spans})
        fold_file(delta, sums, 1.0, True)   # the round's first upload fills the sums
        with _Clock() as clock:
            fold_file(delta, sums, 1.0, False)
        parts["fold"] = clock.sample
    finally:
        path.unlink(missing_ok=True)
    return parts


def floor_summary(summary: Mapping[str, Any], parts: Mapping[str, Mapping[str, float]], cores: int) -> dict[str, Any]:
    """The lower bound on A's upload to its receipt that plain streaming's CPU and the floor's
    parts give on `cores` cores: (CPU of B + CPU of the parts) / cores, with and without the
    fold (a coordinator could acknowledge before folding), against the wall time the 80% target
    allows (B's median / 0.8)."""
    plain_cpu = summary["upload"]["plain"]["cpu_median_s"]
    before_fold = plain_cpu + sum(parts[k]["cpu_median_s"] for k in ("school_hash", "receive_work"))
    with_fold = before_fold + parts["fold"]["cpu_median_s"]
    allowed = summary["upload"]["plain"]["median_s"] / TARGET_RATIO["upload"]
    return {"cores": cores, "plain_cpu_s": plain_cpu, "cpu_s_without_fold": before_fold, "cpu_s_with_fold": with_fold,
            "wall_floor_s_without_fold": before_fold / cores, "wall_floor_s_with_fold": with_fold / cores,
            "target_wall_s": allowed, "target_reachable_on_paper": before_fold / cores <= allowed}


# ------------------------------------------------------------------ the run
SERIES = ("download_project", "download_plain", "upload_project", "upload_plain", "validate_update")


def _summary(samples: list[Sample], nbytes: int) -> dict[str, float]:
    wall = [s.wall for s in samples]
    med = statistics.median(wall)
    return {"median_s": med, "min_s": min(wall), "max_s": max(wall),
            "mb_per_s_median": nbytes / med / 1e6, "mb_per_s_best": nbytes / min(wall) / 1e6,
            "cpu_median_s": statistics.median(s.cpu for s in samples)}


async def _interleave(first: Callable[[], Awaitable[Sample]], second: Callable[[], Awaitable[Sample]],
                      flip: bool) -> tuple[Sample, Sample]:
    """Run A and B back to back; `flip` runs B first (so neither always goes first)."""
    if flip:
        b = await second()
        a = await first()
    else:
        a = await first()
        b = await second()
    return a, b


async def run_benchmark(model_spec: str = DEFAULT_MODEL, cache_dir: Path | None = DEFAULT_CACHE, repeats: int = 7,
                        warmup: int = 1, workdir: Path | None = None,
                        progress: Callable[[str], None] | None = None, stages: bool = False,
                        floor: bool = False) -> dict[str, Any]:
    """Measure both paths in this event loop; returns a JSON-able dict of raw times and summaries.
    `stages`: also time the coordinator's stages of each measured upload (stage_timers).
    `floor`: also time the parts of FLOOR_PARTS alone in every repeat (floor_parts)."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    say = progress or (lambda _msg: None)
    settings = LoraSettings()
    layout = await asyncio.to_thread(load_layout, model_spec, cache_dir, settings)
    payload = await asyncio.to_thread(make_delta, layout)
    say(f"adapter: {len(layout)} tensors, {num_params(layout):,} parameters, upload payload {len(payload):,} bytes")

    tmp_ctx = tempfile.TemporaryDirectory(prefix="transfer-bench-") if workdir is None else None
    root = Path(tmp_ctx.name) if tmp_ctx is not None else workdir
    assert root is not None
    project = ProjectPath(root, model_spec, cache_dir, uploads=warmup + repeats)
    plain: PlainPath | None = None
    samples: dict[str, list[Sample]] = {k: [] for k in SERIES}
    upload_stages: dict[str, list[float]] = {}
    floor_samples: dict[str, list[Sample]] = {k: [] for k, _ in FLOOR_PARTS} if floor else {}
    try:
        await project.start()
        assert project.cfg is not None
        max_norm = project.cfg.rounds.max_norm
        named = digest.of(payload, project.upload_algorithm)   # as a school names it: BLAKE3 if offered
        plain = PlainPath(project.artefact_bytes())
        await plain.start()
        say(f"coordinator on port {project.coord.port}, round {project.round} open with {len(project.schools)} schools; "
            f"global adapter {project.global_size:,} bytes")
        for i in range(warmup + repeats):
            flip = i % 2 == 1
            dl_a, dl_b = await _interleave(project.download, plain.download, flip)
            stage_times: dict[str, list[float]] = {}
            with stage_timers(stage_times) if stages else contextlib.nullcontext():
                up_a, up_b = await _interleave(lambda: project.upload(payload, named), lambda: plain.upload(payload), flip)
            held = bytearray(payload)   # as the coordinator holds an upload: a writable buffer it views
            with _Clock() as clock:   # what the coordinator runs on every upload, on the same bytes
                validate_update(held, named, layout, max_norm, named)
            val = clock.sample
            parts = await asyncio.to_thread(floor_parts, payload, layout, digest.split(named)[0], max_norm, root) if floor else {}
            tag = "warm-up" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
            say(f"{tag}: download A {dl_a.wall:.3f}s B {dl_b.wall:.3f}s | upload A {up_a.wall:.3f}s B {up_b.wall:.3f}s"
                f" | validate_update {val.wall:.3f}s")
            if i >= warmup:
                for key, sample in zip(SERIES, (dl_a, dl_b, up_a, up_b, val)):
                    samples[key].append(sample)
                for key, got in stage_times.items():
                    upload_stages.setdefault(key, []).extend(got)
                for key, sample in parts.items():
                    floor_samples[key].append(sample)
        engine = project.coord.engine
        accepted = len(engine.current.accepted) if engine.current is not None else -1
    finally:
        if plain is not None:
            await plain.stop()
        await project.stop()
        if tmp_ctx is not None:
            tmp_ctx.cleanup()

    down_bytes, up_bytes = project.global_size, len(payload)
    summary: dict[str, Any] = {}
    for direction, nbytes in (("download", down_bytes), ("upload", up_bytes)):
        a = _summary(samples[f"{direction}_project"], nbytes)
        b = _summary(samples[f"{direction}_plain"], nbytes)
        summary[direction] = {"project": a, "plain": b,
                              "ratio_median": a["mb_per_s_median"] / b["mb_per_s_median"],
                              "ratio_best": a["mb_per_s_best"] / b["mb_per_s_best"]}
    v = _summary(samples["validate_update"], up_bytes)
    v["share_of_project_upload"] = v["median_s"] / summary["upload"]["project"]["median_s"]
    summary["validate_update"] = v
    floor_parts_summary = {k: _summary(got, up_bytes) for k, got in floor_samples.items()}
    if floor_parts_summary:
        summary["floor"] = {"parts": floor_parts_summary,
                            **floor_summary(summary, floor_parts_summary, os.cpu_count() or 1)}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "grpcio": grpc.__version__, "torch": torch.__version__,
                    "loadavg_1m_at_end": os.getloadavg()[0]},
        "model": model_spec, "lora": json.loads(settings.to_json()),
        "tensors": len(layout), "parameters": num_params(layout),
        "download_bytes": down_bytes, "upload_bytes": up_bytes, "chunk_bytes": MAX_CHUNK_BYTES,
        "repeats": repeats, "warmup": warmup, "accepted_uploads": accepted,
        "wall_s": {k: [s.wall for s in v] for k, v in samples.items()},
        "cpu_s": {k: [s.cpu for s in v] for k, v in samples.items()},
        "floor_s": {k: {"wall": [s.wall for s in v], "cpu": [s.cpu for s in v]} for k, v in floor_samples.items()},
        "summary": summary,
        "upload_stages_s": {k: {"median_s": statistics.median(v), "n": len(v)} for k, v in upload_stages.items()},
    }


def format_table(result: Mapping[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"{result['model']}: LoRA r={result['lora']['rank']} on {len(result['lora']['target_modules'])} projections, "
        f"{result['parameters']:,} float32 parameters = {result['upload_bytes']:,} bytes of safetensors; "
        f"{result['repeats']} repeats (+{result['warmup']} warm-up), A and B interleaved",
        "",
        f"{'direction':<9} {'path':<24} {'median s':>8} {'min s':>7} {'MB/s':>7} {'A/B':>5} {'A/B best':>8} {'CPU ms':>7}",
    ]
    for direction in ("download", "upload"):
        d = s[direction]
        for label, key in (("A project", "project"), ("B plain gRPC", "plain")):
            r = d[key]
            ratio = f"{d['ratio_median']:.2f}" if key == "project" else ""
            best = f"{d['ratio_best']:.2f}" if key == "project" else ""
            lines.append(f"{direction:<9} {label:<24} {r['median_s']:>8.3f} {r['min_s']:>7.3f} {r['mb_per_s_median']:>7.0f} "
                         f"{ratio:>5} {best:>8} {r['cpu_median_s'] * 1000:>7.0f}")
    v = s["validate_update"]
    lines.append(f"{'upload':<9} {'(validate_update alone)':<24} {v['median_s']:>8.3f} {v['min_s']:>7.3f} {'':>7} {'':>5} {'':>8} "
                 f"{v['cpu_median_s'] * 1000:>7.0f}   = {v['share_of_project_upload']:.0%} of A's median upload")
    st = result.get("upload_stages_s") or {}
    if st:
        up = s["upload"]["project"]["median_s"]
        lines.append("")
        lines.append("where A's upload time goes on the coordinator (medians; the rest is the client, gRPC and the call's own checks):")
        for key, what in STAGES:
            if key in st:
                lines.append(f"  {key:<8} {st[key]['median_s'] * 1000:7.1f} ms  {st[key]['median_s'] / up:4.0%}  {what}")
    fl = s.get("floor")
    if fl:
        ms = 1000
        lines.append("")
        lines.append("the floor of an upload to its receipt (--floor): each part alone, on the same payload (medians):")
        for key, what in FLOOR_PARTS:
            part = fl["parts"][key]
            lines.append(f"  {key:<12} {part['median_s'] * ms:6.1f} ms wall {part['cpu_median_s'] * ms:6.1f} ms CPU  {what}")
        lines.append(f"  plain streaming's whole upload: {s['upload']['plain']['median_s'] * ms:.1f} ms wall, "
                     f"{fl['plain_cpu_s'] * ms:.1f} ms CPU (client and server)")
        verdict = "reachable on paper" if fl["target_reachable_on_paper"] else "NOT reachable on this machine"
        lines.append(f"  => A needs at least {fl['wall_floor_s_without_fold'] * ms:.1f} ms (plain's CPU + the parts before "
                     f"the fold, over {fl['cores']} cores), {fl['wall_floor_s_with_fold'] * ms:.1f} ms with the fold; "
                     f"the 80% target allows {fl['target_wall_s'] * ms:.1f} ms: {verdict}")
    lines.append("")
    lines.append("MB/s = 1e6 bytes/s at the median; A/B = throughput(A)/throughput(B) at the medians (best: at the minima);")
    lines.append("CPU ms = process CPU time (client + server + gRPC threads) per transfer, median.")
    for direction in ("download", "upload"):
        ratio = s[direction]["ratio_median"]
        verdict = "meets" if ratio >= TARGET_RATIO[direction] else "misses"
        lines.append(f"{direction}: project path at {ratio:.0%} of plain streaming - {verdict} the {TARGET_RATIO[direction]:.0%} target")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="measured repeats per path and direction (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up repeats (default 1)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec whose config gives the adapter layout (default {DEFAULT_MODEL})")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"converted-model cache (default {DEFAULT_CACHE})")
    p.add_argument("--json", type=Path, default=None, help="also write the raw times and summary here")
    p.add_argument("--quiet", action="store_true", help="no per-repeat lines")
    p.add_argument("--stages", action="store_true", help="also time the coordinator's stages of each upload")
    p.add_argument("--floor", action="store_true",
                   help="also time the work an upload to its receipt cannot skip, alone, and print the lower bound it sets")
    args = p.parse_args(argv)

    from common.logs import configure_logging

    configure_logging("warning", json=False)   # the coordinator's per-upload INFO lines would swamp the table
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    result = asyncio.run(run_benchmark(args.model, args.cache_dir, args.repeats, args.warmup, progress=say,
                                       stages=args.stages, floor=args.floor))
    print_results(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
