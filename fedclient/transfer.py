"""Resumable artefact download and update upload over the Federation stubs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from common import digest
from common.errors import RETRY_AFTER_KEY, ChecksumError
from common.framing import frame_upload_chunk
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import header_to_pb
from common.wire import MAX_CHUNK_BYTES, iter_chunks, iter_views

Metadata = Sequence[tuple[str, str]]


# A download that receives nothing for this long is ended and resumed where it stopped (a
# stream can stall without the connection failing: measured at 10,000 schools, docs/SCALING.md).
DOWNLOAD_STALL_S = 60.0


class StalledError(Exception):
    """A transfer made no progress for its stall timeout; the bytes received are kept."""


async def download(stub: pb_grpc.FederationStub, sha256: str, metadata: Metadata, buffer: bytearray,
                   progress: Callable[[int, int], None] | None = None, stall_s: float | None = None,
                   blake3: str = "") -> bytes:
    """Fetch an artefact, resuming after the len(buffer) bytes `buffer` holds from an
    interrupted attempt, and verify it: against `blake3` (the BLAKE3 hex the coordinator
    announced beside the sha256) when given and this process has BLAKE3, else against its
    sha256. Returns the whole artefact and empties `buffer`. If the call fails (`stall_s`: no
    chunk for that long ends it with StalledError), `buffer` is left holding every byte that
    arrived, for the caller to resume from; if the bytes do not verify, it is emptied.

    The chunks are kept as received and joined once at the end: one copy of the artefact. (A
    bytearray grown chunk by chunk was copied again at each reallocation, then once more into
    the result: a fifth of the no-op schools' CPU in benchmarks/round_bench.py.)"""
    algorithm, expected = digest.check_by(sha256, blake3)
    hasher = digest.hasher(algorithm, buffer)   # hash as chunks arrive: no second pass at the end
    parts: list[bytes | memoryview] = []   # this call's chunks, in order: views of the received messages
    received = len(buffer)
    stream = stub.Download(pb.DownloadRequest(sha256=sha256, offset=received), metadata=metadata)
    chunks = aiter(stream)
    try:
        while True:
            try:
                async with asyncio.timeout(stall_s or None):   # not wait_for: 3.11's can lose a cancellation
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                stream.cancel()
                raise StalledError(f"no download progress for {stall_s:g} s at byte {received}") from None
            if chunk.offset != received:
                raise ChecksumError(f"download chunk at {chunk.offset}, expected {received}")
            data = chunk.data   # a view of the received bytes (TransferStub); a copy per access from protobuf's Chunk
            parts.append(data)
            received += len(data)
            hasher.update(data)
            if progress is not None:
                progress(received, chunk.total_size)
    except BaseException:
        buffer += b"".join(parts)   # kept for the resume, whatever ended the call
        raise
    if hasher.hexdigest() != expected:
        buffer.clear()  # start over next time; the bytes are not what was announced
        raise ChecksumError(f"downloaded artefact {sha256[:12]}… does not hash to its announced {algorithm} {expected[:12]}…")
    whole = b"".join([buffer, *parts])
    buffer.clear()
    return whole


async def upload(stub: pb_grpc.FederationStub, header: UploadHeader, payload: bytes, metadata: Metadata,
                 chunk_size: int = MAX_CHUNK_BYTES, on_sent: Callable[[int], None] | None = None) -> pb.UploadReceipt | None:
    """Send `payload`, resuming from what the coordinator already holds. Returns None when
    the coordinator says this upload was accepted before (a resumed, already-finished send).
    `on_sent(n)` is told of every chunk's bytes as it is handed to gRPC."""
    # Pre-flight: a refusal (wrong round, too large, replay) comes back here as a clean status.
    status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=header.upload_id, header=header_to_pb(header)),
                                     metadata=metadata)
    if status.complete:
        return None
    offset = min(status.received_bytes, len(payload))

    raw = getattr(stub, "raw_frames", False)   # a TransferStub takes chunks framed by hand: one copy each

    async def messages() -> AsyncIterator[pb.UploadMessage | bytes]:
        h = header_to_pb(header)
        h.offset = offset
        yield pb.UploadMessage(header=h)
        total = len(payload)
        if raw:
            for start, view in iter_views(payload, offset, chunk_size):
                yield frame_upload_chunk(start, view, total)
                if on_sent is not None:
                    on_sent(len(view))
            return
        for start, data in iter_chunks(payload, offset, chunk_size):
            # Fill the chunk in place: UploadMessage(chunk=pb.Chunk(...)) copies the finished
            # Chunk, i.e. every 1 MiB of data once more. Same bytes on the wire.
            msg = pb.UploadMessage()
            msg.chunk.SetInParent()   # the oneof says "chunk" even for an all-default chunk
            msg.chunk.offset, msg.chunk.data, msg.chunk.total_size = start, data, total
            yield msg
            if on_sent is not None:
                on_sent(len(data))

    return await stub.Upload(messages(), metadata=metadata)


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """Seconds to wait before repeating a call the coordinator refused as busy (its
    retry-after trailer on RESOURCE_EXHAUSTED, jittered), or None: not that kind of refusal."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = min(max(int(value), 50), 60_000)
            except ValueError:
                return None
            return ms / 1000 * random.uniform(1.0, 2.0)
    return None


def status_lost(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC's asyncio client reports INTERNAL "Internal error from Core" instead of the
    coordinator's status when the coordinator ends a streaming call (an Upload it refuses, e.g.
    busy or unauthenticated, before reading it) while the client is still writing
    (grpc/grpc#36066). The real status is lost; asking again hears it."""
    return exc.code() == grpc.StatusCode.INTERNAL and "Internal error from Core" in (exc.details() or "")
