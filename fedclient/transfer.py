"""Resumable artefact download and update upload over the Federation stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from common.errors import ChecksumError
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import header_to_pb
from common.wire import MAX_CHUNK_BYTES, iter_chunks, sha256_hex

Metadata = Sequence[tuple[str, str]]


async def download(stub: pb_grpc.FederationStub, sha256: str, metadata: Metadata, buffer: bytearray,
                   progress: Callable[[int, int], None] | None = None) -> bytes:
    """Fetch an artefact into `buffer`, resuming from len(buffer) (bytes kept from an
    interrupted attempt), and verify its sha256."""
    stream = stub.Download(pb.DownloadRequest(sha256=sha256, offset=len(buffer)), metadata=metadata)
    async for chunk in stream:
        if chunk.offset != len(buffer):
            raise ChecksumError(f"download chunk at {chunk.offset}, expected {len(buffer)}")
        buffer.extend(chunk.data)
        if progress is not None:
            progress(len(buffer), chunk.total_size)
    data = bytes(buffer)
    if sha256_hex(data) != sha256:
        buffer.clear()  # start over next time; the bytes are not what was announced
        raise ChecksumError(f"downloaded artefact does not hash to {sha256[:12]}…")
    return data


async def upload(stub: pb_grpc.FederationStub, header: UploadHeader, payload: bytes, metadata: Metadata,
                 chunk_size: int = MAX_CHUNK_BYTES) -> pb.UploadReceipt | None:
    """Send `payload`, resuming from what the coordinator already holds. Returns None when
    the coordinator says this upload was accepted before (a resumed, already-finished send)."""
    # Pre-flight: a refusal (wrong round, too large, replay) comes back here as a clean status.
    status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=header.upload_id, header=header_to_pb(header)),
                                     metadata=metadata)
    if status.complete:
        return None
    offset = min(status.received_bytes, len(payload))

    async def messages() -> AsyncIterator[pb.UploadMessage]:
        h = header_to_pb(header)
        h.offset = offset
        yield pb.UploadMessage(header=h)
        for start, data in iter_chunks(payload, offset, chunk_size):
            yield pb.UploadMessage(chunk=pb.Chunk(offset=start, data=data, total_size=len(payload)))

    return await stub.Upload(messages(), metadata=metadata)
