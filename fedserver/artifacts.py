"""Content-addressed artefacts (global adapters, packs) on disk, named by their sha256. Every
read checks the bytes against the name; a file found to hash to its name is remembered by
(inode, size, mtime), so serving it again costs one stat until it changes. Where BLAKE3 is
available, the BLAKE3 digest of each artefact's bytes is kept beside (computed as it is
written, or read once), and announced with it: schools check downloads by it (common/digest.py)."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.buffers import joined_spans
from common.digest import BLAKE3, hasher, offered
from common.errors import CorruptFileError, NotFoundError
from common.messages import ArtifactRef
from common.safetensors_stream import SafetensorsWriter, write_safetensors
from common.wire import sha256_hex
from fedserver.integrity import file_sha256


_SEQ = itertools.count()


class StreamedTensors:
    """A state written to the store while a strategy makes it (ArtifactStore.begin_tensors;
    the close of a FedAvg round): the header at once, then each finished buffer `add`ed as the
    next bytes in safetensors order, written and hashed on worker threads meanwhile. `holds`
    says whether the state finally returned is exactly those bytes (its tensors are views of
    the buffers added, in the file's order); then `commit` (fsync, rename) stores it. `discard`
    removes what was written (after a commit it does nothing). `add` never raises: a failed
    write makes `holds` False, and the state is then stored whole, which reports the error."""

    def __init__(self, store: ArtifactStore, like: Mapping[str, torch.Tensor]) -> None:
        self.store = store
        self.tmp = store._tmp()   # a name the start-up sweep of a killed run's debris knows
        self.b3 = hasher(BLAKE3) if BLAKE3 in offered() else None
        self.writer = SafetensorsWriter(self.tmp, like, also=self.b3, workers=1)   # the strategy computes meanwhile
        self.spans: list[tuple[int, int]] = []   # (address, bytes) of each buffer added
        self.failed: BaseException | None = None
        self.done = False

    def add(self, buffer: torch.Tensor) -> None:
        if self.failed is not None:
            return
        try:
            flat = buffer.reshape(-1)
            if not flat.is_contiguous():
                raise ValueError("a buffer to write must be contiguous")
            self.writer.add(flat.view(torch.uint8).numpy().data)
            self.spans.append((flat.data_ptr(), flat.numel() * flat.element_size()))
        except BaseException as exc:   # noqa: BLE001 (kept; the state is then written whole)
            self.failed = exc

    def holds(self, state: Mapping[str, torch.Tensor]) -> bool:
        if self.failed is not None or not self.writer.complete() or set(state) != set(self.writer.names):
            return False
        got = [(t.data_ptr(), t.numel() * t.element_size()) for t in (state[n] for n in self.writer.names)
               if t.numel() and t.is_contiguous()]
        if sum(n for _, n in got) != sum(n for _, n in self.spans):
            return False
        return joined_spans(got) == joined_spans(self.spans)

    def commit(self) -> str:
        digest, _ = self.writer.finish()
        sha = self.store._keep(self.tmp, digest, self.b3)
        self.done = True
        return sha

    def discard(self) -> None:
        if not self.done:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
            self.done = True


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._good: dict[str, tuple[int, int, int]] = {}   # sha256 -> (inode, size, mtime_ns) found to hash to it
        self._blake3: OrderedDict[str, str] = OrderedDict()   # sha256 -> BLAKE3 hex of the same bytes, newest kept
        self._blake3_lock = threading.Lock()

    @staticmethod
    def _stamp(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def known_good(self, sha256: str) -> bool:
        """The file was found to hash to its name and has not changed since (one stat)."""
        try:
            p = self.path(sha256)
        except NotFoundError:
            return False
        stamp = self._stamp(p)
        return stamp is not None and self._good.get(sha256) == stamp

    def verify(self, sha256: str) -> None:
        """NotFoundError if the artefact is absent, CorruptFileError if its bytes do not hash
        to its name. Hashes the file unless it was verified and has not changed since."""
        p = self.path(sha256)
        stamp = self._stamp(p)
        if stamp is None or not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…")
        if self._good.get(sha256) == stamp:
            return
        self._judge(sha256, file_sha256(p), stamp[1], stamp)

    def _judge(self, sha256: str, digest: str, size: int, stamp: tuple[int, int, int]) -> None:
        """Remember the file as verified at `stamp` if `digest` is its name; else CorruptFileError."""
        if digest != sha256:
            self._good.pop(sha256, None)
            raise CorruptFileError(f"artefact {sha256[:12]}… ({size} bytes) hashes to {digest[:12]}…, not to its name: "
                                   "it changed on disk")
        self._good[sha256] = stamp

    def _intact(self, sha256: str) -> bool:
        try:
            self.verify(sha256)
            return True
        except (NotFoundError, CorruptFileError):
            return False

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFoundError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256

    # ---- BLAKE3 beside the sha256 (what downloads are checked by, where both ends have it) ----
    BLAKE3_KEPT = 64   # artefacts whose BLAKE3 is remembered (a round announces a few)

    def blake3(self, sha256: str) -> str:
        """The BLAKE3 hex of artefact `sha256`'s bytes if known here, else ''."""
        return self._blake3.get(sha256, "")

    def _note_blake3(self, sha256: str, hex_digest: str) -> None:
        with self._blake3_lock:
            self._blake3[sha256] = hex_digest
            self._blake3.move_to_end(sha256)
            while len(self._blake3) > self.BLAKE3_KEPT:
                self._blake3.popitem(last=False)

    def learn_blake3(self, sha256: str) -> str:
        """Blocking: the BLAKE3 of an artefact this process did not write (one read of the file;
        its sha256 is checked in the same pass unless it is known good). '' where BLAKE3 is not
        offered; CorruptFileError / NotFoundError as verify()."""
        if BLAKE3 not in offered() or self.blake3(sha256):
            return self.blake3(sha256)
        p = self.path(sha256)
        stamp = self._stamp(p)
        if stamp is None or not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…")
        b3 = hasher(BLAKE3)
        sha = None if self._good.get(sha256) == stamp else hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                b3.update(block)
                if sha is not None:
                    sha.update(block)
        if sha is not None:
            self._judge(sha256, sha.hexdigest(), stamp[1], stamp)
        if self._stamp(p) != stamp:   # changed while being read: not vouched for
            return ""
        self._note_blake3(sha256, b3.hexdigest())
        return self.blake3(sha256)

    def ref(self, sha256: str, kind: str = "adapter") -> ArtifactRef:
        """How a command names the artefact: sha256, size, kind, and BLAKE3 when known."""
        return ArtifactRef(sha256, self.size(sha256), kind, self.blake3(sha256))

    def put(self, data: bytes) -> str:
        """Store bytes; returns their sha256. Idempotent; written to a temp name then renamed."""
        digest = sha256_hex(data)
        if BLAKE3 in offered():
            self._note_blake3(digest, hasher(BLAKE3, data).hexdigest())
        dst = self.path(digest)
        if not self._intact(digest):   # absent, or a damaged file of that name: (re)written
            tmp = dst.with_suffix(f".tmp-{os.getpid()}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
            self._remember(digest)
        return digest

    def _remember(self, sha256: str) -> None:
        stamp = self._stamp(self.path(sha256))
        if stamp is not None:
            self._good[sha256] = stamp

    def put_tensors(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Store a state as safetensors; returns its sha256. Serialised, hashed and written in
        one pass (no in-memory copy of the payload), fsynced, then renamed to its digest."""
        tmp = self._tmp()
        try:
            b3 = hasher(BLAKE3) if BLAKE3 in offered() else None
            digest, _ = write_safetensors(tmp, tensors, also=b3)
            return self._keep(tmp, digest, b3)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def begin_tensors(self, like: Mapping[str, torch.Tensor]) -> StreamedTensors | None:
        """A state with `like`'s names, shapes and dtypes, to be stored while it is being made
        (StreamedTensors); None if its file cannot be opened (the state is then stored whole
        with put_tensors, which reports why)."""
        try:
            return StreamedTensors(self, like)
        except OSError:
            return None

    def _tmp(self) -> Path:
        return self.root / f".put-{os.getpid()}-{threading.get_ident()}-{next(_SEQ)}.tmp"

    def _keep(self, tmp: Path, digest: str, b3: Any) -> str:
        """The written, fsynced `tmp` stored as artefact `digest` (an intact one kept instead)."""
        if b3 is not None:
            self._note_blake3(digest, b3.hexdigest())
        if self._intact(digest):
            tmp.unlink()
        else:   # absent, or a damaged file of that name: replaced
            os.replace(tmp, self.path(digest))
            self._remember(digest)
        return digest

    def get(self, sha256: str) -> bytes:
        """The artefact's bytes, checked against its name (CorruptFileError if they differ)."""
        p = self.path(sha256)
        stamp = self._stamp(p)
        if stamp is None or not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…; it may be from an older round")
        data = p.read_bytes()
        if self._good.get(sha256) != stamp or len(data) != stamp[1]:
            self._judge(sha256, sha256_hex(data), len(data), stamp)
        return data

    def size(self, sha256: str) -> int:
        p = self.path(sha256)
        if not p.is_file():
            raise NotFoundError(f"no artefact {sha256[:12]}…")
        return p.stat().st_size

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        with open(self.path(sha256), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)
