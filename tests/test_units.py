"""Unit tests without gRPC: serde round trips, wire helpers, validation, FedAvg math, store."""

from __future__ import annotations

import dataclasses
import random
import sqlite3

import pytest
import torch

from common.errors import ChecksumError, ConfigError, DuplicateUploadError, ValidationError
from common.lora import TensorSpec
from common.messages import (
    ArtifactRef, Capabilities, DistillCommand, EvalReport, EvaluateCommand, Failure, Heartbeat, IdleCommand, Progress,
    SessionSettings, ShutdownCommand, TeachCommand, TrainCommand, UnknownCommand, UploadHeader,
)
from common.serde import (
    capabilities_from_pb, capabilities_to_pb, command_from_pb, command_to_pb, event_from_pb, event_to_pb,
    header_from_pb, header_to_pb, settings_from_pb, settings_to_pb,
)
from common.training import TrainParams
from common.wire import MAX_CHUNK_BYTES, bytes_to_tensors, iter_chunks, sha256_hex, tensors_to_bytes
from fedserver.store import Receipt, Store
from fedserver.strategy import ClientUpdate, FedAvg, STRATEGIES, create, register
from fedserver.validation import validate_update

# ---------------------------------------------------------------- serde


@pytest.mark.parametrize("cmd", [
    TrainCommand(3, 1234.5, ArtifactRef("a" * 64, 99), TrainParams(5, 4, 1e-4, 128, 7, 0.01)),
    DistillCommand(5, 99.0, ArtifactRef("a" * 64, 99), ArtifactRef("c" * 64, 7, "labelled-pack"),
                   TrainParams(5, 4, 1e-4, 128, 7), 0.5, 2.0),
    TeachCommand(6, 0.0, ArtifactRef("a" * 64, 99), ArtifactRef("d" * 64, 8, "pool-pack"), 1.5),
    EvaluateCommand(2, 0.0, ArtifactRef("b" * 64, 10), 16),
    IdleCommand(4, "not selected"),
    ShutdownCommand("done"),
    ShutdownCommand("finished", final=True),
])
def test_command_round_trip(cmd):
    assert command_from_pb(command_to_pb(cmd)) == cmd


@pytest.mark.parametrize("ev", [
    Heartbeat(12.5), Progress(1, "train", 0.5, "loss=1.2"), Failure(2, "upload", "boom"),
    EvalReport(3, 16, {"accuracy": 0.5, "loss": 1.5}),
])
def test_event_round_trip(ev):
    assert event_from_pb(event_to_pb(ev)) == ev


def test_header_settings_capabilities_round_trip():
    h = UploadHeader(1, "u1", 10, "c" * 64, 100, 5, "d" * 64, {"loss": 0.5})
    assert header_from_pb(header_to_pb(h)) == h
    s = SessionSettings("school-1", "tok", 2.0, MAX_CHUNK_BYTES, "0.1.0", '{"rank": 4}')
    assert settings_from_pb(settings_to_pb(s)) == s
    c = Capabilities("packaged:x", 4, 100, "cpu x2", "0.1.0")
    assert capabilities_from_pb(capabilities_to_pb(c)) == c


def test_malformed_messages_are_protocol_errors():
    from common.errors import ProtocolError
    from common.pb import federation_pb2 as pb

    with pytest.raises(ProtocolError):
        event_from_pb(pb.ClientEvent())
    with pytest.raises(TypeError):
        command_to_pb(UnknownCommand(1, "x"))


def test_a_command_this_side_does_not_know_is_kept_not_dropped():
    """A newer coordinator's command (an oneof member this build lacks, here: none set)
    becomes UnknownCommand with its round, so the daemon can report it back."""
    from common.pb import federation_pb2 as pb

    cmd = command_from_pb(pb.ServerCommand(round=7))
    assert isinstance(cmd, UnknownCommand) and cmd.round == 7 and "upgrade" in cmd.detail
    # Bytes from a newer protocol: field 99 of ServerCommand is unknown here and is skipped.
    newer = pb.ServerCommand(round=8).SerializeToString() + b"\x9a\x06\x02\x08\x01"
    cmd = command_from_pb(pb.ServerCommand.FromString(newer))
    assert isinstance(cmd, UnknownCommand) and cmd.round == 8


# ---------------------------------------------------------------- wire


def test_chunks_cover_payload_from_any_offset():
    data = bytes(random.Random(0).randbytes(10_000))
    for offset in (0, 1, 4096, 9_999, 10_000):
        pieces = list(iter_chunks(data, offset, 4096))
        assert b"".join(p for _, p in pieces) == data[offset:]
        assert all(len(p) <= 4096 for _, p in pieces)
        assert [o for o, _ in pieces] == list(range(offset, len(data), 4096))
    with pytest.raises(ValueError):
        list(iter_chunks(data, 0, MAX_CHUNK_BYTES + 1))
    with pytest.raises(ValueError):
        list(iter_chunks(data, 10_001))


def test_tensor_codec_round_trip_and_rejects_garbage():
    t = {"a": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.float16)}
    back = bytes_to_tensors(tensors_to_bytes(t))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    with pytest.raises(ValidationError):
        bytes_to_tensors(b"\x00" * 64)


# ---------------------------------------------------------------- validation

LAYOUT = {"x.lora_A.weight": TensorSpec((2, 8)), "x.lora_B.weight": TensorSpec((8, 2))}


def payload(**over):
    t = {"x.lora_A.weight": torch.ones(2, 8), "x.lora_B.weight": torch.ones(8, 2)}
    t.update(over)
    return tensors_to_bytes({k: v for k, v in t.items() if v is not None})


@pytest.mark.parametrize("over, message", [
    ({"x.lora_A.weight": torch.ones(3, 8)}, "shape"),
    ({"x.lora_A.weight": torch.ones(2, 8, dtype=torch.float64)}, "dtype"),
    ({"x.lora_A.weight": torch.full((2, 8), float("nan"))}, "NaN"),
    ({"x.lora_B.weight": torch.full((8, 2), float("-inf"))}, "NaN or Inf"),
    ({"x.lora_B.weight": torch.full((8, 2), 1e30)}, "too large"),
    ({"x.lora_B.weight": None}, "missing"),
    ({"y.lora_A.weight": torch.ones(1)}, "unexpected"),
])
def test_validation_rejections(over, message):
    data = payload(**over)
    with pytest.raises(ValidationError, match=message):
        validate_update(data, sha256_hex(data), LAYOUT)


def test_validation_checksum_and_norm_bound():
    data = payload()
    with pytest.raises(ChecksumError):
        validate_update(data, sha256_hex(b"other"), LAYOUT)
    assert set(validate_update(data, sha256_hex(data), LAYOUT, max_norm=10.0)) == set(LAYOUT)
    with pytest.raises(ValidationError, match="norm"):
        validate_update(data, sha256_hex(data), LAYOUT, max_norm=1.0)   # norm is sqrt(32)


def test_frozen_tensors_may_be_left_out_and_are_zero():
    """FFA-LoRA schools do not send their (zero) A deltas; only frozen names may be missing,
    and a frozen tensor that is sent is still checked."""
    data = payload(**{"x.lora_A.weight": None})
    got = validate_update(data, sha256_hex(data), LAYOUT, frozen=("lora_A",))
    assert set(got) == set(LAYOUT) and not got["x.lora_A.weight"].any()
    assert torch.equal(got["x.lora_B.weight"], torch.ones(8, 2))
    with pytest.raises(ValidationError, match="missing"):
        validate_update(data, sha256_hex(data), LAYOUT)                       # not frozen this round
    with pytest.raises(ValidationError, match="missing"):
        validate_update(data, sha256_hex(data), LAYOUT, frozen=("lora_B",))   # the wrong tensor left out
    bad = payload(**{"x.lora_A.weight": torch.full((2, 8), float("nan"))})
    with pytest.raises(ValidationError, match="NaN"):
        validate_update(bad, sha256_hex(bad), LAYOUT, frozen=("lora_A",))


# ---------------------------------------------------------------- FedAvg


def updates(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(f"s{i}", 1, n, {"a": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)}, {"loss": float(i)})
            for i, n in zip(range(k), [5, 1, 10, 3, 7][:k])]


def test_fedavg_matches_reference_weighted_mean():
    glob = {"a": torch.randn(4, 3), "b": torch.randn(2)}
    ups = updates(4)
    s = FedAvg()
    s.begin_round(1, glob)
    for u in ups:
        s.accumulate(u)
    out = s.finalize()
    total = sum(u.num_examples for u in ups)
    for k in glob:
        ref = glob[k] + sum(u.num_examples / total * u.delta[k] for u in ups)
        torch.testing.assert_close(out.state[k], ref)
    assert out.metrics["updates"] == 4 and out.metrics["examples"] == total


def test_fedavg_permutation_invariant_and_identical_updates():
    glob = {"a": torch.zeros(4, 3), "b": torch.zeros(2)}
    ups = updates(5, seed=3)
    results = []
    for order in (ups, list(reversed(ups)), random.Random(1).sample(ups, len(ups))):
        s = FedAvg()
        s.begin_round(1, glob)
        for u in order:
            s.accumulate(u)
        results.append(s.finalize().state)
    for r in results[1:]:
        for k in glob:
            torch.testing.assert_close(r[k], results[0][k], rtol=0, atol=1e-6)
    same = [dataclasses.replace(ups[0], school_id=f"c{i}", num_examples=i + 1) for i in range(3)]
    s = FedAvg()
    s.begin_round(1, glob)
    for u in same:
        s.accumulate(u)
    torch.testing.assert_close(s.finalize().state["a"], ups[0].delta["a"])


def test_fedavg_rejects_empty_round_and_zero_examples():
    s = FedAvg()
    s.begin_round(1, {"a": torch.zeros(1)})
    with pytest.raises(ValueError):
        s.finalize()
    with pytest.raises(ValueError):
        s.accumulate(ClientUpdate("s", 1, 0, {"a": torch.ones(1)}))


def test_registry_refuses_duplicates_and_unknown_names():
    assert "fedavg" in STRATEGIES and isinstance(create("fedavg"), FedAvg)
    with pytest.raises(ValueError, match="already registered"):
        register(FedAvg)
    with pytest.raises(ConfigError, match="unknown strategy"):
        create("nope")


# ---------------------------------------------------------------- store


def test_store_receipts_are_unique_and_durable(tmp_path):
    st = Store(tmp_path / "s.sqlite")
    st.open_round(1, ["a", "b"], "g" * 64, 0.0)
    rc = Receipt(1, "a", "u1", "h" * 64, 5, {"loss": 1.0}, "/p")
    st.add_receipt(rc)
    with pytest.raises(DuplicateUploadError):
        st.add_receipt(dataclasses.replace(rc, upload_id="u2"))
    st.close_round(1, "committed", "n" * 64, {"updates": 1.0}, {"b": "disconnected"})
    with pytest.raises(RuntimeError, match="not open"):
        st.close_round(1, "committed", "n" * 64, {}, {})
    st.close()
    again = Store(tmp_path / "s.sqlite")
    assert again.receipts(1) == [rc]
    r = again.get_round(1)
    assert r.status == "committed" and r.failures == {"b": "disconnected"}
    assert again.get_meta("global_sha256") == "n" * 64
    assert again.open_round_row() is None and again.last_round_number() == 1
    ro = Store(tmp_path / "s.sqlite", readonly=True)
    assert ro.committed_rounds() == 1


# ---------------------------------------------------------------- daemon pending uploads


def test_pending_upload_survives_a_daemon_restart_and_is_checked(tmp_path):
    """A trained delta is kept on disk until delivered; a stale or corrupt one is dropped."""
    from fedclient.config import SchoolConfig, SchoolSection
    from fedclient.daemon import SchoolDaemon

    cfg = SchoolConfig(school=SchoolSection(state_dir=tmp_path))
    payload = tensors_to_bytes({"a": torch.ones(3)})
    h = UploadHeader(4, "r4-x", 10, sha256_hex(payload), len(payload), 0, "b" * 64, {"loss": 1.0})
    SchoolDaemon(cfg, "tok", model=None)._save_pending(h, payload)          # type: ignore[arg-type]
    again = SchoolDaemon(cfg, "tok", model=None)                            # type: ignore[arg-type]
    assert again._load_pending(4, "b" * 64) == (h, payload)
    assert again._load_pending(4, "c" * 64) is None                          # trained on another adapter
    assert again._load_pending(4, "b" * 64) is None                          # ... and so it was dropped
    again._save_pending(h, payload)
    (tmp_path / "pending" / "round-4.safetensors").write_bytes(payload[:-1] + b"x")
    assert again._load_pending(4, "b" * 64) is None                          # corrupt on disk


def test_atomic_write_replaces_whole_file_and_leaves_no_debris(tmp_path):
    from common.files import atomic_write_bytes, atomic_write_text

    target = tmp_path / "sub" / "addr"
    atomic_write_text(target, "127.0.0.1:1\n")
    atomic_write_text(target, "127.0.0.1:2\n", fsync=False)
    assert target.read_text() == "127.0.0.1:2\n"

    with pytest.raises(TypeError):     # fails after the temp file exists
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_text() == "127.0.0.1:2\n"          # the old content survives a failed write
    assert sorted(p.name for p in target.parent.iterdir()) == ["addr"]


def test_simulated_attacker_section():
    from fedclient.config import SimulationSection

    d = {"a": torch.ones(2)}
    assert SimulationSection().apply(d) is d      # off by default: the update is untouched
    assert torch.equal(SimulationSection("sign_flip", 3.0).apply(d)["a"], torch.full((2,), -3.0))
    assert torch.equal(SimulationSection("scale", 100.0).apply(d)["a"], torch.full((2,), 100.0))
    assert SimulationSection("poison").problems() and SimulationSection("scale", 0.0).problems()


def test_school_section_checks_its_fields():
    from fedclient.config import SchoolSection

    assert SchoolSection().problems() == []
    problems = SchoolSection(coordinator="nohost", torch_threads=-1, max_batch_tokens=-5, max_backoff_s=0).problems()
    assert len(problems) == 4
    assert any("max_batch_tokens: must be >= 0" in p for p in problems)


def test_evaluation_section_checks_its_fields():
    from fedserver.config import EvaluationSection

    assert EvaluationSection().problems() == []
    problems = EvaluationSection(max_examples=-1, school_timeout_s=-1.0, threads=-2).problems()
    assert len(problems) == 3 and any("school_timeout_s" in p for p in problems)


def test_distill_section_checks_its_fields():
    from fedserver.config import DistillSection

    assert DistillSection().problems() == []
    problems = DistillSection(local_steps=-1, open_slice_size=-2, max_new_tokens=0).problems()
    assert len(problems) == 3 and any("local_steps" in p for p in problems) and any("max_new_tokens" in p for p in problems)


async def test_watchdog_pings_and_reports_a_stalled_loop():
    import asyncio
    import time

    from common import systemd

    pings: list[str] = []
    stalls: list[float] = []
    dog = asyncio.create_task(systemd.watchdog(pings.append, every_s=0.05, stall_warn_s=0.2, on_stall=stalls.append))
    await asyncio.sleep(0.3)
    assert len(pings) >= 3 and stalls == []
    time.sleep(0.5)            # block the loop, as a model load on it would
    await asyncio.sleep(0.1)
    dog.cancel()
    assert len(stalls) == 1 and stalls[0] > 0.2


def test_a_state_file_of_the_first_release_is_migrated(tmp_path):
    """Schema 0 (no round kinds, no plans, upload ids not filed per school) opens as schema 2:
    its rounds are training rounds with an empty plan (recomputed as before), receipts keep."""
    import sqlite3

    from fedserver.store import SCHEMA_VERSION

    old = sqlite3.connect(tmp_path / "state.sqlite")
    old.executescript("""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE rounds (round INTEGER PRIMARY KEY, status TEXT NOT NULL, participants TEXT NOT NULL,
      global_in TEXT NOT NULL, global_out TEXT, started_at REAL NOT NULL, deadline REAL NOT NULL, closed_at REAL,
      bytes_up INTEGER NOT NULL DEFAULT 0, bytes_down INTEGER NOT NULL DEFAULT 0,
      metrics TEXT NOT NULL DEFAULT '{}', failures TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE receipts (round INTEGER NOT NULL, school_id TEXT NOT NULL, upload_id TEXT NOT NULL UNIQUE,
      sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
      received_at REAL NOT NULL, PRIMARY KEY (round, school_id));
    INSERT INTO rounds VALUES (1, 'committed', '["school-1"]', 'a', 'b', 1.0, 2.0, 3.0, 10, 20, '{"updates": 1}', '{}');
    INSERT INTO rounds VALUES (2, 'open', '["school-1"]', 'b', NULL, 4.0, 5.0, NULL, 0, 0, '{}', '{}');
    INSERT INTO receipts VALUES (2, 'school-1', 'r2-abc', 'c', 5, '{}', '/x', 6.0);
    """)
    old.commit()
    old.close()
    with pytest.raises(RuntimeError, match="start the coordinator once"):
        Store(tmp_path / "state.sqlite", readonly=True)
    store = Store(tmp_path / "state.sqlite")
    assert [(r.round, r.kind, r.plan, r.status) for r in store.rounds()] == [(1, "train", {}, "committed"), (2, "train", {}, "open")]
    assert store.receipt_for_upload("school-1.r2-abc") is not None and store.receipts(2)[0].school_id == "school-1"
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()
    Store(tmp_path / "state.sqlite", readonly=True).close()   # readable by `fedserver status` now


async def test_a_round_loop_wait_does_not_lose_a_cancellation():
    """The engine's wait for a change must end with CancelledError when the coordinator is
    stopped, even if a change (a school leaving) lands in the same instant. Python 3.11's
    wait_for returned normally then, and the round loop ran on until its deadline (a teardown
    hung 240 s in CI)."""
    import asyncio

    from fedserver.engine import RoundEngine

    for _ in range(20):
        eng = RoundEngine.__new__(RoundEngine)
        eng._changed = asyncio.Event()
        task = asyncio.create_task(eng._wait_change(5.0))
        await asyncio.sleep(0.001)
        eng._changed.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done and task.cancelled()


# ---------------------------------------------------------------- evaluations written in shared transactions


async def test_evaluation_reports_share_transactions_and_each_caller_returns_after_its_commit(tmp_path):
    import asyncio

    from fedserver.store import GroupWriter

    store = Store(tmp_path / "s.sqlite")
    writer = GroupWriter(store.add_evals)

    async def report(i: int) -> None:
        await writer.add((1, f"school-{i}", 10, {"accuracy": i / 1000}))
        # its row is committed by the time the caller goes on
        assert any(e["source"] == f"school-{i}" for e in store.evals(1))

    await asyncio.gather(*(report(i) for i in range(300)))
    rows = store.evals(1)
    assert len(rows) == 300 and {e["source"] for e in rows} == {f"school-{i}" for i in range(300)}
    assert 1 <= writer.batches < 300   # many rows a transaction while they come at once

    # a write that fails: every caller of that batch hears it; the writer goes on afterwards
    real = store.add_evals

    def broken(rows):
        raise sqlite3.OperationalError("disk I/O error")
    writer._write_many = broken
    results = await asyncio.gather(*(writer.add((2, f"s{i}", 1, {})) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    writer._write_many = real
    # a caller that gives up waiting does not take its row out: it is still written
    task = asyncio.create_task(writer.add((3, "leaver", 5, {"accuracy": 0.5})))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await writer.add((3, "stayer", 5, {}))
    assert {e["source"] for e in store.evals(3)} == {"leaver", "stayer"}
    assert store.evals(2) == []
    store.close()


def test_writeback_started_per_chunk_leaves_the_bytes_as_written(tmp_path, monkeypatch):
    """start_writeback (sync_file_range where Linux has it) only starts the disk write early:
    the file holds exactly what was written, a bad descriptor or range is ignored, and where the
    call does not exist it does nothing."""
    import os

    from common import files

    payload = random.Random(1).randbytes(3 * 65536 + 17)
    path = tmp_path / "f"
    with open(path, "wb") as fh:
        for off in range(0, len(payload), 65536):
            fh.write(payload[off:off + 65536])
            files.start_writeback(fh.fileno(), off, len(payload[off:off + 65536]))
        os.fsync(fh.fileno())
    assert path.read_bytes() == payload
    files.start_writeback(-1, 0, 10)            # EBADF: ignored
    with open(path, "rb") as fh:
        files.start_writeback(fh.fileno(), 0, 0)   # nothing to start
    import sys

    monkeypatch.setattr(files, "_sync_file_range", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    files.start_writeback(-1, 0, 10)
    assert files._sync_file_range is False
