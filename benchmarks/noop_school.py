"""A protocol-level school that trains nothing, and imports no torch.

It speaks the real protocol with the project's own code (the common.pb stubs, common.serde,
common.messages, fedclient.transfer.download/upload): Join with an enrolment token, hold the
Session stream and send heartbeats, and for every TrainCommand

  1. download the global adapter (Download RPC; `download()` checks it by BLAKE3 when the
     coordinator announces one and by sha256 otherwise, as the daemon does),
  2. add a constant to every tensor (numpy over the safetensors' float32 data; the header is
     kept as it is, so names, shapes and dtypes stay the federation's layout),
  3. upload the result as the round's delta through UploadStatus + Upload, with an
     UploadHeader naming the round, the adapter it was computed on and the payload's digest
     (BLAKE3 if the coordinator's JoinResponse offers it, else sha256: common/digest.py).

An EvaluateCommand is answered at once with an empty report (0 questions, as a school with
nothing held out does); Idle is ignored; distill, teach and unknown commands are reported back
as failures (this school cannot do them). A final Shutdown ends `run()`; a non-final one (the
coordinator stopping, or a newer session) reconnects with backoff.

What it is for: measuring the coordinator's own cost per round with many schools on one machine
(`benchmarks/round_bench.py` runs K of them in one asyncio process). It is not a school daemon:
no training, no resumed transfers, no pending uploads on disk; a transfer that fails is
reported as a failure of that round.

Note on the values: the upload is the downloaded global adapter plus the constant, used as a
delta, so under FedAvg the global adapter becomes about 2 x global + c each round. The cost of a
round does not depend on the values; they stay far from float32 overflow for a few dozen rounds
(round_bench keeps a coordinator to at most 40).

Run one or more against a coordinator:

    python -m benchmarks.noop_school --coordinator 127.0.0.1:50051 --token-file school-1.token [...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import PROTOCOL_VERSION, __version__, digest
from common.framing import TransferStub
from common.backoff import Backoff
from common.logs import get_logger
from common.messages import (
    Capabilities, Command, DistillCommand, EvalReport, EvaluateCommand, Event, Failure, Heartbeat, IdleCommand,
    ShutdownCommand, TeachCommand, TrainCommand, UnknownCommand, UploadHeader, command_name,
)
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import capabilities_to_pb, command_from_pb, event_to_pb, named_digest, settings_from_pb
from common.wire import grpc_options
from fedclient.transfer import download, retry_after_s, status_lost, upload

DEFAULT_CONSTANT = 1e-3
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.FAILED_PRECONDITION}   # at Join: a wrong token or an incompatible school; retrying will not help


def channel_options() -> list[tuple[str, int]]:
    """The project's options, plus a subchannel pool of the channel's own: without it gRPC
    lets channels to the same address with the same options share one TCP connection, and K
    schools in one process would look like one school with K streams."""
    return [*grpc_options(), ("grpc.use_local_subchannel_pool", 1)]


def add_constant(data: bytes, constant: float, scale: float = 1.0) -> bytes:
    """Safetensors bytes with `constant` added to every element of every tensor: one numpy pass
    over the data section, the header copied unchanged. Only float32 tensors that fill the data
    section (the layout the federation trains) are accepted."""
    if len(data) < 8:
        raise ValueError("not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n
    if start > len(data):
        raise ValueError("not safetensors: header length past the end of the data")
    header = json.loads(data[8:start])
    covered = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") != "F32":
            raise ValueError(f"{name}: dtype {info.get('dtype')}, this school handles float32 only")
        begin, end = info["data_offsets"]
        covered += end - begin
    body = len(data) - start
    if covered != body or body % 4:
        raise ValueError(f"the tensors cover {covered} of {body} data bytes; expected a dense float32 layout")
    out = bytearray(len(data))
    out[:start] = data[:start]
    src = np.frombuffer(data, dtype="<f4", offset=start)
    dst = np.frombuffer(out, dtype="<f4", offset=start)
    if scale == 1.0:
        np.add(src, np.float32(constant), out=dst)
    else:   # scale 0: the delta is the constant alone (the global then moves by it each round, not doubling)
        np.multiply(src, np.float32(scale), out=dst)
        dst += np.float32(constant)
    return bytes(out)


class Hooks:
    """What a host of no-op schools may observe or hold; the defaults do nothing. Called on the
    school's event loop."""

    def on_command(self, school: NoopSchool, cmd: Command, at: float) -> None:
        """Every command, as it arrives (`at`: time.monotonic())."""

    async def before_work(self, school: NoopSchool, cmd: TrainCommand) -> None:
        """Awaited before a train command's work starts (a benchmark's gate)."""

    def on_result(self, school: NoopSchool, record: dict[str, Any]) -> None:
        """A train command done: its round and timings (monotonic seconds)."""

    def on_error(self, school: NoopSchool, cmd: Command, error: BaseException) -> None:
        """A command's work failed (it is also reported to the coordinator as a Failure)."""


class NoopSchool:
    def __init__(self, coordinator: str, token: str, *, name: str = "", constant: float = DEFAULT_CONSTANT,
                 num_examples: int = 100, hooks: Hooks | None = None, max_backoff_s: float = 5.0,
                 scale: float = 1.0) -> None:
        self.coordinator = coordinator
        self.token = token
        self.name = name or "noop-school"
        self.school_id = ""            # as the coordinator names it (JoinResponse)
        self.upload_algorithm = digest.SHA256   # what the coordinator lets uploads be named by (JoinResponse)
        self.constant = constant
        self.scale = scale   # the upload is scale x global + constant
        self.num_examples = num_examples
        self.hooks = hooks or Hooks()
        self.max_backoff_s = max_backoff_s
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.shutdown_reason: str | None = None
        self.log = get_logger("noop_school").bind(school=self.name)
        self._rounds_seen: set[int] = set()   # train rounds done or under way (a re-sent command is skipped)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event | None = None) -> str:
        """Until a final Shutdown (returns its reason) or `stop` is set."""
        stop = stop or asyncio.Event()
        backoff = Backoff(initial_s=0.2, max_s=self.max_backoff_s)
        try:
            while self.shutdown_reason is None and not stop.is_set():
                try:
                    await self._connect_once(stop, backoff)
                except grpc.aio.AioRpcError as exc:
                    self.log.warning("connection lost", code=exc.code().name, detail=exc.details())
                if self.shutdown_reason is None and not stop.is_set():
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=backoff.next_delay())
                    except TimeoutError:
                        pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.shutdown_reason or "stopped"

    async def _connect_once(self, stop: asyncio.Event, backoff: Backoff) -> None:
        async with grpc.aio.insecure_channel(self.coordinator, options=channel_options()) as channel:
            stub = TransferStub(channel)   # as the school daemon: chunks framed by hand
            caps = Capabilities("", 0, self.num_examples, f"no-op school, cpu x{os.cpu_count()}", __version__)
            try:
                resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=capabilities_to_pb(caps)),
                                       metadata=[("authorization", f"Bearer {self.token}")], timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    raise RuntimeError(f"{self.name}: cannot join: {exc.code().name}: {exc.details()}") from None
                raise
            settings = settings_from_pb(resp)
            backoff.reset()
            self.school_id = settings.school_id
            self.upload_algorithm = digest.upload_algorithm(settings.upload_digests)   # as the daemon: BLAKE3 if offered
            md = [("x-session-token", settings.session_token)]
            await self._session(stub, md, settings.heartbeat_interval_s, stop)

    async def _session(self, stub: pb_grpc.FederationStub, md: list[tuple[str, str]], beat: float,
                       stop: asyncio.Event) -> None:
        async def outgoing() -> AsyncIterator[pb.ClientEvent]:
            while True:
                try:
                    ev = await asyncio.wait_for(self.events.get(), timeout=beat)
                except TimeoutError:
                    ev = Heartbeat(time.time())
                yield event_to_pb(ev)

        call = stub.Session(outgoing(), metadata=md)

        async def incoming() -> None:
            async for msg in call:
                cmd = command_from_pb(msg)
                self.hooks.on_command(self, cmd, time.monotonic())
                if isinstance(cmd, ShutdownCommand):
                    if cmd.final:
                        self.shutdown_reason = cmd.reason
                    try:   # let the coordinator end the stream itself
                        await asyncio.wait_for(call.code(), timeout=2.0)
                    except (TimeoutError, grpc.aio.AioRpcError):
                        pass
                    return
                if isinstance(cmd, IdleCommand):
                    continue
                if isinstance(cmd, EvaluateCommand):   # nothing held out here: an empty report, at once
                    self.events.put_nowait(EvalReport(cmd.round, 0, {}))
                elif isinstance(cmd, TrainCommand):
                    if cmd.round not in self._rounds_seen:
                        self._rounds_seen.add(cmd.round)
                        self._spawn(self._train(stub, md, cmd))
                elif isinstance(cmd, (DistillCommand, TeachCommand, UnknownCommand)):
                    self.events.put_nowait(Failure(cmd.round, command_name(cmd),
                                                   f"a no-op school does not do {command_name(cmd)} commands"))

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

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _train(self, stub: pb_grpc.FederationStub, md: list[tuple[str, str]], cmd: TrainCommand) -> None:
        try:
            await self.hooks.before_work(self, cmd)
            t0 = time.monotonic()
            data = await download(stub, cmd.adapter.sha256, md, bytearray(), blake3=cmd.adapter.blake3)   # ChecksumError on a bad hash
            t1 = time.monotonic()
            payload = await asyncio.to_thread(add_constant, data, self.constant, self.scale)
            del data
            named = await asyncio.to_thread(digest.of, payload, self.upload_algorithm)
            t2 = time.monotonic()
            header = UploadHeader(cmd.round, f"r{cmd.round}-{digest.split(named)[1][:24]}", self.num_examples, named, len(payload), 0,
                                  cmd.adapter.sha256, {})
            lost = 0
            while True:
                try:
                    receipt = await upload(stub, header, payload, md)
                    break
                except grpc.aio.AioRpcError as exc:   # the coordinator's upload budget is spent: wait a moment
                    wait_s = retry_after_s(exc)
                    if wait_s is None and status_lost(exc) and lost < 3:
                        lost, wait_s = lost + 1, 0.5
                    if wait_s is None:
                        raise
                    await asyncio.sleep(wait_s)
            t3 = time.monotonic()
            if receipt is not None and (named_digest(receipt) != named or receipt.received_bytes != len(payload)):
                raise RuntimeError(f"receipt does not match the upload: {receipt}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error("train command failed", round=cmd.round, error=repr(exc))
            self.events.put_nowait(Failure(cmd.round, "train", f"no-op school: {exc!r}"[:500]))
            self.hooks.on_error(self, cmd, exc)
            return
        self.hooks.on_result(self, {"round": cmd.round, "start": t0, "downloaded": t1, "computed": t2, "uploaded": t3,
                                    "download_bytes": cmd.adapter.size, "upload_bytes": len(payload),
                                    "resent": receipt is None})


async def _main_async(args: argparse.Namespace) -> int:
    tokens = [Path(p).read_text().strip() for p in args.token_file]
    schools = [NoopSchool(args.coordinator, tok, name=Path(p).stem, constant=args.constant, scale=args.scale)
               for p, tok in zip(args.token_file, tokens)]
    reasons = await asyncio.gather(*(s.run() for s in schools))
    for s, reason in zip(schools, reasons):
        print(f"{s.name}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.noop_school", description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True, help="host:port of the coordinator (insecure gRPC)")
    p.add_argument("--token-file", action="append", required=True,
                   help="a school's enrolment token file; repeat for more schools in this process")
    p.add_argument("--constant", type=float, default=DEFAULT_CONSTANT, help="added to every element (default 1e-3)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="the upload is scale x the global adapter + constant (default 1; 0: a constant delta)")
    args = p.parse_args(argv)
    from common.logs import configure_logging

    configure_logging("info", json=False)
    return asyncio.run(_main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
