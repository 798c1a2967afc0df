"""A bounded buffer of a round's updates for strategies that need all of them at once
(median, Krum, Bulyan, ...). Up to `max_bytes` of updates stay in memory; the rest are read
back one tensor at a time from their safetensors files (the engine's receipt copy, or a spill
file written here), so coordinator memory stays bounded however many schools report."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import atomic_write_bytes
from common.wire import tensor_bytes, tensors_to_bytes
from fedserver.strategy.base import ClientUpdate


@dataclass
class _Entry:
    school_id: str
    num_examples: int
    tensors: dict[str, torch.Tensor] | None   # None: on disk
    path: Path | None


class UpdateBuffer:
    def __init__(self, max_bytes: int, spill_dir: Path | None) -> None:
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir
        self.entries: list[_Entry] = []
        self.bytes_in_memory = 0
        self.spilled = 0
        self._handles: dict[Path, TensorFile] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, update: ClientUpdate) -> None:
        size = tensor_bytes(update.delta)
        if self.bytes_in_memory + size <= self.max_bytes:
            tensors = {k: v.detach().clone() for k, v in update.delta.items()}
            self.entries.append(_Entry(update.school_id, update.num_examples, tensors, update.path))
            self.bytes_in_memory += size
            return
        path = update.path
        if path is None or not path.exists():
            if self.spill_dir is None:
                raise RuntimeError("update buffer is full and has no spill directory; raise strategy buffer_mb")
            path = self.spill_dir / f"{len(self.entries):05d}-{update.school_id}.safetensors"
            atomic_write_bytes(path, tensors_to_bytes(update.delta), fsync=False)
        self.entries.append(_Entry(update.school_id, update.num_examples, None, path))
        self.spilled += 1

    def tensor(self, i: int, key: str) -> torch.Tensor:
        e = self.entries[i]
        if e.tensors is not None:
            return e.tensors[key]
        assert e.path is not None
        handle = self._handles.get(e.path)
        if handle is None:
            handle = self._handles[e.path] = TensorFile(e.path)
        return handle.read(key)

    def clear(self) -> None:
        for h in self._handles.values():
            h.close()
        for e in self.entries:
            if e.tensors is None and e.path is not None and self.spill_dir is not None and e.path.parent == self.spill_dir:
                e.path.unlink(missing_ok=True)
        self.entries, self.bytes_in_memory, self.spilled, self._handles = [], 0, 0, {}


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


class TensorFile:
    """One tensor at a time from a safetensors file, read with pread into fresh memory.
    Not memory-mapped: a mapping would keep every page read so far resident (and counted
    in the coordinator's RSS) until the file is closed, which defeats spilling."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError) as exc:
            os.close(self._fd)
            raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._index = {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, (start, end) = self._index[key]
        data = bytearray(end - start)
        view = memoryview(data)
        got = 0
        while got < len(data):
            chunk = os.preadv(self._fd, [view[got:]], self._base + start + got)
            if chunk == 0:
                raise ValueError(f"{self.path}: truncated while reading {key}")
            got += chunk
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
