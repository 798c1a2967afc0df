"""Serving artefacts: every chunk of a Download is read from the artefact's file (the page
cache, for the round's adapter that every participant fetches) and framed as a protobuf `Chunk`
around the bytes read, which are then handed to gRPC as they are: one copy out of the page cache
and one into the framed message, no message object built, and nothing kept between chunks (the
coordinator holds no encoded copy of the adapter: its memory does not grow with the adapter's
size times the schools downloading)."""

from __future__ import annotations

from typing import Any

import grpc

from common.framing import chunk_head_tail, decode_upload_message, serialise_framed
from common.pb import federation_pb2_grpc as pb_grpc
from common.wire import MAX_CHUNK_BYTES
from fedserver.admission import capture_handlers
from fedserver.validation import read_into


def read_chunk(fh: Any, offset: int, total: int, chunk: int = MAX_CHUNK_BYTES, scratch: bytearray | None = None) -> bytes:
    """The serialised `Chunk` (offset = 1, data = 2, total_size = 3, in field order, as protobuf
    writes it) of the file's bytes from `offset`, at most `chunk` of them. The bytes are read
    into `scratch` (a buffer the caller keeps between chunks) around the frame's head and tail,
    and leave as one `bytes`: one copy out of the page cache, one into the message gRPC is
    handed. Blocking: the servicer calls it on the event loop, since the round's adapter, just
    written, is read from the page cache (~0.1 ms a chunk; a worker-thread hop per chunk cost
    more than the read). OSError if the file is shorter than `total` (it changed on disk)."""
    n = max(0, min(chunk, total - offset))
    head, tail = chunk_head_tail(offset, n, total)
    size = len(head) + n + len(tail)
    buf = scratch if scratch is not None and len(scratch) >= size else bytearray(size)
    view = memoryview(buf)
    view[:len(head)] = head
    read_into(fh, offset, view[len(head):len(head) + n])
    view[len(head) + n:size] = tail
    return bytes(view[:size])


def frame_scratch(chunk: int = MAX_CHUNK_BYTES) -> bytearray:
    """A buffer `read_chunk` can frame any chunk of up to `chunk` bytes in."""
    return bytearray(chunk + 32)   # + the three fields' tags and varints


def federation_handlers(servicer: pb_grpc.FederationServicer) -> dict[str, Any]:
    """The generated handler table (captured, not registered), with Download's serialiser also
    taking encoded chunks. fedserver/app.py registers it through fedserver/admission.py."""
    _, handlers = capture_handlers(pb_grpc.add_FederationServicer_to_server, servicer)
    dl = handlers["Download"]
    handlers["Download"] = grpc.unary_stream_rpc_method_handler(
        dl.unary_stream, request_deserializer=dl.request_deserializer, response_serializer=serialise_framed)
    up = handlers["Upload"]   # and Upload's decoder hands over chunks without copying them
    handlers["Upload"] = grpc.stream_unary_rpc_method_handler(
        up.stream_unary, request_deserializer=decode_upload_message, response_serializer=up.response_serializer)
    return handlers
