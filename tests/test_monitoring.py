"""What the operator and the school admin see: /metrics of the coordinator and of the school
daemons, scraped during a real federation and checked against the state database; the
dashboard's API; the daemon's status file and `fedclient status`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.monitoring import parse_listen, serve_metrics
from fedclient import cli as fedclient_cli
from fedclient.monitor import STATUS_FILE, describe, format_status, read_status
from fedserver.config import MonitorSection
from tests.conftest import coordinator_config, school_config, wait_for

MONITOR = dict(metrics_listen="127.0.0.1:0", dashboard_listen="127.0.0.1:0")


async def get(url: str, **kw: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.text(), r.headers


def families(text: str) -> dict[str, Any]:
    """Parsed with prometheus_client's own parser; every family must say what it is."""
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, f"{fam.name} has no HELP"
        assert fam.type != "unknown", f"{fam.name} has no TYPE"
        out[fam.name] = fam
    return out


def value(fams: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    total, found = 0.0, False
    for s in fams[family].samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
            found = True
    assert found, f"no sample {sample or family} {labels}"
    return total


def school_toml(tmp: Path, scfg: Any) -> Path:
    s = scfg.school
    path = tmp / f"{s.state_dir.name}.toml"
    path.write_text(f"""[school]
coordinator = "{s.coordinator}"
token_file = "{s.token_file}"
state_dir = "{s.state_dir}"
data_dir = "{s.data_dir}"
heldout_file = "{s.heldout_file}"
[model]
base = "{scfg.model.base}"
""")
    return path


async def test_metrics_status_and_dashboard_during_a_real_federation(tmp_path, tiny_model, fed_data, start_coordinator,
                                                                     start_school, capsys):
    cfg = coordinator_config(tmp_path, tiny_model, eval_file=fed_data / "eval" / "eval.jsonl", monitor=MONITOR,
                             rounds=dict(total=2, min_schools=3, quorum=2, deadline_s=120.0))
    rc = await start_coordinator(cfg)
    mon = await rc.coord.start_monitor()
    urls = mon.urls()
    assert json.loads((cfg.server.state_dir / "monitor.json").read_text()) == urls
    daemons, endpoints, configs = [], [], []
    for sid in ("school-1", "school-2", "school-3"):
        scfg = school_config(tmp_path, rc.address, sid, fed_data, tiny_model)
        daemon, _stop, _task = await start_school(scfg)
        daemons.append(daemon)
        configs.append(scfg)
        endpoints.append(serve_metrics("127.0.0.1:0", daemon.metrics.registry))
    try:
        # ---- during the federation
        # round 2 itself: round 1 is committed in the store while it is still the engine's
        # current round (the close's tail), and between the two rounds there is none
        await wait_for(lambda: rc.engine.current is not None and rc.engine.current.number == 2, 180, "round 2 open")
        fams = families((await get(urls["metrics"]))[1])
        assert value(fams, "schoolfed_schools_connected") == 3
        assert value(fams, "schoolfed_schools_enrolled") == 3
        assert value(fams, "schoolfed_rounds", "schoolfed_rounds_total", kind="train", outcome="committed") == 1
        assert value(fams, "schoolfed_current_round") == 2
        assert value(fams, "schoolfed_event_loop_lag_seconds") >= 0
        d = families((await get(endpoints[0].url))[1])
        assert value(d, "schoolfed_daemon_connected") == 1
        assert value(d, "schoolfed_daemon_joins", "schoolfed_daemon_joins_total") == 1
        view = describe(read_status(configs[0].school.state_dir / STATUS_FILE), configs[0].school.state_dir,
                        configs[0].school.data_dir)
        assert view["running"] and view["connected"] and view["school_id"] == "school-1", view
        assert view["last_round"]["round"] == 1 and view["last_round"]["outcome"] == "delivered"

        status, body, headers = await get(urls["dashboard"] + "api/state")
        assert status == 200
        state = json.loads(body)
        assert state["live"]["connected"] == 3 and state["live"]["round"] == 2
        assert {s["id"] for s in state["live"]["schools"]} == {"school-1", "school-2", "school-3"}
        assert state["settings"]["strategy"]["name"] == "fedavg"
        assert [r["round"] for r in state["history"]["rounds"]] == [1, 2]
        assert state["history"]["rounds"][0]["status"] == "committed"
        status, page, headers = await get(urls["dashboard"])
        assert status == 200 and "School federation" in page and "script-src 'nonce-" in headers["Content-Security-Policy"]
        async with aiohttp.ClientSession() as s, s.post(urls["dashboard"] + "api/state") as r:
            assert r.status == 405   # read-only

        await asyncio.wait_for(rc.engine.finished.wait(), 240)

        # ---- afterwards, against the state database
        fams = families((await get(urls["metrics"]))[1])
        rounds = rc.store.rounds()
        committed = [r for r in rounds if r.status == "committed"]
        assert value(fams, "schoolfed_rounds", "schoolfed_rounds_total", kind="train", outcome="committed") == len(committed) == 2
        receipts = sum(len(rc.store.receipts(r.round)) for r in rounds)
        assert value(fams, "schoolfed_uploads_accepted", "schoolfed_uploads_accepted_total", kind="train") == receipts
        assert value(fams, "schoolfed_received_bytes", "schoolfed_received_bytes_total") == sum(r.bytes_up for r in rounds)
        assert value(fams, "schoolfed_sent_bytes", "schoolfed_sent_bytes_total") == sum(r.bytes_down for r in rounds)
        server = [e for e in rc.store.evals() if e["source"] == "server"]
        assert value(fams, "schoolfed_eval_accuracy", source="server") == pytest.approx(server[-1]["metrics"]["accuracy"])
        assert value(fams, "schoolfed_eval_round", source="server") == server[-1]["round"] == 2
        assert value(fams, "schoolfed_round_duration_seconds", "schoolfed_round_duration_seconds_count",
                     kind="train", outcome="committed") == 2
        assert value(fams, "schoolfed_upload_validation_seconds", "schoolfed_upload_validation_seconds_count") == receipts

        sent = 0.0
        for _daemon, ep in zip(daemons, endpoints):
            d = families((await get(ep.url))[1])
            sent += value(d, "schoolfed_daemon_sent_bytes", "schoolfed_daemon_sent_bytes_total", kind="train")
            assert value(d, "schoolfed_daemon_last_round") == 2
            assert value(d, "schoolfed_daemon_rounds", "schoolfed_daemon_rounds_total", kind="train", outcome="delivered") == 2
            assert value(d, "schoolfed_daemon_train_tokens_per_second") > 0
            assert value(d, "schoolfed_daemon_received_bytes", "schoolfed_daemon_received_bytes_total") > 0
        assert sent == sum(r.bytes_up for r in rounds)   # what the schools sent is what the coordinator counted
    finally:
        for ep in endpoints:
            ep.close()

    # ---- the school admin's view once the federation has finished
    await wait_for(lambda: all(d.shutdown_reason for d in daemons), 30, "schools told to stop")
    await asyncio.sleep(0.5)
    toml = school_toml(tmp_path, configs[0])
    await wait_for(lambda: (read_status(configs[0].school.state_dir / STATUS_FILE) or {}).get("stopped") is not None,
                   30, "the daemon to record its stop")
    capsys.readouterr()   # the federation's own log lines
    code = fedclient_cli.main(["status", "--config", str(toml), "--json"])
    out = json.loads(capsys.readouterr().out)   # exactly one JSON document
    assert code == 3 and out["state"] == "stopped" and not out["running"]
    assert out["last_round"]["round"] == 2 and out["totals"]["results"]["train"] == 2
    assert out["totals"]["sent_bytes"]["train"] > 0 and "pending/" in out["disk"]
    assert fedclient_cli.main(["status", "--config", str(toml)]) == 3
    text = capsys.readouterr().out
    assert "daemon:      stopped" in text and "last round:  2 (train) delivered" in text and "school data:" in text


def test_status_of_a_daemon_that_never_ran_or_died(tmp_path):
    state, data = tmp_path / "state", tmp_path / "data.jsonl"
    data.write_text('{"q": 1}\n')
    view = describe(None, state, data)
    assert view["state"] == "never started" and not view["running"]
    state.mkdir()
    dead = {"pid": 2 ** 22 + 12345, "updated_at": time.time(), "stopped": None, "connected": True, "rounds": [],
            "totals": {}, "coordinator": "x:1"}
    (state / STATUS_FILE).write_text(json.dumps(dead))
    view = describe(read_status(state / STATUS_FILE), state, data)
    assert not view["running"] and not view["connected"] and view["state"].startswith("not running")
    assert "daemon:      not running" in format_status(view)
    (state / STATUS_FILE).write_text("{not json")
    assert describe(read_status(state / STATUS_FILE), state, data)["state"] == "never started"


async def test_dashboard_needs_the_operator_token_when_configured(tmp_path, tiny_model, start_coordinator):
    token_file = tmp_path / "dash.token"
    token_file.write_text("s3cret-" + "x" * 30 + "\n")
    cfg = coordinator_config(tmp_path, tiny_model, monitor=dict(metrics_listen="", dashboard_listen="127.0.0.1:0",
                                                                dashboard_token_file=token_file))
    rc = await start_coordinator(cfg, run_rounds=False)
    mon = await rc.coord.start_monitor()
    assert mon.urls()["metrics"] == ""
    url = mon.urls()["dashboard"]
    status, body, _ = await get(url + "api/state")
    assert status == 401 and "token" in body
    status, _, _ = await get(url + "api/state?token=wrong")
    assert status == 401
    status, body, _ = await get(url + "api/state?token=s3cret-" + "x" * 30)
    assert status == 200 and json.loads(body)["live"]["connected"] == 0
    status, _, _ = await get(url + "api/state", headers={"Authorization": "Bearer s3cret-" + "x" * 30})
    assert status == 200
    assert (await get(url + "healthz"))[0] == 200   # liveness without the secret


async def test_a_taken_port_is_a_configuration_error(tmp_path, tiny_model, start_coordinator):
    import socket

    from common.errors import ConfigError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cfg = coordinator_config(tmp_path, tiny_model, monitor=dict(metrics_listen=f"127.0.0.1:{taken}", dashboard_listen=""))
        rc = await start_coordinator(cfg, run_rounds=False)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{taken}.*set it to ''"):
            await rc.coord.start_monitor()


def test_monitor_settings_are_checked():
    assert MonitorSection().problems() == []
    assert any("dashboard_token_file" in p for p in MonitorSection(dashboard_listen="0.0.0.0:8787").problems())
    assert MonitorSection(dashboard_listen="0.0.0.0:8787", dashboard_token_file=Path("/x")).problems() == []
    assert any("metrics_listen" in p for p in MonitorSection(metrics_listen="nohost").problems())
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="out of range"):
        parse_listen("127.0.0.1:70000")


def test_every_metric_is_documented():
    from fedclient.monitor import DaemonMetrics
    from fedserver.monitor import CoordinatorMetrics

    doc = (Path(__file__).resolve().parent.parent / "docs" / "MONITORING.md").read_text()
    names = {"schoolfed_rounds_total", "schoolfed_eval_accuracy", "schoolfed_eval_loss", "schoolfed_eval_round",
             "schoolfed_school_connected", "schoolfed_school_eval_accuracy"}   # read from the state database
    for metrics in (CoordinatorMetrics(school_labels=True), DaemonMetrics()):
        for fam in metrics.registry.collect():
            names.add(fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, ""))
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/MONITORING.md does not describe {missing}"
