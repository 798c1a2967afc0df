"""Serving artefacts fast: every participant of a round downloads the same global adapter,
so its chunk messages are encoded once (protobuf `Chunk`s, at the fixed chunk boundaries) and
each download hands gRPC those bytes as they are: no file read, no message built, no copy per
school. A resumed download that starts off a boundary, and any artefact not in the cache, is
read from disk and encoded chunk by chunk as before."""

from __future__ import annotations

import asyncio
import io
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.wire import MAX_CHUNK_BYTES
from fedserver.admission import capture_handlers
from fedserver.artifacts import ArtifactStore


def _encode(read: Callable[[int], bytes], total: int, chunk: int) -> list[bytes]:
    out = []
    for offset in range(0, total, chunk):
        msg = pb.Chunk(offset=offset, total_size=total)
        msg.data = read(chunk)
        out.append(msg.SerializeToString())
    return out


def encode_chunks(data: bytes, chunk: int = MAX_CHUNK_BYTES) -> list[bytes]:
    """The serialised `Chunk` messages of an artefact, one per `chunk` bytes."""
    return _encode(io.BytesIO(data).read, len(data), chunk)


def encode_file(path: Path, chunk: int = MAX_CHUNK_BYTES) -> list[bytes]:
    """encode_chunks of a file, read a chunk at a time (never the whole file and its chunks at once)."""
    with open(path, "rb") as fh:
        return _encode(fh.read, os.fstat(fh.fileno()).st_size, chunk)


class ChunkCache:
    """Encoded chunks of the last `entries` artefacts downloaded (the global adapter of the
    open round, and the one before while late schools fetch it). Memory: `entries` x the
    artefact's size; artefacts above `max_bytes` are never cached."""

    def __init__(self, artifacts: ArtifactStore, entries: int = 1, max_bytes: int = 256 << 20) -> None:
        self.artifacts = artifacts
        self.entries = entries
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, list[bytes]] = OrderedDict()
        self._building: dict[str, asyncio.Future[list[bytes]]] = {}

    async def get(self, sha: str, size: int) -> list[bytes] | None:
        if self.entries <= 0 or size > self.max_bytes:
            return None
        hit = self._cache.get(sha)
        if hit is not None:
            self._cache.move_to_end(sha)
            return hit
        pending = self._building.get(sha)
        if pending is not None:   # several schools asked at once: one build
            return await asyncio.shield(pending)
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._building[sha] = fut
        while len(self._cache) >= self.entries:   # room first: never two generations at once
            self._cache.popitem(last=False)
        try:
            chunks = await asyncio.to_thread(encode_file, self.artifacts.path(sha))
            self._cache[sha] = chunks
            fut.set_result(chunks)
            return chunks
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()   # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._building[sha]

    def clear(self) -> None:
        self._cache.clear()


def _serialise_chunk(msg: Any) -> bytes:
    """Download's response serialiser: pre-encoded chunks pass through as they are."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def federation_handlers(servicer: pb_grpc.FederationServicer) -> dict[str, Any]:
    """The generated handler table (captured, not registered), with Download's serialiser also
    taking encoded chunks. fedserver/app.py registers it through fedserver/admission.py."""
    _, handlers = capture_handlers(pb_grpc.add_FederationServicer_to_server, servicer)
    dl = handlers["Download"]
    handlers["Download"] = grpc.unary_stream_rpc_method_handler(
        dl.unary_stream, request_deserializer=dl.request_deserializer, response_serializer=_serialise_chunk)
    return handlers
