"""Round kinds: what a round sends each participant, how it accepts and folds a result, and
what it commits. The loop that opens rounds, waits for quorum or deadline, counts failures
and survives restarts is the engine's (fedserver/engine.py), the same for every kind.

- train: schools train the global adapter on their own data; the strategy aggregates deltas.
- distill (server teaches): the teacher labels a pool slice; schools train on its option
  distributions (plus their own data, kd_weight); deltas are aggregated as in train.
- teach (schools teach): schools answer a pool slice with their current model; the
  coordinator ensembles the answers and trains the teacher's own adapter on them.
- evaluate: schools score the global adapter on their held-out questions; reports only.

A round's plan (participants' parameters, packs, weights) is fixed when it opens and stored
with it, so acceptance and a restart check against what was actually sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common import digest
from common.distill import ANSWERS_TENSOR, Pack, answer_texts, pool_slice, validate_answer_set, vote_texts
from common.errors import ChecksumError, CorruptFileError, NotFoundError, WrongRoundError
from common.files import atomic_write_bytes
from common.messages import (
    ArtifactRef, Command, DistillCommand, EvaluateCommand, TeachCommand, TrainCommand, UploadHeader,
)
from common.training import TrainParams
from common.wire import bytes_to_tensors, tensors_to_bytes
from fedserver.ensemble import ensemble
from fedserver.strategy import ClientFailure, ClientUpdate
from fedserver.validation import FileDelta, PackedFile, StreamCheck, read_whole, shapes_of, validate_update

if TYPE_CHECKING:
    from fedserver.engine import RoundEngine
    from fedserver.store import Receipt


class RoundFailed(Exception):
    """The kind could not commit this round (the rule could not aggregate, the teacher failed)."""


@dataclass
class OpenRound:
    number: int
    kind: str
    participants: list[str]
    global_sha: str
    global_state: Mapping[str, torch.Tensor]
    deadline: float   # unix seconds
    plan: dict[str, Any] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)   # kind-specific, by school: teach keeps answer sets here
    pack: Pack | None = None                                 # the parsed pack of a teach round
    started: float = field(default_factory=time.monotonic)
    plan_seconds: float = 0.0   # how long planning took before `started` (the teacher labelling a pack...)

    def pending(self) -> set[str]:
        return set(self.participants) - self.accepted - set(self.failed)


@dataclass(frozen=True)
class Commit:
    sha: str                                    # the global adapter after the round
    state: dict[str, torch.Tensor] | None       # its tensors when they changed, else None
    metrics: dict[str, float]


class RoundKind:
    name = ""
    upload = ""          # the upload kind this round accepts ("delta", "answers"); "" = none

    async def plan(self, eng: RoundEngine, number: int, participants: list[str]) -> dict[str, Any]:
        return {}

    def begin(self, eng: RoundEngine, rnd: OpenRound) -> None:
        """At open and at a resume, before receipts are re-folded."""

    def command(self, eng: RoundEngine, rnd: OpenRound, school: str) -> Command:
        raise NotImplementedError

    def check(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader) -> None:
        """Cheap checks of an upload header against this kind (no payload yet)."""
        kind = h.kind or "delta"
        if kind != self.upload:
            raise WrongRoundError(f"round {rnd.number} is a {self.name} round; it takes "
                                  f"{self.upload or 'no'} uploads, not {kind!r}. Wait for the command meant for you")

    def stream_check(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader) -> StreamCheck | None:
        """What checks this kind's uploads while their bytes arrive (None: accept() reads the
        complete file and checks it whole)."""
        return None

    async def accept(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader,
                     payload: Path, received: str, check: StreamCheck | None = None) -> tuple[Path, Any, str]:
        """Validate a complete upload (what `check` found while the bytes arrived, or the file
        read back); keep it where a restart finds it. `received`: the payload's digest, as computed
        while it arrived (tagged, common/digest.py). Returns (kept file, result, the kept file's
        tagged digest: the receipt records it). Runs concurrently for several schools, outside
        the engine's lock: touch no shared state."""
        raise NotImplementedError

    def restore(self, eng: RoundEngine, rnd: OpenRound, rc: Receipt) -> Any:
        """A receipted result read back at a restart, as `fold` takes it: the kept file's bytes
        checked against the digest its receipt recorded, then validated again as an upload is
        (ChecksumError, ValidationError, OSError: the engine voids the receipt)."""
        data = read_whole(Path(rc.path))   # a bytearray: validated as views, not copied
        found = digest.same_algorithm(data, rc.kept_digest)
        if found != rc.kept_digest:
            raise ChecksumError(f"the file of {rc.school_id}'s receipted result ({len(data)} bytes) hashes to {digest.short(found)}, "
                                f"not to the {digest.short(rc.kept_digest)} its receipt recorded: it changed on disk")
        return self.revalidate(eng, rnd, rc, data)

    def revalidate(self, eng: RoundEngine, rnd: OpenRound, rc: Receipt, data: bytearray) -> Any:
        raise NotImplementedError

    def rebuild_pack(self, eng: RoundEngine, number: int) -> bytes | None:
        """The bytes of round `number`'s pack made again, when they can be (None: they cannot)."""
        return None

    def fold(self, eng: RoundEngine, rnd: OpenRound, school: str, num_examples: int,
             metrics: Mapping[str, float], path: Path, result: Any = None) -> None:
        """Add an accepted result to the round's aggregate (`result` None: read it from `path`)."""

    def fail(self, eng: RoundEngine, rnd: OpenRound, school: str, reason: str) -> None:
        """A participant's work failed (reported, disconnected, deadline)."""

    async def commit(self, eng: RoundEngine, rnd: OpenRound) -> Commit:
        raise NotImplementedError


def _ref(eng: RoundEngine, sha: str, kind: str = "adapter") -> ArtifactRef:
    return eng.artifacts.ref(sha, kind)


def _check_digest(received: str, h: UploadHeader) -> None:
    """The payload's digest as computed while it arrived against the one its header named."""
    if received != h.digest:
        raise ChecksumError(f"payload digest {digest.short(received)} does not match the announced {digest.short(h.digest)}; "
                            "re-send the upload")


# ---------------------------------------------------------------- train


class TrainKind(RoundKind):
    name = "train"
    upload = "delta"

    async def plan(self, eng: RoundEngine, number: int, participants: list[str]) -> dict[str, Any]:
        base = eng.strategy.configure_round(number, self.base_params(eng, number))
        return {"params": {sid: dataclasses.asdict(eng.strategy.configure_school(number, sid, base))
                           for sid in participants}}

    def base_params(self, eng: RoundEngine, number: int) -> TrainParams:
        return eng.cfg.train.params(number)

    def begin(self, eng: RoundEngine, rnd: OpenRound) -> None:
        eng.strategy.begin_round(rnd.number, rnd.global_state)

    def params(self, eng: RoundEngine, rnd: OpenRound, school: str) -> TrainParams:
        stored = rnd.plan.get("params", {}).get(school)
        if stored is None:   # a round opened by the first release (no stored plan): recompute as it did
            base = eng.strategy.configure_round(rnd.number, self.base_params(eng, rnd.number))
            return eng.strategy.configure_school(rnd.number, school, base)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        return TrainParams(**fields)

    def command(self, eng: RoundEngine, rnd: OpenRound, school: str) -> Command:
        return TrainCommand(rnd.number, rnd.deadline, _ref(eng, rnd.global_sha), self.params(eng, rnd, school))

    def check(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader) -> None:
        super().check(eng, rnd, school, h)
        if h.num_examples < 1:
            raise WrongRoundError("num_examples must be >= 1")

    def stream_check(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader) -> StreamCheck | None:
        if h.encoding or self.params(eng, rnd, school).freeze:   # decoded or filled in first: checked whole
            return None
        return StreamCheck(eng.layout, h.total_size, eng.cfg.rounds.max_norm)

    async def accept(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader,
                     payload: Path, received: str, check: StreamCheck | None = None) -> tuple[Path, Any, str]:
        final = eng.updates_dir / f"round-{rnd.number}" / f"{school}.safetensors"
        frozen = self.params(eng, rnd, school).freeze   # the school may leave these (zero) deltas out
        if check is not None:   # stream_check gave one: a dense upload with nothing left out
            _check_digest(received, h)
            packed = await asyncio.to_thread(_keep_checked, check, payload, final)
            if packed is not None:   # checked as the bytes arrived: nothing was read back
                return final, FileDelta(packed, eng.layout), h.digest
        data = await asyncio.to_thread(read_whole, payload)
        tensors = await asyncio.to_thread(validate_update, data, h.digest, eng.layout, eng.cfg.rounds.max_norm,
                                          received, h.encoding, frozen)
        del data
        final.parent.mkdir(parents=True, exist_ok=True)
        if h.encoding or frozen:   # keep the decoded, complete update: restarts and spilling buffers read it back
            dense = await asyncio.to_thread(tensors_to_bytes, tensors)
            await asyncio.to_thread(atomic_write_bytes, final, dense, fsync=False)
            payload.unlink(missing_ok=True)
            eng.count_dense(rnd.number, h.total_size, len(dense))
            kept = await asyncio.to_thread(digest.of, dense, digest.supported()[0])
        else:
            await asyncio.to_thread(payload.replace, final)
            kept = h.digest   # validate_update checked the payload hashes to it
        return final, tensors, kept

    def revalidate(self, eng: RoundEngine, rnd: OpenRound, rc: Receipt, data: bytearray) -> Any:
        # the kept file is the complete, dense update (decoded, frozen parts filled in)
        return validate_update(data, rc.kept_digest, eng.layout, eng.cfg.rounds.max_norm, payload_digest=rc.kept_digest)

    def fold(self, eng: RoundEngine, rnd: OpenRound, school: str, num_examples: int,
             metrics: Mapping[str, float], path: Path, result: Any = None) -> None:
        tensors = result if result is not None else bytes_to_tensors(path.read_bytes())
        if isinstance(tensors, FileDelta) and not eng.strategy.folds_files:
            tensors = tensors.load()   # the rule (or a wrapper) reads each tensor more than once
        eng.strategy.accumulate(ClientUpdate(school, rnd.number, num_examples, tensors, dict(metrics), path))

    def fail(self, eng: RoundEngine, rnd: OpenRound, school: str, reason: str) -> None:
        eng.strategy.record_failure(ClientFailure(school, rnd.number, reason))

    async def commit(self, eng: RoundEngine, rnd: OpenRound) -> Commit:
        # The new adapter is written and hashed while the strategy makes it, where the strategy
        # can hand its buffers over (the FedAvg family); otherwise, or if the state it returns
        # is not exactly those bytes, it is written whole once finalize returns. All of it is
        # blocking work, done in one worker-thread call (each hop to a worker thread and back
        # waits for the event loop's turn; a close made of six of them lost milliseconds to it).
        return await asyncio.to_thread(self._commit, eng)

    @staticmethod
    def _commit(eng: RoundEngine) -> Commit:
        streamed = eng.artifacts.begin_tensors(shapes_of(eng.global_state)) if eng.strategy.stream_state(None) else None
        try:
            if streamed is not None:
                eng.strategy.stream_state(streamed.add)
            try:
                result = eng.strategy.finalize()
            except (ValueError, ArithmeticError, RuntimeError) as exc:   # the rule could not aggregate this round
                raise RoundFailed(f"{eng.strategy.name}: {exc}") from exc
            except (CorruptFileError, NotFoundError, OSError) as exc:   # the global adapter, read from its file, is lost
                raise RoundFailed(f"the global adapter could not be read: {exc}") from exc
            finally:
                if streamed is not None:
                    eng.strategy.stream_state(None)
            if streamed is not None and streamed.holds(result.state):
                sha = streamed.commit()
                eng.strategy.stored(result.state, eng.artifacts.path(sha))
            else:
                sha = eng.artifacts.put_tensors(result.state)
        finally:
            if streamed is not None:
                streamed.discard()
        return Commit(sha, result.state, dict(result.metrics))


# ---------------------------------------------------------------- distill (server teaches)


def _keep_checked(check: StreamCheck, payload: Path, final: Path) -> PackedFile | None:
    """The verdict of the check made while the bytes arrived and, when it is a packed update
    within bounds, the payload moved to where it is kept (None: check the file whole)."""
    packed = check.result(final)
    if packed is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        payload.replace(final)
    return packed


class DistillKind(TrainKind):
    name = "distill"

    def base_params(self, eng: RoundEngine, number: int) -> TrainParams:
        params = super().base_params(eng, number)
        steps = eng.cfg.distill.local_steps
        return dataclasses.replace(params, local_steps=steps) if steps else params

    async def plan(self, eng: RoundEngine, number: int, participants: list[str]) -> dict[str, Any]:
        plan = await super().plan(eng, number, participants)
        d, index = eng.cfg.distill, eng.exchange_index(number, "distill")
        if not eng.pool and not (eng.open_pool and d.open_slice_size):
            raise RoundFailed("the prompt pool has no questions and no open prompts to distill on; set [distill] "
                              "pool_file (fedserver prepare-data --pool N [--open-pool M] writes one)")
        questions = pool_slice(eng.pool, d.slice_size, index, d.seed) if eng.pool else []
        prompts = pool_slice(eng.open_pool, d.open_slice_size, index, d.seed + 2) if eng.open_pool and d.open_slice_size else []
        sha, tokens = await eng.teacher_labels(questions, prompts)
        return {**plan, "pack": sha, "pack_questions": len(questions), "pack_prompts": len(prompts),
                "teacher_tokens_scored": tokens["scored"], "teacher_tokens_generated": tokens["generated"]}

    def command(self, eng: RoundEngine, rnd: OpenRound, school: str) -> Command:
        d = eng.cfg.distill
        return DistillCommand(rnd.number, rnd.deadline, _ref(eng, rnd.global_sha), _ref(eng, rnd.plan["pack"], "labelled-pack"),
                              self.params(eng, rnd, school), d.kd_weight, d.temperature)

    async def commit(self, eng: RoundEngine, rnd: OpenRound) -> Commit:
        c = await super().commit(eng, rnd)
        return Commit(c.sha, c.state, {**c.metrics, **{k: float(rnd.plan.get(k, 0)) for k in (
            "pack_questions", "pack_prompts", "teacher_tokens_scored", "teacher_tokens_generated")}})


# ---------------------------------------------------------------- teach (schools teach)


class TeachKind(RoundKind):
    name = "teach"
    upload = "answers"

    async def plan(self, eng: RoundEngine, number: int, participants: list[str]) -> dict[str, Any]:
        if not eng.pool:   # open prompts are taught by the teacher only (see docs/DISTILLATION.md)
            raise RoundFailed("teach rounds need multiple-choice questions in the prompt pool; it has none")
        pack = self._pool_pack(eng, number)
        sha = await asyncio.to_thread(eng.artifacts.put, pack.to_bytes())
        # Fixed now, so a restarted round ensembles with the weights it opened with.
        weights = await asyncio.to_thread(eng.last_school_accuracies, participants)
        return {"pack": sha, "pack_questions": len(pack.questions), "pack_prompts": len(pack.prompts), "weights": weights}

    def _pool_pack(self, eng: RoundEngine, number: int) -> Pack:
        """Round `number`'s pool pack: its slice of the prompt pool, the same every time it is made."""
        d, index = eng.cfg.distill, eng.exchange_index(number, "teach")
        questions = pool_slice(eng.pool, d.slice_size, index, d.seed + 1)
        prompts = pool_slice(eng.open_pool, d.open_slice_size, index, d.seed + 3) if eng.open_pool and d.open_slice_size else []
        return Pack(tuple(questions), prompts=tuple(prompts), max_new_tokens=d.max_new_tokens if prompts else 0)

    def rebuild_pack(self, eng: RoundEngine, number: int) -> bytes | None:
        return self._pool_pack(eng, number).to_bytes() if eng.pool else None

    def _pack(self, eng: RoundEngine, rnd: OpenRound) -> Pack:
        """The round's pool pack, parsed once per round (acceptance reads it for every upload)."""
        if rnd.pack is None:
            rnd.pack = Pack.from_bytes(eng.artifacts.get(rnd.plan["pack"]))
        return rnd.pack

    def command(self, eng: RoundEngine, rnd: OpenRound, school: str) -> Command:
        return TeachCommand(rnd.number, rnd.deadline, _ref(eng, rnd.global_sha), _ref(eng, rnd.plan["pack"], "pool-pack"),
                            eng.cfg.distill.temperature)

    async def accept(self, eng: RoundEngine, rnd: OpenRound, school: str, h: UploadHeader,
                     payload: Path, received: str, check: StreamCheck | None = None) -> tuple[Path, Any, str]:
        _check_digest(received, h)
        data = await asyncio.to_thread(payload.read_bytes)
        pack = self._pack(eng, rnd)
        answers = await asyncio.to_thread(validate_answer_set, bytes(data), pack.questions, pack.prompts)
        final = eng.updates_dir / f"round-{rnd.number}" / f"{school}.answers.safetensors"
        final.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(payload.replace, final)
        return final, answers, h.digest

    def revalidate(self, eng: RoundEngine, rnd: OpenRound, rc: Receipt, data: bytearray) -> Any:
        pack = self._pack(eng, rnd)
        return validate_answer_set(bytes(data), pack.questions, pack.prompts)

    def fold(self, eng: RoundEngine, rnd: OpenRound, school: str, num_examples: int,
             metrics: Mapping[str, float], path: Path, result: Any = None) -> None:
        if result is None:   # not from restore(): the kept file was validated when it was accepted
            tensors = bytes_to_tensors(path.read_bytes())
            result = (tensors[ANSWERS_TENSOR], answer_texts(tensors))
        rnd.results[school] = result   # (probabilities, answer texts)

    async def commit(self, eng: RoundEngine, rnd: OpenRound) -> Commit:
        if eng.teacher is None:
            raise RoundFailed("no teacher is configured")
        pack = self._pack(eng, rnd)
        answers = {sid: probs for sid, (probs, _) in rnd.results.items()}
        # open prompts: the answer more than half of the schools gave, if any
        agreed = vote_texts([texts for _, texts in rnd.results.values()], len(pack.prompts))
        open_items = [(p, t) for p, t in zip(pack.prompts, agreed) if t]
        width = max(len(q.choices) for q in pack.questions)
        support = torch.tensor([[j < len(q.choices) for j in range(width)] for q in pack.questions])
        d = eng.cfg.distill
        target = ensemble(answers, support, d.ensemble, d.trim, rnd.plan.get("weights"))
        gold = torch.tensor([q.answer_index for q in pack.questions])
        t0 = time.monotonic()
        before = await eng.teacher.call(lambda b: b.adapter())
        try:
            learned = await eng.teacher.call(lambda b: b.learn(pack.questions, target, d.temperature, rnd.number,
                                                               open_items))
            eng.log.info("teacher learned from the schools", round=rnd.number, loss=round(learned.kd_loss, 4),
                         steps=learned.steps, seconds=round(time.monotonic() - t0, 1))
            await eng.save_teacher(rnd.number)
            after = await eng.evaluate_teacher(rnd.number)
        except Exception as exc:   # the teacher failing must not take the coordinator down
            await eng.teacher.call(lambda b: b.load_adapter(before))   # the round did not happen
            raise RoundFailed(f"teacher could not learn: {exc!r}") from exc
        metrics = {
            "answer_sets": float(len(answers)),
            "pack_questions": float(len(pack.questions)),
            "pack_prompts": float(len(pack.prompts)),
            "open_answers_agreed": float(len(open_items)),   # open prompts the teacher learned an answer for
            # How often the ensemble's top option is the right one (pool questions are public
            # and carry answers; the teacher never trains on those answers).
            "ensemble_accuracy": float((target.argmax(-1) == gold).float().mean()),
            "teacher_learn_loss": learned.kd_loss,
            "teacher_learn_seconds": time.monotonic() - t0,
        }
        if after is not None:
            metrics.update(teacher_accuracy=after.accuracy, teacher_loss=after.loss)
        return Commit(rnd.global_sha, None, metrics)


# ---------------------------------------------------------------- evaluate


class EvaluateKind(RoundKind):
    name = "evaluate"
    upload = ""   # results come as EvalReport events on the session stream

    def command(self, eng: RoundEngine, rnd: OpenRound, school: str) -> Command:
        return EvaluateCommand(rnd.number, rnd.deadline, _ref(eng, rnd.global_sha),
                               eng.cfg.evaluation.school_max_examples or 32)

    def fold(self, eng: RoundEngine, rnd: OpenRound, school: str, num_examples: int,
             metrics: Mapping[str, float], path: Path, result: Any = None) -> None:
        rnd.results[school] = (num_examples, dict(metrics))

    async def commit(self, eng: RoundEngine, rnd: OpenRound) -> Commit:
        reports = [v for v in rnd.results.values() if v[0] > 0]
        n = sum(c for c, _ in reports)
        metrics: dict[str, float] = {"reports": float(len(rnd.results))}
        if n:
            for key in ("accuracy", "loss"):
                metrics[f"school_{key}"] = sum(c * m.get(key, 0.0) for c, m in reports) / n
        return Commit(rnd.global_sha, None, metrics)


KINDS: dict[str, RoundKind] = {k.name: k for k in (TrainKind(), DistillKind(), TeachKind(), EvaluateKind())}
