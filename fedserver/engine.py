"""The round engine: picks participants, pushes commands, folds accepted updates into the
strategy, closes rounds at quorum or deadline, and checkpoints. The only place rounds run."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import DuplicateUploadError, WrongRoundError
from common.files import atomic_write_bytes, atomic_write_text
from common.lora import MERGED_FILE, LoraSettings, TensorSpec, initial_state, split_merge, write_peft_dir
from common.logs import get_logger
from common.messages import ArtifactRef, Capabilities, Command, EvalReport, Failure, UploadHeader
from common.training import TrainParams
from common.wire import bytes_to_tensors, bytes_to_tensors_with_metadata, tensors_to_bytes
from fedserver.artifacts import ArtifactStore
from fedserver.config import CoordinatorConfig
from fedserver.store import Receipt, Store
from fedserver.strategy import ClientFailure, ClientUpdate, Strategy, StrategyContext
from fedserver.validation import validate_update


@dataclass
class SchoolSession:
    school_id: str
    capabilities: Capabilities
    queue: asyncio.Queue[Command] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    progress: str = ""


@dataclass
class OpenRound:
    number: int
    participants: list[str]
    global_sha: str
    global_state: dict[str, torch.Tensor]
    deadline: float   # unix seconds
    accepted: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def pending(self) -> set[str]:
        return set(self.participants) - self.accepted - set(self.failed)


class RoundEngine:
    def __init__(self, cfg: CoordinatorConfig, store: Store, artifacts: ArtifactStore,
                 layout: Mapping[str, TensorSpec], strategy: Strategy, checkpoint_dir: Path,
                 updates_dir: Path, evaluate: Callable[[int, dict[str, torch.Tensor] | None], Any] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.artifacts = artifacts
        self.layout = dict(layout)
        self.strategy = strategy
        self.checkpoint_dir = checkpoint_dir
        self.updates_dir = updates_dir   # accepted payloads of the open round, for restarts
        self.settings: LoraSettings = cfg.lora.settings()
        self._evaluate = evaluate   # async callable(round, state or None for the base model)
        self.sessions: dict[str, SchoolSession] = {}
        self.current: OpenRound | None = None
        self.global_sha = ""
        self.global_state: dict[str, torch.Tensor] = {}
        self._lock = asyncio.Lock()         # serialises accept/close of the open round
        self._changed = asyncio.Event()     # poked on join, leave, upload, failure
        self._bytes: dict[int, list[int]] = {}
        self._dense_bytes: dict[int, list[int]] = {}   # round -> [compressed bytes received, dense payload bytes they stand for]
        self._eval_tasks: set[asyncio.Task[Any]] = set()
        self._evals_due: dict[int, set[str]] = {}   # round -> schools asked to evaluate it that have not answered
        self.finished = asyncio.Event()
        self.log = get_logger("engine")

    # ---------------------------------------------------------------- start-up
    async def start(self) -> None:
        """Load the global adapter (or create round 0) and re-open an interrupted round,
        re-folding every receipted update from disk exactly once."""
        sha = self.store.get_meta("global_sha256")
        if sha is None:
            state = await asyncio.to_thread(initial_state, self.layout, self.cfg.lora.seed)
            data = await asyncio.to_thread(tensors_to_bytes, state)
            sha = await asyncio.to_thread(self.artifacts.put, data)
            await asyncio.to_thread(self._checkpoint, 0, state, {"round": 0, "note": "initial adapter (B = 0)"})
            await asyncio.to_thread(self.store.set_meta, "global_sha256", sha)
            self.log.info("initial adapter created", sha256=sha[:12], tensors=len(state))
        self.global_sha = sha
        self.global_state = bytes_to_tensors(await asyncio.to_thread(self.artifacts.get, sha))
        self.strategy.setup(StrategyContext(self.settings, self.layout, tuple(s.id for s in self.cfg.schools),
                                            self.cfg.server.state_dir / "strategy" / "scratch"))
        await asyncio.to_thread(self._load_strategy_state)
        row = self.store.open_round_row()
        if row is not None:
            rnd = OpenRound(row.round, row.participants, row.global_in,
                            bytes_to_tensors(await asyncio.to_thread(self.artifacts.get, row.global_in)), row.deadline)
            self.strategy.begin_round(rnd.number, rnd.global_state)
            for rc in self.store.receipts(row.round):
                await asyncio.to_thread(self._fold, rc)
                rnd.accepted.add(rc.school_id)
            self.current = rnd
            self.log.info("resumed open round", round=rnd.number, receipted=len(rnd.accepted))
        if self._evaluate is not None and not any(e["source"] == "server" and e["round"] == 0 for e in self.store.evals(0)):
            self._spawn_eval(0, None)

    def _fold(self, rc: Receipt) -> None:
        tensors = bytes_to_tensors(Path(rc.path).read_bytes())
        self.strategy.accumulate(ClientUpdate(rc.school_id, rc.round, rc.num_examples, tensors, rc.metrics, Path(rc.path)))

    # ---------------------------------------------------------------- strategy memory
    def _strategy_state_path(self, number: int) -> Path:
        return self.cfg.server.state_dir / "strategy" / f"round-{number}.safetensors"

    def _save_strategy_state(self, number: int) -> None:
        """Keyed by round: a crash before the commit is recorded resumes from round N-1's state."""
        tensors, meta = self.strategy.state()
        header = {"strategy": json.dumps(self.strategy.describe()), "meta": json.dumps(meta)}
        atomic_write_bytes(self._strategy_state_path(number), tensors_to_bytes(tensors, header))
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
        tensors, header = bytes_to_tensors_with_metadata(path.read_bytes())
        saved = json.loads(header.get("strategy", "{}"))
        if saved != json.loads(json.dumps(self.strategy.describe())):
            self.log.warning("strategy or its options changed since the last round; its saved state is not loaded",
                             saved=saved, now=self.strategy.describe())
            return
        self.strategy.load_state(tensors, json.loads(header.get("meta", "{}")))
        self.log.info("strategy state restored", round=last, tensors=len(tensors))

    # ---------------------------------------------------------------- sessions
    def attach(self, school_id: str, caps: Capabilities) -> SchoolSession:
        old = self.sessions.get(school_id)
        if old is not None:   # a reconnect supersedes the old stream
            old.queue.put_nowait(Command("shutdown", reason="superseded by a newer session"))
        sess = SchoolSession(school_id, caps)
        self.sessions[school_id] = sess
        rnd = self.current
        if rnd is not None and school_id in rnd.pending():
            sess.queue.put_nowait(self._train_command(rnd, school_id))
        self._changed.set()
        self.log.info("school attached", school=school_id, connected=len(self.sessions))
        return sess

    def detach(self, sess: SchoolSession) -> None:
        if self.sessions.get(sess.school_id) is sess:
            del self.sessions[sess.school_id]
            for due in self._evals_due.values():   # its queued evaluate command went with the stream
                due.discard(sess.school_id)
            self._changed.set()
            self.log.info("school detached", school=sess.school_id, connected=len(self.sessions))

    def live_status(self) -> dict[str, Any]:
        """What is happening now (for `fedserver status` and the demo); not durable state."""
        rnd = self.current
        return {
            "time": time.time(),
            "round": rnd.number if rnd else None,
            "participants": rnd.participants if rnd else [],
            "accepted": sorted(rnd.accepted) if rnd else [],
            "failed": dict(rnd.failed) if rnd else {},
            "deadline_in_s": round(rnd.deadline - time.time(), 1) if rnd else None,
            "schools": {sid: s.progress or "connected" for sid, s in sorted(self.sessions.items())},
        }

    async def publish_status(self, path: Path, every_s: float = 2.0) -> None:
        """Write live_status() to `path` atomically every few seconds until cancelled."""
        while True:
            data = json.dumps(self.live_status())
            await asyncio.to_thread(atomic_write_text, path, data, fsync=False)
            await asyncio.sleep(every_s)

    def count_bytes(self, up: int = 0, down: int = 0) -> None:
        rnd = self.current.number if self.current else self.store.last_round_number()
        acc = self._bytes.setdefault(rnd, [0, 0])
        acc[0] += up
        acc[1] += down

    async def report_failure(self, school_id: str, f: Failure) -> None:
        if f.phase == "evaluate":
            self._eval_answered(f.round, school_id)
            self.log.warning("school could not evaluate", school=school_id, round=f.round, error=f.message)
            return
        async with self._lock:
            rnd = self.current
            if rnd is None or f.round != rnd.number or school_id not in rnd.pending():
                return
            rnd.failed[school_id] = f"{f.phase}: {f.message}"
            self.strategy.record_failure(ClientFailure(school_id, rnd.number, rnd.failed[school_id]))
            self.log.warning("school reported failure", school=school_id, round=rnd.number, phase=f.phase, error=f.message)
            self._changed.set()

    async def report_eval(self, school_id: str, r: EvalReport) -> None:
        if r.num_examples > 0:   # 0: the school has no held-out questions
            await asyncio.to_thread(self.store.add_eval, r.round, school_id, r.num_examples, r.metrics)
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
            raise WrongRoundError(f"no round is open; round {h.round} is closed. Wait for the next train command")
        if h.round != rnd.number:
            raise WrongRoundError(f"update is for round {h.round} but round {rnd.number} is open; wait for the next train command")
        if school_id not in rnd.participants:
            raise WrongRoundError(f"school {school_id!r} is not a participant of round {rnd.number}")
        if school_id in rnd.accepted:
            raise DuplicateUploadError(f"school {school_id!r} already has an accepted update for round {rnd.number}; replays are refused")
        if h.base_sha256 and h.base_sha256 != rnd.global_sha:
            raise WrongRoundError(f"update was computed against adapter {h.base_sha256[:12]}… but round {rnd.number} uses {rnd.global_sha[:12]}…; download it again")
        if h.num_examples < 1:
            raise WrongRoundError("num_examples must be >= 1")

    async def accept_upload(self, school_id: str, h: UploadHeader, payload_path: Path, received_sha256: str | None = None) -> Receipt:
        """Validate a complete upload and fold it in. Receipt first, then fold: a crash in
        between is repaired at start-up by re-folding receipts; none is applied twice."""
        async with self._lock:
            self.check_upload_allowed(school_id, h)
            rnd = self.current
            assert rnd is not None
            payload = await asyncio.to_thread(payload_path.read_bytes)
            frozen = self._params_for(rnd, school_id).freeze   # the school may leave these (zero) deltas out
            tensors = await asyncio.to_thread(validate_update, payload, h.sha256, self.layout, self.cfg.rounds.max_norm,
                                              received_sha256, h.encoding, frozen)
            final = self.updates_dir / f"round-{rnd.number}" / f"{school_id}.safetensors"
            final.parent.mkdir(parents=True, exist_ok=True)
            if h.encoding or frozen:   # keep the decoded, complete update: restarts and spilling buffers read it back
                dense = await asyncio.to_thread(tensors_to_bytes, tensors)
                await asyncio.to_thread(atomic_write_bytes, final, dense, fsync=False)
                payload_path.unlink(missing_ok=True)
                acc = self._dense_bytes.setdefault(rnd.number, [0, 0])
                acc[0] += h.total_size
                acc[1] += len(dense)
            else:
                await asyncio.to_thread(payload_path.replace, final)
            rc = Receipt(rnd.number, school_id, h.upload_id, h.sha256, h.num_examples, dict(h.metrics), str(final))
            await asyncio.to_thread(self.store.add_receipt, rc)
            update = ClientUpdate(school_id, rnd.number, h.num_examples, tensors, dict(h.metrics), final)
            await asyncio.to_thread(self.strategy.accumulate, update)
            rnd.accepted.add(school_id)
            if school_id in self.sessions:
                self.sessions[school_id].progress = f"update accepted for round {rnd.number}"
            self.log.info("update accepted", school=school_id, round=rnd.number, examples=h.num_examples,
                          accepted=len(rnd.accepted), participants=len(rnd.participants))
            self._changed.set()
            return rc

    # ---------------------------------------------------------------- the loop
    def _params_for(self, rnd: OpenRound, school_id: str) -> TrainParams:
        params = self.strategy.configure_round(rnd.number, self.cfg.train.params(rnd.number))
        return self.strategy.configure_school(rnd.number, school_id, params)

    def _train_command(self, rnd: OpenRound, school_id: str) -> Command:
        ref = ArtifactRef(rnd.global_sha, self.artifacts.size(rnd.global_sha))
        return Command("train", rnd.number, rnd.deadline, ref, self._params_for(rnd, school_id))

    async def _wait_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(0.01, timeout))
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Run rounds until `rounds.total` are committed (forever if 0), then shut schools down."""
        total = self.cfg.rounds.total
        started = time.monotonic()
        failed_in_a_row = 0
        while total == 0 or self.store.committed_rounds() < total:
            if self.current is None:
                while len(self.sessions) < self.cfg.rounds.min_schools:
                    limit = self.cfg.rounds.start_timeout_s
                    if limit and time.monotonic() - started > limit:
                        raise TimeoutError(f"only {len(self.sessions)} of {self.cfg.rounds.min_schools} schools joined within {limit:.0f} s")
                    await self._wait_change(1.0)
                await self._open_next()
            rnd = self.current
            assert rnd is not None
            while not self._should_close(rnd):
                await self._wait_change(min(1.0, rnd.deadline - time.time()))
            if await self._close(rnd):
                failed_in_a_row = 0
            else:
                failed_in_a_row += 1
                limit = self.cfg.rounds.max_failed_rounds
                if limit and failed_in_a_row >= limit:
                    raise RuntimeError(f"{failed_in_a_row} rounds in a row failed to reach quorum; last failures: {rnd.failed}. "
                                       "Fix the cause (see the schools' errors) and restart the coordinator")
        for task in list(self._eval_tasks):
            await task
        await self._await_school_evals(self.store.last_round_number())
        for sess in list(self.sessions.values()):
            sess.queue.put_nowait(Command("shutdown", reason=f"federation finished after {total} rounds", final=True))
        self.finished.set()

    async def _open_next(self) -> None:
        number = self.store.last_round_number() + 1
        connected = sorted(self.sessions)
        want = max(self.cfg.rounds.min_schools, round(self.cfg.rounds.fraction * len(connected)))
        participants = sorted(random.Random(number).sample(connected, min(want, len(connected))))
        deadline = time.time() + self.cfg.rounds.deadline_s
        await asyncio.to_thread(self.store.open_round, number, participants, self.global_sha, deadline)
        rnd = OpenRound(number, participants, self.global_sha, self.global_state, deadline)
        self.strategy.begin_round(number, self.global_state)
        self.current = rnd
        for sid in participants:
            self.sessions[sid].queue.put_nowait(self._train_command(rnd, sid))
        for sid in set(connected) - set(participants):
            self.sessions[sid].queue.put_nowait(Command("idle", number, reason="not selected this round"))
        self.log.info("round opened", round=number, participants=participants, deadline_s=self.cfg.rounds.deadline_s)

    def _should_close(self, rnd: OpenRound) -> bool:
        pending = rnd.pending()
        if not pending or time.time() >= rnd.deadline:
            return True
        # Dropped schools do not hold a round hostage once a quorum is in.
        return len(rnd.accepted) >= self.cfg.rounds.quorum and not (pending & set(self.sessions))

    async def _close(self, rnd: OpenRound) -> bool:
        """Commit (True) or fail (False) the round."""
        async with self._lock:
            for sid in rnd.pending():
                reason = "disconnected" if sid not in self.sessions else "no update by the deadline"
                rnd.failed[sid] = reason
                self.strategy.record_failure(ClientFailure(sid, rnd.number, reason))
            up, down = self._bytes.pop(rnd.number, [0, 0])
            if up or down:
                await asyncio.to_thread(self.store.add_bytes, rnd.number, up, down)
            seconds = time.monotonic() - rnd.started
            committed = len(rnd.accepted) >= self.cfg.rounds.quorum
            sent, dense = self._dense_bytes.pop(rnd.number, [0, 0])
            result = None
            if committed:
                try:
                    result = await asyncio.to_thread(self.strategy.finalize)
                except (ValueError, ArithmeticError, RuntimeError) as exc:   # the rule could not aggregate this round
                    self.log.error("strategy could not aggregate; the round fails and the global adapter is kept",
                                   round=rnd.number, strategy=self.strategy.name, error=str(exc))
                    rnd.failed["strategy"] = f"{self.strategy.name}: {exc}"
                    committed = False
            if committed and result is not None:
                data = await asyncio.to_thread(tensors_to_bytes, result.state)
                sha = await asyncio.to_thread(self.artifacts.put, data)
                await asyncio.to_thread(self._save_strategy_state, rnd.number)
                school_metrics = await asyncio.to_thread(self._school_metrics, rnd.number)
                metrics = {**school_metrics, **result.metrics, "seconds": seconds}
                if dense:   # some uploads were compressed: what they cost against dense float32 payloads
                    metrics.update(upload_bytes=float(sent), upload_bytes_dense=float(dense), upload_bytes_saved=float(dense - sent))
                await asyncio.to_thread(self._checkpoint, rnd.number, result.state,
                                        {"round": rnd.number, "sha256": sha, "participants": rnd.participants,
                                         "accepted": sorted(rnd.accepted), "metrics": metrics})
                await asyncio.to_thread(self.store.close_round, rnd.number, "committed", sha, metrics, rnd.failed)
                self.global_sha, self.global_state = sha, result.state
                self.log.info("round committed", round=rnd.number, accepted=len(rnd.accepted),
                              failed=len(rnd.failed), sha256=sha[:12], seconds=round(seconds, 1))
                self._after_commit(rnd.number, sha)
            else:
                await asyncio.to_thread(self.store.close_round, rnd.number, "failed", None,
                                        {"seconds": seconds, "updates": float(len(rnd.accepted))}, rnd.failed)
                self.log.warning("round failed", round=rnd.number, accepted=len(rnd.accepted),
                                 quorum=self.cfg.rounds.quorum, failed=rnd.failed)
            self.current = None
            shutil.rmtree(self.updates_dir / f"round-{rnd.number}", ignore_errors=True)
            return committed

    def _school_metrics(self, number: int) -> dict[str, float]:
        """train_<name>: the example-weighted mean of what the schools reported (loss, tokens...)."""
        sums: dict[str, float] = {}
        total = 0
        for rc in self.store.receipts(number):
            total += rc.num_examples
            for k, v in rc.metrics.items():
                sums[k] = sums.get(k, 0.0) + rc.num_examples * float(v)
        return {f"train_{k}": v / total for k, v in sums.items()} if total else {}

    def _after_commit(self, number: int, sha: str) -> None:
        if self._evaluate is not None:
            self._spawn_eval(number, self.global_state)
        n = self.cfg.evaluation.school_max_examples
        if n > 0:
            cmd = Command("evaluate", number, adapter=ArtifactRef(sha, self.artifacts.size(sha)), max_examples=n)
            self._evals_due = {number: set(self.sessions)}   # only the newest round is waited for
            for sess in self.sessions.values():
                sess.queue.put_nowait(cmd)

    def _spawn_eval(self, number: int, state: dict[str, torch.Tensor] | None) -> None:
        assert self._evaluate is not None
        task = asyncio.create_task(self._evaluate(number, state))
        self._eval_tasks.add(task)
        task.add_done_callback(self._eval_tasks.discard)

    def _checkpoint(self, number: int, state: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        path = self.checkpoint_dir / str(number) / "adapter"
        path.parent.mkdir(parents=True, exist_ok=True)
        lora, merged = split_merge(state)
        if merged:   # FLoRA / FedEx-LoRA: the model is W₀ + B_m A_m + the adapter; PEFT cannot hold B_m A_m
            atomic_write_bytes(path.parent / MERGED_FILE, tensors_to_bytes(merged))
        write_peft_dir(path, lora, self.settings, self.cfg.model.base, extra=info)
