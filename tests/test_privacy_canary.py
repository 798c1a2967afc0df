"""Privacy guard: canary questions planted in every school's training and held-out data never
leave the school, neither as text nor as token ids, through train, distill, teach and
evaluate rounds. Every byte each daemon sends passes through a recording TCP proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from pathlib import Path

from common.models import load_tokenizer
from tests.conftest import coordinator_config, school_config


class RecordingProxy:
    """127.0.0.1:0 -> target; keeps every byte the clients send (client -> server)."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.sent = bytearray()
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if record:
                    self.sent.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        for t in (asyncio.create_task(self._pipe(reader, up_writer, True)),
                  asyncio.create_task(self._pipe(up_reader, writer, False))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()


def plant_canaries(src: Path, dst: Path, school: str) -> list[str]:
    """Copy a school's folder, adding a canary question to its train and held-out files."""
    canaries = []
    for name in ("train.jsonl", "heldout/heldout.jsonl"):
        lines = (src / name).read_text().splitlines()
        secret = f"Zyxwv canary {school} {Path(name).stem} quokka-7731"
        canaries.append(secret)
        q = {"id": f"canary:{school}:{name}", "source": "canary", "group": "canary", "question": secret,
             "choices": [f"{secret} answer", "plain option"], "answer_index": 0, "answer": f"{secret} answer"}
        lines = [json.dumps(q)] * 8 + lines   # up front and repeated: trained on in the first steps
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text("\n".join(lines) + "\n")
    return canaries


async def test_no_canary_leaves_a_school(tmp_path, tiny_model, tiny_teacher, exchange_data, start_coordinator, start_school):
    # plaintext on purpose: the proxy must read what the schools send (under TLS it would see
    # ciphertext and find no canary whatever was sent)
    cfg = coordinator_config(
        tmp_path, tiny_model, eval_file=exchange_data / "eval" / "eval.jsonl", tls=False,
        rounds=dict(total=4, min_schools=3, quorum=3, deadline_s=120.0),
        teacher=dict(model=tiny_teacher, quantization="none", eval_max_examples=4, learn_steps=1, learn_batch=4, threads=1),
        distill=dict(pool_file=exchange_data / "public" / "pool.jsonl", slice_size=8, kd_weight=0.5),
        schedule=dict(rounds=("train", "distill", "teach", "evaluate")))
    rc = await start_coordinator(cfg)
    proxy = RecordingProxy(rc.address)
    address = await proxy.start()
    canaries = []
    try:
        for k in (1, 2, 3):
            sid = f"school-{k}"
            folder = tmp_path / "data" / sid
            canaries += plant_canaries(exchange_data / "schools" / sid, folder, sid)
            sc = school_config(tmp_path, address, sid, exchange_data, tiny_model, tls=False)
            sc = dataclasses.replace(sc, school=dataclasses.replace(sc.school, data_dir=folder / "train.jsonl",
                                                                     heldout_file=folder / "heldout" / "heldout.jsonl"))
            await start_school(sc)
        await asyncio.wait_for(rc.run_task, timeout=300)
    finally:
        await proxy.stop()

    rounds = rc.store.rounds()
    assert [(r.kind, r.status) for r in rounds] == [("train", "committed"), ("distill", "committed"),
                                                      ("teach", "committed"), ("evaluate", "committed")]
    sent = bytes(proxy.sent)
    # The proxy really saw the schools' traffic: every byte uploaded, and the Join request.
    assert len(sent) >= sum(r.bytes_up for r in rounds) > 0
    assert tiny_model.encode() in sent
    tok = load_tokenizer(tiny_model)
    for secret in canaries:
        for form in (secret, secret.lower(), "quokka-7731", "Zyxwv canary"):
            assert form.encode() not in sent and form.encode("utf-16-le") not in sent, form
        ids = tok(secret, add_special_tokens=False).input_ids
        for _width, fmt in ((8, "<q"), (4, "<i"), (4, "<f")):
            packed = b"".join(struct.pack(fmt, i) for i in ids)
            assert packed not in sent, (secret, fmt)
        # and as protobuf varints (a repeated int field would carry them so)
        assert bytes(_varints(ids)) not in sent
    # The schools did train on the canaries (they were in the data the daemons loaded).
    assert all(r.metrics.get("train_loss") or r.kind in ("teach", "evaluate") for r in rounds)


def _varints(ids: list[int]) -> bytearray:
    out = bytearray()
    for v in ids:
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return out
