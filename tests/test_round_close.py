"""The round's hot path: uploads validated concurrently across schools (only receipt and fold
serialised), the close serialising the new adapter once (the PEFT checkpoint shares the
artefact's bytes), product-space metrics opt-in, and `seconds` covering the whole round."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file

from common.lora import LoraSettings, initial_state, write_peft_dir
from common.lora import TensorSpec
from common.safetensors_stream import write_safetensors
from common.wire import bytes_to_tensors, sha256_hex, tensors_to_bytes
from fedclient.transfer import upload
from fedserver import rounds as rounds_mod
from fedserver.artifacts import ArtifactStore
from fedserver.strategy import ClientUpdate, FedAvg, StrategyContext
from fedserver.validation import StreamCheck
from tests.test_rpc_errors import _idle, expect_status, good_delta, header_for, open_round  # noqa: F401 (fixture)

LAYOUT = {"m.lora_A.weight": TensorSpec((4, 32)), "m.lora_B.weight": TensorSpec((48, 4))}


# ---------------------------------------------------------------- one serialisation


def test_streamed_safetensors_are_byte_identical_to_safetensors_own(tmp_path):
    state = {k: torch.randn(v.shape) for k, v in initial_state(LAYOUT, 0).items()}
    sha, size = write_safetensors(tmp_path / "a", state)
    data = (tmp_path / "a").read_bytes()
    assert data == tensors_to_bytes(state)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))


def test_a_state_in_segments_is_written_in_runs_with_the_same_bytes(tmp_path):
    """Views of shared buffers (the new adapter's segments) are written a run at a time; runs
    break where views are not consecutive (out of order, a gap, another buffer, a transposed
    view): the bytes are still safetensors' own."""
    from fedserver.strategy.fedavg import segmented_empty_like

    like = {f"m.{i:02d}.w": torch.empty(3, 50 + i) for i in range(30)}
    state = segmented_empty_like(like, torch.float32)
    for v in state.values():
        v.copy_(torch.randn(v.shape))
    buf = torch.randn(1000)
    state.update({"m.05.w": buf[200:200 + 3 * 55].view(3, 55),   # another buffer in the middle
                  "z.gap.a": buf[0:4], "z.gap.b": buf[6:10],            # a gap between two views
                  "z.t": torch.randn(6, 4).t(),                         # not contiguous
                  "a.rev.1": buf[50:60], "a.rev.0": buf[60:70]})        # consecutive, but out of name order
    sha, size = write_safetensors(tmp_path / "s", state)
    data = (tmp_path / "s").read_bytes()
    assert data == tensors_to_bytes({k: v.contiguous() for k, v in state.items()})
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))


def test_streamed_safetensors_of_mixed_dtypes_load_back(tmp_path):
    state = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(7, dtype=torch.int32),
             "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.zeros(0), "e": torch.tensor(True)}
    write_safetensors(tmp_path / "m", state)
    back = load_file(str(tmp_path / "m"))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_put_tensors_is_content_addressed_and_leaves_no_temp(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    state = initial_state(LAYOUT, 0)
    sha = store.put_tensors(state)
    assert sha == sha256_hex(tensors_to_bytes(state)) == store.put(tensors_to_bytes(state))
    assert store.put_tensors(state) == sha                        # idempotent
    assert sorted(p.name for p in store.root.iterdir()) == [sha]  # no temp file left behind
    assert torch.equal(bytes_to_tensors(store.get(sha))["m.lora_B.weight"], state["m.lora_B.weight"])


def test_checkpoint_shares_the_artefact_bytes(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    state = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    sha = store.put_tensors(state)
    ckpt = tmp_path / "ckpt" / "adapter"
    write_peft_dir(ckpt, state, LoraSettings(rank=4, alpha=8.0), "dir:/nowhere", weights_file=store.path(sha))
    weights = ckpt / "adapter_model.safetensors"
    assert weights.stat().st_ino == store.path(sha).stat().st_ino     # one file, two names: no second write
    assert torch.equal(load_file(str(weights))["m.lora_A.weight"], state["m.lora_A.weight"])
    # without a file to share, the bytes are written as before
    write_peft_dir(tmp_path / "other", state, LoraSettings(rank=4, alpha=8.0), "dir:/nowhere")
    assert (tmp_path / "other" / "adapter_model.safetensors").read_bytes() == store.get(sha)


# ---------------------------------------------------------------- the aggregation


@pytest.mark.parametrize("product_metrics", [False, True])
def test_step_norm_only_when_asked_and_the_global_is_never_changed(product_metrics):
    glob = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    before = {k: v.clone() for k, v in glob.items()}
    s = FedAvg()
    s.setup(StrategyContext(LoraSettings(rank=4, alpha=8.0), LAYOUT, ("a", "b"), product_metrics=product_metrics))
    s.begin_round(1, glob)
    d1 = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    d2 = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    s.accumulate(ClientUpdate("a", 1, 3, d1, {}, None))
    s.accumulate(ClientUpdate("b", 1, 1, d2, {}, None))
    res = s.finalize()
    for k in LAYOUT:
        torch.testing.assert_close(res.state[k], glob[k] + 0.75 * d1[k] + 0.25 * d2[k])
        assert torch.equal(glob[k], before[k])
    assert ("step_norm" in res.metrics) is product_metrics
    assert res.metrics["update_norm"] > 0


# ---------------------------------------------------------------- uploads in parallel


def around_validation(monkeypatch, before) -> None:
    """`before()` runs in the worker thread where acceptance decides an upload: the verdict of
    the check made while the bytes arrived (`StreamCheck.result`), or `validate_update` of a
    payload read back whole."""
    real_validate, real_result = rounds_mod.validate_update, StreamCheck.result

    def validate(*args, **kwargs):
        before()
        return real_validate(*args, **kwargs)

    def result(self, *args, **kwargs):
        before()
        return real_result(self, *args, **kwargs)

    monkeypatch.setattr(rounds_mod, "validate_update", validate)
    monkeypatch.setattr(StreamCheck, "result", result)


def held_validation(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Validation that signals `entered` and then waits for `release` (10 s at most)."""
    entered, release = threading.Event(), threading.Event()

    def held():
        entered.set()
        release.wait(10)

    around_validation(monkeypatch, held)
    return entered, release


async def test_uploads_are_validated_concurrently(open_round, monkeypatch):
    """Both schools' validations must be in progress at the same moment: a barrier of two
    parties inside validation breaks (and the upload fails) if they ran one at a time."""
    rc, stub, sessions = open_round
    barrier = threading.Barrier(2, timeout=10)
    # BrokenBarrierError after 10 s if the other validation never starts
    around_validation(monkeypatch, barrier.wait)
    payloads = {sid: tensors_to_bytes({k: v * (i + 1) for k, v in good_delta(rc).items()})
                for i, sid in enumerate(("school-1", "school-2"))}
    receipts = await asyncio.gather(*(upload(stub, header_for(rc, p), p, sessions[sid]) for sid, p in payloads.items()))
    assert all(r is not None for r in receipts)
    assert sorted(r.school_id for r in rc.store.receipts(1)) == ["school-1", "school-2"]


async def test_second_upload_while_the_first_is_validated_is_refused(open_round, monkeypatch):
    rc, stub, sessions = open_round
    entered, release = held_validation(monkeypatch)
    first = tensors_to_bytes(good_delta(rc))
    second = tensors_to_bytes({k: 2 * v for k, v in good_delta(rc).items()})
    task = asyncio.create_task(upload(stub, header_for(rc, first), first, sessions["school-1"]))
    await asyncio.to_thread(entered.wait, 10)
    await expect_status(upload(stub, header_for(rc, second), second, sessions["school-1"]),
                        grpc.StatusCode.ALREADY_EXISTS, "being accepted")
    release.set()
    assert await task is not None
    (receipt,) = rc.store.receipts(1)
    assert receipt.digest == sha256_hex(first)
    assert bytes_to_tensors(open(receipt.path, "rb").read()).keys() == rc.engine.layout.keys()


async def test_upload_validated_while_its_round_closed_is_refused_and_not_kept(open_round, monkeypatch):
    rc, stub, sessions = open_round
    good = tensors_to_bytes(good_delta(rc))
    assert await upload(stub, header_for(rc, good), good, sessions["school-1"]) is not None
    entered, release = held_validation(monkeypatch)
    late = tensors_to_bytes({k: 2 * v for k, v in good_delta(rc).items()})
    task = asyncio.create_task(upload(stub, header_for(rc, late), late, sessions["school-2"]))
    await asyncio.to_thread(entered.wait, 10)
    rnd = rc.engine.current
    rnd.deadline = 0.0      # the deadline passes while school-2's upload is being validated
    rc.engine._changed.set()
    # quorum is 2, so round 1 fails with one result; wait until it is closed
    for _ in range(200):
        if rc.engine.current is not rnd:
            break
        await asyncio.sleep(0.05)
    assert rc.engine.current is not rnd
    release.set()
    await expect_status(task, grpc.StatusCode.FAILED_PRECONDITION, "closed while this upload was being validated")
    assert [r.school_id for r in rc.store.receipts(1)] == ["school-1"]
    leftovers = list((rc.engine.updates_dir / "round-1").glob("*")) if (rc.engine.updates_dir / "round-1").exists() else []
    assert leftovers == []


# ---------------------------------------------------------------- the round's time


async def test_round_seconds_cover_the_close(open_round, monkeypatch):
    """A slow commit (here the aggregation, made to take 0.5 s) is part of the round's time."""
    rc, stub, sessions = open_round
    real = rc.engine.strategy.finalize

    def slow_finalize():
        import time
        time.sleep(0.5)
        return real()

    monkeypatch.setattr(rc.engine.strategy, "finalize", slow_finalize)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i, sid in enumerate(("school-1", "school-2")):
        p = tensors_to_bytes({k: v * (i + 1) for k, v in good_delta(rc).items()})
        assert await upload(stub, header_for(rc, p), p, sessions[sid]) is not None
    for _ in range(200):
        rows = [r for r in rc.store.rounds() if r.round == 1 and r.status == "committed"]
        if rows:
            break
        await asyncio.sleep(0.05)
    (row,) = rows
    metrics = row.metrics
    assert metrics["seconds"] >= 0.5
    assert metrics["seconds"] <= loop.time() - t0 + 60   # and no nonsense
    assert "step_norm" not in metrics   # product metrics are opt-in ([strategy] product_metrics)
    ckpt = rc.engine.checkpoint_dir / "1" / "adapter" / "adapter_model.safetensors"
    assert ckpt.stat().st_ino == rc.engine.artifacts.path(row.global_out).stat().st_ino


# ---------------------------------------------------------------- downloads framed around the bytes read


def test_framed_chunks_are_protobufs_own_encoding(tmp_path):
    from common.pb import federation_pb2 as pb
    from fedserver.downloads import read_chunk

    data = bytes(range(256)) * 41   # 10,496 bytes: 10 whole chunks of 1,000 and a short one
    (tmp_path / "a").write_bytes(data)
    with open(tmp_path / "a", "rb") as fh:
        chunks = [read_chunk(fh, off, len(data), chunk=1000) for off in range(0, len(data), 1000)]
        scratch = bytearray(1032)   # one buffer for every chunk, as the servicer frames them: the same bytes
        assert [read_chunk(fh, off, len(data), 1000, scratch) for off in range(0, len(data), 1000)] == chunks
        assert read_chunk(fh, 0, 0) == pb.Chunk().SerializeToString()   # an empty artefact
        (tmp_path / "a").write_bytes(data[:500])   # shorter than announced: it changed on disk
        with pytest.raises(OSError, match="changed on disk"):
            read_chunk(fh, 600, len(data), chunk=1000)
    for off, c in zip(range(0, len(data), 1000), chunks):
        assert c == pb.Chunk(offset=off, data=data[off:off + 1000], total_size=len(data)).SerializeToString()


async def test_downloads_are_whole_from_any_offset_and_counted(open_round):
    from fedclient.transfer import download

    rc, stub, sessions = open_round
    sha = rc.engine.current.global_sha
    full = rc.engine.artifacts.get(sha)
    down0 = rc.engine._bytes.get(1, [0, 0])[1]
    assert await download(stub, sha, sessions["school-1"], bytearray()) == full
    assert await download(stub, sha, sessions["school-2"], bytearray()) == full
    assert rc.engine._bytes.get(1, [0, 0])[1] - down0 == 2 * len(full)
    # a resume off a chunk boundary gets the same bytes
    assert await download(stub, sha, sessions["school-1"], bytearray(full[:1000])) == full


# ---------------------------------------------------------------- validation without a copy


def _packed(state):
    return bytearray(tensors_to_bytes(state))


def test_packed_payload_is_validated_as_views_of_the_received_bytes():
    from fedserver.validation import packed_views, validate_update

    state = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    buf = _packed(state)
    got = validate_update(buf, sha256_hex(bytes(buf)), LAYOUT, max_norm=1e6)
    for k, v in state.items():
        assert torch.equal(got[k], v)
        assert got[k].untyped_storage().data_ptr() == packed_views(buf, LAYOUT)[0].untyped_storage().data_ptr()
    # bytes (not a writable buffer) take the general parser, with the same result
    assert all(torch.equal(validate_update(bytes(buf), sha256_hex(bytes(buf)), LAYOUT)[k], v) for k, v in state.items())


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "m.lora_B.weight: contains NaN or Inf"),
    (float("inf"), "m.lora_B.weight: contains NaN or Inf"),
    (3e38, "m.lora_B.weight: contains values too large"),
])
def test_packed_payload_with_bad_values_names_the_tensor(bad, message):
    from common.errors import ValidationError
    from fedserver.validation import validate_update

    state = {k: torch.zeros(v.shape) for k, v in LAYOUT.items()}
    state["m.lora_B.weight"][3, 1] = bad
    state["m.lora_B.weight"][4, 1] = bad
    buf = _packed(state)
    with pytest.raises(ValidationError, match=message):
        validate_update(buf, sha256_hex(bytes(buf)), LAYOUT)


def test_packed_payload_norm_bound_and_odd_layouts_fall_back():
    from common.errors import ValidationError
    from fedserver.validation import packed_views, validate_update

    state = {k: torch.ones(v.shape) for k, v in LAYOUT.items()}
    buf = _packed(state)
    with pytest.raises(ValidationError, match="exceeds the bound"):
        validate_update(buf, sha256_hex(bytes(buf)), LAYOUT, max_norm=1.0)
    # wrong shape, extra tensor, other dtype: not packed as the layout says -> the general parser's messages
    for other, message in [({**state, "m.lora_A.weight": torch.ones(5, 32)}, "shape"),
                           ({**state, "x": torch.ones(1)}, "unexpected"),
                           ({k: v.double() for k, v in state.items()}, "dtype")]:
        b = bytearray(tensors_to_bytes(other))
        assert packed_views(b, LAYOUT) is None
        with pytest.raises(ValidationError, match=message):
            validate_update(b, sha256_hex(bytes(b)), LAYOUT)
    # a header whose offsets overlap or leave gaps is not taken as packed
    import json as _json
    import struct as _struct
    n = _struct.unpack_from("<Q", buf, 0)[0]
    header = _json.loads(bytes(buf[8:8 + n]))
    header["m.lora_A.weight"]["data_offsets"] = [0, 4 * 4 * 32]
    header["m.lora_B.weight"]["data_offsets"] = [0, 4 * 48 * 4]
    raw = _json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    forged = bytearray(_struct.pack("<Q", len(raw)) + raw + bytes(buf[8 + n:]))
    assert packed_views(forged, LAYOUT) is None
    with pytest.raises(ValidationError):
        validate_update(forged, sha256_hex(bytes(forged)), LAYOUT)


# ---------------------------------------------------------------- the new adapter written while it is made


def _streaming_round(tmp_path, monkeypatch, **kw):
    """A FedAvg round over a 6-tensor layout whose new state comes in several buffers (the
    segment size made small), with the global held as its file, as the engine holds it."""
    from fedserver import validation
    from fedserver.strategy import fedavg

    monkeypatch.setattr(fedavg, "SEGMENT_BYTES", 512)
    layout = {}
    for j in range(3):
        layout |= {f"m.{j}.lora_A.weight": TensorSpec((4, 16 + j)), f"m.{j}.lora_B.weight": TensorSpec((16 + j, 4))}
    store = ArtifactStore(tmp_path / "art")
    glob = {k: torch.randn(v.shape) for k, v in layout.items()}
    held = validation.FileState.open(store.path(store.put_tensors(glob)))
    s = FedAvg()
    s.setup(StrategyContext(LoraSettings(rank=4, alpha=8.0), layout, ("a", "b"), **kw))
    s.begin_round(1, held)
    deltas = [{k: torch.randn(v.shape) for k, v in layout.items()} for _ in range(2)]
    for sid, d in zip("ab", deltas):
        s.accumulate(ClientUpdate(sid, 1, 2, d, {}, None))
    return store, held, s, glob, deltas


def test_fedavg_new_state_is_stored_while_it_is_made(tmp_path, monkeypatch):
    from common.digest import BLAKE3, hasher

    store, held, s, glob, deltas = _streaming_round(tmp_path, monkeypatch)
    streamed = store.begin_tensors(held.meta())
    given = []
    assert s.stream_state(lambda buf: (given.append(buf.numel()), streamed.add(buf)))
    res = s.finalize()
    s.stream_state(None)
    assert len(given) > 2                                     # buffer by buffer, not whole
    for k in glob:
        torch.testing.assert_close(res.state[k], glob[k] + (deltas[0][k] + deltas[1][k]) / 2)
    assert streamed.holds(res.state)
    sha = streamed.commit()
    data = store.path(sha).read_bytes()
    assert data == tensors_to_bytes(res.state) and sha == sha256_hex(data)
    assert store.blake3(sha) == hasher(BLAKE3, data).hexdigest()
    assert sorted(p.name for p in store.root.iterdir()) == sorted({sha, held.path.name})   # no temp file
    streamed.discard()                                        # after a commit: nothing to do
    assert store.path(sha).read_bytes() == data


def test_a_state_that_is_not_the_bytes_streamed_is_not_taken(tmp_path, monkeypatch):
    """A wrapper that returns other tensors than the buffers it streamed (here: copies, one
    changed) is caught; the bytes written are thrown away, and the state is stored whole."""
    store, held, s, _, _ = _streaming_round(tmp_path, monkeypatch)
    streamed = store.begin_tensors(held.meta())
    s.stream_state(streamed.add)
    res = s.finalize()
    other = {k: v.clone() for k, v in res.state.items()}
    next(iter(other.values()))[0, 0] += 1.0
    assert not streamed.holds(other)
    assert not streamed.holds({k: v for k, v in list(res.state.items())[1:]})   # a tensor missing
    assert streamed.holds(res.state)
    streamed.discard()
    assert sorted(p.name for p in store.root.iterdir()) == [held.path.name]
    assert store.put_tensors(other) == sha256_hex(tensors_to_bytes(other))


def test_a_failed_write_while_streaming_falls_back_and_loses_nothing(tmp_path, monkeypatch):
    from common import safetensors_stream

    store, held, s, _, _ = _streaming_round(tmp_path, monkeypatch)
    streamed = store.begin_tensors(held.meta())

    def full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_stream.SafetensorsWriter, "_write", full)
    s.stream_state(streamed.add)
    res = s.finalize()                                        # the strategy is not disturbed
    assert not streamed.holds(res.state) and isinstance(streamed.failed, OSError)
    streamed.discard()
    assert sorted(p.name for p in store.root.iterdir()) == [held.path.name]
    monkeypatch.undo()
    assert sha256_hex(store.path(store.put_tensors(res.state)).read_bytes()) == sha256_hex(tensors_to_bytes(res.state))


def test_a_finalize_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    store, held, s, _, _ = _streaming_round(tmp_path, monkeypatch)
    streamed = store.begin_tensors(held.meta())
    s.stream_state(streamed.add)
    key = sorted(s._sum)[-1]
    s._sum[key] = torch.zeros(3, dtype=torch.float64)          # the last tensor's step has a wrong shape
    with pytest.raises(ValueError, match="shape"):
        s.finalize()
    assert streamed.spans and not streamed.holds({})         # some buffers went out before the error
    streamed.discard()
    assert sorted(p.name for p in store.root.iterdir()) == [held.path.name]


def test_safetensors_writer_refuses_too_few_or_too_many_bytes(tmp_path):
    from common.safetensors_stream import SafetensorsWriter

    like = {"a": torch.zeros(4), "b": torch.zeros(2)}
    w = SafetensorsWriter(tmp_path / "short", like)
    w.add(memoryview(bytes(16)))
    with pytest.raises(ValueError, match="16 bytes more than|announces"):
        w.finish()
    w = SafetensorsWriter(tmp_path / "long", like)
    with pytest.raises(ValueError, match="more than"):
        w.add(memoryview(bytes(25)))
    w.add(memoryview(bytes(24)))
    sha, size = w.finish()
    assert (tmp_path / "long").read_bytes() == tensors_to_bytes(like) and size == len(tensors_to_bytes(like))


def test_file_state_reads_some_tensors_and_refuses_unknown_ones(tmp_path):
    from fedserver import validation

    state = {k: torch.randn(v.shape) for k, v in LAYOUT.items()}
    store = ArtifactStore(tmp_path / "art")
    held = validation.FileState.open(store.path(store.put_tensors(state)))
    part = {"m.lora_B.weight": torch.empty(48, 4)}
    held.read_into(part)
    assert torch.equal(part["m.lora_B.weight"], state["m.lora_B.weight"])
    with pytest.raises(KeyError, match="no tensor 'x'"):
        held.read_into({"x": torch.empty(1)})


async def _round_1_closed(rc, stub, sessions):
    """Both schools upload (0.01 and 0.02 everywhere); round 1's row once it is closed."""
    for i, sid in enumerate(("school-1", "school-2")):
        p = tensors_to_bytes({k: v * (i + 1) for k, v in good_delta(rc).items()})
        assert await upload(stub, header_for(rc, p), p, sessions[sid]) is not None
    for _ in range(200):
        rows = [r for r in rc.store.rounds() if r.round == 1]
        if rows and rows[0].status != "open":
            break
        await asyncio.sleep(0.05)
    (row,) = rows
    return row


async def test_the_engine_stores_a_fedavg_adapter_while_it_is_made(open_round, monkeypatch):
    """The round's commit takes the streamed bytes (put_tensors is never called); a strategy
    that does not stream gets the same adapter written whole."""
    rc, stub, sessions = open_round

    def whole(*a, **k):
        raise AssertionError("the new adapter was written whole")

    monkeypatch.setattr(ArtifactStore, "put_tensors", whole)
    row = await _round_1_closed(rc, stub, sessions)
    assert row.status == "committed", row
    data = rc.engine.artifacts.path(row.global_out).read_bytes()
    assert sha256_hex(data) == row.global_out
    before = bytes_to_tensors(rc.engine.artifacts.get(row.global_in))
    for k, v in bytes_to_tensors(data).items():   # the mean of 0.01 and 0.02 added (equal weights)
        torch.testing.assert_close(v, before[k] + 0.015)
    assert not list(rc.engine.artifacts.root.glob(".put-*"))


async def test_a_strategy_that_does_not_stream_gets_its_adapter_written_whole(open_round, monkeypatch):
    rc, stub, sessions = open_round
    monkeypatch.setattr(rc.engine.strategy, "stream_state", lambda sink: False)
    wrote = []
    real = ArtifactStore.put_tensors
    monkeypatch.setattr(ArtifactStore, "put_tensors", lambda self, t: wrote.append(1) or real(self, t))
    row = await _round_1_closed(rc, stub, sessions)
    assert row.status == "committed" and wrote == [1]
    assert sha256_hex(rc.engine.artifacts.path(row.global_out).read_bytes()) == row.global_out
    assert not list(rc.engine.artifacts.root.glob(".put-*"))


def test_a_half_streamed_adapter_of_a_killed_coordinator_is_swept_at_start(tmp_path, monkeypatch):
    """A coordinator killed while its new adapter was being streamed leaves the temporary file;
    the next start removes it with the rest of a killed run's debris."""
    from fedserver.transfers import sweep_crash_debris

    store, held, s, _, _ = _streaming_round(tmp_path, monkeypatch)
    streamed = store.begin_tensors(held.meta())
    s.stream_state(streamed.add)
    s.finalize()
    streamed.writer.close()                                   # killed before the commit: the file stays
    assert streamed.tmp.exists()
    assert sweep_crash_debris(tmp_path, tmp_path / "updates", None, time.time() + 1) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [held.path.name]
