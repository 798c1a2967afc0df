"""The operator's and the school's commands as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

from peft import PeftModel

from common.models import load_model
from tests.conftest import REPO
from tests.test_daemon_processes import write_school_toml


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_demo_writes_report_and_loadable_adapters(tmp_path, tiny_model, tiny_teacher):
    """The demo's default schedule (train, distill, teach) with tiny models for speed."""
    out = tmp_path / "demo"
    proc = run("fedserver.cli", "demo", "--model", tiny_model, "--schools", "2", "--local-steps", "1",
               "--eval-size", "6", "--train-per-school", "10", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--teacher", tiny_teacher, "--teacher-quantization", "none", "--teacher-eval", "4", "--pool-size", "20",
               "--slice-size", "6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == tiny_model
    assert report["eval_set"]["count"] == 6 and report["eval_set"]["name"]
    assert 0 <= report["base_eval_accuracy"] <= 1
    assert [(r["round"], r["kind"]) for r in report["rounds"]] == [(1, "train"), (2, "distill"), (3, "teach")]
    for r in report["rounds"]:
        assert {"round", "kind", "participants", "eval_accuracy", "eval_loss", "bytes_up", "bytes_down", "seconds",
                "school_eval_accuracy", "school_eval_loss", "teacher_tokens_scored"} <= set(r)
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and len(r["participants"]) == 2 and r["seconds"] > 0
        assert (r["eval_accuracy"] is not None) == (r["kind"] != "teach")   # teach rounds leave the schools' adapter as is
    assert report["rounds"][1]["teacher_tokens_scored"] > 0
    t = report["teacher"]
    assert t["model"] == tiny_teacher and t["quantization"] == "none" and t["eval_count"] == 4
    assert t["before"]["accuracy"] is not None and [a["round"] for a in t["after_teach_rounds"]] == [3]
    assert report["ood"]["source"] == "openbookqa" and 0 <= report["ood"]["adapter_accuracy"] <= 1
    assert (out / "rounds" / "3" / "teacher-adapter" / "adapter_model.safetensors").is_file()
    out = tmp_path / "demo"
    base, _ = load_model(tiny_model)
    PeftModel.from_pretrained(base, str(out / "rounds" / "2" / "adapter"))
    assert "round" in proc.stdout and "accuracy" in proc.stdout and "teacher" in proc.stdout   # the per-round table
    # The operator's read-only view of the same state.
    status = run("fedserver.cli", "status", "--state-dir", str(out / "coordinator"))
    assert status.returncode == 0 and "school-1" in status.stdout, status.stderr
    live = json.loads((out / "coordinator" / "live.json").read_text())   # the live view the demo prints
    assert set(live) >= {"round", "schools", "participants", "accepted"}
    # Anyone can check a saved adapter independently, through peft.
    ev = run("fedserver.cli", "evaluate", "--model", tiny_model, "--adapter", str(out / "rounds" / "2" / "adapter"),
             "--eval-file", str(out / "data" / "eval" / "eval.jsonl"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    scored = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scored["count"] == 6
    assert scored["accuracy"] == report["rounds"][1]["eval_accuracy"]
    assert abs(scored["loss"] - report["rounds"][1]["eval_loss"]) < 1e-4
    # A second run refuses to overwrite the first.
    again = run("fedserver.cli", "demo", "--model", tiny_model, "--out", str(out), "--schedule", "train")
    assert again.returncode == 2 and "earlier run" in again.stderr


async def test_daemon_exit_codes(tmp_path, tiny_model, fed_data, start_coordinator):
    import asyncio

    from tests.conftest import coordinator_config

    rc = await start_coordinator(coordinator_config(tmp_path, tiny_model), run_rounds=False)
    cfg = write_school_toml(tmp_path, rc.address, "school-1", fed_data, tiny_model)
    (tmp_path / "school-1.token").write_text("not-the-right-token\n")
    proc = await asyncio.to_thread(run, "fedclient.cli", "run", "--config", str(cfg), timeout=120)
    assert proc.returncode == 78 and "unknown school" in proc.stdout + proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[school]\ncoordinator = "nohostport"\ncolour = "blue"\n')
    proc = await asyncio.to_thread(run, "fedclient.cli", "run", "--config", str(bad), timeout=60)
    assert proc.returncode == 78
    assert "colour: unknown key" in proc.stderr and "coordinator: expected host:port" in proc.stderr


async def test_sigterm_stops_coordinator_and_daemon_gracefully(tmp_path, tiny_model, fed_data):
    """systemd stops services with SIGTERM: both exit 0; the coordinator keeps its open round."""
    import asyncio
    import signal

    from tests.test_coordinator_restart import start as start_server
    from tests.test_coordinator_restart import write_config
    from tests.test_daemon_processes import spawn

    cfg = write_config(tmp_path, tiny_model)
    server, address = await asyncio.to_thread(start_server, cfg, tmp_path, 1)
    school = spawn(write_school_toml(tmp_path, address, "school-1", fed_data, tiny_model), tmp_path / "school.log")
    try:
        log = tmp_path / "school.log"
        for _ in range(600):   # until the school has joined
            if log.exists() and "joined" in log.read_text():
                break
            await asyncio.sleep(0.1)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from tests.conftest import tls_channel

        async with tls_channel(address, "school-1") as channel:   # the standard health service
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "schoolfed.v1.Federation"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        school.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(school.wait, 30) == 0, log.read_text()[-2000:]
        assert "stopped" in log.read_text()
        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 30) == 0
        assert "stopping on signal" in (tmp_path / "coordinator-1.log").read_text()
    finally:
        for p in (school, server):
            if p.poll() is None:
                p.kill()
