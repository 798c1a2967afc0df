"""A coordinator killed (SIGKILL) mid-round restarts into the same round: every receipted
update is kept, none is applied twice, and a replay after the restart is refused."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch

from common import PROTOCOL_VERSION
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.wire import bytes_to_tensors, sha256_hex, tensors_to_bytes
from fedclient.transfer import download, upload
from fedserver.auth import hash_token
from fedserver.store import Store
from tests.conftest import REPO, TOKENS, server_tls_toml, tls_channel


def write_config(tmp: Path, model: str) -> Path:
    q = json.dumps
    schools = "\n".join(f'[[schools]]\nid = "{s}"\ntoken_sha256 = "{hash_token(TOKENS[s])}"\n' for s in ("school-1", "school-2"))
    cfg = tmp / "coordinator.toml"
    cfg.write_text(f"""[server]
listen = "127.0.0.1:0"
state_dir = {q(str(tmp / "state"))}
heartbeat_interval_s = 0.5
{server_tls_toml()}
[model]
base = {q(model.removeprefix("dir:"))}
[lora]
rank = 4
alpha = 8.0
[rounds]
total = 1
min_schools = 2
quorum = 2
deadline_s = 300.0
[evaluation]
school_timeout_s = 1.0
[monitor]
metrics_listen = "127.0.0.1:0"
dashboard_listen = "127.0.0.1:0"
{schools}""")
    return cfg


def start(cfg: Path, tmp: Path, n: int) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"addr-{n}"
    proc = subprocess.Popen([sys.executable, "-m", "fedserver.cli", "serve", "--config", str(cfg), "--port-file", str(port_file)],
                            cwd=REPO, stdout=open(tmp / f"coordinator-{n}.log", "wb"), stderr=subprocess.STDOUT)
    end = time.time() + 120
    while not port_file.exists():
        assert proc.poll() is None and time.time() < end, (tmp / f"coordinator-{n}.log").read_text()[-2000:]
        time.sleep(0.1)
    return proc, port_file.read_text().strip()


class School:
    def __init__(self, address: str, sid: str) -> None:
        self.channel = tls_channel(address, sid)   # mutual TLS with this school's certificate
        self.stub = pb_grpc.FederationStub(self.channel)
        self.sid = sid
        self.call: grpc.aio.StreamStreamCall | None = None

    async def join(self) -> None:
        resp = await self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS[self.sid]}")])
        self.md = [("x-session-token", resp.session_token)]

        async def beats():
            while True:
                yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=time.time()))
                await asyncio.sleep(0.3)

        self.call = self.stub.Session(beats(), metadata=self.md)

    async def next_train(self) -> pb.ServerCommand:
        async for cmd in self.call:
            if cmd.WhichOneof("command") == "train":
                return cmd
        raise AssertionError("session ended without a train command")

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


async def test_killed_coordinator_resumes_round_without_double_counting(tmp_path, tiny_model):
    cfg = write_config(tmp_path, tiny_model)
    proc, address = start(cfg, tmp_path, 1)
    s1, s2 = School(address, "school-1"), School(address, "school-2")
    try:
        await s1.join()
        await s2.join()
        cmd = await s1.next_train()
        glob_sha = cmd.train.global_adapter.sha256
        glob = bytes_to_tensors(await download(s1.stub, glob_sha, s1.md, bytearray()))
        deltas = {sid: {k: torch.full_like(v, c) for k, v in glob.items()} for sid, c in (("school-1", 0.5), ("school-2", -0.25))}
        payload1 = tensors_to_bytes(deltas["school-1"])
        h1 = UploadHeader(cmd.round, "s1-upload", 30, sha256_hex(payload1), len(payload1), 0, glob_sha)
        assert await upload(s1.stub, h1, payload1, s1.md) is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await s1.close()
        await s2.close()

    state = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    assert [r.school_id for r in state.receipts(1)] == ["school-1"] and state.get_round(1).status == "open"
    state.close()

    proc, address = start(cfg, tmp_path, 2)
    s1, s2 = School(address, "school-1"), School(address, "school-2")
    try:
        await s1.join()
        await s2.join()
        cmd2 = await s2.next_train()
        assert cmd2.round == 1 and cmd2.train.global_adapter.sha256 == glob_sha   # the same round, resumed
        # school-1's update survived the crash: sending it again is a replay.
        assert await upload(s1.stub, h1, payload1, s1.md) is None
        payload2 = tensors_to_bytes(deltas["school-2"])
        h2 = UploadHeader(1, "s2-upload", 10, sha256_hex(payload2), len(payload2), 0, glob_sha)
        assert await upload(s2.stub, h2, payload2, s2.md) is not None
        # total = 1: it finishes and exits 0, after waiting school_timeout_s for evaluation
        # reports these hand-driven schools never send.
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await s1.close()
        await s2.close()

    state = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    r1 = state.get_round(1)
    assert r1.status == "committed" and r1.metrics["updates"] == 2
    new = bytes_to_tensors((tmp_path / "state" / "artifacts" / r1.global_out).read_bytes())
    for k in glob:   # each delta counted exactly once, weighted 30:10
        torch.testing.assert_close(new[k], glob[k] + (30 * 0.5 + 10 * -0.25) / 40)
