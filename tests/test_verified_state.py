"""Verified state on restart (issue #8): every file the coordinator reads back from its state
directory is checked against the sha256 recorded for it (and receipted updates for their
values) before use. A bad file is quarantined, logged, counted and recovered; the coordinator
starts, aggregates nothing unverified and the federation goes on (docs/RELIABILITY.md).

Most tests drive a RoundEngine directly on a tiny two-tensor layout (no model, no gRPC); one
goes end to end over gRPC; the daemon's side of "send it again" is tested on its own."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import digest
from common.errors import CorruptFileError, ValidationError
from common.lora import TensorSpec
from common.messages import ArtifactRef, Capabilities, TrainCommand, UploadHeader
from common.training import TrainParams
from common.wire import bytes_to_tensors, sha256_hex, tensors_to_bytes
from fedserver import strategy as strategies
from fedserver.artifacts import ArtifactStore
from fedserver.engine import RoundEngine
from fedserver.integrity import COPIES, QUARANTINE, file_sha256
from fedserver.store import Store
from fedserver.validation import FileState
from tests.conftest import coordinator_config

LAYOUT = {"m.lora_A.weight": TensorSpec((4, 32)), "m.lora_B.weight": TensorSpec((48, 4))}
SCHOOLS = ("school-1", "school-2")


# ---------------------------------------------------------------- a coordinator's engine, no network


def make_engine(tmp: Path, **sections) -> RoundEngine:
    """A round engine on `tmp`'s state directory, as the coordinator builds it (its own store
    connection: a second call is the coordinator restarted on the same files)."""
    sections.setdefault("rounds", dict(total=0, min_schools=2, quorum=2, deadline_s=600.0))
    cfg = coordinator_config(tmp, "dir:/nowhere", schools=3, tls=False, **sections)
    state = cfg.server.state_dir
    state.mkdir(parents=True, exist_ok=True)
    return RoundEngine(cfg, Store(state / "state.sqlite"), ArtifactStore(state / "artifacts"), LAYOUT,
                       strategies.build(cfg.strategy), state / "rounds", state / "updates")


async def started(tmp: Path, **sections) -> RoundEngine:
    eng = make_engine(tmp, **sections)
    await eng.start()
    for sid in SCHOOLS:
        eng.attach(sid, Capabilities())
    return eng


async def stop(eng: RoundEngine) -> None:
    """As if the process ended: background work finished, the store closed."""
    for task in list(eng._eval_tasks):
        await task
    eng.store.close()


def delta(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, value) for k, v in LAYOUT.items()}


async def send(eng: RoundEngine, sid: str, tensors: dict[str, torch.Tensor], examples: int = 10) -> None:
    """What the servicer does with a complete upload: the payload file, then accept_upload."""
    rnd = eng.current
    payload = tensors_to_bytes(tensors)
    part = eng.cfg.server.state_dir / "uploads" / f"{sid}.{sha256_hex(payload)[:8]}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(payload)
    h = UploadHeader(rnd.number, f"r{rnd.number}-" + sha256_hex(payload)[:16], examples, sha256_hex(payload), len(payload), 0, rnd.global_sha)
    check = eng.stream_check(sid, h)   # the servicer feeds it every byte as it arrives
    if check is not None:
        check.feed(payload)
    await eng.accept_upload(sid, h, part, sha256_hex(payload), check)


async def commit_round(eng: RoundEngine, values: dict[str, float]) -> str:
    """Open a round, send each school's constant delta, close it; returns the new global sha."""
    if eng.current is None:
        assert await eng._open_next()
    for sid, v in values.items():
        await send(eng, sid, delta(v))
    assert await eng._close(eng.current)
    for task in list(eng._eval_tasks):   # the round's after-close work (its second copy) done
        await task
    return eng.global_sha


def quarantined(tmp: Path) -> list[str]:
    folder = tmp / "coordinator" / QUARANTINE
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def counted(eng: RoundEngine, what: str) -> float:
    return eng.metrics.registry.get_sample_value("schoolfed_state_files_quarantined_total", {"what": what}) or 0.0


def float_offset(data: bytes) -> int:
    """Where the first tensor's data starts (after the safetensors header)."""
    (n,) = struct.unpack_from("<Q", data, 0)
    return 8 + n


def assert_finite(state: dict[str, torch.Tensor]) -> None:
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


# ---------------------------------------------------------------- receipted updates


async def _one_receipt_then_crash(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Round 1 open, school-1's update receipted; the coordinator stops. Returns the kept file
    and the round's global adapter."""
    eng = await started(tmp)
    assert await eng._open_next()
    await send(eng, "school-1", delta(0.5), examples=30)
    (rc,) = eng.store.receipts(1)
    glob = {k: v.clone() for k, v in eng.current.global_state.items()}
    await stop(eng)
    return Path(rc.path), glob


async def _resend_and_commit(eng: RoundEngine, glob: dict[str, torch.Tensor]) -> None:
    """school-1 sends its update again (the same bytes and upload id), school-2 sends its own;
    the round commits each counted once, weighted 30:10."""
    assert eng.current is not None and eng.current.number == 1
    assert "school-1" in eng.current.pending()   # asked for again: attach() sent it its command
    await send(eng, "school-1", delta(0.5), examples=30)
    await send(eng, "school-2", delta(-0.25), examples=10)
    assert await eng._close(eng.current)
    out = bytes_to_tensors(eng.artifacts.get(eng.global_sha))
    assert_finite(out)
    for k in LAYOUT:
        torch.testing.assert_close(out[k], glob[k] + (30 * 0.5 + 10 * -0.25) / 40)
    assert eng.store.get_round(1).status == "committed"


async def test_receipted_update_with_a_flipped_byte_is_quarantined_and_sent_again(tmp_path):
    kept, glob = await _one_receipt_then_crash(tmp_path)
    data = bytearray(kept.read_bytes())
    data[float_offset(data) + 5] ^= 0x40   # one bit of one float
    kept.write_bytes(data)

    eng = await started(tmp_path)
    assert eng.current is not None and eng.current.accepted == set()     # not folded
    assert eng.store.receipts(1) == []                                    # receipt voided
    assert [n for n in quarantined(tmp_path) if n.endswith("school-1.safetensors")]
    assert not kept.exists()
    assert counted(eng, "update") == 1
    (note,) = eng.store.recovery_notes()
    assert note["what"] == "update" and "hashes to" in note["problem"] and "voided" in note["action"]
    await _resend_and_commit(eng, glob)
    await stop(eng)


async def test_planted_inf_without_a_new_hash_is_caught_by_the_hash(tmp_path):
    kept, glob = await _one_receipt_then_crash(tmp_path)
    data = bytearray(kept.read_bytes())
    struct.pack_into("<f", data, float_offset(data), math.inf)
    kept.write_bytes(data)

    eng = await started(tmp_path)
    assert eng.current.accepted == set() and eng.store.receipts(1) == []
    assert "hashes to" in eng.store.recovery_notes()[-1]["problem"]
    await _resend_and_commit(eng, glob)
    await stop(eng)


async def test_planted_inf_with_its_hash_updated_is_caught_by_the_values(tmp_path):
    """Someone re-hashed the file and the receipt: the hash matches, the values check does not."""
    kept, glob = await _one_receipt_then_crash(tmp_path)
    data = bytearray(kept.read_bytes())
    struct.pack_into("<f", data, float_offset(data), math.inf)
    kept.write_bytes(data)
    db = sqlite3.connect(tmp_path / "coordinator" / "state.sqlite")
    db.execute("UPDATE receipts SET sha256=?, file_sha256=?", (sha256_hex(data), sha256_hex(data)))
    db.commit()
    db.close()

    eng = await started(tmp_path)
    assert eng.current.accepted == set() and eng.store.receipts(1) == []
    assert "NaN or Inf" in eng.store.recovery_notes()[-1]["problem"]
    assert counted(eng, "update") == 1
    await _resend_and_commit(eng, glob)
    await stop(eng)


async def test_missing_receipted_update_voids_its_receipt(tmp_path):
    kept, glob = await _one_receipt_then_crash(tmp_path)
    kept.unlink()
    eng = await started(tmp_path)
    assert eng.current.accepted == set() and eng.store.receipts(1) == []
    assert "missing" in eng.store.recovery_notes()[-1]["problem"]
    await _resend_and_commit(eng, glob)
    await stop(eng)


async def test_intact_receipts_are_folded_once_as_before(tmp_path):
    kept, glob = await _one_receipt_then_crash(tmp_path)
    eng = await started(tmp_path)
    assert eng.current.accepted == {"school-1"} and quarantined(tmp_path) == []
    await send(eng, "school-2", delta(-0.25), examples=10)
    assert await eng._close(eng.current)
    out = bytes_to_tensors(eng.artifacts.get(eng.global_sha))
    for k in LAYOUT:
        torch.testing.assert_close(out[k], glob[k] + (30 * 0.5 + 10 * -0.25) / 40)
    await stop(eng)


async def test_compressed_upload_kept_decoded_is_verified_by_its_own_hash(tmp_path):
    """A compressed upload is kept decoded: its receipt records that file's sha256 (not the
    payload's), so an intact one is folded again at a restart and a damaged one is not."""
    from common.compression import CompressionSpec, encode

    eng = await started(tmp_path)
    assert await eng._open_next()
    rnd = eng.current
    payload = tensors_to_bytes(encode(delta(0.5), CompressionSpec("int8")))
    part = tmp_path / "s1.part"
    part.write_bytes(payload)
    h = UploadHeader(1, "r1-int8", 30, sha256_hex(payload), len(payload), 0, rnd.global_sha, {}, "int8")
    assert eng.stream_check("school-1", h) is None   # compressed: checked whole, after decoding
    await eng.accept_upload("school-1", h, part, sha256_hex(payload))
    (rc,) = eng.store.receipts(1)
    kept = Path(rc.path).read_bytes()   # the decoded update, named by the fastest digest here (common/digest.py)
    assert rc.digest == sha256_hex(payload) and rc.file_digest == digest.of(kept, digest.supported()[0]) != rc.digest
    await stop(eng)
    eng = await started(tmp_path)
    assert eng.current.accepted == {"school-1"} and quarantined(tmp_path) == []
    await stop(eng)
    data = bytearray(Path(rc.path).read_bytes())
    data[-1] ^= 1
    Path(rc.path).write_bytes(data)
    eng = await started(tmp_path)
    assert eng.current.accepted == set() and eng.store.receipts(1) == [] and counted(eng, "update") == 1
    await stop(eng)


# ---------------------------------------------------------------- the global adapter


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:   # in place: the checkpoint's hard link sees it too
        fh.truncate(keep)


async def test_truncated_global_is_restored_from_its_second_copy(tmp_path):
    eng = await started(tmp_path)
    g1 = await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    await stop(eng)
    copy = tmp_path / "coordinator" / COPIES / g1
    ckpt = tmp_path / "coordinator" / "rounds" / "1" / "adapter" / "adapter_model.safetensors"
    assert copy.is_file() and copy.stat().st_ino != eng.artifacts.path(g1).stat().st_ino   # a real second copy
    truncate(eng.artifacts.path(g1), 100)
    assert file_sha256(ckpt) != g1   # the checkpoint shares the damaged bytes

    eng = await started(tmp_path)
    assert eng.global_sha == g1 and file_sha256(eng.artifacts.path(g1)) == g1
    assert file_sha256(ckpt) == g1                                   # repaired too
    assert [n for n in quarantined(tmp_path) if n.endswith(g1)]
    assert counted(eng, "global_adapter") == 1
    assert "second copy" in eng.store.recovery_notes()[-1]["action"]
    g2 = await commit_round(eng, {"school-1": 0.1, "school-2": 0.1})  # the federation goes on
    assert eng.store.get_round(2).status == "committed" and eng.store.get_round(2).global_in == g1
    assert_finite(bytes_to_tensors(eng.artifacts.get(g2)))
    await stop(eng)


async def test_lost_global_falls_back_to_the_newest_intact_one_and_the_open_round_fails(tmp_path):
    eng = await started(tmp_path)
    g0 = eng.global_sha
    g1 = await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    assert await eng._open_next()                 # round 2 open on g1, one result in
    await send(eng, "school-1", delta(0.1))
    await stop(eng)
    truncate(eng.artifacts.path(g1), 0)
    (tmp_path / "coordinator" / COPIES / g1).unlink()

    eng = await started(tmp_path)                 # no exit: it starts, from round 0's adapter
    assert eng.global_sha == g0 and eng.store.get_meta("global_sha256") == g0
    assert eng.metrics.registry.get_sample_value("schoolfed_global_adapter_fallbacks_total") == 1
    r2 = eng.store.get_round(2)
    assert r2.status == "failed" and "could not resume" in r2.failures["restart"] and eng.current is None
    notes = eng.store.recovery_notes()
    assert notes[-1]["what"] == "global_adapter_fallback" and notes[-1]["rounds_lost"] == [1]
    g3 = await commit_round(eng, {"school-1": 0.1, "school-2": 0.1})
    r3 = eng.store.get_round(3)
    assert r3.status == "committed" and r3.global_in == g0 and g3 != g1
    await stop(eng)


async def test_check_before_serving_restores_or_refuses_a_damaged_artefact(tmp_path):
    eng = await started(tmp_path)
    g1 = await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    await eng.check_served(g1)                       # intact: nothing to do
    data = bytearray(eng.artifacts.path(g1).read_bytes())
    data[-1] ^= 1
    eng.artifacts.path(g1).write_bytes(data)          # changed while running
    await eng.check_served(g1)                       # restored from the second copy
    assert file_sha256(eng.artifacts.path(g1)) == g1 and counted(eng, "artifact") == 1
    eng.artifacts.path(g1).write_bytes(data)
    (tmp_path / "coordinator" / COPIES / g1).unlink()
    with pytest.raises(CorruptFileError, match="damaged on the coordinator"):
        await eng.check_served(g1)                   # no intact copy: refused, never served
    assert not eng.artifacts.path(g1).exists() and counted(eng, "artifact") == 2
    await stop(eng)


def damage_in_place(path: Path) -> None:
    """One flipped data byte, the file's inode and size kept; its mtime moves on as a write's does."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


async def test_the_global_is_held_as_its_file_and_restored_if_damaged_before_the_close(tmp_path):
    eng = await started(tmp_path)
    g1 = await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    assert isinstance(eng.global_state, FileState)   # not held in memory between commits
    intact = bytes_to_tensors(eng.artifacts.get(g1))
    assert await eng._open_next()
    for sid in SCHOOLS:
        await send(eng, sid, delta(0.125))
    damage_in_place(eng.artifacts.path(g1))          # while round 2 is open on it
    assert await eng._close(eng.current)             # read at the close: found changed, restored, read
    for task in list(eng._eval_tasks):
        await task
    assert counted(eng, "artifact") == 1 and file_sha256(eng.artifacts.path(g1)) == g1
    g2 = bytes_to_tensors(eng.artifacts.get(eng.global_sha))
    for k, v in intact.items():   # computed from the intact adapter, not the damaged bytes
        assert torch.equal(g2[k], (v.double() + 0.125).float()), k
    await stop(eng)


async def test_a_global_lost_during_a_round_fails_that_round_and_the_next_starts_from_an_intact_one(tmp_path):
    eng = await started(tmp_path)
    g0 = eng.global_sha
    g1 = await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    assert await eng._open_next()
    for sid in SCHOOLS:
        await send(eng, sid, delta(0.125))
    damage_in_place(eng.artifacts.path(g1))
    (tmp_path / "coordinator" / COPIES / g1).unlink()   # and no intact copy
    assert not await eng._close(eng.current)            # the round fails, with what happened; no crash
    r2 = eng.store.get_round(2)
    assert r2.status == "failed" and "global adapter could not be read" in r2.failures["commit"]
    assert "no intact copy" in r2.failures["commit"] or "damaged" in r2.failures["commit"]
    assert eng.global_sha == g0 and isinstance(eng.global_state, FileState)   # fallen back, as a restart would
    g3 = await commit_round(eng, {"school-1": 0.1, "school-2": 0.1})        # and the federation goes on
    assert eng.store.get_round(3).status == "committed" and eng.store.get_round(3).global_in == g0 and g3 != g1
    await stop(eng)


# ---------------------------------------------------------------- strategy state, teacher files


async def test_corrupt_strategy_state_is_quarantined_and_moments_start_from_zero(tmp_path):
    strategy = dict(name="fedavgm")
    eng = await started(tmp_path, strategy=strategy)
    await commit_round(eng, {"school-1": 0.5, "school-2": 0.25})
    await stop(eng)
    eng = await started(tmp_path, strategy=strategy)  # intact: loaded
    assert eng.strategy.m and quarantined(tmp_path) == []
    await stop(eng)
    path = tmp_path / "coordinator" / "strategy" / "round-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(data)

    eng = await started(tmp_path, strategy=strategy)
    assert eng.strategy.m == {}                       # from zero, as in a new federation
    assert [n for n in quarantined(tmp_path) if n.endswith("round-1.safetensors")]
    assert counted(eng, "strategy_state") == 1
    assert "recorded with round 1's commit" in eng.store.recovery_notes()[-1]["problem"]
    await commit_round(eng, {"school-1": 0.1, "school-2": 0.1})
    assert eng.store.get_round(2).status == "committed"
    await stop(eng)


class FakeTeacher:
    """The TeacherHost surface teacher_labels uses; counts how often it labels."""

    def __init__(self) -> None:
        self.restore_from = None
        self.labelled = 0
        outer = self

        class Backend:
            def label(self, questions, temperature):
                outer.labelled += 1
                return [[1.0 / len(q.choices)] * len(q.choices) for q in questions]

            def count_tokens(self, questions):
                return 7 * len(questions)

        self.backend = Backend()

    async def call(self, fn, *args):
        return fn(self.backend, *args)


def questions():
    from common.data import Question

    return [Question(f"q{i}", "test", "g", f"question {i}?", ("a", "b", "c"), 1, "b") for i in range(3)]


async def test_corrupt_cached_label_pack_is_quarantined_and_labelled_again(tmp_path):
    eng = make_engine(tmp_path)
    eng.teacher = FakeTeacher()
    await eng.start()
    sha, tokens = await eng.teacher_labels(questions())
    assert eng.teacher.labelled == 1 and tokens["scored"] == 21
    assert (await eng.teacher_labels(questions()))[0] == sha and eng.teacher.labelled == 1   # cached
    path = eng.artifacts.path(sha)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])          # truncated
    again, tokens = await eng.teacher_labels(questions())
    assert eng.teacher.labelled == 2 and tokens["scored"] == 21       # labelled again, not served damaged
    assert again == sha and file_sha256(path) == sha
    assert [n for n in quarantined(tmp_path) if n.endswith(sha)] and counted(eng, "label_pack") == 1
    await stop(eng)


async def test_damaged_teacher_adapter_is_quarantined_and_not_restored(tmp_path):
    eng = make_engine(tmp_path)
    saved = tmp_path / "coordinator" / "rounds" / "3" / "teacher-adapter"
    saved.mkdir(parents=True)
    (saved / "adapter_model.safetensors").write_bytes(tensors_to_bytes(delta(0.1)))
    eng.store.set_meta("teacher_adapter", str(saved))
    eng.store.set_meta("teacher_adapter_sha256", file_sha256(saved / "adapter_model.safetensors"))
    eng.teacher = FakeTeacher()
    await eng.start()
    assert eng.teacher.restore_from == saved          # intact: restored
    await stop(eng)
    with open(saved / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(20)
    eng = make_engine(tmp_path)
    eng.teacher = FakeTeacher()
    await eng.start()
    assert eng.teacher.restore_from is None and not saved.exists()
    assert eng.store.get_meta("teacher_adapter") == "" and counted(eng, "teacher_adapter") == 1
    await stop(eng)


# ---------------------------------------------------------------- the artefact store itself


def test_artifact_store_checks_reads_and_rewrites_a_damaged_file_on_put(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    sha = store.put(b"x" * 1000)
    store.path(sha).write_bytes(b"y" * 1000)
    with pytest.raises(CorruptFileError, match="not to its name"):
        store.get(sha)
    with pytest.raises(CorruptFileError):
        store.verify(sha)
    assert store.put(b"x" * 1000) == sha and store.get(sha) == b"x" * 1000   # put repairs it
    assert store.known_good(sha)


def test_pack_of_an_open_teach_round_is_made_again(tmp_path):
    """A teach round's pool pack is a slice of the pool: the same bytes can be made again."""
    from fedserver.rounds import KINDS

    eng = make_engine(tmp_path)
    eng.pool = questions()
    data = KINDS["teach"].rebuild_pack(eng, 1)
    sha = eng.artifacts.put(data)
    eng.artifacts.path(sha).write_bytes(data[:-5])
    assert eng.recovery.pack_ok(KINDS["teach"], 1, sha) and file_sha256(eng.artifacts.path(sha)) == sha
    eng.artifacts.path(sha).write_bytes(data[:-5])
    assert not eng.recovery.pack_ok(KINDS["distill"], 1, sha)   # a labelled pack cannot be: the round fails
    eng.store.close()


# ---------------------------------------------------------------- the payload header, before any tensor


def _forged(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_a_million_empty_tensors_are_refused_before_any_is_built(monkeypatch):
    from fedserver import validation

    def never(*args, **kwargs):
        raise AssertionError("tensors were built from a payload that should have been refused")

    monkeypatch.setattr(validation, "bytes_to_tensors", never)
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    raw = ("{" + ",".join(f'"t{i}":{entry}' for i in range(1_000_000)) + "}").encode()
    payload = bytearray(struct.pack("<Q", len(raw)) + raw)
    t0 = time.perf_counter()
    with pytest.raises(ValidationError, match=r"a header of [\d,]+ bytes, but an update of its 2 adapter tensors "
                                              r"has at most [\d,]+\. Refused unparsed"):
        validation.validate_update(payload, sha256_hex(payload), LAYOUT)
    assert time.perf_counter() - t0 < 30   # generous: the point is that nothing is parsed
    # within the byte bound but more tensors than the layout has: counted from the header alone
    few = _forged({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(5)})
    with pytest.raises(ValidationError, match="update holds 5 tensors but the federation's adapter has 2"):
        validation.validate_update(bytearray(few), sha256_hex(few), LAYOUT)
    with pytest.raises(ValidationError, match="longer than"):
        validation.validate_update(few[:20], sha256_hex(few[:20]), LAYOUT)


def test_header_bounds_follow_the_layout_and_the_encoding():
    from fedserver.validation import check_header, header_limits

    dense_bytes, dense_count = header_limits(LAYOUT)
    topk_bytes, topk_count = header_limits(LAYOUT, "topk")
    assert (dense_count, topk_count) == (2, 6) and topk_bytes > dense_bytes
    real = tensors_to_bytes(delta(0.0))
    check_header(real, LAYOUT)                       # what a school sends passes
    assert len(real) - 8 < dense_bytes
    with pytest.raises(ValidationError, match="not valid safetensors"):
        check_header(b"\x01", LAYOUT)


# ---------------------------------------------------------------- the school sends again


def test_daemon_sends_again_a_result_the_coordinator_lost(tmp_path, monkeypatch):
    """A command for a round this daemon delivered: if the coordinator still holds the receipt
    it is a repeat (nothing sent); if not (voided at a restart), the kept result is sent
    again, without training again."""
    from common.lora import LoraSettings
    from fedclient import daemon as daemon_mod
    from fedclient.config import SchoolConfig, SchoolSection

    d = daemon_mod.SchoolDaemon(SchoolConfig(school=SchoolSection(state_dir=tmp_path)), "tok", model=None)  # type: ignore[arg-type]
    d._adapter_settings = LoraSettings(rank=4, alpha=8.0)
    payload = tensors_to_bytes(delta(0.5))
    base = "b" * 64
    h = UploadHeader(3, "r3-" + sha256_hex(payload)[:24], 10, sha256_hex(payload), len(payload), 0, base, {"loss": 1.0})
    d._save_pending(h, payload)
    d._finished_rounds.add(3)
    d._delivered_ids[3] = h.upload_id
    held = {"complete": True}
    sent: list[tuple[UploadHeader, bytes]] = []

    class Stub:
        async def UploadStatus(self, request, metadata=None):
            assert request.upload_id == h.upload_id
            return SimpleNamespace(complete=held["complete"], received_bytes=0)

    async def rpc(fn, deadline):
        return await fn(Stub(), [])

    async def fake_upload(stub, header, data, md, on_sent=None):
        sent.append((header, data))
        return SimpleNamespace(round=header.round)

    async def compute():
        raise AssertionError("the result is kept on disk; no training again")

    monkeypatch.setattr(d, "_rpc", rpc)
    monkeypatch.setattr(daemon_mod, "upload", fake_upload)
    cmd = TrainCommand(3, time.time() + 60, ArtifactRef(base, 10), TrainParams())

    async def run():
        await d._deliver(cmd, compute)
        assert sent == []                              # the coordinator has it: a repeat
        held["complete"] = False
        await d._deliver(cmd, compute)
        assert sent == [(h, payload)]                  # lost there: the same bytes, the same upload id
        assert 3 in d._finished_rounds

    asyncio.run(run())


# ---------------------------------------------------------------- end to end over gRPC


async def test_restarted_coordinator_asks_again_over_grpc_and_commits(tmp_path, tiny_model, start_coordinator):
    """A real coordinator (in this process) restarted on a damaged receipt: over gRPC, the
    school's replay is now taken (not refused as already accepted) and the round commits."""
    import grpc

    from common import PROTOCOL_VERSION
    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc as pb_grpc
    from common.wire import grpc_options
    from fedclient.transfer import download, upload
    from tests.conftest import TOKENS, wait_for
    from tests.test_rpc_errors import _idle

    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False,
                             rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=120.0))

    async def connect(rc):
        channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
        stub = pb_grpc.FederationStub(channel)
        md, calls = {}, []
        for sid in SCHOOLS:
            resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                                   metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
            md[sid] = [("x-session-token", resp.session_token)]
            calls.append(stub.Session(_idle(), metadata=md[sid]))
        return channel, stub, md, calls

    rc = await start_coordinator(cfg, run_rounds=True)
    channel, stub, md, calls = await connect(rc)
    await wait_for(lambda: rc.engine.current is not None, 20, "round 1 to open")
    glob_sha = rc.engine.current.global_sha
    glob = bytes_to_tensors(await download(stub, glob_sha, md["school-1"], bytearray()))
    p1 = tensors_to_bytes({k: torch.full_like(v, 0.5) for k, v in glob.items()})
    h1 = UploadHeader(1, "s1-upload", 30, sha256_hex(p1), len(p1), 0, glob_sha)
    assert await upload(stub, h1, p1, md["school-1"]) is not None
    kept = Path(rc.store.receipts(1)[0].path)
    for c in calls:
        c.cancel()
    await rc.stop()
    await channel.close()
    data = bytearray(kept.read_bytes())
    data[float_offset(data)] ^= 0x7F
    kept.write_bytes(data)

    rc = await start_coordinator(cfg, run_rounds=True)
    channel, stub, md, calls = await connect(rc)
    try:
        assert rc.engine.current.number == 1 and rc.engine.current.accepted == set()
        assert await upload(stub, h1, p1, md["school-1"]) is not None   # taken again, not a replay
        p2 = tensors_to_bytes({k: torch.full_like(v, -0.25) for k, v in glob.items()})
        h2 = UploadHeader(1, "s2-upload", 10, sha256_hex(p2), len(p2), 0, glob_sha)
        assert await upload(stub, h2, p2, md["school-2"]) is not None
        await wait_for(lambda: (rc.store.get_round(1) or SimpleNamespace(status="")).status == "committed", 30,
                       "round 1 to commit")
        new = bytes_to_tensors(rc.engine.artifacts.get(rc.store.get_round(1).global_out))
        for k in glob:
            torch.testing.assert_close(new[k], glob[k] + (30 * 0.5 + 10 * -0.25) / 40)
    finally:
        for c in calls:
            c.cancel()
        await rc.stop()
        await channel.close()
