"""Property-based tests (hypothesis), bounded for CI: a fixed number of examples per property,
derandomized (the same examples on every run), no per-example deadline.

1. The payload parser (fedserver/validation.py, common/wire.py, common/compression.py): random
   bytes, truncated and bit-flipped valid payloads, hand-made safetensors headers, wrong dtypes
   and shapes, NaN/Inf, compressed parts. Whatever arrives, the only exception is the project's
   ValidationError (with a message); what is accepted is exactly the layout, finite.
2. Every RPC of the coordinator's Federation service over real gRPC (plaintext on 127.0.0.1):
   undecodable bytes as the request, and well-formed messages with random field values, with
   and without credentials. The status is never UNKNOWN or INTERNAL, every refusal says what
   is wrong, and the coordinator still answers a health check and an honest school afterwards."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any

import grpc
import pytest
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import PROTOCOL_VERSION
from common.errors import ValidationError
from common.lora import TensorSpec
from common.pb import federation_pb2 as pb
from common.wire import bytes_to_tensors, bytes_to_tensors_with_metadata, grpc_options, sha256_hex, tensors_to_bytes
from fedserver.validation import validate_update
from tests.conftest import TOKENS
from tests.test_rpc_errors import open_round  # noqa: F401 (a fixture)

# Bounded and reproducible: CI runs the same examples every time, and no example fails on time.
PURE = settings(max_examples=60, deadline=None, derandomize=True, database=None)
RPC = settings(max_examples=30, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# 1. The payload parser

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LAYOUT = {A: TensorSpec((4, 8)), B: TensorSpec((8, 4))}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8, torch.bool]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL",
             "F8_E4M3", "F8_E5M2", "C64", "X", "", "f32"]


def parse(payload: bytes | bytearray, encoding: str = "", frozen: tuple[str, ...] = (),
          max_norm: float = 0.0) -> dict[str, torch.Tensor] | None:
    """validate_update on `payload` (announced with its own digest): the accepted tensors, or
    None if it was refused with a ValidationError. Any other exception fails the property."""
    try:
        out = validate_update(payload, sha256_hex(payload), LAYOUT, max_norm=max_norm, encoding=encoding, frozen=frozen)
    except ValidationError as exc:
        assert str(exc).strip(), "a refusal must say what is wrong"
        return None
    assert out.keys() == LAYOUT.keys()
    for name, spec in LAYOUT.items():
        assert tuple(out[name].shape) == spec.shape and out[name].dtype == spec.dtype
        assert bool(torch.isfinite(out[name]).all())
    if max_norm > 0:
        assert math.sqrt(sum(float(t.double().square().sum()) for t in out.values())) <= max_norm * (1 + 1e-6)
    return out


def parse_both(payload: bytes) -> dict[str, torch.Tensor] | None:
    """Through both parsers: the general one (bytes) and the in-place one (a bytearray, what the
    coordinator hands it); they agree on accepting or refusing."""
    general = parse(bytes(payload))
    packed = parse(bytearray(payload))
    assert (general is None) == (packed is None)
    return packed


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def valid_payloads(draw: st.DrawFn) -> bytes:
    tensors = {name: torch.tensor(draw(st.lists(finite, min_size=math.prod(spec.shape), max_size=math.prod(spec.shape))),
                                  dtype=torch.float32).reshape(spec.shape)
               for name, spec in LAYOUT.items()}
    return tensors_to_bytes(tensors, draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2)))


@st.composite
def crafted_headers(draw: st.DrawFn) -> bytes:
    """A safetensors file by hand: an 8-byte length (sometimes wrong), a JSON header of random
    entries (names from the layout or not, any dtype string, odd shapes and offsets), data."""
    names = draw(st.lists(st.sampled_from([A, B, A + "::q", A + "::scale", B + "::idx", "x", "__metadata__"]),
                          max_size=4, unique=True))
    header: dict[str, Any] = {}
    for name in names:
        if name == "__metadata__":
            header[name] = draw(st.sampled_from([{}, {"k": "v"}, {"k": 1}, [], "text", None]))
            continue
        entry = {"dtype": draw(st.sampled_from(ST_DTYPES)),
                 "shape": draw(st.lists(st.integers(-2, 9) | st.sampled_from([2**31, 2**40, 2**63]), max_size=3)),
                 "data_offsets": draw(st.lists(st.integers(-1, 300) | st.just(2**64 - 1), min_size=0, max_size=3))}
        if draw(st.booleans()):
            entry.pop(draw(st.sampled_from(sorted(entry))))
        header[name] = draw(st.just(entry) | st.sampled_from([None, 1, "F32", [1, 2]]))
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 7))   # safetensors pads its header to 8 bytes
    length = draw(st.just(len(text)) | st.integers(0, 2**64 - 1))
    data = draw(st.binary(max_size=300))
    return struct.pack("<Q", length) + text + data


def decoders_raise_only_validation_errors(payload: bytes) -> None:
    """The wire decoders either parse `payload` or refuse it with a ValidationError that says why."""
    for decoder in (bytes_to_tensors, bytes_to_tensors_with_metadata):
        try:
            decoder(payload)
        except ValidationError as exc:
            assert str(exc)


@PURE
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_as_validation_errors(payload):
    assert parse_both(payload) is None
    decoders_raise_only_validation_errors(payload)


@PURE
@given(crafted_headers())
def test_crafted_safetensors_headers_only_raise_validation_errors(payload):
    parse_both(payload)
    decoders_raise_only_validation_errors(payload)


@PURE
@given(valid_payloads(), st.data())
def test_truncated_payloads_are_refused(payload, data):
    assert parse_both(payload) is not None   # the whole one is accepted
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert parse_both(payload[:cut]) is None
    with pytest.raises(ValidationError):
        bytes_to_tensors(payload[:cut])


@PURE
@given(valid_payloads(), st.data())
def test_bit_flipped_payloads_are_refused_or_still_the_layout(payload, data):
    flipped = bytearray(payload)
    for bit in data.draw(st.lists(st.integers(0, 8 * len(payload) - 1), min_size=1, max_size=4)):
        flipped[bit // 8] ^= 1 << (bit % 8)
    parse_both(bytes(flipped))   # refused, or accepted as exactly the layout and finite
    try:
        bytes_to_tensors_with_metadata(bytes(flipped))
    except ValidationError:
        pass


@PURE
@given(st.sampled_from(sorted(LAYOUT)), st.sampled_from(DTYPES),
       st.lists(st.integers(0, 9), max_size=3).map(tuple), st.booleans())
def test_wrong_dtype_or_shape_is_refused(name, dtype, shape, drop):
    tensors = {n: torch.zeros(spec.shape) for n, spec in LAYOUT.items()}
    if drop:
        del tensors[name]
    else:
        tensors[name] = torch.zeros(shape, dtype=dtype)
    matches = not drop and dtype == torch.float32 and shape == LAYOUT[name].shape
    assert (parse_both(tensors_to_bytes(tensors)) is not None) == matches


@PURE
@given(st.sampled_from(sorted(LAYOUT)), st.integers(0, 31), st.sampled_from([math.nan, math.inf, -math.inf, 3e38]),
       st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_nan_inf_and_overflow_are_refused(name, index, bad, dtype):
    tensors = {n: torch.full(spec.shape, 0.5) for n, spec in LAYOUT.items()}
    tensors[name].view(-1)[index] = bad
    if bad == 3e38:   # finite, but the update's norm overflows float32
        tensors[name].view(-1)[(index + 1) % 32] = bad
    assert parse_both(tensors_to_bytes(tensors)) is None
    # the same in another dtype (the dtype check or the finiteness check refuses it)
    assert parse(tensors_to_bytes({n: t.to(dtype) for n, t in tensors.items()})) is None


@PURE
@given(valid_payloads(), st.floats(1e-3, 1e4))
def test_the_norm_bound_holds_for_what_is_accepted(payload, max_norm):
    parse(bytearray(payload), max_norm=max_norm)
    parse(payload, max_norm=max_norm)


small_tensors = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
    st.sampled_from(DTYPES), st.lists(st.integers(0, 6), max_size=2).map(tuple),
    st.sampled_from([0, 1, -1, 3, 127, 2**31 - 1, 1e30, math.nan, math.inf]))


@PURE
@given(st.dictionaries(st.sampled_from([f"{n}::{p}" for n in LAYOUT for p in ("q", "scale", "idx", "val", "shape", "x")]
                                       + [A, B, "::q", A + "::"]),
                       small_tensors, max_size=6),
       st.sampled_from(["int8", "topk", "none", "bogus", "INT8"]), st.sampled_from([(), ("lora_A",), ("lora_B",)]))
def test_compressed_parts_only_raise_validation_errors(tensors, encoding, frozen):
    parse(tensors_to_bytes(tensors), encoding=encoding, frozen=frozen)


# ---------------------------------------------------------------------------------------------
# 2. Every RPC over real gRPC

SERVICE = "/schoolfed.v1.Federation/"
# method -> (request streaming, response streaming)
METHODS = {"Join": (False, False), "Session": (True, True), "Download": (False, True),
           "UploadStatus": (False, False), "Upload": (True, False)}
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
CALL_TIMEOUT_S = 15.0


def _raw_call_sync(channel: grpc.Channel, method: str, messages: list[bytes],
                   metadata: list[tuple[str, str]]) -> tuple[grpc.StatusCode, str]:
    streaming_in, streaming_out = METHODS[method]
    path = SERVICE + method
    try:   # no serialisers: the request is exactly these bytes, the response is not decoded
        if not streaming_in and not streaming_out:
            channel.unary_unary(path)(messages[0], metadata=metadata, timeout=CALL_TIMEOUT_S)
        elif not streaming_in:
            for _ in channel.unary_stream(path)(messages[0], metadata=metadata, timeout=CALL_TIMEOUT_S):
                pass
        elif not streaming_out:
            channel.stream_unary(path)(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT_S)
        else:
            for _ in channel.stream_stream(path)(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT_S):
                pass
    except grpc.RpcError as err:
        return err.code(), err.details() or ""   # the error is also the call
    return grpc.StatusCode.OK, ""


async def raw_call(channel: grpc.Channel, method: str, messages: list[bytes],
                   metadata: list[tuple[str, str]]) -> tuple[grpc.StatusCode, str]:
    """Call `method` with `messages` as the request bytes, unencoded (what the coordinator
    decodes is exactly these bytes); the final status and its details. Through the blocking
    client on a thread: grpc.aio's client reports INTERNAL "Internal error from Core" instead of
    the server's status when the server ends a request stream before the client has written
    all of it (grpc/grpc#36066), which is what a refusal before reading does."""
    return await asyncio.to_thread(_raw_call_sync, channel, method, messages, metadata)


def assert_clear(method: str, code: grpc.StatusCode, details: str) -> None:
    assert code not in NEVER, f"{method}: {code.name}: {details}"
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: no answer within {CALL_TIMEOUT_S:g} s: {details}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{method}: {code.name} without a message"


class Fuzz:
    """A channel to the coordinator of `open_round`, and its credentials."""

    def __init__(self, rc: Any, sessions: dict[str, list[tuple[str, str]]]) -> None:
        self.rc = rc
        self.channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
        self.blocking = grpc.insecure_channel(rc.address, options=grpc_options())   # for raw_call
        self.sessions = sessions

    def metadata(self, method: str, who: str) -> list[tuple[str, str]]:
        if who == "none":
            return []
        if who == "forged":
            return [("authorization", "Bearer forged"), ("x-session-token", "forged")]
        if method == "Join":   # school-3: a Join does not replace the sessions of school-1 and -2
            return [("authorization", f"Bearer {TOKENS['school-3']}")]
        return self.sessions["school-2"]

    async def still_serving(self) -> None:
        """A health check, and an honest school's Join and UploadStatus, answered as usual."""
        health = health_pb2_grpc.HealthStub(self.channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        join = self.channel.unary_unary(SERVICE + "Join", request_serializer=pb.JoinRequest.SerializeToString,
                                        response_deserializer=pb.JoinResponse.FromString)
        joined = await join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                            metadata=[("authorization", f"Bearer {TOKENS['school-3']}")], timeout=CALL_TIMEOUT_S)
        assert joined.school_id == "school-3" and joined.session_token
        status = self.channel.unary_unary(SERVICE + "UploadStatus",
                                          request_serializer=pb.UploadStatusRequest.SerializeToString,
                                          response_deserializer=pb.UploadStatusResponse.FromString)
        got = await status(pb.UploadStatusRequest(upload_id="honest-1"), metadata=[("x-session-token", joined.session_token)],
                           timeout=CALL_TIMEOUT_S)
        assert got.received_bytes == 0 and not got.complete


@pytest.fixture
async def fuzz(open_round):
    rc, _stub, sessions = open_round
    f = Fuzz(rc, sessions)
    yield f
    await f.still_serving()
    await f.channel.close()
    f.blocking.close()


# Bytes that are no protobuf message at all: a field number 0, a truncated varint, a length
# past the end, the wrong wire type for a known field, an end-group tag with no group.
UNDECODABLE = [b"\x00", b"\xff", b"\x08\xff\xff", b"\x0a\x05ab", b"\x12\x7f", b"\x0c", b"\x0b\x0c\x0c",
               b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"]
undecodable = st.sampled_from(UNDECODABLE) | st.binary(min_size=1, max_size=64).filter(lambda b: _undecodable(b))


def _undecodable(data: bytes) -> bool:
    """True if no Federation request message decodes from `data` (protobuf skips unknown fields,
    so most random bytes decode as *something*)."""
    for cls in (pb.JoinRequest, pb.ClientEvent, pb.DownloadRequest, pb.UploadStatusRequest, pb.UploadMessage):
        try:
            cls.FromString(data)
        except Exception:
            continue
        return False
    return True


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_undecodable_request_is_invalid_argument_with_a_message_and_a_log_line(fuzz, method):
    """Regression (issue #8): bytes that are not the method's message came back UNKNOWN or
    INTERNAL (unary), and on the Session stream ended it with OK, the event dropped silently."""
    with structlog.testing.capture_logs() as logs:
        code, details = await raw_call(fuzz.blocking, method, [b"\x0a\x05ab"], fuzz.metadata(method, "good"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert method in details, details   # names what could not be decoded
    assert any(e.get("event") == "rpc refused" and e.get("status") == "INVALID_ARGUMENT" for e in logs), logs


async def test_undecodable_event_after_good_ones_ends_the_session_stream(fuzz):
    """Good heartbeats first, then bytes that are no ClientEvent: the stream ends INVALID_ARGUMENT."""
    beat = pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=1.0)).SerializeToString()
    code, details = await raw_call(fuzz.blocking, "Session", [beat, beat, b"\xff"], fuzz.metadata("Session", "good"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Session" in details, f"{code.name}: {details}"


async def test_a_bug_handling_a_session_event_is_internal_and_logged_not_ok(fuzz, monkeypatch):
    """Regression: an exception other than a refusal while the coordinator handled a Session
    event ended the stream with OK, the event dropped and nothing logged. It is a coordinator
    bug: INTERNAL with a message that points to the log, and the log line with its traceback."""
    async def broken(*_a: Any, **_k: Any) -> None:
        raise KeyError("simulated bug")

    monkeypatch.setattr(fuzz.rc.engine, "report_failure", broken)
    failure = pb.ClientEvent(failure=pb.Failure(round=1, phase="train", message="disk full")).SerializeToString()
    with structlog.testing.capture_logs() as logs:
        code, details = await raw_call(fuzz.blocking, "Session", [failure], fuzz.metadata("Session", "good"))
    assert code == grpc.StatusCode.INTERNAL and "coordinator's log" in details, f"{code.name}: {details}"
    assert any(e.get("event") == "rpc failed" and "simulated bug" in str(e.get("error")) for e in logs), logs
    monkeypatch.undo()


WHO = st.sampled_from(["good"] * 6 + ["none", "forged"])   # mostly a school's own session


@RPC
@pytest.mark.parametrize("method", sorted(METHODS))
@given(who=WHO, messages=st.lists(undecodable | st.binary(max_size=200), min_size=1, max_size=3))
async def test_arbitrary_bytes_to_every_rpc_get_a_clear_status(fuzz, method, who, messages):
    code, details = await raw_call(fuzz.blocking, method, messages, fuzz.metadata(method, who))
    assert_clear(method, code, details)
    if who == "good" and all(_undecodable(m) for m in messages[:1]):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {code.name}: {details}"


# Well-formed messages with random field values: some near what a school sends (round 1, the
# global adapter's digest, a coherent upload whose bytes hash to its header), some far from it.
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2, 7, 2**63])
floats = st.floats() | st.sampled_from([0.0, 0.5, 1.0, -1.0, math.nan, math.inf])
texts = st.text(max_size=40) | st.sampled_from(["", "a" * 5000, "\x1b[31mred", "../../etc/passwd", "ab" * 32, "x\n\ty",
                                                "train", "delta", "answers", "int8", "topk", "u-1"])
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


def message_strategies(rc: Any) -> dict[str, st.SearchStrategy[list[bytes]]]:
    sha = st.sampled_from([rc.engine.global_sha, "0" * 64]) | hex64 | texts
    rounds = st.sampled_from([0, 1, 2]) | u64
    metrics = st.dictionaries(texts, floats, max_size=4) | st.dictionaries(st.sampled_from(["loss", "accuracy", "seconds"]),
                                                                           st.floats(-1, 2), max_size=3)
    caps = st.builds(pb.Capabilities, model=texts | st.just(rc.cfg.model.base), lora_rank=u32 | st.just(4),
                     num_examples=u64 | st.integers(0, 100), hardware=texts, client_version=texts | st.just("0.1.0"))
    header = st.builds(pb.UploadHeader, round=rounds, upload_id=names | names | texts, num_examples=u64 | st.integers(0, 100),
                       metrics=metrics, sha256=sha, total_size=u64 | st.integers(0, 5000), offset=u64 | st.integers(0, 5000),
                       base_sha256=sha, encoding=texts, kind=texts)
    chunk = st.builds(pb.Chunk, offset=u64 | st.integers(0, 5000), data=st.binary(max_size=300), total_size=u64)
    event = st.one_of(
        st.builds(lambda t: pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=t)), floats),
        st.builds(lambda r, ph, fr, d: pb.ClientEvent(progress=pb.Progress(round=r, phase=ph, fraction=fr, detail=d)),
                  rounds, texts | names, floats, texts),
        st.builds(lambda r, ph, m: pb.ClientEvent(failure=pb.Failure(round=r, phase=ph, message=m)), rounds, texts | names, texts),
        st.builds(lambda r, n, m: pb.ClientEvent(eval_report=pb.EvalReport(round=r, num_examples=n, metrics=m)),
                  rounds, u64 | st.integers(0, 10), metrics),
        st.just(pb.ClientEvent()),
    )
    one = lambda s: s.map(lambda m: [m.SerializeToString()])  # noqa: E731
    many = lambda s: st.lists(s, min_size=0, max_size=4).map(lambda ms: [m.SerializeToString() for m in ms])  # noqa: E731
    upload = st.one_of(
        st.builds(lambda h: pb.UploadMessage(header=h), header),
        st.builds(lambda c: pb.UploadMessage(chunk=c), chunk),
        st.just(pb.UploadMessage()),
    )
    return {
        "Join": one(st.builds(pb.JoinRequest, protocol_version=st.sampled_from([PROTOCOL_VERSION, 0, 2]) | u32,
                              capabilities=st.none() | caps)),
        "Session": many(event),
        "Download": one(st.builds(pb.DownloadRequest, sha256=sha, offset=u64 | st.integers(0, 5000))),
        "UploadStatus": one(st.builds(pb.UploadStatusRequest, upload_id=names | names | texts, header=header | header | st.none())),
        "Upload": coherent_uploads(rc) | coherent_uploads(rc) | many(upload),
    }


@st.composite
def coherent_uploads(draw: st.DrawFn, rc: Any) -> list[bytes]:
    """An upload a school could send for the open round: its header's digest and size are those
    of the bytes that follow in chunks at their offsets, so the payload reaches the parser:
    random bytes, or a well-formed delta truncated, bit-flipped or with NaN."""
    good = tensors_to_bytes({k: torch.full(v.shape, 0.01) for k, v in rc.engine.layout.items()})
    kind = draw(st.sampled_from(["random", "cut", "flip", "nan", "dtype"]))
    if kind == "random":
        payload = draw(st.binary(max_size=2000))
    elif kind == "cut":
        payload = good[:draw(st.integers(0, len(good) - 1))]
    elif kind == "flip":
        flipped = bytearray(good)
        for bit in draw(st.lists(st.integers(0, 8 * len(good) - 1), min_size=1, max_size=3)):
            flipped[bit // 8] ^= 1 << (bit % 8)
        payload = bytes(flipped)
    else:
        tensors = {k: torch.full(v.shape, 0.01) for k, v in rc.engine.layout.items()}
        name = draw(st.sampled_from(sorted(tensors)))
        if kind == "nan":
            tensors[name].view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        else:
            tensors[name] = tensors[name].to(draw(st.sampled_from([torch.float16, torch.float64, torch.int32])))
        payload = tensors_to_bytes(tensors)
    h = pb.UploadHeader(round=rc.engine.current.number if rc.engine.current else 1, upload_id=draw(names),
                        num_examples=draw(st.integers(1, 100)), sha256=sha256_hex(payload), total_size=len(payload),
                        base_sha256=draw(st.sampled_from([rc.engine.global_sha, ""])),
                        encoding=draw(st.sampled_from(["", "", "int8", "topk"])))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    bounds = [0, *cuts, len(payload)]
    chunks = [pb.UploadMessage(chunk=pb.Chunk(offset=a, data=payload[a:b], total_size=len(payload)))
              for a, b in zip(bounds, bounds[1:]) if b > a]
    return [m.SerializeToString() for m in [pb.UploadMessage(header=h), *chunks]]


@RPC
@pytest.mark.parametrize("method", sorted(METHODS))
@given(who=WHO, data=st.data())
async def test_well_formed_messages_with_random_fields_get_a_clear_status(fuzz, method, who, data):
    messages = data.draw(message_strategies(fuzz.rc)[method], label=method)
    if not messages and not METHODS[method][0]:
        messages = [b""]
    code, details = await raw_call(fuzz.blocking, method, messages, fuzz.metadata(method, who))
    assert_clear(method, code, details)
