"""A coordinator killed (SIGKILL) mid-distill and mid-teach resumes the same round from its
stored plan (the same pack, not labelled again): every receipted result is kept, none is
applied twice, a replay is refused, and the round commits once the rest arrive."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import torch

from common.distill import Pack, answers_to_bytes
from common.messages import UploadHeader
from common.wire import bytes_to_tensors, sha256_hex, tensors_to_bytes
from fedclient.transfer import download, upload
from fedserver.store import Store
from tests.test_coordinator_restart import School, start, write_config


def write_exchange_config(tmp: Path, model: str, teacher: str, data: Path, kind: str) -> Path:
    cfg = write_config(tmp, model)
    q = json.dumps
    text = cfg.read_text().replace("[evaluation]", f"""[teacher]
model = {q(teacher)}
quantization = "none"
eval_max_examples = 0
learn_steps = 2
learn_batch = 4
threads = 1

[distill]
pool_file = {q(str(data / "public" / "pool.jsonl"))}
slice_size = 6
open_slice_size = 2
max_new_tokens = 4

[schedule]
rounds = [{q(kind)}]

[evaluation]""")
    cfg.write_text(text)
    return cfg


async def next_command(school: School, kind: str):
    async for cmd in school.call:
        if cmd.WhichOneof("command") == kind:
            return cmd
    raise AssertionError(f"session ended without a {kind} command")


async def test_killed_coordinator_resumes_a_distill_round(tmp_path, tiny_model, tiny_teacher, exchange_data):
    cfg = write_exchange_config(tmp_path, tiny_model, tiny_teacher, exchange_data, "distill")
    proc, address = start(cfg, tmp_path, 1)
    s1, s2 = School(address, "school-1"), School(address, "school-2")
    try:
        await s1.join()
        await s2.join()
        cmd = await next_command(s1, "distill")
        pack_sha, glob_sha = cmd.distill.pack.sha256, cmd.distill.global_adapter.sha256
        pack = Pack.from_bytes(await download(s1.stub, pack_sha, s1.md, bytearray()))
        assert pack.kind == "labelled-pack" and len(pack.questions) == 6
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

    proc, address = start(cfg, tmp_path, 2)
    s1, s2 = School(address, "school-1"), School(address, "school-2")
    try:
        await s1.join()
        await s2.join()
        cmd2 = await next_command(s2, "distill")
        assert cmd2.round == 1 and cmd2.distill.pack.sha256 == pack_sha   # the stored plan, not a new labelling
        assert await upload(s1.stub, h1, payload1, s1.md) is None          # kept across the crash: a replay
        payload2 = tensors_to_bytes(deltas["school-2"])
        h2 = UploadHeader(1, "s2-upload", 10, sha256_hex(payload2), len(payload2), 0, glob_sha)
        assert await upload(s2.stub, h2, payload2, s2.md) is not None
        assert await asyncio.to_thread(proc.wait, 90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await s1.close()
        await s2.close()

    state = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    r1 = state.get_round(1)
    assert r1.kind == "distill" and r1.status == "committed" and r1.metrics["updates"] == 2
    new = bytes_to_tensors((tmp_path / "state" / "artifacts" / r1.global_out).read_bytes())
    for k in glob:   # each delta counted exactly once, weighted 30:10
        torch.testing.assert_close(new[k], glob[k] + (30 * 0.5 + 10 * -0.25) / 40)
    log = (tmp_path / "coordinator-2.log").read_text()
    assert "teacher labelled a pool slice" not in log   # the restarted coordinator did not label again


async def test_killed_coordinator_resumes_a_teach_round(tmp_path, tiny_model, tiny_teacher, exchange_data):
    cfg = write_exchange_config(tmp_path, tiny_model, tiny_teacher, exchange_data, "teach")
    proc, address = start(cfg, tmp_path, 1)
    s1, s2 = School(address, "school-1"), School(address, "school-2")
    try:
        await s1.join()
        await s2.join()
        cmd = await next_command(s1, "teach")
        pack_sha, glob_sha = cmd.teach.pack.sha256, cmd.teach.global_adapter.sha256
        pack = Pack.from_bytes(await download(s1.stub, pack_sha, s1.md, bytearray()))
        width = max(len(x.choices) for x in pack.questions)
        # school-1 is sure of option 0, school-2 of each question's right answer
        a1 = torch.zeros(len(pack.questions), width)
        a1[:, 0] = 1.0
        a2 = torch.zeros(len(pack.questions), width)
        a2[torch.arange(len(pack.questions)), torch.tensor([x.answer_index for x in pack.questions])] = 1.0
        # both answer the first open prompt alike (the teacher learns it), the second not
        p1 = answers_to_bytes(a1, ["Paris", "red"])
        h1 = UploadHeader(cmd.round, "s1-answers", len(pack.questions), sha256_hex(p1), len(p1), 0, glob_sha, {}, "", "answers")
        assert await upload(s1.stub, h1, p1, s1.md) is not None
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
        cmd2 = await next_command(s2, "teach")
        assert cmd2.round == 1 and cmd2.teach.pack.sha256 == pack_sha
        assert await upload(s1.stub, h1, p1, s1.md) is None
        p2 = answers_to_bytes(a2, ["paris.", "blue"])
        h2 = UploadHeader(1, "s2-answers", len(pack.questions), sha256_hex(p2), len(p2), 0, glob_sha, {}, "", "answers")
        assert await upload(s2.stub, h2, p2, s2.md) is not None
        assert await asyncio.to_thread(proc.wait, 90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await s1.close()
        await s2.close()

    state = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    r1 = state.get_round(1)
    assert r1.kind == "teach" and r1.status == "committed"
    assert r1.metrics["answer_sets"] == 2 and r1.global_out == glob_sha   # the schools' adapter is unchanged
    assert 0.0 <= r1.metrics["ensemble_accuracy"] <= 1.0
    # the answer texts survived the restart too: one agreed answer of two prompts
    assert r1.metrics["pack_prompts"] == 2 and r1.metrics["open_answers_agreed"] == 1
    assert state.get_meta("teacher_adapter") == str(tmp_path / "state" / "rounds" / "1" / "teacher-adapter")
    assert (tmp_path / "state" / "rounds" / "1" / "teacher-adapter" / "adapter_model.safetensors").is_file()
