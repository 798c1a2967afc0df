"""Issue #8 (hardening): a school's strings checked at the boundary and never handed to the
filesystem; logs that follow their configuration, hold no secret and quote a school's text
cut short and rate-limited; a Join that cannot be recorded changes nothing; a school leaving
while a round opens does not stop the engine; secrets written 0600, never through a link."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pathlib
import sqlite3
import sys
import warnings

import grpc
import pytest
import structlog

from common import PROTOCOL_VERSION
from common.logs import LineBudget, configure_logging, school_text, scrub
from common.messages import Capabilities, TrainCommand
from common.pb import federation_pb2 as pb
from fedserver import inputs
from tests.conftest import TOKENS, coordinator_config, wait_for
from tests.test_rpc_errors import expect_status, open_round  # noqa: F401 (fixture)


def _bearer(school: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[school]}")]


@pytest.fixture
def captured_log(monkeypatch):
    """configure_logging(...) into a StringIO; everything it changed is undone afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, __import__("threading").excepthook)
    buf = io.StringIO()

    def configure(level: str = "info", json: bool = False) -> io.StringIO:
        monkeypatch.setattr(sys, "stderr", buf)   # in the test's own phase (pytest's capture resets it per phase)
        configure_logging(level, json=json)
        return buf

    yield configure
    structlog.configure(**saved)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    sys.excepthook, __import__("threading").excepthook = hooks
    logging.captureWarnings(False)
    warnings.resetwarnings()


# ---------------------------------------------------------------- 1. a school's strings


async def test_long_model_name_is_refused_without_touching_the_filesystem(open_round, monkeypatch):
    rc, stub, _ = open_round
    seen: list[str] = []
    for name in ("is_dir", "exists", "is_file", "stat"):
        real = getattr(pathlib.Path, name)

        def spy(self, *a, _real=real, **kw):
            seen.append(str(self))
            return _real(self, *a, **kw)
        monkeypatch.setattr(pathlib.Path, name, spy)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **kw: (seen.append(str(p)), real_stat(p, *a, **kw))[1])

    def join(**caps):
        return stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=pb.Capabilities(**caps)),
                         metadata=_bearer("school-3"))

    # 300 characters: once an OSError (File name too long) from Path.is_dir and INTERNAL
    await expect_status(join(model="m" * 300), grpc.StatusCode.FAILED_PRECONDITION, "set [model] base")
    await expect_status(join(model="d/" * 150), grpc.StatusCode.FAILED_PRECONDITION, "set [model] base")
    await expect_status(join(model="m" * 600), grpc.StatusCode.INVALID_ARGUMENT, "capabilities.model: 600 characters; allowed: 0-512")
    await expect_status(join(model="packaged:x\x1b[2J"), grpc.StatusCode.INVALID_ARGUMENT, "capabilities.model: holds characters")
    await expect_status(join(hardware="h" * 201), grpc.StatusCode.INVALID_ARGUMENT, "capabilities.hardware")
    await expect_status(join(client_version="1.0; rm -rf /"), grpc.StatusCode.INVALID_ARGUMENT,
                        "capabilities.client_version: holds characters that are not allowed; allowed: letters, digits")
    await expect_status(join(num_examples=10**12), grpc.StatusCode.INVALID_ARGUMENT, "capabilities.num_examples")
    assert not [p for p in seen if "mmmm" in p or "d/d/" in p or "\x1b" in p], "a school's string reached the filesystem"
    assert "school-3" not in rc.engine.sessions and not [s for s in rc.store.schools() if s["id"] == "school-3"]
    # the school's own model, in any of its spellings, still joins
    resp = await join(model=rc.cfg.model.base, hardware="cpu x2", client_version="0.9.1+local")
    assert resp.session_token


def test_same_model_reads_text_only(monkeypatch):
    def no_fs(self, *a, **kw):
        raise AssertionError(f"filesystem call with {self}")
    monkeypatch.setattr(pathlib.Path, "is_dir", no_fs)
    hub = "hub:HuggingFaceTB/SmolLM2-135M-Instruct"
    assert inputs.same_model("HuggingFaceTB/SmolLM2-135M-Instruct", hub)
    assert inputs.same_model(hub, hub) and not inputs.same_model("hub:other/model", hub)
    assert inputs.same_model("/srv/models/tiny", "dir:/srv/models/tiny")
    assert inputs.same_model("org/name", "dir:org/name")          # a bare value: a directory or a hub id
    assert inputs.same_model("/x/model.gguf", "gguf:/x/model.gguf")
    assert not inputs.same_model("x" * 400, "dir:/srv/models/tiny")


async def test_session_event_out_of_bounds_ends_the_stream(open_round):
    rc, stub, sessions = open_round

    async def one(event):
        yield event
        await asyncio.sleep(30)   # the coordinator must end the stream, not the school

    cases = [
        (pb.ClientEvent(failure=pb.Failure(round=1, phase="train", message="x" * 1001)), "failure.message: 1001 characters"),
        (pb.ClientEvent(failure=pb.Failure(round=1, phase="../../etc", message="m")), "failure.phase"),
        (pb.ClientEvent(progress=pb.Progress(round=1, phase="train", fraction=float("nan"))), "progress.fraction"),
        (pb.ClientEvent(progress=pb.Progress(round=1, phase="train", fraction=0.5, detail="\x00" * 5)), "progress.detail"),
    ]
    # school-3 joins: a session of a school that is not in the open round
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=_bearer("school-3"))
    md = [("x-session-token", resp.session_token)]
    for event, text in cases:
        call = stub.Session(one(event), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async def drain(c=call):
                async for _ in c:
                    pass
            await asyncio.wait_for(drain(), 10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert text in err.value.details() and "allowed" in err.value.details()
    assert "school-1" in rc.engine.current.pending() and not rc.engine.current.failed


async def test_upload_strings_checked_before_anything_is_stored(open_round):
    rc, stub, sessions = open_round
    md = sessions["school-1"]
    rnd = rc.engine.current

    def header(**kw):
        fields = dict(round=rnd.number, upload_id="u-1", num_examples=10, sha256="ab" * 32, total_size=100,
                      base_sha256=rnd.global_sha)
        fields.update(kw)
        return pb.UploadHeader(**fields)

    for kw, text in [
        (dict(upload_id="é" * 8), "upload_id: holds characters"),       # unicode letters: isalnum() took them
        (dict(upload_id="u" * 129), "upload_id: 129 characters"),
        (dict(sha256="z" * 64), "sha256: holds characters"),
        (dict(sha256="AB" * 32), "sha256: holds characters"),
        (dict(sha256="", blake3="z" * 64), "blake3: holds characters"),
        (dict(blake3="ab" * 32), "set exactly one"),   # named by both
        (dict(sha256="blake3:" + "ab" * 32), "sha256: holds characters"),   # a tag is not a digest field's value
        (dict(base_sha256="../" * 3), "base_sha256"),
        (dict(encoding="int8\n"), "encoding"),
        (dict(kind="k" * 40), "kind: 40 characters"),
    ]:
        await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id="u-1", header=header(**kw)), metadata=md),
                            grpc.StatusCode.INVALID_ARGUMENT, text)
    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id="../../x"), metadata=md),
                        grpc.StatusCode.INVALID_ARGUMENT, "upload_id")
    call = stub.Download(pb.DownloadRequest(sha256="../" * 20), metadata=md)
    await expect_status(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "sha256")
    assert rc.store.get_upload("school-1.u-1") is None and not list((rc.cfg.server.state_dir / "uploads").iterdir())


def test_field_rules_say_what_is_allowed():
    for name, rule in inputs.RULES.items():
        bad = "x" * (rule.max_len + 1)
        with pytest.raises(Exception) as err:
            inputs.text(name, bad)
        assert name in str(err.value) and "allowed" in str(err.value) and bad not in str(err.value)


# ---------------------------------------------------------------- 2. logs


def test_module_loggers_follow_the_configured_format_and_level(captured_log):
    from fedserver import servicer   # its logger was made at import, before any configuration

    buf = captured_log("warning", json=True)
    servicer.log.info("an info line")
    servicer.log.warning("a warning line", n=1)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [(x["event"], x["level"], x["component"]) for x in lines] == [("a warning line", "warning", "servicer")]
    buf.truncate(0)
    buf.seek(0)
    captured_log("info", json=False)
    servicer.log.info("now info", n=2)
    out = buf.getvalue()
    assert "now info" in out and "n=2" in out and not out.lstrip().startswith("{")


@pytest.mark.parametrize("as_json", [False, True])
async def test_no_token_in_the_log_when_a_handler_raises(open_round, captured_log, monkeypatch, as_json):
    from fedserver.auth import Authenticator

    rc, stub, sessions = open_round
    buf = captured_log("info", json=as_json)
    issued: list[str] = [md[0][1] for md in sessions.values()]
    real_open = Authenticator.open_session

    def recording(self, school_id):
        info = real_open(self, school_id)
        issued.append(info.token)
        return info
    monkeypatch.setattr(Authenticator, "open_session", recording)

    def bug(*a, **kw):
        raise RuntimeError("simulated bug after the session was opened")
    monkeypatch.setattr(rc.engine, "note_session", bug)
    await expect_status(stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=_bearer("school-3")),
                        grpc.StatusCode.INTERNAL, "coordinator error in Join")
    # a line naming a secret on purpose, and a message quoting one, are redacted too
    from common.logs import get_logger
    get_logger("test").warning("careless", session_token=issued[0], detail=f"metadata (('authorization', 'Bearer {TOKENS['school-1']}'),)")
    out = buf.getvalue()
    assert "rpc failed" in out and "simulated bug" in out and "Traceback" in out
    assert len(issued) >= 3
    for secret in [*issued, *TOKENS.values()]:
        assert secret not in out, "a token reached the log"
    assert "locals" not in out and "[redacted]" in out


def test_scrub_removes_keys_and_bearer_tokens():
    pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBase64Stuff\n-----END EC PRIVATE KEY-----"
    assert "MHcCAQ" not in scrub(f"oops {pem} tail") and scrub(f"oops {pem} tail").endswith(" tail")
    assert scrub("authorization: Bearer abc.def") == "authorization: [redacted]"
    assert scrub("send 'authorization: Bearer <token>'") == "send 'authorization: Bearer <token>'"   # advice kept
    assert scrub("nothing secret here") == "nothing secret here"


def test_school_text_is_cut_and_escaped():
    assert school_text("short") == "short"
    out = school_text("line one\nline two\x1b[31m" + "x" * 1000)
    assert "\n" not in out and "\x1b" not in out and "\\n" in out
    assert out.endswith(f"[truncated: {8 + 1 + 8 + 1 + 4 + 1000} characters]") and len(out) < 340


def test_line_budget_is_a_token_bucket_per_key_with_a_summary():
    now = [0.0]
    budget = LineBudget(per_s=0.5, burst=3, summary_s=60.0, clock=lambda: now[0])
    lines: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event, **kw):
            lines.append((event, kw))
    for _ in range(10):
        budget.log(Log(), "warning", "school reported failure", "school-1", school="school-1")
    budget.log(Log(), "warning", "school reported failure", "school-2", school="school-2")
    assert [kw["school"] for _, kw in lines] == ["school-1"] * 3 + ["school-2"]
    now[0] += 2.0   # one more line's worth for school-1: it carries the count held back
    budget.log(Log(), "warning", "school reported failure", "school-1", school="school-1")
    assert lines[-1][1] == {"suppressed": 7, "school": "school-1"}
    for _ in range(5):
        budget.log(Log(), "warning", "school reported failure", "school-1", school="school-1")
    now[0] += 61.0
    budget.summarise(Log())
    assert lines[-1][0] == "log lines held back" and lines[-1][1]["top"] == {"school-1": 5}


async def test_a_school_failing_in_a_loop_costs_a_few_short_lines(open_round, captured_log):
    rc, stub, sessions = open_round
    buf = captured_log("info", json=True)

    async def failures():
        for _ in range(40):
            yield pb.ClientEvent(failure=pb.Failure(round=1, phase="evaluate", message="boom\n" + "y" * 900))
        await asyncio.sleep(30)
    call = stub.Session(failures(), metadata=sessions["school-2"])
    try:
        await wait_for(lambda: buf.getvalue().count("school could not evaluate") >= 10, 20, "the first lines")
        await asyncio.sleep(0.5)
    finally:
        call.cancel()
    rc.engine.school_lines.summarise(rc.engine.log, force=True)
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x["event"] == "school could not evaluate"]
    assert 10 <= len(mine) <= 11, len(mine)   # the burst (and a refill on a very slow run); the rest counted
    assert all(len(x["error"]) < 340 and "[truncated: 905 characters]" in x["error"] and "\n" not in x["error"] for x in mine)
    summary = [x for x in lines if x["event"] == "log lines held back"]
    assert summary and set(summary[-1]["top"]) == {"school-2"}
    assert len(mine) + sum(x.get("suppressed", 0) for x in mine) + summary[-1]["total"] == 40   # every line accounted for


# ---------------------------------------------------------------- 3. Join's database write first


async def test_join_that_cannot_be_recorded_changes_nothing(open_round, monkeypatch):
    from fedserver.auth import Authenticator

    rc, stub, sessions = open_round
    opened: list[str] = []
    real_open = Authenticator.open_session
    monkeypatch.setattr(Authenticator, "open_session", lambda self, sid: (opened.append(sid), real_open(self, sid))[1])

    def locked(*a, **kw):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(rc.store, "record_join", locked)
    for school in ("school-1", "school-3"):   # a re-join of a connected school, and a first join
        await expect_status(stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=_bearer(school)),
                            grpc.StatusCode.UNAVAILABLE, "nothing was changed, retry")
    assert opened == []
    # school-1's live session still works (a half-done re-join would have replaced its token)
    status = await stub.UploadStatus(pb.UploadStatusRequest(upload_id="u-1"), metadata=sessions["school-1"])
    assert status.received_bytes == 0 and not status.complete
    monkeypatch.undo()
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=_bearer("school-3"))
    assert resp.session_token and [s for s in rc.store.schools() if s["id"] == "school-3"]


# ---------------------------------------------------------------- 4. a school leaving while a round opens


class _LeavingQueue(asyncio.Queue):
    """A session queue whose first command detaches every other participant: a school leaving
    between two steps of the round's fan-out, made deterministic."""

    engine = None
    participants: set[str] = set()

    def put_nowait(self, item):
        eng = type(self).engine
        if eng is not None:
            type(self).engine = None
            for sid, sess in list(eng.sessions.items()):
                if sid in type(self).participants and sess.queue is not self:
                    eng.detach(sess)
        super().put_nowait(item)


@pytest.fixture
async def engine_only(tmp_path, tiny_model, start_coordinator):
    cfg = coordinator_config(tmp_path, tiny_model, schools=3, tls=False, rounds=dict(total=1, min_schools=1, fraction=0.67, quorum=1))
    return await start_coordinator(cfg, run_rounds=False)


async def test_school_leaving_during_the_fan_out_does_not_stop_the_engine(engine_only):
    eng = engine_only.engine
    sessions = {sid: eng.attach(sid, Capabilities()) for sid in ("school-1", "school-2", "school-3")}
    import random
    chosen = set(random.Random(1).sample(sorted(sessions), 2))   # as _open_next picks round 1's participants
    _LeavingQueue.engine, _LeavingQueue.participants = eng, chosen
    for s in sessions.values():
        s.queue = _LeavingQueue()
    assert await eng._open_next() is True
    rnd = eng.current
    assert rnd is not None and set(rnd.participants) == chosen
    assert len(eng.sessions) == 2   # one participant left mid-fan-out; it stays a participant of the round
    (stayed,) = set(eng.sessions) & chosen
    assert isinstance(sessions[stayed].queue.get_nowait(), TrainCommand)
    # a school the round did not select hears nothing of it (no IdleCommand per round)
    (bystander,) = set(sessions) - chosen
    assert sessions[bystander].queue.empty()


async def test_participant_leaving_while_the_round_is_planned_is_skipped(engine_only, monkeypatch):
    from fedserver.rounds import KINDS

    eng = engine_only.engine
    sessions = {sid: eng.attach(sid, Capabilities()) for sid in ("school-1", "school-2", "school-3")}
    import dataclasses
    eng.cfg = dataclasses.replace(eng.cfg, rounds=dataclasses.replace(eng.cfg.rounds, fraction=1.0))
    kind = KINDS["train"]
    real_plan = kind.plan

    async def plan(e, number, participants):
        e.detach(sessions["school-2"])   # leaves while the round is planned
        await asyncio.sleep(0)
        return await real_plan(e, number, participants)
    monkeypatch.setattr(kind, "plan", plan)
    assert await eng._open_next() is True
    assert eng.current.participants == ["school-1", "school-2", "school-3"]
    for sid in ("school-1", "school-3"):
        assert isinstance(sessions[sid].queue.get_nowait(), TrainCommand)
    assert sessions["school-2"].queue.empty()
    back = eng.attach("school-2", Capabilities())   # it comes back: its command is sent then
    assert isinstance(back.queue.get_nowait(), TrainCommand)


# ---------------------------------------------------------------- 5. secret files


def test_write_secret_refuses_links_and_existing_files(tmp_path):
    from common.errors import ConfigError
    from common.files import write_secret

    old = os.umask(0)
    try:
        write_secret(tmp_path / "a.token", "s3cret\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.token").read_text() == "s3cret\n" and (tmp_path / "a.token").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        write_secret(tmp_path / "a.token", "other")
    (tmp_path / "a.token").chmod(0o644)
    write_secret(tmp_path / "a.token", "new", overwrite=True)
    assert (tmp_path / "a.token").read_text() == "new" and (tmp_path / "a.token").stat().st_mode & 0o777 == 0o600
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "would-be-created")
    for name in ("link", "dangling"):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="symbolic link"):
                write_secret(tmp_path / name, "x", overwrite=overwrite)
    os.link(victim, tmp_path / "hard")
    with pytest.raises(ConfigError, match="hard link"):
        write_secret(tmp_path / "hard", "x", overwrite=True)
    assert victim.read_text() == "precious" and not (tmp_path / "would-be-created").exists()


def test_demo_token_files_are_not_written_through_a_planted_link(tmp_path):
    from common.errors import ConfigError
    from fedserver.demo import DemoOptions, write_configs

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "school-1.token").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_configs(DemoOptions(schools=2, schedule=("train",)), tmp_path, tmp_path / "cache")
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    (tmp_path / "config" / "school-1.token").unlink()
    write_configs(DemoOptions(schools=2, schedule=("train",)), tmp_path, tmp_path / "cache")
    for k in (1, 2):
        assert (tmp_path / "config" / f"school-{k}.token").stat().st_mode & 0o777 == 0o600


def test_issued_private_keys_go_through_the_one_helper(tmp_path, monkeypatch):
    import common.files
    from fedserver import certs

    calls: list[tuple[str, int]] = []
    real = common.files.write_secret
    monkeypatch.setattr(certs, "write_secret", lambda p, d, **kw: (calls.append((pathlib.Path(p).name, kw["mode"])), real(p, d, **kw))[1])
    ca = certs.init_ca(tmp_path / "ca", days=2)
    ca.issue_school("school-a", tmp_path / "a", days=1)
    assert ("ca.key", 0o600) in calls and ("school-a.key", 0o600) in calls
    assert (tmp_path / "a" / "school-a.key").stat().st_mode & 0o777 == 0o600
