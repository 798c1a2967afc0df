"""Bad input over real gRPC: each gets a clear status and the coordinator's state is unchanged."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch

from common import PROTOCOL_VERSION
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.wire import MAX_CHUNK_BYTES, grpc_options, sha256_hex, tensors_to_bytes
from fedclient.transfer import download, upload
from tests.conftest import TOKENS, coordinator_config, wait_for


@pytest.fixture
async def open_round(tmp_path, tiny_model, start_coordinator):
    """A coordinator with round 1 open for school-1 and school-2, driven by the test."""
    # plaintext: one channel stands in for several schools (tokens only); TLS is tests/test_tls.py's
    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False, rounds=dict(total=1, min_schools=2, quorum=2))
    rc = await start_coordinator(cfg, run_rounds=True)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)
    sessions = {}
    calls = []
    for sid in ("school-1", "school-2"):
        resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
        md = [("x-session-token", resp.session_token)]
        sessions[sid] = md
        call = stub.Session(_idle(), metadata=md)
        calls.append(call)
    await wait_for(lambda: rc.engine.current is not None, 20, "round 1 to open")
    yield rc, stub, sessions
    for c in calls:
        c.cancel()
    # Stop the server first: it ends the streams, so the client close cannot wait on them
    # (a close-first teardown hung once in CI). Stopping twice is harmless.
    await rc.stop()
    await channel.close()


async def _idle():
    import asyncio

    while True:
        await asyncio.sleep(0.2)
        yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=0))


def good_delta(rc) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, 0.01) for k, v in rc.engine.layout.items()}


def header_for(rc, payload: bytes, **kw) -> UploadHeader:
    fields = dict(round=rc.engine.current.number, upload_id="u-" + sha256_hex(payload)[:16], num_examples=10,
                  digest=sha256_hex(payload), total_size=len(payload), base_sha256=rc.engine.current.global_sha)
    fields.update(kw)
    return UploadHeader(**fields)


def snapshot(rc):
    return ([(r.round, r.status) for r in rc.store.rounds()], [x.school_id for x in rc.store.receipts(1)],
            sorted(rc.engine.current.accepted) if rc.engine.current else None)


async def expect_status(coro, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()


async def test_unknown_school_is_unauthenticated(open_round):
    rc, stub, _ = open_round
    await expect_status(stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", "Bearer nope")]),
                        grpc.StatusCode.UNAUTHENTICATED, "unknown school")
    await expect_status(stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION)), grpc.StatusCode.UNAUTHENTICATED, "missing enrolment token")


async def test_rpcs_without_session_are_refused(open_round):
    rc, stub, _ = open_round
    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id="x")), grpc.StatusCode.UNAUTHENTICATED, "call Join")
    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id="x"), metadata=[("x-session-token", "forged")]),
                        grpc.StatusCode.UNAUTHENTICATED, "call Join")


async def test_protocol_version_mismatch(open_round):
    rc, stub, _ = open_round
    await expect_status(stub.Join(pb.JoinRequest(protocol_version=99), metadata=[("authorization", f"Bearer {TOKENS['school-1']}")]),
                        grpc.StatusCode.FAILED_PRECONDITION, "upgrade the school daemon")


async def test_school_on_another_base_model_is_refused(open_round):
    rc, stub, _ = open_round
    caps = pb.Capabilities(model="HuggingFaceTB/SmolLM2-1.7B-Instruct")
    await expect_status(stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=caps),
                                  metadata=[("authorization", f"Bearer {TOKENS['school-1']}")]),
                        grpc.StatusCode.FAILED_PRECONDITION, "set [model] base")


@pytest.mark.parametrize("case, code, text", [
    ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("inf", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("missing_tensor", grpc.StatusCode.INVALID_ARGUMENT, "missing"),
    ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("not_safetensors", grpc.StatusCode.INVALID_ARGUMENT, "not valid safetensors"),
    ("bad_checksum", grpc.StatusCode.DATA_LOSS, "does not match"),
    ("wrong_round", grpc.StatusCode.FAILED_PRECONDITION, "round 7"),
    ("stale_base", grpc.StatusCode.FAILED_PRECONDITION, "download it again"),
    ("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the coordinator's limit"),
])
async def test_bad_upload_rejected_and_state_intact(open_round, case, code, text):
    rc, stub, sessions = open_round
    delta = good_delta(rc)
    name = next(iter(delta))
    kw = {}
    if case == "wrong_shape":
        delta[name] = torch.zeros(3, 3)
    elif case == "nan":
        delta[name][0, 0] = float("nan")
    elif case == "inf":
        delta[name][0, 0] = float("inf")
    elif case == "missing_tensor":
        del delta[name]
    elif case == "wrong_dtype":
        delta[name] = delta[name].half()
    payload = b"garbage, not safetensors" * 10 if case == "not_safetensors" else tensors_to_bytes(delta)
    if case == "bad_checksum":
        kw["digest"] = hashlib.sha256(b"something else").hexdigest()
    elif case == "wrong_round":
        kw["round"] = 7
    elif case == "stale_base":
        kw["base_sha256"] = "ab" * 32
    elif case == "too_large":
        kw["total_size"] = rc.cfg.server.max_upload_bytes + 1
    before = snapshot(rc)
    await expect_status(upload(stub, header_for(rc, payload, **kw), payload, sessions["school-1"]), code, text)
    assert snapshot(rc) == before
    # Nothing was lost: the same school can still deliver a good update afterwards.
    good = tensors_to_bytes(good_delta(rc))
    receipt = await upload(stub, header_for(rc, good), good, sessions["school-1"])
    assert receipt is not None and receipt.round == 1
    assert "school-1" in rc.engine.current.accepted or rc.store.rounds()[0].status == "committed"


async def test_replayed_upload_is_refused(open_round):
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc))
    h = header_for(rc, good)
    assert await upload(stub, h, good, sessions["school-1"]) is not None
    # The same upload again: UploadStatus says complete, the client sends nothing.
    assert await upload(stub, h, good, sessions["school-1"]) is None
    # A different upload id for the same (round, school) is a replay too.
    other = tensors_to_bytes({k: v * 2 for k, v in good_delta(rc).items()})
    await expect_status(upload(stub, header_for(rc, other), other, sessions["school-1"]), grpc.StatusCode.ALREADY_EXISTS, "replays are refused")
    assert [r.school_id for r in rc.store.receipts(1)] == ["school-1"]


async def test_oversized_chunk_is_refused(open_round):
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc)) + b"\0" * MAX_CHUNK_BYTES  # > 1 MiB in one chunk
    h = header_for(rc, good)

    async def messages():
        from common.serde import header_to_pb

        yield pb.UploadMessage(header=header_to_pb(h))
        yield pb.UploadMessage(chunk=pb.Chunk(offset=0, data=good[: MAX_CHUNK_BYTES + 1], total_size=len(good)))

    await expect_status(stub.Upload(messages(), metadata=sessions["school-1"]), grpc.StatusCode.RESOURCE_EXHAUSTED, "chunk limit")
    assert rc.store.receipts(1) == []


async def test_upload_from_non_participant_is_refused(open_round):
    rc, stub, _ = open_round
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS['school-3']}")])
    good = tensors_to_bytes(good_delta(rc))
    await expect_status(upload(stub, header_for(rc, good), good, [("x-session-token", resp.session_token)]),
                        grpc.StatusCode.FAILED_PRECONDITION, "not a participant")


async def test_interrupted_upload_resumes_from_acknowledged_byte(open_round):
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc))
    assert len(good) > 2 * 4096
    h = header_for(rc, good)
    from common.serde import header_to_pb

    async def first_part():
        yield pb.UploadMessage(header=header_to_pb(h))
        yield pb.UploadMessage(chunk=pb.Chunk(offset=0, data=good[:4096], total_size=len(good)))

    await expect_status(stub.Upload(first_part(), metadata=sessions["school-2"]), grpc.StatusCode.INVALID_ARGUMENT, "resume from UploadStatus")
    status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=h.upload_id), metadata=sessions["school-2"])
    assert status.received_bytes == 4096 and not status.complete
    sent = rc.engine._bytes.get(1, [0, 0])[0]
    receipt = await upload(stub, h, good, sessions["school-2"], chunk_size=4096)
    assert receipt is not None and receipt.received_bytes == len(good)
    assert rc.engine._bytes.get(1, [0, 0])[0] - sent == len(good) - 4096   # only the rest was sent


async def test_two_schools_with_identical_uploads_are_both_accepted(open_round):
    """Upload ids are the school's choice and derived from the payload: two schools that send
    the same delta pick the same id. Each must get its own receipt (the second used to be told
    'complete' and drop its update, and the round waited for its deadline)."""
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc))
    h = header_for(rc, good)
    assert await upload(stub, h, good, sessions["school-1"]) is not None
    status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=h.upload_id), metadata=sessions["school-2"])
    assert not status.complete and status.received_bytes == 0
    assert await upload(stub, h, good, sessions["school-2"]) is not None
    assert sorted(r.school_id for r in rc.store.receipts(1)) == ["school-1", "school-2"]
    # a replay by either school is still refused
    assert await upload(stub, h, good, sessions["school-1"]) is None


async def test_download_resumes_and_verifies(open_round):
    rc, stub, sessions = open_round
    sha = rc.engine.current.global_sha
    full = rc.engine.artifacts.get(sha)
    buf = bytearray(full[:1000])
    assert await download(stub, sha, sessions["school-1"], buf) == full
    assert buf == bytearray()   # the partial is not kept once the whole artefact is returned
    await expect_status(download(stub, "cd" * 32, sessions["school-1"], bytearray()), grpc.StatusCode.NOT_FOUND, "no artefact")
    from common.errors import ChecksumError

    corrupt = bytearray(b"x" * 1000)
    with pytest.raises(ChecksumError):
        await download(stub, sha, sessions["school-1"], corrupt)
    assert corrupt == bytearray()   # a corrupt partial is dropped, not resumed again


async def test_preflight_refuses_before_any_byte_is_sent(open_round):
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc))
    h = header_for(rc, good, total_size=rc.cfg.server.max_upload_bytes + 1)
    from common.serde import header_to_pb

    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id=h.upload_id, header=header_to_pb(h)), metadata=sessions["school-1"]),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds")
    assert rc.engine._bytes.get(1, [0, 0])[0] == 0


async def test_rounds_failing_in_a_row_stop_the_engine(tmp_path, tiny_model, start_coordinator):
    """A school whose updates are always refused must not make the coordinator spin forever."""
    cfg = coordinator_config(tmp_path, tiny_model, schools=1, tls=False,
                             rounds=dict(total=5, min_schools=1, quorum=1, max_failed_rounds=2, deadline_s=60.0))
    rc = await start_coordinator(cfg)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS['school-1']}")])
    md = [("x-session-token", resp.session_token)]
    import asyncio

    outbox: asyncio.Queue = asyncio.Queue()

    async def events():
        while True:
            yield await outbox.get()

    call = stub.Session(events(), metadata=md)

    async def answer_with_failures() -> None:
        async for cmd in call:
            if cmd.WhichOneof("command") == "train":   # every round fails at this school
                outbox.put_nowait(pb.ClientEvent(failure=pb.Failure(round=cmd.round, phase="train", message="disk full")))

    answering = asyncio.create_task(answer_with_failures())
    try:
        await asyncio.wait({rc.run_task}, timeout=60)
    finally:
        answering.cancel()
        call.cancel()
        await asyncio.gather(answering, return_exceptions=True)
        await channel.close()
    with pytest.raises(RuntimeError, match="2 rounds in a row failed"):
        await rc.run_task
    assert [r.status for r in rc.store.rounds()] == ["failed", "failed"]


async def test_a_coordinator_bug_is_internal_not_a_crash(open_round, monkeypatch):
    rc, stub, sessions = open_round

    def broken(*_a, **_k):
        raise KeyError("simulated bug")

    monkeypatch.setattr(rc.store, "receipt_for_upload", broken)
    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id="u1"), metadata=sessions["school-1"]),
                        grpc.StatusCode.INTERNAL, "coordinator's log")
    monkeypatch.undo()
    good = tensors_to_bytes(good_delta(rc))   # and the coordinator keeps serving
    assert await upload(stub, header_for(rc, good), good, sessions["school-1"]) is not None


async def test_silent_school_is_dropped_after_the_session_timeout(tmp_path, tiny_model, start_coordinator):
    """A school whose stream stays open but sends nothing is detached after session_timeout_s
    and its stream is ended (its daemon would reconnect); a school that keeps beating stays."""
    import asyncio
    import dataclasses

    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False, rounds=dict(total=1, min_schools=2, quorum=2))
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, heartbeat_interval_s=0.3, session_timeout_s=1.5))
    rc = await start_coordinator(cfg)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)

    async def one_beat_then_silence():
        yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=0))
        await asyncio.Event().wait()

    calls = []
    for sid, events in (("school-1", one_beat_then_silence()), ("school-2", _idle())):
        resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
        calls.append(stub.Session(events, metadata=[("x-session-token", resp.session_token)]))
    try:
        await wait_for(lambda: rc.engine.current is not None, 20, "round 1 to open")
        await wait_for(lambda: "school-1" not in rc.engine.sessions, 10, "the silent school to be dropped")
        assert "school-2" in rc.engine.sessions
        received = [m async for m in calls[0]]   # the coordinator ended the silent school's stream
        assert all(m.WhichOneof("command") != "shutdown" for m in received)
    finally:
        for c in calls:
            c.cancel()
        await rc.stop()
        await channel.close()


async def test_heartbeats_are_spread_to_the_coordinators_budget(tmp_path, tiny_model, start_coordinator):
    """With more schools than heartbeats_per_s x heartbeat_interval_s, Join hands out a longer
    interval (schools / heartbeats_per_s) and the session's silence timeout grows with it: a
    school beating at that interval, slower than session_timeout_s, stays; a silent one is
    still dropped, at the scaled timeout."""
    import asyncio
    import dataclasses
    import time

    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False, rounds=dict(total=1, min_schools=3, quorum=2))
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, heartbeat_interval_s=0.3, session_timeout_s=1.0,
                                                              heartbeats_per_s=2.5))
    rc = await start_coordinator(cfg)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)

    async def beating(every: float):
        while True:
            yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=0))
            await asyncio.sleep(every)

    async def one_beat_then_silence():
        yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=0))
        await asyncio.Event().wait()

    calls, intervals = [], []
    try:
        for sid in ("school-1", "school-2"):
            resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                                   metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
            intervals.append(resp.heartbeat_interval_s)
            events = beating(resp.heartbeat_interval_s) if sid == "school-1" else one_beat_then_silence()
            calls.append(stub.Session(events, metadata=[("x-session-token", resp.session_token)]))
        assert intervals == [pytest.approx(1.2), pytest.approx(1.2)]   # 3 enrolled / 2.5 a second
        await wait_for(lambda: {"school-1", "school-2"} <= set(rc.engine.sessions), 10, "both sessions")
        t0 = time.monotonic()
        await asyncio.sleep(2.5)   # well past session_timeout_s (1.0 s), short of the scaled 4.0 s
        assert {"school-1", "school-2"} <= set(rc.engine.sessions)
        await wait_for(lambda: "school-2" not in rc.engine.sessions, 10, "the silent school to be dropped")
        assert time.monotonic() - t0 > 2.5
        assert "school-1" in rc.engine.sessions   # beating every 1.2 s: never silent for 4 s
    finally:
        for c in calls:
            c.cancel()
        await rc.stop()
        await channel.close()


def test_the_heartbeat_interval_grows_with_the_schools_past_the_budget():
    from fedserver.servicer import FederationServicer

    s = FederationServicer.__new__(FederationServicer)
    s.heartbeat_interval_s, s.session_timeout_s, s._intervals = 5.0, 30.0, {}
    s.heartbeats_per_s, s.enrolled = 125.0, 10_000
    assert s.heartbeat_interval(10) == 80.0            # the enrolled schools count, connected or not
    assert s.heartbeat_interval(12_000) == 96.0        # more connected than enrolled (certificates)
    s.enrolled = 600
    assert s.heartbeat_interval(3) == 5.0              # within the budget: the configured interval
    s.heartbeats_per_s = 0.0
    s.enrolled = 10_000
    assert s.heartbeat_interval(10_000) == 5.0         # no budget
    s._intervals["a"] = 80.0
    assert s.session_timeout("a") == 480.0 and s.session_timeout("b") == 30.0
