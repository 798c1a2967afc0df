"""School daemons as real processes: one is killed mid-round with SIGKILL; the round still
closes at quorum, the daemon comes back and joins the next round. The coordinator's event
loop stays responsive throughout (training, uploads and evaluation all run off the loop)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, TOKENS, coordinator_config, school_tls_toml, wait_for


def write_school_toml(tmp: Path, address: str, school: str, fed_data: Path, model: str, tls: bool = True) -> Path:
    token = tmp / f"{school}.token"
    token.write_text(TOKENS[school] + "\n")
    d = fed_data / "schools" / school
    cfg = tmp / f"{school}.toml"
    q = json.dumps
    cfg.write_text(f"""[school]
coordinator = {q(address)}
token_file = {q(str(token))}
state_dir = {q(str(tmp / school))}
data_dir = {q(str(d / "train.jsonl"))}
heldout_file = {q(str(d / "heldout" / "heldout.jsonl"))}
torch_threads = 1
max_backoff_s = 0.5

{school_tls_toml(school, tls)}
[model]
base = {q(model.removeprefix("dir:"))}
""")
    return cfg


def spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fedclient.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


async def test_killed_daemon_does_not_stop_the_federation(tmp_path, tiny_model, fed_data, start_coordinator):
    cfg = coordinator_config(tmp_path, tiny_model, eval_file=fed_data / "eval" / "eval.jsonl",
                             rounds=dict(total=2, min_schools=3, quorum=2, deadline_s=120.0),
                             train=dict(local_steps=200, batch_size=2, learning_rate=1e-3, max_seq_len=96))
    rc = await start_coordinator(cfg)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            lags.append(time.perf_counter() - t - 0.02)

    tick = asyncio.create_task(ticker())
    procs = {}
    configs = {}
    for k in (1, 2, 3):
        sid = f"school-{k}"
        configs[sid] = write_school_toml(tmp_path, rc.address, sid, fed_data, tiny_model)
        procs[sid] = spawn(configs[sid], tmp_path / f"{sid}.log")
    try:
        def training(sid: str) -> bool:
            s = rc.engine.sessions.get(sid)
            return s is not None and s.progress.startswith("train") and rc.engine.current is not None

        await wait_for(lambda: training("school-3"), 120, "school-3 to start training in round 1")
        procs["school-3"].send_signal(signal.SIGKILL)
        procs["school-3"].wait(timeout=10)
        await wait_for(lambda: rc.store.get_round(1) is not None and rc.store.get_round(1).status != "open", 120, "round 1 to close")
        r1 = rc.store.get_round(1)
        assert r1.status == "committed"
        assert r1.metrics["updates"] == 2
        assert r1.failures == {"school-3": "disconnected"}
        # Round 2 needs three schools: it waits until the killed daemon is back.
        await asyncio.sleep(1.0)
        assert rc.store.get_round(2) is None
        procs["school-3"] = spawn(configs["school-3"], tmp_path / "school-3.restarted.log")
        await asyncio.wait_for(rc.run_task, timeout=180)
        r2 = rc.store.get_round(2)
        assert r2.status == "committed" and r2.metrics["updates"] == 3
        assert r2.global_in == r1.global_out
        # Told to shut down when the federation finished, every daemon exits 0.
        for sid, p in procs.items():
            assert await asyncio.to_thread(p.wait, 30) == 0, (tmp_path / f"{sid}.log").read_text()[-2000:]
    finally:
        tick.cancel()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    # Anything run on the loop by mistake (a model load, a training step, hashing 20 MB) stalls
    # it for seconds; 1 s leaves room for scheduler noise on a loaded 2-core machine.
    assert max(lags) < 1.0, f"coordinator event loop blocked for {max(lags):.2f} s"
