"""Wire helpers: size limits, gRPC channel options, hashing, chunking, and tensor codecs.

Importing this module does not import torch: the size limits, gRPC options, hashing and
chunking serve protocol-level clients without it (benchmarks/noop_school.py). The tensor
codecs import torch and safetensors.torch when first called."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from common.errors import ValidationError

if TYPE_CHECKING:
    import torch

# gRPC rejects messages over 4 MiB by default, and a 4 MiB payload plus protobuf framing is
# already over it (sometimes reported as INTERNAL). Chunks stay at 1 MiB; the limit below
# leaves room for the header fields around a chunk.
MAX_CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# HTTP/2 keepalive, both sides: a ping every KEEPALIVE_MS on an idle connection, answered within
# KEEPALIVE_TIMEOUT_MS or the connection is closed (a dead peer is noticed within ~80 s). gRPC's
# C core answers pings without Python, but at 10,000 connections pings every 20 s were ~30 % of
# the coordinator's idle CPU (docs/SCALING.md); 60 s still keeps NAT mappings (minutes) alive.
KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def grpc_options() -> list[tuple[str, int]]:
    """Channel/server options, set once for both sides."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Keep idle session streams alive through NATs and notice dead peers within ~80 s.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_chunks(data: bytes, offset: int = 0, chunk_size: int = MAX_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of `data` from `offset` on, each at most `chunk_size` bytes."""
    for start, view in iter_views(data, offset, chunk_size):
        yield start, bytes(view)


def iter_views(data: bytes, offset: int = 0, chunk_size: int = MAX_CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """As iter_chunks, the pieces as views of `data` (no copy)."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_BYTES}, got {chunk_size}")
    if not 0 <= offset <= len(data):
        raise ValueError(f"offset {offset} outside payload of {len(data)} bytes")
    view = memoryview(data)
    for start in range(offset, len(data), chunk_size):
        yield start, view[start : start + chunk_size]


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes (never pickle) of a flat name -> tensor mapping."""
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, dict(metadata) if metadata else None)


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything malformed becomes a ValidationError."""
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ValidationError(f"payload is not valid safetensors: {exc}") from exc


def bytes_to_tensors_with_metadata(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors plus the safetensors header's string metadata."""
    tensors = bytes_to_tensors(data)
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError) as exc:
        raise ValidationError(f"safetensors header is unreadable: {exc}") from exc
    return tensors, dict(meta)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
