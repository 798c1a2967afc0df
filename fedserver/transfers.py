"""Resumable uploads of any artefact kind (adapter deltas, answer sets): one place that
registers an upload, appends chunks durably while hashing them, and answers where to resume.
What the bytes mean is the round kind's business (fedserver/rounds.py), not this module's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from common import digest
from common.errors import DuplicateUploadError, ProtocolError, TooLargeError, ValidationError, WrongRoundError
from common.files import start_writeback
from common.logs import get_logger
from common.messages import UploadHeader
from common.wire import MAX_CHUNK_BYTES
from fedserver.store import Store
from fedserver.validation import CODECS, StreamCheck, header_numbers_problem


def _write_and_hash(fh: Any, hasher: Any, check: StreamCheck | None, data: bytes | memoryview, offset: int) -> None:
    fh.write(data)
    start_writeback(fh.fileno(), offset, len(data))   # the closing fsync then waits for little
    hasher.update(data)
    if check is not None:
        check.feed(data)


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _read_and_hash(path: Path, algorithm: str, check: StreamCheck | None) -> Any:
    """A resumed upload's bytes already held, read a chunk at a time: their running hash (in
    the header's algorithm), and the stream check fed with them."""
    hasher = digest.hasher(algorithm)
    with open(path, "rb") as fh:
        while data := fh.read(MAX_CHUNK_BYTES):
            hasher.update(data)
            if check is not None:
                check.feed(data)
    return hasher


# Uploads one school may have begun and not finished in one round (a retry resumes its own).
MAX_UNFINISHED_PER_SCHOOL = 2


def upload_key(school: str, upload_id: str) -> str:
    """Where the coordinator files a school's upload: upload ids are the school's choice, so
    two schools may pick the same one (identical payloads give identical ids), and each must
    still get its own bytes, row and receipt. School ids may contain '.', upload ids may not."""
    if not upload_id or len(upload_id) > 128 or not all(c.isalnum() or c in "-_" for c in upload_id):
        raise ProtocolError("upload_id must be 1-128 characters of letters, digits, '-' or '_'")
    return f"{school}.{upload_id}"


class UploadReceiver:
    """Bytes of uploads in progress, `<upload_id>.part` under `uploads_dir`, and their rows in
    the store. `count_up(n)` is told about every byte received (round byte counters)."""

    def __init__(self, store: Store, uploads_dir: Path, max_upload_bytes: int,
                 count_up: Callable[[int], None] = lambda n: None) -> None:
        self.store = store
        self.uploads_dir = uploads_dir
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.count_up = count_up
        self._receiving: set[str] = set()   # uploads a stream is writing now: one writer per upload
        self.is_open: Callable[[int], bool] = lambda round_: True   # the round still takes uploads (the engine's)
        self.log = get_logger("uploads")

    def part(self, key: str) -> Path:
        return self.uploads_dir / f"{key}.part"

    async def check_header(self, school: str, h: UploadHeader) -> None:
        """Checks that need neither the payload nor the round: size, form, replay."""
        if h.total_size > self.max_upload_bytes:
            raise TooLargeError(f"upload of {h.total_size} bytes exceeds the coordinator's limit of {self.max_upload_bytes}")
        if h.total_size == 0 or not digest.well_formed(h.digest):
            raise ProtocolError("header needs total_size > 0 and a sha256 (or, if offered, blake3) hex digest")
        if h.encoding and h.encoding not in CODECS:   # before a byte of payload is sent, not after
            raise ValidationError(f"unknown upload encoding {h.encoding!r}; this coordinator decodes {sorted(CODECS)}. "
                                  "Upgrade the school")
        problem = header_numbers_problem(h.num_examples, h.metrics)
        if problem:
            raise ValidationError(f"upload header: {problem}; the daemon reports its own numbers, so upgrade or fix it")
        if await asyncio.to_thread(self.store.receipt_for_upload, upload_key(school, h.upload_id)):
            raise DuplicateUploadError(f"upload {h.upload_id} was already accepted; replays are refused")

    async def status(self, school: str, upload_id: str) -> tuple[int, bool]:
        """(durable bytes held for this school's upload, already accepted)."""
        key = upload_key(school, upload_id)
        if await asyncio.to_thread(self.store.receipt_for_upload, key):
            return 0, True
        if self.store.get_upload(key) is None:
            return 0, False
        part = self.part(key)
        return (part.stat().st_size if part.exists() else 0), False

    async def receive(self, school: str, h: UploadHeader, chunks: AsyncIterator[tuple[int, bytes | memoryview]],
                      check: StreamCheck | None = None) -> tuple[Path, str]:
        """Append the chunks (offset, bytes) after what is already held; returns the complete
        payload's path and its digest (tagged, in the header's algorithm), computed while the
        bytes arrived. `check` (the round
        kind's validation as bytes arrive) is fed every byte, in order, beside the hash. No
        payload is held: a chunk at a time is written. Runs concurrently for many schools:
        nothing here takes the engine's lock."""
        key = upload_key(school, h.upload_id)
        if key in self._receiving:
            raise DuplicateUploadError(f"upload {h.upload_id} is being received on another stream; cancel that "
                                       "stream or wait for it to end, then ask UploadStatus where to resume")
        self._receiving.add(key)
        try:
            return await self._receive(key, school, h, chunks, check)
        finally:
            self._receiving.discard(key)

    async def _receive(self, key: str, school: str, h: UploadHeader, chunks: AsyncIterator[tuple[int, bytes | memoryview]],
                       check: StreamCheck | None) -> tuple[Path, str]:
        part = self.part(key)
        others = [u for u in await asyncio.to_thread(self.store.unfinished_uploads, school, h.round) if u != key]
        if len(others) >= MAX_UNFINISHED_PER_SCHOOL:
            raise TooLargeError(f"this school already has {len(others)} unfinished uploads in round {h.round}; resume "
                                "one (UploadStatus says where) instead of starting another")
        row = await asyncio.to_thread(self.store.begin_upload, key, school, h.round, h.digest, h.total_size,
                                      {"round": h.round, "num_examples": h.num_examples, "kind": h.kind})
        if (row.school_id, row.round, row.digest, row.total_size) != (school, h.round, h.digest, h.total_size):
            raise ProtocolError(f"upload id {h.upload_id} is already used for a different payload; choose a new upload_id")
        have = part.stat().st_size if part.exists() else 0
        if h.offset != have:
            raise ProtocolError(f"upload {h.upload_id}: coordinator holds {have} bytes but the header resumes at {h.offset}; ask UploadStatus")
        received = have
        # A resumed upload first reads, hashes and checks the bytes it already holds.
        algorithm = digest.split(h.digest)[0]
        hasher = await asyncio.to_thread(_read_and_hash, part, algorithm, check) if have else digest.hasher(algorithm)
        loop = asyncio.get_running_loop()
        writing: asyncio.Future[None] | None = None   # one chunk's write + hash in flight while the next arrives
        with open(part, "ab") as fh:
            try:
                async for offset, data in chunks:
                    if len(data) > MAX_CHUNK_BYTES:
                        raise TooLargeError(f"chunk of {len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte chunk limit")
                    if offset != received:
                        raise ProtocolError(f"chunk at offset {offset}, expected {received}")
                    if received + len(data) > h.total_size:
                        raise ProtocolError(f"chunks exceed the announced total_size of {h.total_size} bytes")
                    if not self.is_open(h.round):   # no stream outlives its round
                        raise WrongRoundError(f"round {h.round} closed while this upload was in progress; its "
                                              "result is no longer needed")
                    if writing is not None:
                        await writing
                    writing = loop.run_in_executor(None, _write_and_hash, fh, hasher, check, data, received)
                    received += len(data)
                    self.count_up(len(data))
            finally:   # what arrived is on disk before the file closes (a resume starts after it)
                if writing is not None:
                    await writing
            await asyncio.to_thread(_sync, fh)
        if received != h.total_size:
            raise ProtocolError(f"stream ended at {received} of {h.total_size} bytes; resume from UploadStatus")
        return part, digest.tag(algorithm, hasher.hexdigest())

    def sweep(self, open_round: int | None) -> int:
        """Remove what no stream will finish (start-up, and after rounds): rows and `.part`
        files of uploads for rounds other than the open one, `.part` files without a row (a
        crash between the two), and temporary files. Uploads a stream is writing are left
        alone. Returns the number of files removed. Blocking: call it off the event loop."""
        removed = 0
        abandoned = [u for u in self.store.abandoned_uploads(open_round) if u not in self._receiving]
        for key in abandoned:
            self.store.forget_upload(key)
        known = self.store.upload_ids() | self._receiving
        for path in self.uploads_dir.iterdir():
            stem = path.name.removesuffix(".part")
            if path.is_file() and (path.suffix != ".part" or stem not in known):
                path.unlink(missing_ok=True)
                removed += 1
        if abandoned or removed:
            self.log.info("abandoned uploads removed", rows=len(abandoned), files=removed, open_round=open_round)
        return removed

    async def discard(self, school: str, upload_id: str) -> None:
        """A rejected payload is not kept: the school sends a new one."""
        key = upload_key(school, upload_id)
        self.part(key).unlink(missing_ok=True)
        await asyncio.to_thread(self.store.forget_upload, key)


def sweep_crash_debris(state_dir: Path, updates_dir: Path, open_round: int | None, before: float) -> int:
    """What a killed coordinator leaves behind, removed at start-up: temporary files of
    interrupted writes anywhere under the state directory (`*.tmp`, `*.tmp-<pid>`) last
    written before `before` (this process's start: its own writes in progress are younger),
    and the update directories of rounds that are not open. Returns the number of paths
    removed. Blocking."""
    import re
    import shutil

    removed = 0
    keep = f"round-{open_round}" if open_round is not None else None
    if updates_dir.is_dir():
        for d in updates_dir.iterdir():
            if d.name != keep:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed += 1
    temp = re.compile(r"(\.tmp|\.tmp-\d+)$")
    for path in state_dir.rglob("*"):
        if temp.search(path.name) and "quarantine" not in path.parts:
            try:
                if not path.is_file() or path.stat().st_mtime >= before:
                    continue
            except OSError:   # renamed into place meanwhile
                continue
            path.unlink(missing_ok=True)
            removed += 1
    return removed
