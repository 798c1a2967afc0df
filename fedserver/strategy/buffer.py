"""A bounded buffer of a round's updates for strategies that need all of them at once
(median, Krum, Bulyan, ...). Up to `max_bytes` of updates stay in memory; the rest are read
back one tensor at a time from their safetensors files (the engine's receipt copy, or a spill
file written here), so coordinator memory stays bounded however many schools report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.files import atomic_write_bytes
from common.wire import tensors_to_bytes
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
        self._handles: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, update: ClientUpdate) -> None:
        size = sum(t.numel() * t.element_size() for t in update.delta.values())
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
            handle = self._handles[e.path] = safe_open(str(e.path), framework="pt")
        return handle.get_tensor(key)  # type: ignore[attr-defined]

    def clear(self) -> None:
        for e in self.entries:
            if e.tensors is None and e.path is not None and self.spill_dir is not None and e.path.parent == self.spill_dir:
                e.path.unlink(missing_ok=True)
        self.entries, self.bytes_in_memory, self.spilled, self._handles = [], 0, 0, {}
