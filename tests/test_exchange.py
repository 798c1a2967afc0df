"""The distillation exchange channel: packs, answer sets, ensembles, the KD loss, and a real
federation (separate tokenizers for schools and teacher) running train, distill and teach
rounds over gRPC; bad answer sets are refused with clear statuses and change nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from common import PROTOCOL_VERSION
from common.data import Question, answer_text, prompt_text, read_jsonl, read_pool
from common.distill import (
    Pack, answers_to_bytes, distributions, kd_loss, label, option_scores, pool_slice, train_distill, validate_answers,
)
from common.errors import ValidationError
from common.lora import LoraSettings, wrap
from common.messages import UploadHeader
from common.models import load_model
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import command_from_pb
from common.training import TrainParams
from common.wire import bytes_to_tensors, grpc_options, sha256_hex, tensors_to_bytes
from fedclient.transfer import download, upload
from fedserver.ensemble import ensemble
from tests.conftest import TOKENS, coordinator_config, school_config
from tests.test_rpc_errors import _idle


def q(i: int, n: int = 4) -> Question:
    choices = tuple(f"option {i}-{j}" for j in range(n))
    return Question(f"t:{i}", "t", "t", f"What is {i}?", choices, 0, choices[0])


# ---------------------------------------------------------------- pure pieces


def test_pack_round_trip_and_pool_slices_cycle():
    qs = [q(i) for i in range(10)]
    labelled = Pack(tuple(qs[:2]), ((0.7, 0.1, 0.1, 0.1), (0.25, 0.25, 0.25, 0.25)), "teacher", 2.0)
    assert Pack.from_bytes(labelled.to_bytes()) == labelled and labelled.kind == "labelled-pack"
    assert Pack(tuple(qs)).kind == "pool-pack"
    slices = [pool_slice(qs, 4, i, seed=3) for i in range(5)]
    assert [len(s) for s in slices] == [4] * 5
    assert {x.id for s in slices[:2] for x in s} | {x.id for x in slices[2][:2]} == {x.id for x in qs}   # no repeat before a full cycle
    with pytest.raises(ValidationError):
        Pack.from_bytes(b"{not json")


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_one_poisoned_school_cannot_steer_a_robust_ensemble(rule):
    support = torch.ones(3, 4, dtype=torch.bool)
    honest = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    answers = {f"s{k}": honest + 0.01 * k for k in range(4)}
    answers = {k: v / v.sum(-1, keepdim=True) for k, v in answers.items()}
    answers["evil"] = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3)   # always the same wrong option
    target = ensemble(answers, support, rule, trim=0.2)
    assert torch.equal(target.argmax(-1), honest.argmax(-1))
    assert torch.allclose(target.sum(-1), torch.ones(3))
    mean = ensemble(answers, support, "mean")
    assert float(mean[0, 3]) > float(target[0, 3])   # the plain mean moves toward the attacker


def test_weighted_ensemble_and_padding_columns_stay_zero():
    support = torch.tensor([[True, True, False]])
    a = {"good": torch.tensor([[1.0, 0.0, 0.0]]), "bad": torch.tensor([[0.0, 1.0, 0.0]])}
    out = ensemble(a, support, "weighted", weights={"good": 0.9, "bad": 0.1})
    assert torch.allclose(out, torch.tensor([[0.9, 0.1, 0.0]]))
    with pytest.raises(ValueError):
        ensemble(a, support, "nope")


def _answers(rows):
    return answers_to_bytes(torch.tensor(rows, dtype=torch.float32))


@pytest.mark.parametrize("payload, text", [
    (_answers([[0.5, 0.5, 0.0, 0.0]]), "shape"),
    (_answers([[0.5, 0.5, 0.0, 0.0], [float("nan"), 0.5, 0.5, 0.0]]), "NaN or Inf"),
    (_answers([[0.5, 0.6, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0]]), "sums to"),
    (_answers([[1.5, -0.5, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0]]), "[0, 1]"),
    (_answers([[0.5, 0.5, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]]), "past question"),
    (tensors_to_bytes({"probs": torch.full((2, 4), 0.25)}, {"note": "my students wrote this"}), "no metadata"),
    (tensors_to_bytes({"probs": torch.full((2, 4), 0.25), "text": torch.zeros(3)}), "exactly the tensors"),
    (tensors_to_bytes({"probs": torch.full((2, 4), 0.25, dtype=torch.float64)}), "dtype"),
    (b"\x00" * 4, "too short"),
])
def test_bad_answer_sets_are_refused(payload, text):
    pack = [q(1), q(2, 3)]   # the second question has three options
    with pytest.raises(ValidationError, match=None) as err:
        validate_answers(payload, pack)
    assert text in str(err.value)


def test_valid_answer_set_passes():
    probs = validate_answers(_answers([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]]), [q(1), q(2, 3)])
    assert probs.shape == (2, 4)


def test_kd_loss_is_zero_at_the_target_and_training_moves_toward_it(tiny_model, fed_data):
    model, tok = load_model(tiny_model)
    model = wrap(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj")))
    qs = read_jsonl(fed_data / "schools" / "school-1" / "train.jsonl")[:6]
    scores = option_scores(model, tok, qs, chunk=4)
    p = distributions(scores.detach(), 1.0)
    assert float(kd_loss(scores, p)) == pytest.approx(0.0, abs=1e-5)
    # the fanned-out KV cache scores each option as running its whole text alone does
    reference = torch.full_like(scores, float("-inf"))
    with torch.no_grad():
        for i, x in enumerate(qs):
            prompt = tok(prompt_text(x), add_special_tokens=False).input_ids
            for j in range(len(x.choices)):
                ans = tok(answer_text(x, j), add_special_tokens=False).input_ids
                logp = model(input_ids=torch.tensor([prompt + ans])).logits[0].float().log_softmax(-1)
                reference[i, j] = torch.stack([logp[len(prompt) - 1 + t, a] for t, a in enumerate(ans)]).mean()
    torch.testing.assert_close(scores.detach(), reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(label(model, tok, qs), p.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
    target = torch.zeros_like(p)
    target[torch.arange(len(qs)), torch.tensor([x.answer_index for x in qs])] = 1.0
    before = float(kd_loss(option_scores(model, tok, qs), target))
    result = train_distill(model, tok, qs, target, TrainParams(local_steps=6, batch_size=6, learning_rate=5e-3), 1.0)
    after = float(kd_loss(option_scores(model, tok, qs), target))
    assert result.steps == 6 and after < before


# ---------------------------------------------------------------- a federation with a teacher


def exchange_config(tmp_path, tiny_model, tiny_teacher, exchange_data, schedule, total, **sections):
    sections = {"rounds": dict(total=total, min_schools=3, quorum=2, deadline_s=120.0),
                "teacher": dict(model=tiny_teacher, quantization="none", eval_max_examples=6, learn_steps=2, learn_batch=4,
                                threads=1),
                "distill": dict(pool_file=exchange_data / "public" / "pool.jsonl", slice_size=8, kd_weight=0.5,
                                open_slice_size=4, max_new_tokens=6, local_steps=1, top_k=3),
                "schedule": dict(rounds=schedule), **sections}
    return coordinator_config(tmp_path, tiny_model, eval_file=exchange_data / "eval" / "eval.jsonl", **sections)


async def test_train_distill_teach_rounds_across_two_tokenizers(tmp_path, tiny_model, tiny_teacher, exchange_data,
                                                                start_coordinator, start_school):
    from safetensors.torch import load_file

    cfg = exchange_config(tmp_path, tiny_model, tiny_teacher, exchange_data, ("train", "distill", "teach"), 3)
    rc = await start_coordinator(cfg)
    for k in (1, 2, 3):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", exchange_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=240)

    rounds = rc.store.rounds()
    assert [(r.kind, r.status) for r in rounds] == [("train", "committed"), ("distill", "committed"), ("teach", "committed")]
    train, distill, teach = rounds
    # The plan was fixed when each round opened, and stored with it.
    assert set(train.plan["params"]) == set(train.participants)
    # distill rounds take [distill] local_steps; train rounds keep [train]'s
    assert {p["local_steps"] for p in train.plan["params"].values()} == {2}
    assert {p["local_steps"] for p in distill.plan["params"].values()} == {1}
    pack = Pack.from_bytes(rc.engine.artifacts.get(distill.plan["pack"]))
    assert pack.kind == "labelled-pack" and len(pack.questions) == 8
    pool_qs, pool_open = read_pool(exchange_data / "public" / "pool.jsonl")
    assert {x.id for x in pack.questions} <= {x.id for x in pool_qs}
    assert all(abs(sum(row) - 1) < 1e-4 for row in pack.probs)
    # open prompts: the teacher answered each (sequence-level KD, text across tokenizers)
    assert len(pack.prompts) == len(pack.texts) == 4 and {p.id for p in pack.prompts} <= {p.id for p in pool_open}
    assert distill.metrics["pack_prompts"] == 4 and distill.metrics["teacher_tokens_generated"] > 0
    # every school trained on the teacher's answers too (its receipt says so)
    assert pack.open_items() and all("seq_kd_loss" in r.metrics for r in rc.store.receipts(distill.round))
    # the pack carries the teacher's top-k, but its vocabulary is not the schools': they used the text
    assert pack.topk and all(r.metrics["topk_kd"] == 0.0 for r in rc.store.receipts(distill.round))
    # distill changed the schools' adapter; teach did not, but trained the teacher's
    assert distill.global_out != distill.global_in and teach.global_out == teach.global_in
    assert distill.metrics["updates"] == 3 and distill.metrics["teacher_tokens_scored"] > 0
    assert teach.metrics["answer_sets"] == 3 and 0 <= teach.metrics["ensemble_accuracy"] <= 1
    # the schools answered the teach pack's open prompts too; the teacher learned the agreed ones
    assert teach.metrics["pack_prompts"] == 4 and 0 <= teach.metrics["open_answers_agreed"] <= 4
    saved = cfg.server.state_dir / "rounds" / "3" / "teacher-adapter"
    assert rc.store.get_meta("teacher_adapter") == str(saved)
    state = load_file(str(saved / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)   # B started at zero
    # the teacher was scored before it learned and after the teach round
    assert {e["round"] for e in rc.store.evals() if e["source"] == "teacher"} == {0, 3}
    # the teacher adapter is a PEFT directory for the teacher's base
    from peft import PeftModel

    base, _ = load_model(tiny_teacher)
    PeftModel.from_pretrained(base, str(saved))
    # a restarted coordinator's teacher starts from the recorded adapter
    from fedserver.teacher import TeacherHost

    host = TeacherHost(cfg.teacher, None)
    host.restore_from = saved
    try:
        restored = await host.call(lambda b: b.adapter())
    finally:
        host.close()
    assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)


@pytest.fixture
async def teach_round(tmp_path, tiny_model, tiny_teacher, exchange_data, start_coordinator):
    """A teach round open for school-1 and school-2, driven by the test at protocol level."""
    cfg = exchange_config(tmp_path, tiny_model, tiny_teacher, exchange_data, ("teach",), 1, tls=False,   # one channel, two schools
                          rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=120.0),
                          evaluation=dict(school_timeout_s=1.0))
    rc = await start_coordinator(cfg)
    channel = grpc.aio.insecure_channel(rc.address, options=grpc_options())
    stub = pb_grpc.FederationStub(channel)
    sessions, calls = {}, []
    for sid in ("school-1", "school-2"):
        resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=[("authorization", f"Bearer {TOKENS[sid]}")])
        sessions[sid] = [("x-session-token", resp.session_token)]
        calls.append(stub.Session(_idle(), metadata=sessions[sid]))
    cmd = command_from_pb(await asyncio.wait_for(calls[0].read(), 60))
    pack = Pack.from_bytes(await download(stub, cmd.pack.sha256, sessions["school-1"], bytearray()))
    yield rc, stub, sessions, cmd, pack
    for c in calls:
        c.cancel()
    await rc.stop()
    await channel.close()


def _uniform(pack: Pack) -> torch.Tensor:
    width = max(len(x.choices) for x in pack.questions)
    return torch.tensor([[1 / len(x.choices) if j < len(x.choices) else 0.0 for j in range(width)] for x in pack.questions])


def _answer_set(pack: Pack, probs: torch.Tensor, texts: list[str] | None = None) -> bytes:
    return answers_to_bytes(probs, texts if texts is not None else ["an answer"] * len(pack.prompts))


@pytest.mark.parametrize("case, code, text", [
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("not_normalised", grpc.StatusCode.INVALID_ARGUMENT, "sums to"),
    ("wrong_rows", grpc.StatusCode.INVALID_ARGUMENT, "one row per pack question"),
    ("smuggled_text", grpc.StatusCode.INVALID_ARGUMENT, "no metadata"),
    ("smuggled_tensor", grpc.StatusCode.INVALID_ARGUMENT, "exactly the tensors"),
    ("missing_texts", grpc.StatusCode.INVALID_ARGUMENT, "exactly the tensors"),
    ("text_too_long", grpc.StatusCode.INVALID_ARGUMENT, "at most 400"),
    ("text_with_newline", grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
    ("text_not_utf8", grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8"),
    ("text_offsets_wrong", grpc.StatusCode.INVALID_ARGUMENT, "must rise from 0"),
    ("texts_per_prompt", grpc.StatusCode.INVALID_ARGUMENT, "one answer per open prompt"),
    ("delta_in_teach_round", grpc.StatusCode.FAILED_PRECONDITION, "takes answers uploads"),
    ("bad_checksum", grpc.StatusCode.DATA_LOSS, "does not match"),
])
async def test_bad_answer_uploads_get_clear_statuses_and_change_nothing(teach_round, case, code, text):
    rc, stub, sessions, cmd, pack = teach_round
    probs = _uniform(pack)
    kind = "answers"
    if case == "nan":
        probs[0, 0] = float("nan")
    if case == "not_normalised":
        probs[1] *= 2
    assert len(pack.prompts) == 4   # the pool's open prompts are answered in text too
    payload = _answer_set(pack, probs)
    if case == "wrong_rows":
        payload = _answer_set(pack, probs[:-1])
    good_parts = bytes_to_tensors(_answer_set(pack, probs))
    if case == "smuggled_text":
        payload = tensors_to_bytes(good_parts, {"answer": "a student's essay"})
    if case == "smuggled_tensor":
        payload = tensors_to_bytes({**good_parts, "essay": torch.zeros(3, dtype=torch.uint8)})
    if case == "missing_texts":
        payload = answers_to_bytes(probs)
    if case == "text_too_long":
        payload = _answer_set(pack, probs, ["x" * 401, "", "", ""])
    if case == "text_with_newline":
        payload = _answer_set(pack, probs, ["one line\nand a second", "", "", ""])
    if case == "text_not_utf8":
        raw = torch.tensor(list(b"\xff\xfe"), dtype=torch.uint8)
        payload = tensors_to_bytes({**good_parts, "texts": raw, "text_offsets": torch.tensor([0, 2, 2, 2, 2])})
    if case == "text_offsets_wrong":
        payload = tensors_to_bytes({**good_parts, "text_offsets": torch.tensor([0, 5, 3, 9, 36])})
    if case == "texts_per_prompt":
        payload = _answer_set(pack, probs, ["a", "b", "c"])
    if case == "delta_in_teach_round":
        kind = ""
    sha = sha256_hex(payload)
    if case == "bad_checksum":
        sha = sha256_hex(payload + b"x")
    h = UploadHeader(cmd.round, f"a-{case}", len(pack.questions), sha, len(payload), 0, cmd.adapter.sha256, {}, "", kind)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(stub, h, payload, sessions["school-1"])
    assert err.value.code() == code and text in err.value.details(), err.value.details()
    assert rc.store.receipts(cmd.round) == [] and rc.engine.current.accepted == set()
    # a good answer set from the same school still goes through
    good = _answer_set(pack, _uniform(pack))
    h = UploadHeader(cmd.round, "a-good", len(pack.questions), sha256_hex(good), len(good), 0, cmd.adapter.sha256, {}, "", "answers")
    assert await upload(stub, h, good, sessions["school-1"]) is not None
    assert [r.school_id for r in rc.store.receipts(cmd.round)] == ["school-1"]


async def test_unknown_command_is_reported_back_as_a_failure(tmp_path, tiny_model, fed_data, start_coordinator, start_school,
                                                             monkeypatch):
    """A command the daemon cannot read (what an older daemon sees of a newer coordinator's
    command: a ServerCommand whose oneof it does not know) fails that school's part of the
    round at once, with a message saying to upgrade; it is never dropped silently."""
    import fedserver.servicer as servicer
    from common.messages import TrainCommand

    real = servicer.command_to_pb
    sent = []

    def newer_coordinator(cmd):
        if isinstance(cmd, TrainCommand) and not sent:   # the first school's train command
            sent.append(cmd)
            return pb.ServerCommand(round=cmd.round, deadline_unix=cmd.deadline_unix)
        return real(cmd)

    monkeypatch.setattr(servicer, "command_to_pb", newer_coordinator)
    cfg = coordinator_config(tmp_path, tiny_model, rounds=dict(total=1, min_schools=2, quorum=1, deadline_s=120.0))
    rc = await start_coordinator(cfg)
    for k in (1, 2):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=120)
    r1 = rc.store.get_round(1)
    assert r1.status == "committed" and r1.metrics["updates"] == 1
    (failed,) = r1.failures.values()
    assert failed.startswith("command:") and "upgrade the school daemon" in failed


def test_pool_eval_and_ood_are_disjoint_from_the_schools(exchange_data):
    from common.data import normalize_text

    pool, open_prompts = read_pool(exchange_data / "public" / "pool.jsonl")
    assert len(open_prompts) == 8 and {p.source for p in open_prompts} == {"naturalqs_open"}
    ood = read_jsonl(exchange_data / "eval" / "ood.jsonl")
    evals = read_jsonl(exchange_data / "eval" / "eval.jsonl")
    schools = [q for k in (1, 2, 3) for f in ("train.jsonl", "heldout/heldout.jsonl")
               for q in read_jsonl(exchange_data / "schools" / f"school-{k}" / f)]
    texts = {name: {normalize_text(q.question) for q in qs}
             for name, qs in (("pool", pool), ("ood", ood), ("eval", evals), ("schools", schools))}
    assert len(pool) == 24 and len(ood) == 8
    for a in texts:
        for b in texts:
            if a < b:
                assert not texts[a] & texts[b], (a, b)
    assert {q.source for q in ood} == {"openbookqa"} and "openbookqa" not in {q.source for q in schools + pool + evals}


async def test_a_round_the_teacher_cannot_plan_fails_cleanly(tmp_path, tiny_model, exchange_data, start_coordinator, start_school):
    """A teacher that cannot load fails its distill round with the reason recorded (not a
    crash of the engine); the failed-rounds limit then stops the coordinator with a message."""
    cfg = exchange_config(tmp_path, tiny_model, f"dir:{tmp_path / 'no-such-model'}", exchange_data, ("distill",), 1,
                          rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=60.0, max_failed_rounds=2))
    rc = await start_coordinator(cfg)
    for k in (1, 2):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", exchange_data, tiny_model))
    with pytest.raises(RuntimeError, match="2 rounds in a row failed"):
        await asyncio.wait_for(rc.run_task, timeout=120)
    rounds = rc.store.rounds()
    assert [(r.kind, r.status) for r in rounds] == [("distill", "failed"), ("distill", "failed")]
    assert "could not be planned" in rounds[0].failures["plan"] and "config.json" in rounds[0].failures["plan"]
