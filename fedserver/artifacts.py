"""Content-addressed artefacts (global adapters) on disk, named by their sha256."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from common.errors import NotFoundError
from common.safetensors_stream import write_safetensors
from common.wire import sha256_hex


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFoundError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256

    def put(self, data: bytes) -> str:
        """Store bytes; returns their sha256. Idempotent; written to a temp name then renamed."""
        digest = sha256_hex(data)
        dst = self.path(digest)
        if not dst.exists():
            tmp = dst.with_suffix(f".tmp-{os.getpid()}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
        return digest

    def put_tensors(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Store a state as safetensors; returns its sha256. Serialised, hashed and written in
        one pass (no in-memory copy of the payload), fsynced, then renamed to its digest."""
        tmp = self.root / f".put-{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            digest, _ = write_safetensors(tmp, tensors)
            dst = self.path(digest)
            if dst.exists():
                tmp.unlink()
            else:
                os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        p = self.path(sha256)
        if not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…; it may be from an older round")
        return p.read_bytes()

    def size(self, sha256: str) -> int:
        p = self.path(sha256)
        if not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…")
        return p.stat().st_size

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        with open(self.path(sha256), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)
