"""Half-sent uploads: capped per school, ended with their round, and swept away (rows, `.part`
files, crash debris) at start-up and after."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from common.errors import ProtocolError, TooLargeError, WrongRoundError
from common.messages import UploadHeader
from fedserver.store import Store
from fedserver.transfers import MAX_UNFINISHED_PER_SCHOOL, UploadReceiver, sweep_crash_debris
from tests.conftest import coordinator_config, wait_for


def header(upload_id: str, round_: int = 1, size: int = 8) -> UploadHeader:
    return UploadHeader(round=round_, upload_id=upload_id, num_examples=1, digest="0" * 64, total_size=size,
                        base_sha256="")


async def chunks(*pieces: bytes):
    off = 0
    for p in pieces:
        yield off, p
        off += len(p)


@pytest.fixture
def rx(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    yield UploadReceiver(store, tmp_path / "uploads", 1 << 20)
    store.close()


async def test_a_school_may_leave_only_a_few_uploads_unfinished(rx):
    for i in range(MAX_UNFINISHED_PER_SCHOOL):
        with pytest.raises(ProtocolError, match="stream ended at 4 of 8"):
            await rx.receive("school-1", header(f"u{i}"), chunks(b"abcd"))
    with pytest.raises(TooLargeError, match="unfinished uploads in round 1; resume one"):
        await rx.receive("school-1", header("another"), chunks(b"abcdefgh"))
    # resuming one of its own is fine, and so is another school's, or the next round's
    h = dataclasses.replace(header("u0"), offset=4)
    part, _ = await rx.receive("school-1", h, _from(4, b"efgh"))
    assert part.read_bytes() == b"abcdefgh"
    await rx.receive("school-2", header("another"), chunks(b"abcdefgh"))
    await rx.receive("school-1", header("next", round_=2), chunks(b"abcdefgh"))


async def _from(offset: int, data: bytes):
    yield offset, data


async def test_an_upload_ends_when_its_round_closes(rx):
    state = {"open": True}
    rx.is_open = lambda r: state["open"]

    async def slow():
        yield 0, b"abcd"
        state["open"] = False   # the round closes while the school is still sending
        yield 4, b"efgh"

    with pytest.raises(WrongRoundError, match="round 1 closed while this upload was in progress"):
        await rx.receive("school-1", header("u1"), slow())


async def test_sweep_removes_abandoned_uploads_and_orphans_but_not_the_open_rounds(rx):
    for uid, rnd in (("old", 1), ("cur", 2)):
        with pytest.raises(ProtocolError):
            await rx.receive("school-1", header(uid, round_=rnd), chunks(b"abcd"))
    (rx.uploads_dir / "ghost.upload.part").write_bytes(b"x")   # a row that never got written (crash)
    (rx.uploads_dir / ".stray.tmp").write_bytes(b"x")
    removed = rx.sweep(open_round=2)
    assert removed == 3
    assert sorted(p.name for p in rx.uploads_dir.iterdir()) == ["school-1.cur.part"]
    assert rx.store.unfinished_uploads("school-1", 1) == [] and rx.store.unfinished_uploads("school-1", 2) == ["school-1.cur"]
    # no round open: nothing is kept
    rx.sweep(open_round=None)
    assert list(rx.uploads_dir.iterdir()) == []


async def test_sweep_leaves_an_upload_being_written_alone(rx):
    release = asyncio.Event()

    async def slow():
        yield 0, b"abcd"
        await release.wait()
        yield 4, b"efgh"

    task = asyncio.create_task(rx.receive("school-1", header("live", round_=1), slow()))
    await asyncio.sleep(0.1)
    rx.sweep(open_round=2)   # round 1 is not open, but a stream is still writing it
    assert (rx.uploads_dir / "school-1.live.part").exists()
    release.set()
    await task


def test_crash_debris_is_swept(tmp_path):
    state = tmp_path / "state"
    updates = state / "updates"
    for d in ("round-3", "round-4"):
        (updates / d).mkdir(parents=True)
        (updates / d / "school-1.safetensors").write_bytes(b"x")
    (state / "artifacts").mkdir()
    (state / "artifacts" / "abc.tmp-12345").write_bytes(b"x")
    (state / "artifacts" / ".put-1-2.tmp").write_bytes(b"x")
    (state / "artifacts" / "keep").write_bytes(b"x")
    (state / "quarantine").mkdir()
    (state / "quarantine" / "bad.tmp").write_bytes(b"x")   # evidence is kept
    young = state / "artifacts" / "writing-now.tmp-999"   # this run's write in progress
    young.write_bytes(b"x")
    import os
    import time
    past = time.time() - 60
    for p in state.rglob("*"):
        if p != young:
            os.utime(p, (past, past))
    assert sweep_crash_debris(state, updates, open_round=4, before=time.time() - 30) == 3
    assert sorted(p.name for p in updates.iterdir()) == ["round-4"]
    assert sorted(p.name for p in (state / "artifacts").iterdir()) == ["keep", "writing-now.tmp-999"]
    assert (state / "quarantine" / "bad.tmp").exists()


async def test_a_starting_coordinator_sweeps_what_a_crash_left(tmp_path, tiny_model, start_coordinator):
    cfg = coordinator_config(tmp_path, tiny_model, schools=2, tls=False)
    state = cfg.server.state_dir
    (state / "uploads").mkdir(parents=True)
    (state / "uploads" / "school-1.orphan.part").write_bytes(b"x" * 100)
    (state / "updates" / "round-7").mkdir(parents=True)
    (state / "strategy").mkdir(parents=True)
    (state / "strategy" / ".round-1.safetensors.abc.tmp").write_bytes(b"x")
    import os
    import time
    for p in state.rglob("*"):
        os.utime(p, (time.time() - 60, time.time() - 60))
    await start_coordinator(cfg, run_rounds=False)
    await wait_for(lambda: not (state / "uploads" / "school-1.orphan.part").exists()
                   and not (state / "updates" / "round-7").exists()
                   and not (state / "strategy" / ".round-1.safetensors.abc.tmp").exists(), 20, "the start-up sweep")


async def test_an_unknown_encoding_is_refused_before_the_payload_is_sent(rx):
    """Found by the fault suite: UploadStatus's pre-flight said OK to encoding "bogus", and the
    refusal came only after the whole payload had been streamed."""
    from common.errors import ValidationError

    with pytest.raises(ValidationError, match="unknown upload encoding 'bogus'"):
        await rx.check_header("school-1", dataclasses.replace(header("u1"), encoding="bogus"))
    await rx.check_header("school-1", dataclasses.replace(header("u1"), encoding="int8"))


def test_closing_the_store_under_a_writing_thread_does_not_crash(tmp_path):
    """A coroutine awaiting asyncio.to_thread(store.add_bytes) can be cancelled while its thread
    still writes; the coordinator's stop then closed the database under it: SIGSEGV (seen once in
    CI, once in the fault suite). Run in a child process: a crash must fail the test, not pytest."""
    import subprocess
    import sys

    code = f"""
import sqlite3, threading, time
from pathlib import Path
from fedserver.store import Store
for attempt in range(30):
    store = Store(Path({str(tmp_path)!r}) / f"s{{attempt}}.sqlite")
    store.open_round(1, ["a"], "0" * 64, time.time() + 60)
    stop = False
    def hammer():
        while not stop:
            try:
                store.add_bytes(1, 1, 1)
            except sqlite3.ProgrammingError:   # closed: the clear error, not a crash
                return
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    store.close()
    stop = True
    for t in threads:
        t.join()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
