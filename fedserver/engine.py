"""The round engine: opens rounds of the scheduled kind, pushes their commands, folds accepted
results, closes rounds at quorum or deadline, and checkpoints. The only place rounds run;
what each kind of round sends, accepts and commits lives in fedserver/rounds.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.data import OpenPrompt, Question, open_answer, prompt_text
from common.distill import Pack
from common.errors import CorruptFileError, DuplicateUploadError, FederationError, NotFoundError, WrongRoundError
from common.evaluation import EvalResult
from common.files import atomic_write_bytes, atomic_write_text
from common.lora import MERGED_FILE, LoraSettings, TensorSpec, initial_state, split_merge, write_peft_dir
from common.logs import LineBudget, get_logger, school_text
from common.memory import release_memory
from common.messages import (
    Capabilities, Command, EvalReport, EvaluateCommand, Failure, ShutdownCommand, UploadHeader,
)
from common.wire import sha256_hex, tensors_to_bytes
from fedserver.artifacts import ArtifactStore
from fedserver.config import CoordinatorConfig
from fedserver.integrity import Recovery, file_sha256
from fedserver.rounds import KINDS, OpenRound, RoundFailed
from fedserver.store import GroupWriter, Receipt, Store
from fedserver.strategy import Strategy, StrategyContext
from fedserver.strategy.base import State
from fedserver.monitor import CoordinatorMetrics
from fedserver.validation import FileState, StreamCheck, eval_report_problem
from fedserver.transfers import upload_key


@dataclass
class SchoolSession:
    school_id: str
    capabilities: Capabilities
    queue: asyncio.Queue[Command] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    progress: str = ""


class RoundEngine:
    def __init__(self, cfg: CoordinatorConfig, store: Store, artifacts: ArtifactStore,
                 layout: Mapping[str, TensorSpec], strategy: Strategy, checkpoint_dir: Path,
                 updates_dir: Path, evaluate: Callable[[int, dict[str, torch.Tensor] | None], Any] | None = None,
                 teacher: Any = None, pool: Sequence[Question] = (), teacher_eval: Sequence[Question] = (),
                 open_pool: Sequence[OpenPrompt] = ()) -> None:
        self.cfg = cfg
        self.store = store
        self.artifacts = artifacts
        self.layout = dict(layout)
        self.strategy = strategy
        self.checkpoint_dir = checkpoint_dir
        self.updates_dir = updates_dir   # accepted payloads of the open round, for restarts
        self.settings: LoraSettings = cfg.lora.settings()
        self._evaluate = evaluate   # async callable(round, state or None for the base model)
        self.teacher = teacher      # fedserver.teacher.TeacherHost, or None (train/evaluate rounds only)
        self.pool = list(pool)      # the public prompt pool's multiple-choice questions (distill / teach rounds)
        self.open_pool = list(open_pool)   # its open prompts (distill rounds: the teacher answers them)
        self.teacher_eval = list(teacher_eval)   # held-out questions the teacher is scored on
        self.sessions: dict[str, SchoolSession] = {}
        self.current: OpenRound | None = None
        self.global_sha = ""
        self.global_state: State = {}
        self._lock = asyncio.Lock()         # serialises receipts and folds into the open round, and its close
        self._eval_rows = GroupWriter(store.add_evals)   # schools' evaluations: many per transaction in a storm
        self._accepting: set[str] = set()   # schools whose upload is being validated (one at a time per school)
        self._changed = asyncio.Event()     # poked on join, leave, upload, failure
        self._bytes: dict[int, list[int]] = {}
        self._dense_bytes: dict[int, list[int]] = {}   # round -> [compressed bytes received, dense payload bytes they stand for]
        self._eval_tasks: set[asyncio.Task[Any]] = set()
        self._evals_due: dict[int, set[str]] = {}   # round -> schools asked to evaluate it that have not answered
        self._teacher_saved = ""   # the teacher adapter a teach round's commit records
        self._last_closed = store.last_round_number()   # kept in memory: count_bytes runs per chunk
        self.finished = asyncio.Event()
        self.started = asyncio.Event()   # set when start() has loaded the state (the open round, if any)
        self.log = get_logger("engine")
        self.planning: tuple[int, str] | None = None   # (number, kind) of the round being planned
        self.phase = "starting"   # what the engine is doing now (dashboard): waiting, planning, collecting, closing, finished
        self._notes_start = float("-inf")           # the session-lines window's start (monotonic); -inf: none yet
        self._notes_lines = 0                       # per-school lines written in this window
        self._notes_skipped: dict[str, int] = {}    # event -> lines counted, not written, in this window
        self.school_lines = LineBudget()            # lines quoting a school's own text: a few a minute per school
        self.metrics = CoordinatorMetrics(cfg.monitor.school_labels)
        self.metrics.bind(self)
        self.recovery = Recovery(self)   # files read back from disk: checked, a bad one quarantined and recovered
        self._strategy_saved = ""        # "<round>:<sha256>" of the strategy state a commit records
        self._teacher_saved_sha = ""     # sha256 of the teacher adapter's weights a teach round's commit records
        self._resumed_global: dict[str, torch.Tensor] = {}   # the interrupted round's adapter, when not the global one
        self._checking: dict[str, asyncio.Future[None]] = {}   # artefacts being checked before they are served

    # ---------------------------------------------------------------- start-up
    async def start(self) -> None:
        """Load the global adapter (or create round 0) and re-open an interrupted round,
        re-folding every receipted update from disk exactly once. Every file read back is
        checked against the sha256 recorded for it first; a bad one is quarantined and
        recovered, never used, and never stops the start (fedserver/integrity.py)."""
        sha = self.store.get_meta("global_sha256")
        if sha is None:
            state = await asyncio.to_thread(initial_state, self.layout, self.cfg.lora.seed)
            data = await asyncio.to_thread(tensors_to_bytes, state)
            sha = await asyncio.to_thread(self.artifacts.put, data)
            await asyncio.to_thread(self._checkpoint, 0, state, {"round": 0, "note": "initial adapter (B = 0)"}, sha)
            await asyncio.to_thread(self.store.set_meta, "global_sha256", sha)
            self.log.info("initial adapter created", sha256=sha[:12], tensors=len(state))
        self.global_sha, loaded = await asyncio.to_thread(self.recovery.load_global, sha)
        self.global_state = await self._hold_global(self.global_sha, loaded)
        del loaded
        self.strategy.setup(StrategyContext(self.settings, self.layout, tuple(s.id for s in self.cfg.schools),
                                            self.cfg.server.state_dir / "strategy" / "scratch",
                                            product_metrics=self.cfg.strategy.product_metrics))
        await asyncio.to_thread(self._load_strategy_state)
        if self.teacher is not None:   # the teacher's adapter of record, applied when the model loads
            saved = await asyncio.to_thread(self.recovery.teacher_adapter)
            self.teacher.restore_from = Path(saved) if saved else None
        row = self.store.open_round_row()
        if row is not None and await self._resumable(row):
            rnd = OpenRound(row.round, row.kind, row.participants, row.global_in,
                            self.global_state if row.global_in == self.global_sha else self._resumed_global, row.deadline,
                            plan=row.plan)
            kind = KINDS[rnd.kind]
            kind.begin(self, rnd)
            voided = 0
            for rc in self.store.receipts(row.round):   # every receipted result, checked, folded exactly once
                try:
                    result = await asyncio.to_thread(kind.restore, self, rnd, rc)
                except (FederationError, OSError, ValueError) as exc:   # damaged, missing or no longer valid
                    await asyncio.to_thread(self.recovery.void_receipt, rc, exc)
                    voided += 1
                    continue
                await asyncio.to_thread(kind.fold, self, rnd, rc.school_id, rc.num_examples, rc.metrics, Path(rc.path), result)
                rnd.accepted.add(rc.school_id)
            if not kind.upload:   # evaluate rounds: the stored reports are the receipts
                for e in self.store.evals(row.round):
                    if e["source"] in rnd.participants:
                        kind.fold(self, rnd, e["source"], e["num_examples"], e["metrics"], Path())
                        rnd.accepted.add(e["source"])
            self.current = rnd
            self.log.info("resumed open round", round=rnd.number, kind=rnd.kind, receipted=len(rnd.accepted),
                          **({"receipts_voided": voided} if voided else {}))
        if self._evaluate is not None and not any(e["source"] == "server" and e["round"] == 0 for e in self.store.evals(0)):
            self._spawn_eval(0, None)
        if self.teacher is not None and self.teacher_eval and not any(e["source"] == "teacher" for e in self.store.evals(0)):
            self._spawn(self.evaluate_teacher(0))   # the teacher before it learned anything
        self.started.set()

    async def _resumable(self, row: Any) -> bool:
        """The interrupted round's global adapter and pack are intact (or were restored); if
        not, it cannot resume: it is closed as failed and the next round starts."""
        problem = ""
        if row.global_in != self.global_sha:
            state = await asyncio.to_thread(self.recovery.read_adapter, row.global_in, f"round {row.round}'s global adapter",
                                            "the round cannot resume", row.round)
            if state is None:
                problem = f"its global adapter {row.global_in[:12]}… is lost (damaged or missing, no intact copy)"
            else:
                self._resumed_global = state
        pack = row.plan.get("pack")
        if not problem and pack and not await asyncio.to_thread(self.recovery.pack_ok, KINDS[row.kind], row.round, pack):
            problem = f"its pack {pack[:12]}… is damaged or missing and cannot be made again"
        if not problem:
            return True
        await asyncio.to_thread(self.store.close_round, row.round, "failed", None, {"seconds": 0.0},
                                {"restart": f"could not resume: {problem}"})
        self._last_closed = row.round
        self.metrics.note_failure("", row.round, f"{row.kind} round closed at restart", problem)
        self.log.error("the interrupted round cannot resume; it is closed as failed and the next round starts",
                       round=row.round, kind=row.kind, reason=problem)
        self._spawn(asyncio.to_thread(self._after_close, row.round))
        return False

    async def check_served(self, sha: str) -> None:
        """Before an artefact is served: it still hashes to its name (one stat when it was
        checked and has not changed since). A damaged one is quarantined and restored from an
        intact copy, or refused (CorruptFileError); several downloads asking at once share one check."""
        if self.artifacts.known_good(sha):
            return
        pending = self._checking.get(sha)
        if pending is None:
            pending = self._checking[sha] = asyncio.ensure_future(asyncio.to_thread(self.recovery.served_ok, sha))
            pending.add_done_callback(lambda _f: self._checking.pop(sha, None))
        await asyncio.shield(pending)

    # ---------------------------------------------------------------- the teacher
    async def teacher_labels(self, questions: Sequence[Question],
                             prompts: Sequence[OpenPrompt] = ()) -> tuple[str, dict[str, int]]:
        """A labelled pack for `questions` (option distributions) and `prompts` (generated
        answers) from the current teacher: (artefact sha256, {"scored": tokens, "generated":
        tokens}). Content-addressed and cached: the same teacher, adapter, temperature and
        items are labelled once, also across restarts."""
        assert self.teacher is not None
        d = self.cfg.distill
        version = self.store.get_meta("teacher_adapter") or "initial"
        ident: list[Any] = [self.cfg.teacher.model, self.cfg.teacher.quantization, version, d.temperature,
                            [q.id for q in questions]]
        if prompts:   # appended only when present: multiple-choice packs keep the keys they had
            ident.append([d.max_new_tokens, [p.id for p in prompts]] + ([d.top_k] if d.top_k else []))
        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()
        cached = self.store.get_meta(f"labels:{key}")
        # (bool(): mypy would type to_thread's result after the `and`'s left operand, str | None)
        if cached and bool(await asyncio.to_thread(self.recovery.artifact_ok, cached, "label_pack",
                                                   "the teacher labels the slice again")):
            return cached, {"scored": 0, "generated": 0}
        t0 = time.monotonic()
        probs: Any = []
        scored = 0
        if questions:
            probs = await self.teacher.call(lambda b: b.label(questions, d.temperature))
            scored = await self.teacher.call(lambda b: b.count_tokens(questions))
        texts: list[str] = []
        generated = 0
        token_ids: list[tuple[int, ...]] = []
        topk: list[Any] = []
        vocab = ""
        if prompts:
            def answer(b: Any) -> tuple[list[Any], str, list[list[int]]]:   # on the teacher's thread, in one go
                gens = b.generate([prompt_text(p) for p in prompts], d.max_new_tokens, d.top_k)
                voc = b.vocab() if d.top_k else ""
                return gens, voc, [b.answer_ids(g.token_ids) for g in gens] if voc else []

            gens, vocab, cut = await self.teacher.call(answer)
            texts = [open_answer(g.text) for g in gens]
            generated = sum(max(len(g.token_ids), len(g.logprobs)) for g in gens)
            if d.top_k and not vocab:
                self.log.warning("top_k is set but this teacher backend gives no token ids; sending text only")
            # the same tokens as the text (cut at its first line break) and their top-k
            token_ids = [tuple(ids) for ids in cut]
            topk = [tuple(g.top[: len(ids)]) for g, ids in zip(gens, cut)]
        pack = Pack(tuple(questions), tuple(tuple(float(x) for x in row) for row in probs),
                    self.cfg.teacher.model, d.temperature, tuple(prompts), tuple(texts),
                    tuple(token_ids), tuple(topk), vocab)
        sha = await asyncio.to_thread(self.artifacts.put, pack.to_bytes())
        await asyncio.to_thread(self.store.set_meta, f"labels:{key}", sha)
        self.log.info("teacher labelled a pool slice", questions=len(questions), open_prompts=len(prompts),
                      tokens=scored, generated=generated, seconds=round(time.monotonic() - t0, 1), sha256=sha[:12])
        return sha, {"scored": scored, "generated": generated}

    async def save_teacher(self, number: int) -> None:
        """Write the teacher's adapter as a PEFT directory; it becomes the teacher's state of
        record only when the round's commit records it (same transaction)."""
        assert self.teacher is not None
        path = self.checkpoint_dir / str(number) / "teacher-adapter"
        await self.teacher.call(lambda b: b.save_adapter(path))
        weights = path / "adapter_model.safetensors"
        self._teacher_saved_sha = await asyncio.to_thread(file_sha256, weights) if weights.is_file() else ""
        self._teacher_saved = str(path)

    async def evaluate_teacher(self, number: int) -> EvalResult | None:
        if self.teacher is None or not self.teacher_eval:
            return None
        result = await self.teacher.call(lambda b: b.evaluate(self.teacher_eval))
        await asyncio.to_thread(self.store.add_eval, number, "teacher", result.count, result.metrics())
        self.log.info("teacher evaluated", round=number, accuracy=round(result.accuracy, 4), loss=round(result.loss, 4))
        return result

    def exchange_index(self, number: int, kind: str) -> int:
        """How many `kind` rounds the schedule ran before round `number`: picks the pool slice."""
        return sum(1 for n in range(1, number) if self.cfg.schedule.kind_of(n) == kind)

    def last_school_accuracies(self, schools: Sequence[str]) -> dict[str, float]:
        """Each school's most recent held-out accuracy (1.0 before it reported any); one read."""
        latest: dict[str, float] = {}
        for e in self.store.evals():   # ordered by round
            if e["source"] in schools and "accuracy" in e["metrics"]:
                latest[e["source"]] = float(e["metrics"]["accuracy"])
        return {sid: latest.get(sid, 1.0) for sid in schools}

    def count_dense(self, number: int, sent: int, dense: int) -> None:
        acc = self._dense_bytes.setdefault(number, [0, 0])
        acc[0] += sent
        acc[1] += dense

    # ---------------------------------------------------------------- strategy memory
    def _strategy_state_path(self, number: int) -> Path:
        return self.cfg.server.state_dir / "strategy" / f"round-{number}.safetensors"

    def _save_strategy_state(self, number: int) -> None:
        """Keyed by round: a crash before the commit is recorded resumes from round N-1's state."""
        tensors, meta = self.strategy.state()
        header = {"strategy": json.dumps(self.strategy.describe()), "meta": json.dumps(meta)}
        data = tensors_to_bytes(tensors, header)
        atomic_write_bytes(self._strategy_state_path(number), data)
        self._strategy_saved = f"{number}:{sha256_hex(data)}"   # recorded by the commit, checked at a restart
        for old in self._strategy_state_path(number).parent.glob("round-*.safetensors"):
            n = old.stem.removeprefix("round-")
            if n.isdigit() and int(n) < number - 1:   # keep N and N-1
                old.unlink(missing_ok=True)

    def _load_strategy_state(self) -> None:
        last = self.store.last_committed_round()
        if last == 0:
            return
        path = self._strategy_state_path(last)
        if not path.exists():
            self.log.warning("no saved strategy state for the last committed round; server moments start from zero",
                             round=last, path=str(path))
            return
        loaded = self.recovery.strategy_state(path, last)   # checked against the sha256 the commit recorded
        if loaded is None:
            return
        tensors, header = loaded
        saved = json.loads(header.get("strategy", "{}"))
        if saved != json.loads(json.dumps(self.strategy.describe())):
            self.log.warning("strategy or its options changed since the last round; its saved state is not loaded",
                             saved=saved, now=self.strategy.describe())
            return
        self.strategy.load_state(tensors, json.loads(header.get("meta", "{}")))
        self.log.info("strategy state restored", round=last, tensors=len(tensors))

    # ---------------------------------------------------------------- sessions
    # Per-school session lines (joined, attached, detached, timed out): one each while they are
    # few; past SESSION_LINES in a SESSION_WINDOW_S window the rest are counted and logged as
    # one summary line per window. A coordinator restart at 10,000 schools is 30,000 lines in
    # a minute or two, over journald's default rate limit (10,000 per 30 s), which then drops
    # lines that matter along with them (docs/SCALING.md).
    SESSION_LINES = 20
    SESSION_WINDOW_S = 10.0
    LIVE_SCHOOLS_MAX = 1000   # live.json lists every connected school up to this many

    def note_session(self, event: str, school_id: str, logger: Any = None, warn: bool = False, **fields: Any) -> None:
        """Log a per-school session event, or count it into the window's summary."""
        now = time.monotonic()
        if now - self._notes_start >= self.SESSION_WINDOW_S:
            self.flush_session_notes(now)
        self._notes_lines += 1
        if self._notes_lines <= self.SESSION_LINES:
            out = logger or self.log
            (out.warning if warn else out.info)(event, school=school_id, connected=len(self.sessions), **fields)
        else:
            self._notes_skipped[event] = self._notes_skipped.get(event, 0) + 1

    def flush_session_notes(self, now: float | None = None, force: bool = False) -> None:
        """Write the summary of a finished window (publish_status calls this every 2 s)."""
        now = time.monotonic() if now is None else now
        if not force and now - self._notes_start < self.SESSION_WINDOW_S:
            return
        if self._notes_skipped:
            counts = {k.replace(" ", "_"): v for k, v in sorted(self._notes_skipped.items())}
            (self.log.warning if "session timed out" in self._notes_skipped else self.log.info)(
                "school sessions", window_s=round(min(now - self._notes_start, 3600.0), 1), connected=len(self.sessions),
                note=f"counts of per-school lines not written one by one (more than {self.SESSION_LINES} in the window)",
                **counts)
        self._notes_start, self._notes_lines, self._notes_skipped = now, 0, {}

    def attach(self, school_id: str, caps: Capabilities) -> SchoolSession:
        old = self.sessions.get(school_id)
        if old is not None:   # a reconnect supersedes the old stream
            old.queue.put_nowait(ShutdownCommand("superseded by a newer session"))
        sess = SchoolSession(school_id, caps)
        self.sessions[school_id] = sess
        rnd = self.current
        if rnd is not None and school_id in rnd.pending():
            sess.queue.put_nowait(KINDS[rnd.kind].command(self, rnd, school_id))
        self._changed.set()
        self.note_session("school attached", school_id)
        return sess

    def detach(self, sess: SchoolSession) -> None:
        if self.sessions.get(sess.school_id) is sess:
            del self.sessions[sess.school_id]
            for due in self._evals_due.values():   # its queued evaluate command went with the stream
                due.discard(sess.school_id)
            self._changed.set()
            self.note_session("school detached", sess.school_id)

    def end_sessions(self, reason: str) -> None:
        """The coordinator is stopping: end every Session stream with a (non-final) Shutdown, so
        each handler returns normally instead of being cancelled when the server's grace runs
        out; the schools reconnect with backoff."""
        for sess in list(self.sessions.values()):
            sess.queue.put_nowait(ShutdownCommand(reason))

    def live_status(self) -> dict[str, Any]:
        """What is happening now (for `fedserver status` and the demo); not durable state."""
        rnd = self.current
        if len(self.sessions) <= self.LIVE_SCHOOLS_MAX:
            schools = {sid: s.progress or "connected" for sid, s in sorted(self.sessions.items())}
        else:   # thousands: all of them would be ~250 KB and several ms of CPU every 2 s (docs/SCALING.md)
            schools = dict(sorted((sid, s.progress) for sid, s in self.sessions.items() if s.progress)[: self.LIVE_SCHOOLS_MAX])
        return {
            "time": time.time(),
            "phase": self.phase,
            "connected": len(self.sessions),
            "schools_listed": "all" if len(schools) == len(self.sessions) else f"{len(schools)} with progress to report",
            "round": rnd.number if rnd else None,
            "kind": rnd.kind if rnd else None,
            "participants": rnd.participants if rnd else [],
            "accepted": sorted(rnd.accepted) if rnd else [],
            "failed": dict(rnd.failed) if rnd else {},
            "deadline_in_s": round(rnd.deadline - time.time(), 1) if rnd else None,
            "schools": schools,
        }

    async def publish_status(self, path: Path, every_s: float = 2.0) -> None:
        """Write live_status() to `path` atomically every few seconds until cancelled."""
        while True:
            data = json.dumps(self.live_status())
            await asyncio.to_thread(atomic_write_text, path, data, fsync=False)
            await self._flush_bytes()   # a crash loses at most a few seconds of byte counts
            self.flush_session_notes()
            self.school_lines.summarise(self.log)
            await asyncio.sleep(every_s)

    async def flush_bytes(self) -> None:
        """Store the byte counters held in memory (on stop: the open round resumes with them)."""
        await self._flush_bytes()

    async def _flush_bytes(self) -> None:
        """Write the byte counters of every round that has some (the open one, and the last
        closed one: its adapter is downloaded for evaluation after it closed)."""
        pending, self._bytes = self._bytes, {}
        for number, (up, down) in sorted(pending.items()):
            if (up or down) and number > 0:
                await asyncio.to_thread(self.store.add_bytes, number, up, down)

    def count_bytes(self, up: int = 0, down: int = 0) -> None:
        # Between rounds: the round last closed (its adapter is being downloaded for evaluation).
        rnd = self.current.number if self.current else self._last_closed
        acc = self._bytes.setdefault(rnd, [0, 0])
        acc[0] += up
        acc[1] += down
        if up:
            self.metrics.bytes_received.inc(up)
        if down:
            self.metrics.bytes_sent.inc(down)

    async def report_failure(self, school_id: str, f: Failure) -> None:
        message = school_text(f.message)   # the school's own words: cut short, control characters escaped
        if f.phase == "evaluate":
            self._eval_answered(f.round, school_id)
            self.school_lines.log(self.log, "warning", "school could not evaluate", school_id,
                                  school=school_id, round=f.round, error=message)
            return
        async with self._lock:
            rnd = self.current
            if rnd is None or f.round != rnd.number or school_id not in rnd.pending():
                return
            rnd.failed[school_id] = f"{f.phase}: {message}"
            self.metrics.school_failure(school_id, rnd.number, f.phase, message)
            KINDS[rnd.kind].fail(self, rnd, school_id, rnd.failed[school_id])
            self.school_lines.log(self.log, "warning", "school reported failure", school_id,
                                  school=school_id, round=rnd.number, phase=f.phase, error=message)
            self._changed.set()

    def _refuse_eval(self, school_id: str, r: EvalReport, why: str) -> None:
        self.school_lines.log(self.log, "warning", "evaluation report refused", school_id,
                              school=school_id, round=r.round, reason=school_text(why, 200))
        self.metrics.refusal("EvalReport", "INVALID_ARGUMENT", ValueError(why))
        self.metrics.note_failure(school_id, r.round, "evaluation report refused", why)

    async def report_eval(self, school_id: str, r: EvalReport) -> None:
        """A school's evaluation: taken only for a round it was asked to evaluate, once, with
        at most the questions asked for and sane numbers; anything else is logged and dropped."""
        asked = self.cfg.evaluation.school_max_examples or 32
        problem = eval_report_problem(r.num_examples, r.metrics, asked)
        async with self._lock:
            rnd = self.current
            in_round = rnd is not None and rnd.kind == "evaluate" and r.round == rnd.number and school_id in rnd.pending()
            if not in_round and school_id not in self._evals_due.get(r.round, ()):
                self._refuse_eval(school_id, r, f"round {r.round} was not asked of this school, or was answered already")
                return
            if problem:
                self._refuse_eval(school_id, r, problem)
                if in_round:
                    assert rnd is not None
                    rnd.failed[school_id] = f"evaluate: report refused: {problem}"
                    KINDS[rnd.kind].fail(self, rnd, school_id, rnd.failed[school_id])
                    self._changed.set()
                self._eval_answered(r.round, school_id)
                return
            if in_round:
                assert rnd is not None
                # An evaluate round's result: stored first (the store is its receipt), then folded.
                await asyncio.to_thread(self.store.add_eval, r.round, school_id, r.num_examples, r.metrics)
                KINDS[rnd.kind].fold(self, rnd, school_id, r.num_examples, r.metrics, Path())
                rnd.accepted.add(school_id)
                self._changed.set()
                return
        if r.num_examples > 0:   # 0: the school has no held-out questions
            await self._eval_rows.add((r.round, school_id, r.num_examples, r.metrics))
        self._eval_answered(r.round, school_id)

    def _eval_answered(self, round_: int, school_id: str) -> None:
        due = self._evals_due.get(round_)
        if due is not None and school_id in due:
            due.discard(school_id)
            self._changed.set()

    async def _await_school_evals(self, round_: int) -> None:
        """Before the schools are told to shut down: let them report the last round's
        evaluation (for at most [evaluation] school_timeout_s; a school that leaves is not
        waited for)."""
        due = self._evals_due.get(round_, set())
        end = time.time() + self.cfg.evaluation.school_timeout_s
        if due:
            self.log.info("waiting for the schools' evaluation of the last round", round=round_, schools=sorted(due))
        while due and time.time() < end:
            await self._wait_change(min(1.0, end - time.time()))
        if due:
            self.log.warning("schools did not report their evaluation of the last round", round=round_, schools=sorted(due))

    # ---------------------------------------------------------------- uploads
    def check_upload_allowed(self, school_id: str, h: UploadHeader) -> None:
        """Cheap checks before any byte is stored."""
        rnd = self.current
        if rnd is None:
            raise WrongRoundError(f"no round is open; round {h.round} is closed. Wait for the next command")
        if h.round != rnd.number:
            raise WrongRoundError(f"upload is for round {h.round} but round {rnd.number} is open; wait for the next command")
        if school_id not in rnd.participants:
            raise WrongRoundError(f"school {school_id!r} is not a participant of round {rnd.number}")
        if school_id in rnd.accepted:
            raise DuplicateUploadError(f"school {school_id!r} already has an accepted result for round {rnd.number}; replays are refused")
        KINDS[rnd.kind].check(self, rnd, school_id, h)
        if h.base_sha256 and h.base_sha256 != rnd.global_sha:
            raise WrongRoundError(f"upload was computed against adapter {h.base_sha256[:12]}… but round {rnd.number} uses "
                                  f"{rnd.global_sha[:12]}…; download it again")

    def stream_check(self, school_id: str, h: UploadHeader) -> StreamCheck | None:
        """What checks this upload's bytes as they arrive (the open round kind's), if anything."""
        rnd = self.current
        if rnd is None or rnd.number != h.round:
            return None
        return KINDS[rnd.kind].stream_check(self, rnd, school_id, h)

    async def accept_upload(self, school_id: str, h: UploadHeader, payload_path: Path, received_digest: str | None = None,
                            check: StreamCheck | None = None) -> Receipt:
        """Validate a complete upload (the round kind's checks) and fold it in. Validation runs
        concurrently across schools, unlocked; only the receipt and the fold are serialised.
        Receipt first, then fold: a crash in between is repaired at start-up by re-folding
        receipts; none is applied twice."""
        self.check_upload_allowed(school_id, h)
        if school_id in self._accepting:
            raise DuplicateUploadError(f"another upload from school {school_id!r} is being accepted for round {h.round}; "
                                       "wait for its receipt (UploadStatus tells)")
        rnd = self.current
        assert rnd is not None
        kind = KINDS[rnd.kind]
        self._accepting.add(school_id)
        try:
            t0 = time.monotonic()
            final, result, kept = await kind.accept(self, rnd, school_id, h, payload_path, received_digest or "", check)
            async with self._lock:
                try:
                    if self.current is not rnd:
                        raise WrongRoundError(f"round {rnd.number} closed while this upload was being validated; wait for the next command")
                    self.check_upload_allowed(school_id, h)
                except Exception:
                    final.unlink(missing_ok=True)   # validated but never receipted: not kept
                    raise
                rc = Receipt(rnd.number, school_id, upload_key(school_id, h.upload_id), h.digest, h.num_examples, dict(h.metrics),
                             str(final), kept)
                await asyncio.to_thread(self.store.add_receipt, rc)
                t1 = time.monotonic()
                await asyncio.to_thread(kind.fold, self, rnd, school_id, h.num_examples, h.metrics, final, result)
                rnd.accepted.add(school_id)
        finally:
            self._accepting.discard(school_id)
        self.metrics.upload_accepted(rnd.kind, school_id, t1 - t0, time.monotonic() - t1)
        self.metrics.accepted.set(len(rnd.accepted))
        # (no malloc_trim here: the heap pages this upload's transfer freed are reused by the
        # next one; trimming them after every upload cost the coordinator 8-10% of its CPU per
        # round at K = 2 in page faults. The close's _after_close trims once per round.)
        if school_id in self.sessions:
            self.sessions[school_id].progress = f"{kind.name} result accepted for round {rnd.number}"
        self.log.info("result accepted", school=school_id, round=rnd.number, kind=rnd.kind, examples=h.num_examples,
                      accepted=len(rnd.accepted), participants=len(rnd.participants))
        self._changed.set()
        return rc

    # ---------------------------------------------------------------- the loop
    async def _wait_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when the
            # event is set as the task is cancelled, losing the cancellation (a stop then hung)
            async with asyncio.timeout(max(0.01, timeout)):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Run rounds until `rounds.total` are committed (forever if 0), then shut schools down."""
        total = self.cfg.rounds.total
        started = time.monotonic()
        failed_in_a_row = 0
        while total == 0 or self.store.committed_rounds() < total:
            if self.current is None:
                self.phase = "waiting for schools"
                while len(self.sessions) < self.cfg.rounds.min_schools:
                    limit = self.cfg.rounds.start_timeout_s
                    if limit and time.monotonic() - started > limit:
                        raise TimeoutError(f"only {len(self.sessions)} of {self.cfg.rounds.min_schools} schools joined within {limit:.0f} s")
                    await self._wait_change(1.0)
                opened = await self._open_next()
            else:
                opened = True
            rnd = self.current
            if opened and rnd is not None:
                while not self._should_close(rnd):
                    await self._wait_change(min(1.0, rnd.deadline - time.time()))
                ok = await self._close(rnd)
                why: Any = rnd.failed
            else:
                ok, why = False, "the round could not be planned (see the log)"
            if ok:
                failed_in_a_row = 0
            else:
                failed_in_a_row += 1
                limit = self.cfg.rounds.max_failed_rounds
                if limit and failed_in_a_row >= limit:
                    raise RuntimeError(f"{failed_in_a_row} rounds in a row failed; last failures: {why}. "
                                       "Fix the cause (see the schools' errors and this log) and restart the coordinator")
        for task in list(self._eval_tasks):
            await task
        await self._await_school_evals(self.store.last_round_number())
        await self._flush_bytes()
        for sess in list(self.sessions.values()):
            sess.queue.put_nowait(ShutdownCommand(f"federation finished after {total} rounds", final=True))
        self.phase = "finished"
        self.finished.set()

    async def _open_next(self) -> bool:
        number = self.store.last_round_number() + 1
        kind = KINDS[self.cfg.schedule.kind_of(number)]
        connected = sorted(self.sessions)
        want = max(self.cfg.rounds.min_schools, round(self.cfg.rounds.fraction * len(connected)))
        participants = sorted(random.Random(number).sample(connected, min(want, len(connected))))
        rnd = OpenRound(number, kind.name, participants, self.global_sha, self.global_state, 0.0)
        kind.begin(self, rnd)
        self.phase = f"planning round {number}"
        self.planning = (number, kind.name)
        planned = time.monotonic()
        # The plan may take long (the teacher labels a pool slice); the deadline starts after it.
        try:
            rnd.plan = await kind.plan(self, number, participants)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # e.g. the teacher could not label: this round fails, the loop goes on
            self.log.error("could not plan the round", round=number, kind=kind.name, error=repr(exc))
            self.metrics.note_failure("", number, f"{kind.name} round could not be planned", repr(exc))
            self.planning = None
            self.metrics.round_seconds.labels(kind.name, "failed").observe(time.monotonic() - planned)
            await asyncio.to_thread(self.store.open_round, number, participants, self.global_sha, time.time(), kind.name, {})
            await asyncio.to_thread(self.store.close_round, number, "failed", None, {"seconds": 0.0},
                                    {"plan": f"{kind.name} round could not be planned: {exc!r}"[:500]})
            self._last_closed = number
            return False
        self.planning = None
        rnd.deadline = time.time() + self.cfg.rounds.deadline_s
        rnd.started = time.monotonic()
        rnd.plan_seconds = rnd.started - planned
        self.metrics.phase_seconds.labels(kind.name, "plan").observe(rnd.plan_seconds)
        await asyncio.to_thread(self.store.open_round, number, participants, self.global_sha, rnd.deadline, kind.name, rnd.plan)
        self.current = rnd
        self.phase = "collecting results"
        self.metrics.current_round.set(number)
        self.metrics.participants.set(len(participants))
        self.metrics.accepted.set(0)
        # Who is connected now, once: a participant that left while the round was planned gets
        # nothing (it stays a participant: if it comes back, attach() sends its command; if not,
        # the close counts it as disconnected), and a school leaving during this fan-out is not
        # looked up again.
        # Only participants hear of the round: a school not selected gets nothing (an
        # IdleCommand each was 9,000 messages per round at 10,000 schools, for daemons that
        # ignore it; docs/SCALING.md).
        chosen = set(participants)
        live = [(sid, sess) for sid, sess in self.sessions.items() if sid in chosen]
        for sid, sess in live:
            sess.queue.put_nowait(kind.command(self, rnd, sid))
        gone = sorted(chosen - {sid for sid, _ in live})
        self.log.info("round opened", round=number, kind=kind.name, participants=participants,
                      deadline_s=self.cfg.rounds.deadline_s, **({"left_while_planned": gone} if gone else {}))
        return True

    def _should_close(self, rnd: OpenRound) -> bool:
        pending = rnd.pending()
        if not pending or time.time() >= rnd.deadline:
            return True
        # Dropped schools do not hold a round hostage once a quorum is in.
        return len(rnd.accepted) >= self.cfg.rounds.quorum and not (pending & set(self.sessions))

    async def _close(self, rnd: OpenRound) -> bool:
        """Commit (True) or fail (False) the round."""
        async with self._lock:
            kind = KINDS[rnd.kind]
            self.phase = f"closing round {rnd.number}"
            closing = time.monotonic()
            self.metrics.phase_seconds.labels(rnd.kind, "collect").observe(closing - rnd.started)
            for sid in rnd.pending():
                reason = "disconnected" if sid not in self.sessions else "no result by the deadline"
                rnd.failed[sid] = reason
                kind.fail(self, rnd, sid, reason)
                self.metrics.note_failure(sid, rnd.number, f"{rnd.kind} round", reason)
            await self._flush_bytes()
            committed = len(rnd.accepted) >= self.cfg.rounds.quorum
            sent, dense = self._dense_bytes.pop(rnd.number, [0, 0])
            commit = None
            copy: tuple[str, str] | None = None
            self._teacher_saved, self._teacher_saved_sha, self._strategy_saved = "", "", ""
            if committed:
                try:
                    commit = await kind.commit(self, rnd)
                except RoundFailed as exc:
                    self.log.error("the round could not be committed; the global adapter is kept",
                                   round=rnd.number, kind=rnd.kind, error=str(exc))
                    rnd.failed["commit"] = str(exc)
                    self.metrics.note_failure("", rnd.number, f"{rnd.kind} round could not be committed", str(exc))
                    committed = False
                    await self._recheck_global()
                self.metrics.commit_seconds.labels(rnd.kind).observe(time.monotonic() - closing)
            if committed and commit is not None:
                sha = commit.sha
                metrics = {**commit.metrics}
                if dense:   # some uploads were compressed: what they cost against dense float32 payloads
                    metrics.update(upload_bytes=float(sent), upload_bytes_dense=float(dense), upload_bytes_saved=float(dense - sent))
                committed_at = time.monotonic()
                metrics = await asyncio.to_thread(self._commit_files, rnd, commit, metrics)
                # `seconds`: the whole round, planning and close included (all but the commit's own row)
                metrics["seconds"] = time.monotonic() - rnd.started + rnd.plan_seconds
                seconds = metrics["seconds"]
                meta = {"teacher_adapter": self._teacher_saved,
                        "teacher_adapter_sha256": self._teacher_saved_sha} if self._teacher_saved else {}
                if self._strategy_saved:
                    meta["strategy_state_sha256"] = self._strategy_saved
                await asyncio.to_thread(self.store.close_round, rnd.number, "committed", sha, metrics, rnd.failed, meta)
                self.log.info("round committed", round=rnd.number, kind=rnd.kind, accepted=len(rnd.accepted),
                              failed=len(rnd.failed), sha256=sha[:12], seconds=round(seconds, 3),
                              close_s=round(time.monotonic() - closing, 4), aggregate_s=round(committed_at - closing, 4))
                if commit.state is not None:
                    copy = (sha, self.global_sha)   # a second copy of the new adapter, after the close
                    self.global_sha, self.global_state = sha, await self._hold_global(sha, commit.state)
                    self._after_commit(rnd.number, sha, commit.state)
            else:
                seconds = time.monotonic() - rnd.started + rnd.plan_seconds
                await asyncio.to_thread(self.store.close_round, rnd.number, "failed", None,
                                        {"seconds": seconds, "updates": float(len(rnd.accepted))}, rnd.failed)
                self.log.warning("round failed", round=rnd.number, kind=rnd.kind, accepted=len(rnd.accepted),
                                 quorum=self.cfg.rounds.quorum, failed=rnd.failed)
            self.current = None
            self._last_closed = rnd.number
            outcome = "committed" if committed and commit is not None else "failed"
            end = time.monotonic()
            self.metrics.phase_seconds.labels(rnd.kind, "commit").observe(end - closing)
            self.metrics.round_seconds.labels(rnd.kind, outcome).observe(end - rnd.started + rnd.plan_seconds)
            self.metrics.current_round.set(0)
            self.metrics.participants.set(0)
            self.metrics.accepted.set(0)
            self.phase = "between rounds"
        # The round's update files are no longer needed (its commit is recorded), and the
        # memory its uploads and aggregation used goes back to the system: off the loop, unlocked.
        self._spawn(asyncio.to_thread(self._after_close, rnd.number, copy))
        return committed

    def _after_close(self, number: int, copy: tuple[str, str] | None = None) -> None:
        shutil.rmtree(self.updates_dir / f"round-{number}", ignore_errors=True)
        if copy is not None:   # (new global, previous): a separate second copy of the new one, the previous kept
            self.recovery.keep_copy(copy[0], keep={copy[1]})
        release_memory(collect=False)

    def _commit_files(self, rnd: OpenRound, commit: Any, metrics: dict[str, float]) -> dict[str, float]:
        """A committed round's files before its row: the strategy's state, then the PEFT
        checkpoint (sharing the artefact's bytes). Returns the round's metrics with the
        schools' reported ones. One worker-thread call."""
        self._save_strategy_state(rnd.number)
        metrics = {**self._school_metrics(rnd.number), **metrics}
        if commit.state is not None:
            self._checkpoint(rnd.number, commit.state,
                             {"round": rnd.number, "kind": rnd.kind, "sha256": commit.sha, "participants": rnd.participants,
                              "accepted": sorted(rnd.accepted), "metrics": metrics}, commit.sha)
        return metrics

    def _school_metrics(self, number: int) -> dict[str, float]:
        """train_<name>: the example-weighted mean of what the schools reported (loss, tokens...)."""
        sums: dict[str, float] = {}
        total = 0
        for rc in self.store.receipts(number):
            total += rc.num_examples
            for k, v in rc.metrics.items():
                sums[k] = sums.get(k, 0.0) + rc.num_examples * float(v)
        return {f"train_{k}": v / total for k, v in sums.items()} if total else {}

    def _after_commit(self, number: int, sha: str, state: dict[str, torch.Tensor]) -> None:
        if self._evaluate is not None:
            self._spawn_eval(number, state)   # the new adapter as committed, in memory: not read back
        n = self.cfg.evaluation.school_max_examples
        if n > 0:
            cmd = EvaluateCommand(number, 0.0, self.artifacts.ref(sha), n)
            # who was asked, per round (a late answer to an older round is still taken); the
            # final shutdown waits only for the newest round's
            self._evals_due = {n: due for n, due in self._evals_due.items() if n > number - 10 and due}
            self._evals_due[number] = set(self.sessions)
            for sess in self.sessions.values():
                sess.queue.put_nowait(cmd)

    async def _recheck_global(self) -> None:
        """After a commit that failed: if the global adapter was lost meanwhile (damaged on disk
        with no intact copy), fall back to the newest intact one now, as a restart would,
        rather than fail every round after this one."""
        try:
            await asyncio.to_thread(self.artifacts.verify, self.global_sha)
            return
        except (CorruptFileError, NotFoundError):
            pass
        sha, state = await asyncio.to_thread(self.recovery.load_global, self.global_sha)
        self.global_sha, self.global_state = sha, await self._hold_global(sha, state)

    async def _hold_global(self, sha: str, state: State) -> State:
        """The global adapter as the engine holds it between commits: read from its artefact
        file when a round needs it (FileState: not held in memory through the round, as
        uploads are folded from their files); the tensors in memory only when the file cannot
        be read that way. A file that changes on disk meanwhile is checked again, and restored
        from its kept copy if damaged, before it is read (fedserver/integrity.py)."""
        if not self.artifacts.blake3(sha):   # announced with the adapter: schools check downloads by it
            with contextlib.suppress(CorruptFileError, NotFoundError, OSError):   # then sha256 is checked instead
                await asyncio.to_thread(self.artifacts.learn_blake3, sha)
        lazy = await asyncio.to_thread(FileState.open, self.artifacts.path(sha), lambda: self.recovery.served_ok(sha))
        return lazy if lazy is not None else state

    def _spawn_eval(self, number: int, state: dict[str, torch.Tensor] | None) -> None:
        assert self._evaluate is not None
        self._spawn(self._evaluate(number, state))

    def _spawn(self, work: Any) -> None:
        """Background evaluation work; the final shutdown waits for it."""
        task = asyncio.create_task(work)
        self._eval_tasks.add(task)
        task.add_done_callback(self._eval_tasks.discard)

    def _checkpoint(self, number: int, state: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                    artefact_sha: str = "") -> None:
        """Round `number`'s PEFT directory. `artefact_sha`: the artefact holding exactly
        tensors_to_bytes(state); without merged tensors its file is hard-linked, not re-serialised."""
        path = self.checkpoint_dir / str(number) / "adapter"
        path.parent.mkdir(parents=True, exist_ok=True)
        lora, merged = split_merge(state)
        if merged:   # FLoRA / FedEx-LoRA: the model is W₀ + B_m A_m + the adapter; PEFT cannot hold B_m A_m
            atomic_write_bytes(path.parent / MERGED_FILE, tensors_to_bytes(merged))
        shared = self.artifacts.path(artefact_sha) if artefact_sha and not merged else None
        write_peft_dir(path, lora, self.settings, self.cfg.model.base, extra=info, weights_file=shared)

