"""Admission (fedserver/admission.py): callers identified before a request byte is read,
calls per school capped, request messages timed, upload bytes budgeted; and the whole attack
(benchmarks/hostile_streams.py) leaving the coordinator's memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest

from common import PROTOCOL_VERSION
from common.errors import RETRY_AFTER_KEY, BusyError, DuplicateUploadError, TooLargeError
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.wire import grpc_options
from fedserver.admission import ByteBudget
from fedserver.config import ServerLimitsSection
from fedserver.store import Store
from fedserver.transfers import UploadReceiver
from tests.conftest import TOKENS, coordinator_config

JOIN = "/schoolfed.v1.Federation/Join"


@pytest.fixture
async def plain(tmp_path, tiny_model, start_coordinator):
    """A plaintext coordinator (tokens only) with tight limits, rounds not running."""
    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False)
    import dataclasses
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(
        cfg.server, limits=ServerLimitsSection(calls_per_school=2, request_timeout_s=1.0)))
    rc = await start_coordinator(cfg, run_rounds=False)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    yield rc, channel
    await rc.stop()
    await channel.close()


async def _join(channel, school: str) -> list[tuple[str, str]]:
    resp = await pb_grpc.FederationStub(channel).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                                                      metadata=[("authorization", f"Bearer {TOKENS[school]}")])
    return [("x-session-token", resp.session_token)]


async def test_a_stranger_is_refused_before_its_request_is_read(plain):
    rc, channel = plain
    raw = channel.unary_unary(JOIN)   # bytes in, bytes out: the body is not a JoinRequest at all
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\x00 not protobuf", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED   # not INVALID_ARGUMENT: nothing was read
    # the same bytes from an enrolled school: read, and refused as what they are
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\x00 not protobuf", metadata=[("authorization", f"Bearer {TOKENS['school-1']}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid Join message" in err.value.details()


async def test_a_request_larger_than_one_chunk_is_refused(plain):
    rc, channel = plain
    raw = channel.unary_unary(JOIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x00" * (2 * 1024 * 1024), metadata=[("authorization", f"Bearer {TOKENS['school-1']}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not any(k == RETRY_AFTER_KEY for k, _ in (err.value.trailing_metadata() or ()))   # final, not "busy"


async def test_calls_per_school_are_capped_and_the_cap_says_when_to_retry(plain):
    rc, channel = plain
    md1 = await _join(channel, "school-1")
    md2 = await _join(channel, "school-2")
    stub = pb_grpc.FederationStub(channel)
    hold = asyncio.Event()

    async def nothing():   # an upload that never sends its header (held until the test lets go)
        await hold.wait()
        return
        yield  # pragma: no cover

    rc.engine.cfg  # noqa: B018  (the coordinator is up)
    first = [stub.Upload(nothing(), metadata=md1) for _ in range(2)]
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Upload(nothing(), metadata=md1, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 2 Upload calls open" in err.value.details()
    assert dict(err.value.trailing_metadata() or ())[RETRY_AFTER_KEY] == "1000"
    # another school is not affected by school-1's calls: its upload is read (and times out)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Upload(nothing(), metadata=md2, timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    hold.set()
    for call in first:
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    assert rc.coord.server is not None


async def test_a_request_that_does_not_arrive_in_time_ends_the_call(plain):
    rc, channel = plain
    md = await _join(channel, "school-1")
    stub = pb_grpc.FederationStub(channel)

    async def stall():
        await asyncio.sleep(30)
        yield pb.UploadMessage()  # pragma: no cover

    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Upload(stall(), metadata=md, timeout=20)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no complete request message within 1 s" in err.value.details()
    assert time.monotonic() - t0 < 10
    # and its slot is given back: the school can call again at once
    assert rc.coord.server is not None
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(stall(), metadata=md, timeout=20)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_is_answered_and_its_anonymous_pool_is_bounded(plain):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rc, channel = plain
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == health_pb2.HealthCheckResponse.SERVING
    raw = channel.stream_unary("/grpc.health.v1.Health/Check")
    hold = asyncio.Event()

    async def nothing():
        await hold.wait()
        return
        yield  # pragma: no cover

    held = [raw(nothing()) for _ in range(16)]
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a school that shows its session has a pool of its own
    md = await _join(channel, "school-1")
    assert (await health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)).status == \
        health_pb2.HealthCheckResponse.SERVING
    hold.set()
    await asyncio.gather(*held, return_exceptions=True)


# ------------------------------------------------------------------ the upload byte budget

async def test_byte_budget_first_come_first_served_and_waits_bounded():
    b = ByteBudget(100, wait_s=0.5)
    await b.acquire(60, "a")
    got = []

    async def take(n, name):
        await b.acquire(n, name)
        got.append(name)

    t1 = asyncio.create_task(take(50, "b"))
    await asyncio.sleep(0.05)
    t2 = asyncio.create_task(take(10, "c"))   # would fit now, but waits behind b (no starvation of large ones)
    await asyncio.sleep(0.05)
    assert got == [] and b.used == 60
    b.release(60)
    await asyncio.gather(t1, t2)
    assert got == ["b", "c"] and b.used == 60 and b.peak == 60
    with pytest.raises(BusyError, match="did not fit within 0.5 s"):
        await b.acquire(50, "d")
    assert b.used == 60 and not b._waiters   # a refused waiter leaves nothing behind
    with pytest.raises(TooLargeError, match="upload_memory_mb"):
        await b.acquire(101, "e")


async def test_byte_budget_cancelled_waiter_gives_its_place_back():
    b = ByteBudget(10, wait_s=5)
    await b.acquire(10, "a")
    t = asyncio.create_task(b.acquire(5, "b"))
    await asyncio.sleep(0.05)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    b.release(10)
    assert b.used == 0 and not b._waiters
    async with b.hold(10, "c"):
        assert b.used == 10
    assert b.used == 0


# ------------------------------------------------------------------ one writer per upload

async def test_one_writer_per_upload_id(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    rx = UploadReceiver(store, tmp_path / "uploads", 1 << 20)
    h = UploadHeader(round=1, upload_id="u1", num_examples=1, digest="0" * 64, total_size=8, base_sha256="")
    release = asyncio.Event()

    async def slow():
        yield 0, b"1234"
        await release.wait()
        yield 4, b"5678"

    first = asyncio.create_task(rx.receive("school-1", h, slow()))
    await asyncio.sleep(0.1)

    async def other():
        yield 0, b"abcd"

    with pytest.raises(DuplicateUploadError, match="being received on another stream"):
        await rx.receive("school-1", h, other())
    release.set()
    part, digest = await first
    assert part.read_bytes() == b"12345678" and digest == hashlib.sha256(b"12345678").hexdigest()   # not interleaved
    store.close()


# ------------------------------------------------------------------ the daemon's side

def test_daemon_retries_busy_refusals_only():
    from fedclient.transfer import retry_after_s

    class Err(grpc.aio.AioRpcError):
        def __init__(self, code, trailing):
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="x")

    busy = retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, [(RETRY_AFTER_KEY, "1000")]))
    assert busy is not None and 1.0 <= busy <= 2.0   # jittered
    assert retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, [])) is None   # too large: final
    assert retry_after_s(Err(grpc.StatusCode.UNAVAILABLE, [(RETRY_AFTER_KEY, "1000")])) is None


def test_a_status_the_asyncio_client_lost_is_recognised():
    from fedclient.transfer import status_lost

    lost = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="Internal error from Core")
    real = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="coordinator error in Upload; the operator can find it in the coordinator's log")
    assert status_lost(lost) and not status_lost(real)


# ------------------------------------------------------------------ the attack, end to end

def test_hostile_streams_leave_memory_bounded_and_honest_schools_served(tmp_path):
    """Before admission: 1,000 such streams took the coordinator from 0.5 to 2.9 GB (20 s) and it
    kept the memory; 300 streams of ~1 MB each would be ~300 MB here."""
    from benchmarks.hostile_streams import run

    r = asyncio.run(run(streams=300, per_conn=100, announce=1_000_000, hold_s=3.0,
                        scenarios=("anon-join", "school-upload"), work=tmp_path))
    for name, s in r["scenarios"].items():
        assert s["coordinator_alive"], name
        assert s["attacker"]["streams_ended_by_server"] >= 290, (name, s)
        assert s["peak_above_before_mib"] < 100, (name, s)
        assert s["honest_during_attack"]["failed"] == 0, (name, s)
        assert s["honest_during_attack"]["ok"] >= 3, (name, s)


# ------------------------------------------------------------------ a stalled download resumes

async def test_a_stalled_download_ends_and_resumes_where_it_stopped():
    """A download stream can stall without the connection failing (seen at 10,000 schools);
    the daemon's download gives up after its stall timeout, keeps what arrived, and resumes."""
    from common.wire import sha256_hex
    from fedclient.transfer import StalledError, download

    data = bytes(range(256)) * 40
    cut = 4096

    class Stream:
        def __init__(self, offset, stall):
            self.offset, self.stall, self.cancelled = offset, stall, False

        def cancel(self):
            self.cancelled = True

        async def __aiter__(self):
            for start in range(self.offset, len(data), cut):
                if self.stall and start >= cut:
                    await asyncio.sleep(3600)   # the server side went quiet
                yield pb.Chunk(offset=start, data=data[start:start + cut], total_size=len(data))

    class Stub:
        def __init__(self):
            self.calls = []

        def Download(self, request, metadata=None):
            s = Stream(request.offset, stall=not self.calls)
            self.calls.append(s)
            return s

    stub, buf = Stub(), bytearray()
    with pytest.raises(StalledError, match="no download progress for 0.2 s at byte 4096"):
        await download(stub, sha256_hex(data), [], buf, stall_s=0.2)
    assert stub.calls[0].cancelled and bytes(buf) == data[:cut]
    assert await download(stub, sha256_hex(data), [], buf, stall_s=0.2) == data   # resumed at 4096
    assert len(stub.calls) == 2 and buf == bytearray()   # done: the artefact is returned, the partial dropped

    # a download cancelled from outside (the daemon stopping) keeps what arrived too
    stub, buf = Stub(), bytearray()
    task = asyncio.create_task(download(stub, sha256_hex(data), [], buf))
    while len(buf) == 0 and not stub.calls:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)   # past the first chunk, into the stall
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bytes(buf) == data[:cut]
    assert await download(stub, sha256_hex(data), [], buf) == data and stub.calls[1].offset == cut


# ------------------------------------------------------------------ the daemon's retries, per kind

async def test_the_daemon_retries_each_refusal_kind_as_it_should():
    """SchoolDaemon._rpc: busy (retry-after) and a coordinator's DEADLINE_EXCEEDED (a slow
    message timed out) are retried on the same link; UNAVAILABLE waits for a new link; a
    final refusal is raised."""
    import types

    from fedclient.daemon import SchoolDaemon

    class Counter:
        def inc(self):
            pass

    ready = asyncio.Event()
    ready.set()
    fake = types.SimpleNamespace(_link_ready=ready, _link=("stub", []), log=types.SimpleNamespace(info=lambda *a, **k: None),
                                 metrics=types.SimpleNamespace(retries=Counter()),
                                 status=types.SimpleNamespace(add=lambda *a: None))

    def err(code, trailing=()):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="x")

    async def run(errors):
        calls = []

        async def fn(stub, md):
            calls.append(len(calls))
            if errors:
                raise errors.pop(0)
            return "ok"
        return await SchoolDaemon._rpc(fake, fn, time.time() + 5), calls

    # busy, then a timed-out message: both on the same link, the link never cleared
    got, calls = await run([err(grpc.StatusCode.RESOURCE_EXHAUSTED, [(RETRY_AFTER_KEY, "50")]),
                            err(grpc.StatusCode.DEADLINE_EXCEEDED)])
    assert got == "ok" and len(calls) == 3 and ready.is_set()
    # a dropped link: cleared, and the call waits until the session re-joins
    task = asyncio.create_task(run([err(grpc.StatusCode.UNAVAILABLE)]))
    await asyncio.sleep(0.5)
    assert not task.done() and not ready.is_set()
    ready.set()
    assert (await task)[0] == "ok"
    # final: raised at once
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run([err(grpc.StatusCode.INVALID_ARGUMENT)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_receive_window_is_fixed_unless_set_to_zero(tmp_path):
    """What gRPC buffers per incoming stream is the configured window (no BDP probing, which grows
    it with the link); 0 gives gRPC's own sizing back."""
    import dataclasses

    from fedserver.app import server_options
    from fedserver.config import ServerLimitsSection
    from tests.conftest import coordinator_config

    cfg = coordinator_config(tmp_path, "dir:unused", tls=False)
    opts = dict(server_options(cfg))
    assert opts["grpc.http2.bdp_probe"] == 0 and opts["grpc.http2.lookahead_bytes"] == 2048 * 1024
    off = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, limits=ServerLimitsSection(receive_window_kb=0)))
    assert "grpc.http2.bdp_probe" not in dict(server_options(off))
    assert ServerLimitsSection(receive_window_kb=10).problems() and not ServerLimitsSection(receive_window_kb=0).problems()
