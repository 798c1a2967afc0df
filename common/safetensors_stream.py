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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

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


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *, fsync: bool = True) -> tuple[str, int]:
    """Write `tensors` to `path` (created or truncated); returns (sha256 hex, size in bytes)."""
    items, head = _header(tensors)
    hasher = hashlib.sha256(head)
    size = len(head)
    with open(path, "wb") as fh:
        fh.write(head)
        for _, t in items:
            flat = t.detach().cpu().contiguous().reshape(-1)
            view = flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")
            hasher.update(view)   # hashlib and file writes release the GIL on large buffers
            fh.write(view)
            size += len(view)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return hasher.hexdigest(), size
