"""BLAKE3 digests on the transfers, negotiated (common/digest.py): the coordinator offers BLAKE3
in its JoinResponse and beside every artefact's sha256; schools that have it check downloads
and name uploads by it; schools and coordinators without it use sha256, and a wrong or
unoffered digest is refused with nothing kept."""

from __future__ import annotations

import hashlib
import json

import blake3
import grpc
import pytest

from common import PROTOCOL_VERSION, digest
from common.errors import ChecksumError, ProtocolError
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.serde import header_from_pb, header_to_pb, named_digest
from common.wire import sha256_hex, tensors_to_bytes
from fedclient.daemon import SchoolDaemon
from fedclient.transfer import download, upload
from fedserver.rounds import KINDS
from tests.conftest import TOKENS
from tests.test_rpc_errors import expect_status, good_delta, header_for, open_round, snapshot  # noqa: F401 (fixture)


def test_tagged_digests():
    data = b"school federation" * 1000
    b3 = blake3.blake3(data).hexdigest()
    assert digest.of(data, digest.SHA256) == hashlib.sha256(data).hexdigest()   # bare hex, as stored before BLAKE3
    assert digest.of(data, digest.BLAKE3) == "blake3:" + b3
    assert digest.split("blake3:" + b3) == ("blake3", b3) and digest.split(b3) == ("sha256", b3)
    assert digest.same_algorithm(data, "blake3:" + "0" * 64) == "blake3:" + b3
    assert digest.well_formed("blake3:" + b3) and digest.well_formed(b3)
    # an unknown tag is no tag: the whole string is taken for a (malformed) sha256 digest, never echoed as a name
    assert digest.split("md5:" + b3) == ("sha256", "md5:" + b3) and not digest.well_formed("md5:" + b3)
    assert not digest.well_formed("blake3:" + b3.upper())
    h = digest.hasher(digest.BLAKE3, data[:100])
    h.update(data[100:])
    assert h.hexdigest() == b3
    with pytest.raises(ValueError, match="not available"):
        digest.hasher("md5")
    assert digest.upload_algorithm(["blake3"]) == "blake3" and digest.upload_algorithm([]) == "sha256"
    assert digest.upload_algorithm(["something-new"]) == "sha256"


def test_header_names_one_digest_on_the_wire():
    h = UploadHeader(1, "u1", 10, "blake3:" + "ab" * 32, 100)
    m = header_to_pb(h)
    assert (m.sha256, m.blake3) == ("", "ab" * 32) and header_from_pb(m) == h
    m2 = header_to_pb(UploadHeader(1, "u1", 10, "cd" * 32, 100))
    assert (m2.sha256, m2.blake3) == ("cd" * 32, "") and header_from_pb(m2).digest == "cd" * 32
    m2.blake3 = "ab" * 32
    with pytest.raises(ProtocolError, match="set exactly one"):
        header_from_pb(m2)


def test_without_blake3_only_sha256(monkeypatch):
    monkeypatch.setattr(digest, "BLAKE3_AVAILABLE", False)
    assert digest.supported() == ("sha256",) and digest.offered() == ()
    assert digest.upload_algorithm(["blake3"]) == "sha256"   # offered, but this school cannot compute it


async def test_blake3_offered_announced_and_checked(open_round):
    rc, stub, sessions = open_round
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION),
                           metadata=[("authorization", f"Bearer {TOKENS['school-3']}")])
    assert list(resp.upload_digests) == ["blake3"]
    rnd = rc.engine.current
    data = rc.engine.artifacts.path(rnd.global_sha).read_bytes()
    ref = KINDS["train"].command(rc.engine, rnd, "school-1").adapter
    assert ref.sha256 == rnd.global_sha and ref.blake3 == blake3.blake3(data).hexdigest()
    # a school checks its download by BLAKE3: the right digest passes, a wrong one is refused
    # and the bytes are dropped (the next attempt starts over)
    md = sessions["school-1"]
    assert await download(stub, ref.sha256, md, bytearray(), blake3=ref.blake3) == data
    buf = bytearray()
    with pytest.raises(ChecksumError, match="blake3"):
        await download(stub, ref.sha256, md, buf, blake3="0" * 64)
    assert buf == bytearray()


async def test_upload_named_by_blake3(open_round):
    rc, stub, sessions = open_round
    payload = tensors_to_bytes(good_delta(rc))
    named = digest.of(payload, digest.BLAKE3)
    # a wrong BLAKE3 is refused as a wrong sha256 is, and nothing is kept
    before = snapshot(rc)
    wrong = digest.of(payload + b"x", digest.BLAKE3)
    await expect_status(upload(stub, header_for(rc, payload, digest=wrong, upload_id="u-wrong"), payload, sessions["school-1"]),
                        grpc.StatusCode.DATA_LOSS, "does not match")
    assert snapshot(rc) == before
    receipt = await upload(stub, header_for(rc, payload, digest=named), payload, sessions["school-1"])
    assert receipt is not None and (receipt.sha256, receipt.blake3) == ("", named.removeprefix("blake3:"))
    assert named_digest(receipt) == named
    (rc_row,) = rc.store.receipts(1)
    assert rc_row.digest == named and rc_row.kept_digest == named
    # a school that names by sha256 (older daemons) is still taken
    other = tensors_to_bytes({k: v * 2 for k, v in good_delta(rc).items()})
    assert await upload(stub, header_for(rc, other), other, sessions["school-2"]) is not None


async def test_coordinator_without_blake3(tmp_path, tiny_model, start_coordinator, monkeypatch):
    """Where the coordinator has no BLAKE3 it offers none, announces none, and refuses an upload
    named by it with what to do; sha256 works as before."""
    import grpc.aio

    from common.pb import federation_pb2_grpc as pb_grpc
    from common.wire import grpc_options
    from tests.conftest import coordinator_config, wait_for
    from tests.test_rpc_errors import _idle

    monkeypatch.setattr(digest, "BLAKE3_AVAILABLE", False)
    cfg = coordinator_config(tmp_path, tiny_model, schools=2, tls=False, rounds=dict(total=1, min_schools=2, quorum=2))
    rc = await start_coordinator(cfg, run_rounds=True)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)
    calls, mds = [], []
    try:
        for sid in ("school-1", "school-2"):
            resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
            assert list(resp.upload_digests) == []
            mds.append([("x-session-token", resp.session_token)])
            calls.append(stub.Session(_idle(), metadata=mds[-1]))
        await wait_for(lambda: rc.engine.current is not None, 20, "round 1 to open")
        rnd = rc.engine.current
        assert KINDS["train"].command(rc.engine, rnd, "school-1").adapter.blake3 == ""
        payload = tensors_to_bytes(good_delta(rc))
        monkeypatch.setattr(digest, "BLAKE3_AVAILABLE", True)   # this school has BLAKE3; the coordinator did not offer it
        h = header_for(rc, payload, digest=digest.of(payload, digest.BLAKE3))
        monkeypatch.setattr(digest, "BLAKE3_AVAILABLE", False)
        await expect_status(upload(stub, h, payload, mds[0]), grpc.StatusCode.INVALID_ARGUMENT, "name the payload by sha256")
        assert rc.store.get_upload(f"school-1.{h.upload_id}") is None
        receipt = await upload(stub, header_for(rc, payload), payload, mds[0])
        assert receipt is not None and receipt.sha256 == sha256_hex(payload)
    finally:
        for c in calls:
            c.cancel()
        await rc.stop()
        await channel.close()


def test_pending_upload_of_an_older_daemon_loads(tmp_path):
    """A result kept on disk by a daemon from before BLAKE3 names ('sha256' in its header) is
    resumed after the upgrade, not recomputed."""
    payload = b"\x00" * 64
    daemon = SchoolDaemon.__new__(SchoolDaemon)
    daemon.pending_dir = tmp_path
    meta, data = daemon._pending_paths(4)
    data.write_bytes(payload)
    meta.write_text(json.dumps({"round": 4, "upload_id": "r4-x", "num_examples": 1, "sha256": sha256_hex(payload),
                                "total_size": 64, "offset": 0, "base_sha256": "ab" * 32, "metrics": {},
                                "encoding": "", "kind": ""}))
    loaded = daemon._load_pending(4, "ab" * 32)
    assert loaded is not None and loaded[0].digest == sha256_hex(payload) and loaded[1] == payload
    # and a kept result whose bytes changed is dropped, whatever names it
    h = daemon._named(UploadHeader(4, "", 1, digest.of(payload, digest.BLAKE3), 64, 0, "ab" * 32), digest.of(payload, digest.BLAKE3))
    assert h.upload_id == "r4-" + blake3.blake3(payload).hexdigest()[:24]
    daemon._save_pending(h, payload)
    assert daemon._load_pending(4, "ab" * 32) == (h, payload)
    data.write_bytes(b"\x01" * 64)
    assert daemon._load_pending(4, "ab" * 32) is None and not meta.exists()


async def test_blake3_receipt_survives_a_restart_and_a_damaged_file_is_voided(tmp_path):
    """A result accepted under a BLAKE3 name is checked against it when a restart re-folds it;
    one whose kept file changed on disk is voided (the school sends it again)."""
    from pathlib import Path

    import torch

    from tests.test_verified_state import LAYOUT, counted, started, stop

    eng = await started(tmp_path)
    assert await eng._open_next()
    rnd = eng.current
    for sid, value in (("school-1", 0.01), ("school-2", 0.02)):
        payload = tensors_to_bytes({k: torch.full(v.shape, value) for k, v in LAYOUT.items()})
        named = digest.of(payload, digest.BLAKE3)
        part = tmp_path / f"{sid}.part"
        part.write_bytes(payload)
        h = UploadHeader(rnd.number, f"r1-{sid}", 10, named, len(payload), 0, rnd.global_sha)
        check = eng.stream_check(sid, h)
        if check is not None:
            check.feed(payload)
        if sid == "school-2":   # accepted only after the restart below
            break
        await eng.accept_upload(sid, h, part, named, check)
    (row,) = eng.store.receipts(1)
    assert row.digest == row.kept_digest == digest.of(Path(row.path).read_bytes(), digest.BLAKE3)
    await stop(eng)
    eng = await started(tmp_path)
    assert eng.current.accepted == {"school-1"} and counted(eng, "update") == 0
    await stop(eng)
    kept = Path(row.path)
    data = bytearray(kept.read_bytes())
    data[-1] ^= 0x01
    kept.write_bytes(data)
    eng = await started(tmp_path)
    assert eng.current.accepted == set() and eng.store.receipts(1) == [] and counted(eng, "update") == 1
    await stop(eng)


def test_second_copy_checked_by_blake3(tmp_path):
    """The second copy of a new global adapter is checked by the BLAKE3 known from its write;
    bytes that changed on disk before the copy are not copied, whichever digest checks them."""
    from fedserver.integrity import copy_verified

    src = tmp_path / "artefact"
    src.write_bytes(b"adapter bytes" * 1000)
    sha, b3 = sha256_hex(src.read_bytes()), blake3.blake3(src.read_bytes()).hexdigest()
    assert copy_verified(src, tmp_path / "copies" / "one", sha, b3)
    assert (tmp_path / "copies" / "one").read_bytes() == src.read_bytes()
    src.write_bytes(b"damaged bytes" * 1000)
    assert not copy_verified(src, tmp_path / "copies" / "two", sha, b3)
    assert not copy_verified(src, tmp_path / "copies" / "three", sha)
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == ["one"]
