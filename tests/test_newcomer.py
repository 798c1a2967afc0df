"""A new operator's path through deploy/README.md: check-config predicts what serve/run refuse,
`status --json` is one document and says when its live view is stale, the logs are one JSON
stream, SIGTERM is quiet, saved adapters name a base transformers resolves, READY means joined,
a school that never connected says what to check, held-out questions are never trained on,
token files are created safely, and the units' Documentation= exists after the install."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import structlog

from common.config import load_toml
from tests.conftest import REPO, TOKENS, coordinator_config, server_tls_toml, wait_for
from tests.test_shipped_configs import restore_logging  # noqa: F401  (a fixture: the CLIs configure logging)

DEPLOY = REPO / "deploy"


def _path_keys(cls: type, prefix: str = "") -> set[str]:
    """Every Path-typed field of a config dataclass, as "section.key"."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out |= _path_keys(tp, f"{prefix}{f.name}.")
        elif tp is Path or Path in args:
            out.add(f"{prefix}{f.name}")
    return out


# ---------------------------------------------------------------- 1. check-config = what serve/run check
def test_every_config_path_is_checked() -> None:
    from fedclient import preflight as school_preflight
    from fedclient.config import SchoolConfig
    from fedserver import preflight as coordinator_preflight
    from fedserver.config import CoordinatorConfig

    assert _path_keys(CoordinatorConfig) == set(coordinator_preflight.PATH_KEYS)
    assert _path_keys(SchoolConfig) == set(school_preflight.PATH_KEYS)


def _coordinator_toml(tmp: Path, model: str, extra: str = "", schools: str = "") -> Path:
    from fedserver.auth import hash_token

    q = json.dumps
    cfg = tmp / "coordinator.toml"
    cfg.write_text(f"""[server]
listen = "127.0.0.1:0"
state_dir = {q(str(tmp / "state"))}
{server_tls_toml()}
[model]
base = {q(model.removeprefix("dir:"))}
cache_dir = {q(str(tmp / "cache"))}
[rounds]
min_schools = 1
quorum = 1
{extra}
[monitor]
metrics_listen = ""
dashboard_listen = ""
{schools or f'[[schools]]{chr(10)}id = "school-1"{chr(10)}token_sha256 = "{hash_token(TOKENS["school-1"])}"'}
""")
    return cfg


def test_coordinator_paths_are_checked_by_check_config_and_serve(tmp_path, tiny_model, restore_logging, capsys) -> None:
    """Missing eval/pool files, a state dir that cannot be created, a missing teacher: check-config
    and serve both exit 78 naming each key (serve before loading anything, no traceback)."""
    from fedserver.cli import main

    (tmp_path / "a-file").write_text("")
    cfg = _coordinator_toml(tmp_path, tiny_model, extra=f"""
[evaluation]
eval_file = {json.dumps(str(tmp_path / "missing" / "eval.jsonl"))}
[distill]
pool_file = "no-such-pool.jsonl"
[teacher]
model = {json.dumps("dir:" + str(tmp_path / "no-teacher"))}
quantization = "none"
cache_dir = {json.dumps(str(tmp_path / "a-file" / "sub"))}
""")
    for argv in (["check-config", "--config", str(cfg)], ["serve", "--config", str(cfg)]):
        assert main(argv) == 78
        err = capsys.readouterr().err
        assert "4 problem(s)" in err, err
        assert f"evaluation.eval_file: {tmp_path / 'missing' / 'eval.jsonl'} does not exist" in err
        assert "prepare-data" in err
        assert f"distill.pool_file: {tmp_path / 'no-such-pool.jsonl'} does not exist" in err   # relative to the file
        assert f"teacher.model: {tmp_path / 'no-teacher'} has no config.json" in err
        assert f"teacher.cache_dir: cannot create {tmp_path / 'a-file' / 'sub'}" in err
        assert "Traceback" not in err
    assert not (tmp_path / "state").exists()   # serve stopped before creating anything

    bad_json = tmp_path / "eval.jsonl"
    bad_json.write_text('{"id": "x"\n')
    cfg = _coordinator_toml(tmp_path, tiny_model, extra=f"[evaluation]\neval_file = {json.dumps(str(bad_json))}\n")
    assert main(["check-config", "--config", str(cfg)]) == 78
    assert f"evaluation.eval_file: {bad_json}:1: invalid JSON" in capsys.readouterr().err


def test_placeholder_token_hashes_are_refused(tmp_path, tiny_model, restore_logging, capsys) -> None:
    from fedserver.cli import main

    schools = '[[schools]]\nid = "school-a"\ntoken_sha256 = "' + "0" * 64 + '"\n'
    cfg = _coordinator_toml(tmp_path, tiny_model, schools=schools)
    for command in ("check-config", "serve"):
        assert main([command, "--config", str(cfg)]) == 78
        err = capsys.readouterr().err
        assert "schools[0] (school-a): token_sha256 is a placeholder" in err and "fedserver token --school school-a" in err


def test_school_check_config_gives_runs_messages(tmp_path, fed_data, tiny_model, restore_logging, capsys) -> None:
    """A missing or empty token file, a data_dir that is missing or holds no *.jsonl: check-config
    and run say the same, exit 78."""
    from fedclient.cli import main
    from tests.test_daemon_processes import write_school_toml

    cfg = write_school_toml(tmp_path, "127.0.0.1:1", "school-1", fed_data, tiny_model)
    text = cfg.read_text()
    cases = {
        "token missing": (text.replace(str(tmp_path / "school-1.token"), str(tmp_path / "nope.token")),
                          f"school.token_file: {tmp_path / 'nope.token'} does not exist"),
        "token empty": (text.replace(str(tmp_path / "school-1.token"), str(tmp_path / "empty.token")),
                        f"school.token_file: {tmp_path / 'empty.token'} is empty"),
        "data missing": (text.replace(str(fed_data / "schools" / "school-1" / "train.jsonl"), str(tmp_path / "nodata")),
                         f"school.data_dir: {tmp_path / 'nodata'} does not exist"),
        "no jsonl": (text.replace(str(fed_data / "schools" / "school-1" / "train.jsonl"), str(tmp_path / "emptydir")),
                     f"school.data_dir: no *.jsonl files at the top of the folder {tmp_path / 'emptydir'}"),
        "all held out": (text.replace(str(fed_data / "schools" / "school-1" / "train.jsonl"),
                                      str(fed_data / "schools" / "school-1" / "heldout" / "heldout.jsonl")),
                         "is also in the held-out file"),
        "config unreadable": (None, "cannot read config file"),
    }
    (tmp_path / "empty.token").write_text("\n")
    (tmp_path / "emptydir").mkdir()
    for name, (body, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '-')}.toml"
        if body is None:
            bad.mkdir()   # unreadable as a file (root reads any file, so a folder stands in for a 0600 file)
        else:
            bad.write_text(body)
        for command in ("check-config", "run"):
            assert main([command, "--config", str(bad)]) == 78, name
            err = capsys.readouterr().err
            assert message in err, (name, command, err)
    assert main(["check-config", "--config", str(cfg)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{cfg}: ok: trains on 24 questions from" in out and "held-out" in out and "SchoolConfig(" not in out


# ---------------------------------------------------------------- 2. status
def _state_with_live(tmp: Path, age_s: float) -> Path:
    from fedserver.store import Store

    state = tmp / "state"
    state.mkdir()
    store = Store(state / "state.sqlite")
    store.record_join("school-1", {"model": "m"})
    store.close()
    live = {"time": time.time() - age_s, "round": 3, "kind": "train", "participants": ["school-1"], "accepted": [],
            "failed": {}, "deadline_in_s": 100.0, "schools": {"school-1": "train 50%"}}
    (state / "live.json").write_text(json.dumps(live))
    return state


def test_status_json_is_one_document_and_a_stale_live_view_says_so(tmp_path, restore_logging, capsys) -> None:
    from fedserver.cli import main

    state = _state_with_live(tmp_path, age_s=60)
    assert main(["status", "--state-dir", str(state), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)   # the whole output parses: jq works
    assert [s["id"] for s in doc["schools"]] == ["school-1"] and "rounds" in doc
    assert doc["live"]["round"] == 3 and doc["live"]["stale"] is True and doc["live"]["age_s"] >= 59
    assert main(["status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "round 3 open (as of 60 s ago; the coordinator is not running or not writing" in out, out

    (state / "live.json").write_text(json.dumps({**json.loads((state / "live.json").read_text()), "time": time.time()}))
    assert main(["status", "--state-dir", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["live"]["stale"] is False
    assert main(["status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "round 3 open: school-1: train 50%" in out and "as of" not in out

    # thousands of connected schools: counted, not listed one by one
    many = {f"school-{i:05d}": ("train 50%" if i % 3 else "uploading") for i in range(3000)}
    live = {**json.loads((state / "live.json").read_text()), "time": time.time(), "schools": dict(list(many.items())[:1000]),
            "connected": 3000}
    (state / "live.json").write_text(json.dumps(live))
    assert main(["status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "connected: 3000 schools (school-00000, school-00001," in out, out
    assert ("round 3 open: 1000 schools (of 3000 connected; live.json lists the first 1000): train 50% 666, "
            "uploading 334") in out, out
    assert max(len(line) for line in out.splitlines()) < 400


async def test_a_resumed_round_keeps_its_byte_counts(tmp_path, tiny_model) -> None:
    """Bytes counted in an open round survive a stop and a restart into the same round."""
    from fedserver.app import create_server
    from fedserver.store import Store

    cfg = coordinator_config(tmp_path, tiny_model, schools=1)
    coord = await create_server(cfg)
    await coord.engine.start()   # round 0: the initial adapter
    await coord.stop(grace=0)
    db = cfg.server.state_dir / "state.sqlite"
    store = Store(db)
    store.open_round(1, ["school-1"], store.get_meta("global_sha256"), time.time() + 600)
    store.close()
    expected = [0, 0]
    for up, down in ((1000, 300), (5, 7)):   # two runs of the coordinator, both in round 1
        coord = await create_server(cfg)
        await coord.engine.start()
        assert coord.engine.current is not None and coord.engine.current.number == 1
        coord.engine.count_bytes(up=up, down=down)
        await coord.stop(grace=0)
        expected = [expected[0] + up, expected[1] + down]
        store = Store(db, readonly=True)
        r = store.get_round(1)
        store.close()
        assert r is not None and [r.bytes_up, r.bytes_down] == expected


# ---------------------------------------------------------------- 3. logs: one JSON stream
LOGGING_SCRIPT = r'''
import logging, sys, warnings
import fedserver.servicer as servicer      # its module-level logger exists before logging is configured
from common.logs import configure_logging, get_logger

configure_logging("info", json=True)
logging.getLogger("bitsandbytes.cextension").warning("a library's stdlib warning %s", 1)
from transformers.utils import logging as tlog
tlog.get_logger("transformers.modeling_utils").warning("through transformers' own logger")
warnings.warn("a python warning", UserWarning)
get_logger("test").info("a structlog line", n=1)
servicer.log.info("the servicer's module-level logger")
logging.getLogger("asyncio").error("an asyncio error", exc_info=ValueError("x"))
from tqdm import tqdm
for _ in tqdm(range(3)):
    pass
raise RuntimeError("uncaught")
'''


def test_json_logging_makes_every_stderr_line_json() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "JOURNAL_STREAM")}
    proc = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stdout == ""   # the module-level logger used to print to stdout, in console format
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]   # every line is JSON
    by = {(d.get("logger") or d.get("component")): d for d in lines}
    assert by["bitsandbytes.cextension"]["level"] == "warning"
    assert by["transformers.modeling_utils"]["event"] == "through transformers' own logger"
    assert "a python warning" in by["py.warnings"]["event"]
    assert by["test"]["n"] == 1
    assert by["servicer"]["event"] == "the servicer's module-level logger" and "timestamp" in by["servicer"]
    assert "ValueError" in by["asyncio"]["exception"]
    assert "RuntimeError: uncaught" in by["uncaught"]["exception"]


def test_module_level_logger_follows_the_configuration(restore_logging, capsys) -> None:
    import fedserver.servicer
    from common.logs import configure_logging

    configure_logging("warning", json=True)
    fedserver.servicer.log.info("dropped: below the level")
    fedserver.servicer.log.warning("kept", school="s")
    lines = capsys.readouterr().err.strip().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["kept"]


async def test_sigterm_with_a_school_mid_round_is_quiet(tmp_path, tiny_model, fed_data) -> None:
    """systemd's stop: the coordinator exits 0 without CancelledError tracebacks, and every line
    it wrote is JSON."""
    from tests.test_coordinator_restart import start, write_config
    from tests.test_daemon_processes import spawn, write_school_toml

    cfg = write_config(tmp_path, tiny_model)
    cfg.write_text(cfg.read_text().replace("min_schools = 2\nquorum = 2", "min_schools = 1\nquorum = 1")
                   + "\n[train]\nlocal_steps = 400\nbatch_size = 2\nmax_seq_len = 64\n")
    server, address = await asyncio.to_thread(start, cfg, tmp_path, 1)
    school_log = tmp_path / "school.log"
    school = spawn(write_school_toml(tmp_path, address, "school-1", fed_data, tiny_model), school_log)
    try:
        await wait_for(lambda: school_log.exists() and '"training"' in school_log.read_text(), 120, "the school to train")
        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 30) == 0
        log = (tmp_path / "coordinator-1.log").read_text()
        assert "stopping on signal" in log
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        for line in log.splitlines():
            if line.strip():
                json.loads(line)
        await wait_for(lambda: "coordinator ended this stream" in school_log.read_text(), 30, "the school to see the end")
        school.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(school.wait, 30) == 0
    finally:
        for p in (school, server):
            if p.poll() is None:
                p.kill()


# ---------------------------------------------------------------- 4. saved adapters name a base transformers resolves
def test_saved_adapter_names_the_hub_id_and_keeps_our_spec(tmp_path, tiny_model) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM

    from common.lora import LoraSettings, expected_layout, write_peft_dir
    from common.models import PACKAGED, PACKAGED_HUB_IDS, PACKAGED_SPLIT, load_config

    assert set(PACKAGED_HUB_IDS) == set(PACKAGED) | set(PACKAGED_SPLIT)
    settings = LoraSettings(rank=4, alpha=8.0)
    state = {k: torch.zeros(s.shape) for k, s in expected_layout(load_config(tiny_model), settings).items()}
    write_peft_dir(tmp_path / "packaged", state, settings, "packaged:smollm2-135m-instruct", extra={"round": 2})
    cfg = json.loads((tmp_path / "packaged" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = json.loads((tmp_path / "packaged" / "federation.json").read_text())
    assert info == {"round": 2, "base_model": "packaged:smollm2-135m-instruct"}
    # A base transformers can resolve here (a directory): peft's Auto class loads the adapter alone, offline.
    write_peft_dir(tmp_path / "dir", state, settings, tiny_model)
    assert json.loads((tmp_path / "dir" / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model.removeprefix("dir:")
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "dir"))


# ---------------------------------------------------------------- 5. READY and the never-connected message
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon_config(tmp: Path, address: str, fed_data: Path, model: str):  # type: ignore[no-untyped-def]
    from tests.conftest import school_config

    cfg = school_config(tmp, address, "school-1", fed_data, model)
    return dataclasses.replace(cfg, school=dataclasses.replace(cfg.school, max_backoff_s=0.02))


async def test_a_school_that_never_connected_says_what_to_check(tmp_path, tiny_model, fed_data) -> None:
    from fedclient.daemon import NEVER_CONNECTED_EVERY, SchoolDaemon
    from fedclient.worker import SchoolModel

    address = f"127.0.0.1:{_closed_port()}"
    cfg = _daemon_config(tmp_path, address, fed_data, tiny_model)
    s = cfg.school
    model = SchoolModel(cfg.model.base, None, s.data_dir, s.heldout_file, 1, s.state_dir)
    ready, statuses = [], []
    daemon = SchoolDaemon(cfg, TOKENS["school-1"], model, on_ready=lambda: ready.append(1), on_status=statuses.append)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(daemon.run(stop))
        await wait_for(lambda: daemon._failed_attempts >= 2 * NEVER_CONNECTED_EVERY + 1, 60, "21 failed attempts")
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert [e["attempts"] for e in warned] == [1, NEVER_CONNECTED_EVERY, 2 * NEVER_CONNECTED_EVERY]
    assert all(e["event"].startswith(f"cannot reach the coordinator at {address} (never connected): check") for e in warned)
    assert "firewall" in warned[0]["event"] and "coordinator = host:port" in warned[0]["event"]
    assert not any(e["event"] == "connection lost" for e in logs)
    assert not any(e["log_level"] == "info" and e["event"] == "reconnecting" for e in logs)
    assert not ready and not daemon.ready.is_set()
    assert any(line.startswith(f"waiting for the coordinator at {address}: never connected") for line in statuses)


async def test_ready_after_the_first_join_and_the_model(tmp_path, tiny_model, fed_data, start_coordinator) -> None:
    from fedclient.daemon import SchoolDaemon
    from fedclient.worker import SchoolModel

    rc = await start_coordinator(coordinator_config(tmp_path, tiny_model, schools=1), run_rounds=False)
    cfg = _daemon_config(tmp_path, rc.address, fed_data, tiny_model)
    s = cfg.school
    model = SchoolModel(cfg.model.base, None, s.data_dir, s.heldout_file, 1, s.state_dir)
    order: list[str] = []
    load = model.ensure_loaded

    def ensure_loaded(settings):  # type: ignore[no-untyped-def]
        order.append(f"load (joined: {daemon._joined_once})")
        load(settings)
        order.append("loaded")

    model.ensure_loaded = ensure_loaded  # type: ignore[method-assign]
    daemon = SchoolDaemon(cfg, TOKENS["school-1"], model, on_ready=lambda: order.append("READY"))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        assert order == ["load (joined: True)", "loaded", "READY"]
        assert [sc["id"] for sc in rc.store.schools()] == ["school-1"]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
    assert order.count("READY") == 1


def test_fedclient_unit_waits_for_ready_without_a_start_timeout() -> None:
    from tests.test_shipped_configs import one, service

    assert one(service("fedclient"), "TimeoutStartSec") == "infinity"
    assert one(service("fedclient"), "Type") == "notify"


# ---------------------------------------------------------------- 6. held-out questions are never trained on
def test_prepare_data_layout_keeps_heldout_out_of_the_documented_data_dir(fed_data, tmp_path) -> None:
    from common.data import SCHOOL_HELDOUT, read_jsonl
    from fedclient.config import SchoolSection
    from fedclient.preflight import heldout_path
    from fedclient.worker import SchoolModel

    manifest = json.loads((fed_data / "manifest.json").read_text())
    for entry in manifest["schools"]:
        folder = fed_data / "schools" / entry["name"]
        assert entry["heldout_path"] == f"schools/{entry['name']}/{SCHOOL_HELDOUT}"
        assert sorted(p.name for p in folder.glob("*.jsonl")) == ["train.jsonl"]   # what a folder data_dir reads
        section = SchoolSection(data_dir=folder)   # as deploy/README.md says: the folder, heldout_file unset
        assert heldout_path(section) == folder / SCHOOL_HELDOUT
        m = SchoolModel("packaged:smollm2-135m-instruct", None, section.data_dir, heldout_path(section))
        assert m.heldout and len(m.train_questions) == entry["train"]
        assert not {q.id for q in m.train_questions} & {q.id for q in m.heldout}

    # The old layout (train.jsonl and heldout.jsonl side by side) with data_dir at the folder:
    # the held-out file is found and its questions are left out of training.
    old = tmp_path / "old"
    old.mkdir()
    src = fed_data / "schools" / "school-1"
    shutil.copy(src / "train.jsonl", old / "train.jsonl")
    shutil.copy(src / SCHOOL_HELDOUT, old / "heldout.jsonl")
    section = SchoolSection(data_dir=old)
    assert heldout_path(section) == old / "heldout.jsonl"
    m = SchoolModel("packaged:smollm2-135m-instruct", None, old, heldout_path(section))
    assert {q.id for q in m.train_questions} == {q.id for q in read_jsonl(src / "train.jsonl")}


def test_demo_school_configs_use_the_documented_layout(tmp_path) -> None:
    from common.data import SCHOOL_HELDOUT
    from fedclient.config import SchoolConfig
    from fedclient.preflight import heldout_path
    from fedserver.demo import DemoOptions, write_configs

    _, paths = write_configs(DemoOptions(schools=2, schedule=("train",)), tmp_path, tmp_path / "cache")
    for p in paths:
        p.write_text(p.read_text().replace("COORDINATOR", "127.0.0.1:50051"))   # as run_demo does once bound
        s = load_toml(SchoolConfig, p).school
        assert s.data_dir == tmp_path / "data" / "schools" / p.stem and s.heldout_file == s.data_dir / SCHOOL_HELDOUT
        s.heldout_file.parent.mkdir(parents=True)
        s.heldout_file.write_text("")
        assert heldout_path(dataclasses.replace(s, heldout_file=None)) == s.heldout_file   # the default agrees


# ---------------------------------------------------------------- 7. token files, Documentation=
def test_token_out_refuses_existing_files_and_symlinks(tmp_path, restore_logging, capsys) -> None:
    from fedserver.cli import main

    out = tmp_path / "school-a.token"
    assert main(["token", "--school", "school-a", "--out", str(out)]) == 0
    first = out.read_text()
    assert (out.stat().st_mode & 0o777) == 0o600 and len(first.strip()) > 20
    capsys.readouterr()
    assert main(["token", "--school", "school-a", "--out", str(out)]) == 78
    assert "already exists" in capsys.readouterr().err and out.read_text() == first
    out.chmod(0o644)
    assert main(["token", "--school", "school-a", "--out", str(out), "--force"]) == 0
    assert out.read_text() != first and (out.stat().st_mode & 0o777) == 0o600

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "planted.token"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.token"
    dangling.symlink_to(tmp_path / "would-be-created")
    for extra in ([], ["--force"]):
        for path in (link, dangling):
            capsys.readouterr()
            assert main(["token", "--school", "school-a", "--out", str(path), *extra]) == 78
            assert "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n" and not (tmp_path / "would-be-created").exists()


def test_unit_documentation_exists_after_the_documented_install() -> None:
    from tests.test_shipped_configs import UNITS, parse_unit

    guide = (DEPLOY / "README.md").read_text()
    for unit in sorted(UNITS.glob("*.service")):
        urls = [u for value in parse_unit(unit)["Unit"]["Documentation"] for u in value.split()]
        assert urls
        for url in urls:
            if url.startswith("file://"):
                target = url.removeprefix("file://")
                assert re.search(r"sudo install\b[^\n]* deploy/README\.md " + re.escape(target) + r"\s", guide), (unit, target)
            else:
                assert url.startswith(("https://", "http://", "man:")), url


def test_guide_documents_rotation_revocation_and_de_enrolment() -> None:
    guide = (DEPLOY / "README.md").read_text()
    section = guide.split("## Rotating, revoking and de-enrolling a school", 1)[1].split("\n## ", 1)[0]
    for needle in ("fedserver token --school", "token_sha256", "systemctl restart fedserver", "Revoke",
                   "De-enrol", "state.sqlite", "cannot be taken out"):
        assert needle in section, needle


async def test_a_taken_grpc_port_is_a_configuration_error(tmp_path, tiny_model) -> None:
    """serve with [server] listen on a port another process holds: exit 78 with what to do, not a
    crash (systemd would restart it in a loop); check-config warns about it."""
    import socket

    from common.errors import ConfigError
    from fedserver import preflight
    from fedserver.app import create_server
    from tests.conftest import coordinator_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cfg = coordinator_config(tmp_path, tiny_model)
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen=f"127.0.0.1:{taken}"))
        _, warnings = preflight.check(cfg)
        assert any(f"server.listen: cannot bind 127.0.0.1:{taken}" in w for w in warnings), warnings
        with pytest.raises(ConfigError, match="cannot bind it"):
            await create_server(cfg)
