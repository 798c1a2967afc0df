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
from common.files import start_writeback

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


class SafetensorsWriter:
    """A safetensors file written while its tensors' bytes are still being made: the header
    from `like` (names, shapes and dtypes; tensors on the meta device will do) at once, then
    each `add`ed buffer, which must be the next bytes in the file's order (`_header`'s). Each
    buffer is hashed and written (and fed to `also`) by worker threads while the caller goes
    on, so the caller may make the next bytes meanwhile; it must not change a buffer it has
    added. `workers`: 2 hashes on one thread while another writes (best when the caller only
    hands over finished bytes); 1 does both on one thread (best when the caller is computing
    the next bytes meanwhile: on 2 cores, three busy threads slowed each other, measured in
    benchmarks/README.md). `finish` waits for them, checks the size, fsyncs and returns
    (sha256 hex, size). A writer that is not finished must be `close`d (the file is left)."""

    def __init__(self, path: Path, like: Mapping[str, torch.Tensor], *, also: Any = None, workers: int = 2) -> None:
        items, head = _header(like)
        self.names = [name for name, _ in items]
        self.expected = len(head) + sum(t.numel() * t.element_size() for _, t in items)
        self.size = len(head)
        self._hasher = hashlib.sha256(head)
        self._also = also
        if also is not None:
            also.update(head)
        self._fh = open(path, "wb")
        self._writing = ThreadPoolExecutor(1)
        self._hashing = ThreadPoolExecutor(1) if workers > 1 else None
        self._pending: list[Any] = []
        self._fh.write(head)
        self._written = len(head)   # bytes handed to the file (the writer thread's count)

    def _write(self, view: memoryview, hash_too: bool = False) -> None:
        if hash_too:
            self._hasher.update(view)
        self._fh.write(view)
        start_writeback(self._fh.fileno(), self._written, len(view))   # (finish's fsync waits for little)
        self._written += len(view)
        if self._also is not None:
            self._also.update(view)

    def add(self, view: memoryview) -> None:
        if self.size + len(view) > self.expected:
            raise ValueError(f"{len(view)} bytes more than the {self.expected} the header announces")
        self.size += len(view)
        if self._hashing is not None:
            self._pending.append(self._hashing.submit(self._hasher.update, view))
        self._pending.append(self._writing.submit(self._write, view, self._hashing is None))
        for f in [f for f in self._pending if f.done()]:
            f.result()   # a failed write surfaces here, at the latest in finish
            self._pending.remove(f)

    def complete(self) -> bool:
        return self.size == self.expected

    def finish(self, fsync: bool = True) -> tuple[str, int]:
        try:
            for f in self._pending:
                f.result()
            if not self.complete():
                raise ValueError(f"{self.size} bytes written, the header announces {self.expected}")
            if fsync:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            return self._hasher.hexdigest(), self.size
        finally:
            self.close()

    def close(self) -> None:
        self._writing.shutdown(wait=True)
        if self._hashing is not None:
            self._hashing.shutdown(wait=True)
        self._pending = []
        self._fh.close()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *, fsync: bool = True,
                      also: Any = None) -> tuple[str, int]:
    """Write `tensors` to `path` (created or truncated); returns (sha256 hex, size in bytes).
    Each buffer is hashed in a worker thread while another writes it (hashlib and file writes
    release the GIL). `also`: a second hasher (`update`), fed the same bytes as they are written."""
    writer = SafetensorsWriter(path, tensors, also=also)
    try:
        for view in _runs([(n, tensors[n]) for n in writer.names]):
            writer.add(view)
    except BaseException:
        writer.close()
        raise
    return writer.finish(fsync)
