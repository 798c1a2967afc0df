"""Transfer chunks on the wire without protobuf's copies.

A `Chunk` (offset = 1, data = 2, total_size = 3) carries 1 MiB of payload. Protobuf's Python
decoder copies that data into the message and again out of the field on every access; its
encoder copies it into the message and again into the serialised bytes. For the two messages
that carry payload bytes, both ends frame them by hand instead: the bytes on the wire are
exactly protobuf's (field order, varints; tested against protobuf), the data is read as a view
of the received bytes and written with one copy into the frame.

  Download  the coordinator frames chunks around the bytes read from the page cache
            (fedserver/downloads.py); a school decodes them with `decode_chunk`.
  Upload    a school frames `UploadMessage{chunk}` with `frame_upload_chunk`; the coordinator
            decodes them with `decode_upload_message`.

Anything these readers do not recognise as a plain chunk goes to protobuf, whose errors say
what is wrong. No torch here: benchmark clients import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class RawChunk:
    """A `Chunk` with its data a view of the received message's bytes."""

    offset: int
    data: memoryview
    total_size: int


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if shift > 63:
            raise ValueError("varint too long")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def chunk_head_tail(offset: int, length: int, total: int) -> tuple[bytes, bytes]:
    """A `Chunk`'s bytes before and after its `length` data bytes, as protobuf writes them
    (fields in order, defaults left out)."""
    head = (b"\x08" + varint(offset) if offset else b"") + (b"\x12" + varint(length) if length else b"")
    return head, (b"\x18" + varint(total) if total else b"")


def parse_chunk(raw: bytes, pos: int, end: int) -> RawChunk | None:
    """The `Chunk` in raw[pos:end] (unknown fields skipped), or None if it is anything else."""
    offset = total = 0
    data = memoryview(b"")
    while pos < end:
        tag, pos = read_varint(raw, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0 or field >= 1 << 29 or (field in (1, 3) and wire != 0) or (field == 2 and wire != 2):
            return None
        if wire == 0:
            value, pos = read_varint(raw, pos)
            if field == 1:
                offset = value
            elif field == 3:
                total = value
        elif wire == 2:
            length, pos = read_varint(raw, pos)
            if pos + length > end:
                return None
            if field == 2:
                data = memoryview(raw)[pos:pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return None
    if pos != end or offset >= 1 << 64 or total >= 1 << 64:
        return None
    return RawChunk(offset, data, total)


def decode_chunk(raw: bytes) -> RawChunk | pb.Chunk:
    """Download's response decoder: a chunk as a view of the received bytes; anything odd by
    protobuf (same fields, same names)."""
    try:
        chunk = parse_chunk(raw, 0, len(raw))
    except (ValueError, IndexError):
        chunk = None
    return chunk if chunk is not None else pb.Chunk.FromString(raw)


def _chunk_view(raw: bytes) -> RawChunk | None:
    """The chunk in `raw` when it is exactly an UploadMessage whose oneof holds a Chunk (field 2;
    Chunk: offset = 1, data = 2, total_size = 3, unknown fields skipped); None for anything else."""
    if not raw or raw[0] != 0x12:
        return None
    n, pos = read_varint(raw, 1)
    if pos + n != len(raw):
        return None
    return parse_chunk(raw, pos, len(raw))


def decode_upload_message(raw: bytes) -> RawChunk | pb.UploadMessage:
    """Upload's request decoder: chunks as views of the received bytes (no copy), anything else
    (the header, an odd encoding) by protobuf, whose errors say what is wrong."""
    try:
        chunk = _chunk_view(raw)
    except (ValueError, IndexError):
        chunk = None
    return chunk if chunk is not None else pb.UploadMessage.FromString(raw)


def frame_upload_chunk(offset: int, data: bytes | memoryview, total: int) -> bytes:
    """`UploadMessage(chunk=Chunk(offset, data, total_size))` serialised, with one copy of `data`."""
    head, tail = chunk_head_tail(offset, len(data), total)
    return b"".join((b"\x12", varint(len(head) + len(data) + len(tail)), head, data, tail))


def serialise_framed(msg: Any) -> bytes:
    """A serialiser for the messages that may come framed by hand: bytes pass through as they are."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class TransferStub(pb_grpc.FederationStub):
    """The generated stub, with Download's chunks decoded as views (`decode_chunk`) and
    Upload taking pre-framed chunks (`frame_upload_chunk`) as well as messages.
    fedclient.transfer.upload frames its chunks when given this stub."""

    raw_frames = True

    def __init__(self, channel: grpc.aio.Channel | Any) -> None:
        super().__init__(channel)   # type: ignore[no-untyped-call]  # generated code
        self.Download = channel.unary_stream(
            "/schoolfed.v1.Federation/Download", request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=decode_chunk)
        self.Upload = channel.stream_unary(
            "/schoolfed.v1.Federation/Upload", request_serializer=serialise_framed,
            response_deserializer=pb.UploadReceipt.FromString)

