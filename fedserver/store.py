"""Durable coordinator state in one SQLite file (WAL): schools, rounds, uploads, receipts, evals.

Every method is one short transaction. Calls are synchronous; the async layers call the
writes through asyncio.to_thread so an fsync never stalls the event loop."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.errors import DuplicateUploadError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS schools (
  id TEXT PRIMARY KEY, capabilities TEXT NOT NULL DEFAULT '{}',
  first_seen REAL NOT NULL, last_seen REAL NOT NULL, joins INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('open','committed','failed')),
  participants TEXT NOT NULL, global_in TEXT NOT NULL, global_out TEXT,
  started_at REAL NOT NULL, deadline REAL NOT NULL, closed_at REAL,
  bytes_up INTEGER NOT NULL DEFAULT 0, bytes_down INTEGER NOT NULL DEFAULT 0,
  metrics TEXT NOT NULL DEFAULT '{}', failures TEXT NOT NULL DEFAULT '{}',
  kind TEXT NOT NULL DEFAULT 'train', plan TEXT NOT NULL DEFAULT '{}');
-- uploads.sha256, receipts.sha256 and receipts.file_sha256 hold tagged digests (common/digest.py):
-- a sha256 hex digest as always, or "blake3:<hex>" for an upload its school named by BLAKE3.
CREATE TABLE IF NOT EXISTS uploads (
  upload_id TEXT PRIMARY KEY, school_id TEXT NOT NULL, round INTEGER NOT NULL,
  sha256 TEXT NOT NULL, total_size INTEGER NOT NULL, received INTEGER NOT NULL DEFAULT 0,
  header TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
  round INTEGER NOT NULL, school_id TEXT NOT NULL, upload_id TEXT NOT NULL UNIQUE,
  sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, metrics TEXT NOT NULL,
  path TEXT NOT NULL, received_at REAL NOT NULL, file_sha256 TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (round, school_id));
CREATE TABLE IF NOT EXISTS evals (
  round INTEGER NOT NULL, source TEXT NOT NULL, num_examples INTEGER NOT NULL,
  metrics TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (round, source));
"""

# PRAGMA user_version of the file. 0: the first release (rounds were all training rounds);
# 2: rounds carry their kind and the plan fixed when they opened; 3: receipts record the sha256
# of the file kept for them (a compressed upload is kept decoded), checked before a restart
# re-folds it. Migrations run at start-up.
SCHEMA_VERSION = 3


def _migrate(db: sqlite3.Connection) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"state file has schema version {version}, newer than this coordinator's {SCHEMA_VERSION}; "
                           "upgrade the coordinator (a downgrade cannot read it)")
    if version < 2:
        cols = {r[1] for r in db.execute("PRAGMA table_info(rounds)")}
        db.execute("BEGIN IMMEDIATE")
        if "kind" not in cols:   # every round before round kinds was a training round
            db.execute("ALTER TABLE rounds ADD COLUMN kind TEXT NOT NULL DEFAULT 'train'")
        if "plan" not in cols:   # '{}': the plan is recomputed as the first release did
            db.execute("ALTER TABLE rounds ADD COLUMN plan TEXT NOT NULL DEFAULT '{}'")
        # Upload ids are filed per school now ("<school>.<upload id>"): two schools may send
        # the same id. Unfinished uploads of the old form restart from byte 0.
        db.execute("UPDATE receipts SET upload_id = school_id || '.' || upload_id WHERE instr(upload_id, '.') = 0")
        db.execute("PRAGMA user_version = 2")
        db.execute("COMMIT")
        version = 2
    if version < 3:
        cols = {r[1] for r in db.execute("PRAGMA table_info(receipts)")}
        db.execute("BEGIN IMMEDIATE")
        if "file_sha256" not in cols:   # '': the receipt's own sha256 (the payload as sent) is the kept file's
            db.execute("ALTER TABLE receipts ADD COLUMN file_sha256 TEXT NOT NULL DEFAULT ''")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")


@dataclass(frozen=True)
class RoundRow:
    round: int
    status: str
    participants: list[str]
    global_in: str
    global_out: str | None
    started_at: float
    deadline: float
    closed_at: float | None
    bytes_up: int
    bytes_down: int
    metrics: dict[str, float]
    failures: dict[str, str]
    kind: str = "train"
    plan: dict[str, Any] = field(default_factory=dict)   # fixed when the round opened (fedserver/rounds.py)


@dataclass(frozen=True)
class Receipt:
    round: int
    school_id: str
    upload_id: str
    digest: str             # of the payload as sent, tagged (common/digest.py); column `sha256`
    num_examples: int
    metrics: dict[str, float]
    path: str
    file_digest: str = ""   # of the file at `path` ('' before schema 3: then `digest`, the payload as sent); column `file_sha256`

    @property
    def kept_digest(self) -> str:
        return self.file_digest or self.digest


@dataclass(frozen=True)
class UploadRow:
    upload_id: str
    school_id: str
    round: int
    digest: str   # tagged (common/digest.py); column `sha256`
    total_size: int
    received: int
    header: dict[str, Any]


class Store:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process
            self._db.executescript(SCHEMA)
            _migrate(self._db)
        elif int(self._db.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} is from an older coordinator; start the coordinator once to migrate it")

    def close(self) -> None:
        """Close the database once every statement in flight has finished. A worker thread may
        still be writing (a coroutine awaiting asyncio.to_thread was cancelled, its thread was
        not): closing under it crashed the process (SIGSEGV in sqlite3). Later calls raise
        sqlite3.ProgrammingError."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.fetchall()

    # ---- meta ----
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key,value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # ---- schools ----
    def record_join(self, school_id: str, capabilities: Mapping[str, Any]) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO schools(id,capabilities,first_seen,last_seen,joins) VALUES(?,?,?,?,1) "
                "ON CONFLICT(id) DO UPDATE SET capabilities=excluded.capabilities, last_seen=excluded.last_seen, joins=joins+1",
                (school_id, json.dumps(dict(capabilities)), now, now),
            )

    def schools(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT id, capabilities, first_seen, last_seen, joins FROM schools ORDER BY id")
        return [{"id": r[0], "capabilities": json.loads(r[1]), "first_seen": r[2], "last_seen": r[3], "joins": r[4]} for r in rows]

    # ---- rounds ----
    def _round(self, r: sqlite3.Row | tuple[Any, ...]) -> RoundRow:
        return RoundRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9], json.loads(r[10]), json.loads(r[11]),
                        r[12], json.loads(r[13]))

    _ROUND_COLS = "round,status,participants,global_in,global_out,started_at,deadline,closed_at,bytes_up,bytes_down,metrics,failures,kind,plan"

    def open_round(self, round_: int, participants: list[str], global_in: str, deadline: float,
                   kind: str = "train", plan: Mapping[str, Any] | None = None) -> RoundRow:
        """The round's plan (per-school parameters, packs...) is stored with it, in the same
        transaction: acceptance and restarts check against what was actually sent."""
        with self._tx() as db:
            db.execute(f"INSERT INTO rounds({self._ROUND_COLS}) VALUES(?,?,?,?,NULL,?,?,NULL,0,0,'{{}}','{{}}',?,?)",
                       (round_, "open", json.dumps(participants), global_in, time.time(), deadline, kind,
                        json.dumps(dict(plan or {}))))
        row = self.get_round(round_)
        assert row is not None
        return row

    def close_round(self, round_: int, status: str, global_out: str | None,
                    metrics: Mapping[str, float], failures: Mapping[str, str], meta: Mapping[str, str] | None = None) -> None:
        """`meta`: keys that become true with the commit and not before (the teacher's adapter
        of record), written in the same transaction."""
        with self._tx() as db:
            cur = db.execute("UPDATE rounds SET status=?, global_out=?, closed_at=?, metrics=?, failures=? WHERE round=? AND status='open'",
                             (status, global_out, time.time(), json.dumps(dict(metrics)), json.dumps(dict(failures)), round_))
            if cur.rowcount != 1:
                raise RuntimeError(f"round {round_} is not open; cannot close it twice")
            if status == "committed":
                db.execute("INSERT INTO meta(key,value) VALUES('global_sha256',?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (global_out,))
                for key, value in (meta or {}).items():
                    db.execute("INSERT INTO meta(key,value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def get_round(self, round_: int) -> RoundRow | None:
        rows = self._query(f"SELECT {self._ROUND_COLS} FROM rounds WHERE round=?", (round_,))
        return self._round(rows[0]) if rows else None

    def open_round_row(self) -> RoundRow | None:
        rows = self._query(f"SELECT {self._ROUND_COLS} FROM rounds WHERE status='open' ORDER BY round DESC LIMIT 1")
        return self._round(rows[0]) if rows else None

    def rounds(self) -> list[RoundRow]:
        return [self._round(r) for r in self._query(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round")]

    def round_counts(self) -> dict[tuple[str, str], int]:
        """(kind, status) -> rounds closed so; no round's participants or plan is parsed."""
        rows = self._query("SELECT kind, status, COUNT(*) FROM rounds WHERE status != 'open' GROUP BY kind, status")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def last_round_number(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(round), 0) FROM rounds")
        return int(rows[0][0])

    def last_committed_round(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(round), 0) FROM rounds WHERE status='committed'")[0][0])

    def committed_rounds(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM rounds WHERE status='committed'")[0][0])

    def add_bytes(self, round_: int, up: int = 0, down: int = 0) -> None:
        with self._tx() as db:
            db.execute("UPDATE rounds SET bytes_up=bytes_up+?, bytes_down=bytes_down+? WHERE round=?", (up, down, round_))

    # ---- uploads in progress ----
    def begin_upload(self, upload_id: str, school_id: str, round_: int, digest: str, total: int, header: Mapping[str, Any]) -> UploadRow:
        """Register (or find) an upload. The same id from another school or with another
        payload is refused: ids are how resumes find their bytes."""
        with self._tx() as db:
            rows = db.execute("SELECT upload_id,school_id,round,sha256,total_size,received,header FROM uploads WHERE upload_id=?", (upload_id,)).fetchall()
            if not rows:
                db.execute("INSERT INTO uploads VALUES(?,?,?,?,?,0,?,?)",
                           (upload_id, school_id, round_, digest, total, json.dumps(dict(header)), time.time()))
                return UploadRow(upload_id, school_id, round_, digest, total, 0, dict(header))
        r = rows[0]
        return UploadRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))

    def get_upload(self, upload_id: str) -> UploadRow | None:
        rows = self._query("SELECT upload_id,school_id,round,sha256,total_size,received,header FROM uploads WHERE upload_id=?", (upload_id,))
        if not rows:
            return None
        r = rows[0]
        return UploadRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))

    def set_upload_received(self, upload_id: str, received: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET received=?, updated_at=? WHERE upload_id=?", (received, time.time(), upload_id))

    def forget_upload(self, upload_id: str) -> None:
        """Drop a rejected upload's record so its bytes are not resumed."""
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))

    def unfinished_uploads(self, school_id: str, round_: int) -> list[str]:
        """The ids of a school's uploads for `round_` that have no receipt yet."""
        return [r[0] for r in self._query("SELECT upload_id FROM uploads WHERE school_id=? AND round=?", (school_id, round_))]

    def abandoned_uploads(self, open_round: int | None) -> list[str]:
        """Uploads in progress for any round but the open one (None: for any round): their round
        closed or never opened, so nobody will finish them."""
        if open_round is None:
            return [r[0] for r in self._query("SELECT upload_id FROM uploads")]
        return [r[0] for r in self._query("SELECT upload_id FROM uploads WHERE round<>?", (open_round,))]

    def upload_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT upload_id FROM uploads")}

    # ---- receipts ----
    def add_receipt(self, rc: Receipt) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO receipts(round,school_id,upload_id,sha256,num_examples,metrics,path,received_at,"
                           "file_sha256) VALUES(?,?,?,?,?,?,?,?,?)",
                           (rc.round, rc.school_id, rc.upload_id, rc.digest, rc.num_examples, json.dumps(dict(rc.metrics)),
                            rc.path, time.time(), rc.file_digest))
        except sqlite3.IntegrityError:
            raise DuplicateUploadError(
                f"school {rc.school_id!r} already has an accepted update for round {rc.round}; replays are refused"
            ) from None

    _RECEIPT_COLS = "round,school_id,upload_id,sha256,num_examples,metrics,path,file_sha256"

    def receipts(self, round_: int) -> list[Receipt]:
        rows = self._query(f"SELECT {self._RECEIPT_COLS} FROM receipts WHERE round=? ORDER BY received_at", (round_,))
        return [Receipt(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    def receipt_for_upload(self, upload_id: str) -> Receipt | None:
        rows = self._query(f"SELECT {self._RECEIPT_COLS} FROM receipts WHERE upload_id=?", (upload_id,))
        r = rows[0] if rows else None
        return Receipt(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) if r else None

    def void_receipt(self, rc: Receipt) -> None:
        """Forget an accepted result whose kept file was found damaged: its receipt and its
        upload row go in one transaction, so the school counts as not having sent it and its
        next upload (even with the same id) is taken."""
        with self._tx() as db:
            db.execute("DELETE FROM receipts WHERE round=? AND school_id=? AND upload_id=?", (rc.round, rc.school_id, rc.upload_id))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (rc.upload_id,))

    RECOVERY_NOTES = 50

    def add_recovery_note(self, note: Mapping[str, Any]) -> None:
        """A bad file found and what was done (meta 'state_recoveries', the newest RECOVERY_NOTES)."""
        with self._tx() as db:
            rows = db.execute("SELECT value FROM meta WHERE key='state_recoveries'").fetchall()
            notes = json.loads(rows[0][0]) if rows else []
            notes = [*notes, dict(note)][-self.RECOVERY_NOTES:]
            db.execute("INSERT INTO meta(key,value) VALUES('state_recoveries',?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (json.dumps(notes),))

    def recovery_notes(self) -> list[dict[str, Any]]:
        value = self.get_meta("state_recoveries")
        return json.loads(value) if value else []

    # ---- evaluations ----
    def add_eval(self, round_: int, source: str, num_examples: int, metrics: Mapping[str, float]) -> None:
        self.add_evals([(round_, source, num_examples, metrics)])

    def add_evals(self, rows: Sequence[tuple[int, str, int, Mapping[str, float]]]) -> None:
        """Several evaluations in one transaction (a later row for the same round and source wins)."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT INTO evals VALUES(?,?,?,?,?) ON CONFLICT(round,source) DO UPDATE SET "
                           "num_examples=excluded.num_examples, metrics=excluded.metrics, at=excluded.at",
                           [(r, src, n, json.dumps(dict(m)), now) for r, src, n, m in rows])

    def evals(self, round_: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT round,source,num_examples,metrics FROM evals"
        rows = self._query(sql + (" WHERE round=? ORDER BY source" if round_ is not None else " ORDER BY round, source"),
                           (round_,) if round_ is not None else ())
        return [{"round": r[0], "source": r[1], "num_examples": r[2], "metrics": json.loads(r[3])} for r in rows]


class GroupWriter(Generic[T]):
    """Rows that many callers write at once go to the database in shared transactions: a
    caller's row joins the batch being gathered while the previous one commits, and the caller
    returns once its batch is committed (or raises what the write raised). One row at a time
    when calls are sparse; at 10,000 schools reporting an evaluation, a few hundred
    transactions and worker-thread hops instead of 10,000 (docs/SCALING.md)."""

    def __init__(self, write_many: Callable[[list[T]], None]) -> None:
        self._write_many = write_many
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0   # transactions written (for tests and benchmarks)

    async def add(self, row: T) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())   # heard even if its caller left
        self._pending.append((row, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(fut)   # a caller cancelled meanwhile does not take its row out of the batch

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_many, [row for row, _ in batch])
            except asyncio.CancelledError:   # the coordinator stopping: nobody is left waiting for an answer
                for _, fut in batch + self._pending:
                    fut.cancel()
                self._pending = []
                raise
            except Exception as exc:   # each caller hears what its write raised
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
