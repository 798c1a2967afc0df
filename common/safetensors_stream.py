"""Safetensors written straight to a file while hashing, without building the payload in
memory first (the coordinator's commit: serialise, hash and write the new global adapter in one
pass). The layout is safetensors' own: an 8-byte little-endian header length, a JSON header
padded with spaces to 8 bytes, then the tensors' bytes; tensors are ordered by dtype
alignment, then name, as `safetensors.torch.save` orders them, so a single-dtype state gives
byte-identical output (tests check it)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.buffers import memory_axis, merge_runs, storage_view

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _header(tensors: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], bytes]:
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be written as safetensors here")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return items, struct.pack("<Q", len(raw)) + raw


def _runs(items: list[tuple[str, torch.Tensor]]) -> list[memoryview]:
    """The tensors' bytes in order, as few buffers as possible: tensors that are consecutive
    views of one storage (a state built in segments, as the coordinator's new adapter is)
    become one buffer, so a 420-tensor adapter is written in a handful of calls, not 420."""
    flats = [t.detach().cpu().contiguous() for _, t in items if t.numel()]
    return [storage_view(t, torch.uint8)[begin:begin + n].numpy().data
            for ((_, begin, n, t),) in merge_runs((memory_axis(t, in_bytes=True),) for t in flats)]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *, fsync: bool = True,
                      also: Any = None) -> tuple[str, int]:
    """Write `tensors` to `path` (created or truncated); returns (sha256 hex, size in bytes).
    Each buffer is hashed in a worker thread while it is written (hashlib and file writes
    release the GIL). `also`: a second hasher (`update`), fed the same bytes on this thread
    after each write."""
    items, head = _header(tensors)
    hasher = hashlib.sha256(head)
    if also is not None:
        also.update(head)
    size = len(head)
    runs = _runs(items)
    with open(path, "wb") as fh, ThreadPoolExecutor(1) as pool:
        fh.write(head)
        for view in runs:
            hashed = pool.submit(hasher.update, view)
            fh.write(view)
            if also is not None:
                also.update(view)
            size += len(view)
            hashed.result()
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return hasher.hexdigest(), size
