"""Open-ended pool prompts: the pool format, prepare-data, packs that carry the teacher's
answers, and sequence-level distillation (a student trains on the teacher's text in its own
tokenization)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from common.data import OpenPrompt, Question, open_answer, pool_item, prompt_text, read_pool, write_jsonl
from common.distill import MAX_TEXT_CHARS, Pack, train_distill
from common.errors import ValidationError
from common.lora import LoraSettings, wrap
from common.models import load_model
from common.training import TrainParams, encode_pair


def _open(i: int) -> OpenPrompt:
    return OpenPrompt(f"o:{i}", "o", "o", f"who wrote book {i}", (f"author {i}",))


def _mc(i: int) -> Question:
    return Question(f"t:{i}", "t", "t", f"What is {i}?", ("a", "b"), 1, "b")


def test_pool_lines_are_questions_or_open_prompts(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_jsonl(path, [_mc(1), _open(1), _mc(2), _open(2)])
    questions, prompts = read_pool(path)
    assert [q.id for q in questions] == ["t:1", "t:2"] and [p.id for p in prompts] == ["o:1", "o:2"]
    assert prompt_text(_open(3)) == "Question: who wrote book 3\nAnswer:"
    with pytest.raises(ValueError, match="answers"):
        pool_item({"id": "x", "source": "s", "group": "g", "question": "q?", "answers": []})
    with pytest.raises(ValueError, match="missing"):   # neither choices nor answers: read as a question, and refused
        pool_item({"id": "x", "source": "s", "group": "g", "question": "q?"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "source": "s", "group": "g", "question": "q?", "answers": "Paris"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answers' must be a list"):
        read_pool(bad)


def test_prepare_data_adds_open_prompts_from_a_source_no_school_has(exchange_data):
    manifest = json.loads((exchange_data / "manifest.json").read_text())
    assert manifest["public_pool"]["open_prompts"] == 8 and manifest["public_pool"]["open_source"] == "naturalqs_open"
    _, prompts = read_pool(exchange_data / "public" / "pool.jsonl")
    assert all(p.id.startswith("naturalqs_open:") and p.answers for p in prompts)
    assert "naturalqs_open" not in manifest["counts"]["per_source"]


def test_open_answer_keeps_the_first_line():
    assert open_answer("  Justin Timberlake\nQuestion: next") == "Justin Timberlake"
    assert open_answer("\n\nx\ny") == "x" and open_answer(" \n ") == "" and len(open_answer("y" * 5000)) == 400


def test_labelled_pack_carries_the_teacher_answers_and_refuses_bad_ones():
    pack = Pack((_mc(1),), ((0.25, 0.75),), "teacher", 1.0, (_open(1), _open(2)), ("author 1", ""))
    back = Pack.from_bytes(pack.to_bytes())
    assert back == pack and back.kind == "labelled-pack"
    assert back.open_items() == [(_open(1), "author 1")]   # an empty answer teaches nothing
    # prompts only, no multiple choice: still a labelled pack
    only = Pack((), (), "teacher", 1.0, (_open(1),), ("author 1",))
    assert Pack.from_bytes(only.to_bytes()).kind == "labelled-pack"
    # a multiple-choice pack's bytes (hence its address) did not change with the new fields
    assert "prompts" not in json.loads(Pack((_mc(1),)).to_bytes())
    body = json.loads(pack.to_bytes())
    for change, msg in ((dict(texts=["only one"]), "2 open prompts but 1 answers"),
                        (dict(texts=["x" * (MAX_TEXT_CHARS + 1), "y"]), "longer than"),
                        (dict(texts=[1, 2]), "list of strings"),
                        (dict(prompts=[{"id": "o"}]), "not a prompt pack")):
        with pytest.raises(ValidationError, match=msg):
            Pack.from_bytes(json.dumps({**body, **change}).encode())


def _answer_nll(model, tok, items) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for p, text in items:
            ids, labels = encode_pair(tok, prompt_text(p), " " + text, 96)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            tgt = torch.tensor(labels[1:])
            keep = tgt != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_sequence_level_kd_fits_the_teacher_answers(tiny_model, fed_data):
    from common.data import read_jsonl

    model, tok = load_model(tiny_model)
    model = wrap(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj")))
    items = [(_open(i), f"the author is number {i}") for i in range(4)]
    before = _answer_nll(model, tok, items)
    own = read_jsonl(fed_data / "schools" / "school-1" / "train.jsonl")[:4]
    result = train_distill(model, tok, [], torch.zeros((0,)), TrainParams(local_steps=6, batch_size=4, learning_rate=5e-3),
                           0.5, own=own, open_items=items)
    after = _answer_nll(model, tok, items)
    assert result.steps == 6 and after < before - 0.1
    assert result.seq_kd_loss == pytest.approx(result.kd_loss) and "seq_kd_loss" in result.metrics()
    assert result.ce_loss == result.ce_loss   # own data mixed in (not nan)
    with pytest.raises(ValueError, match="something to learn from"):
        train_distill(model, tok, [], torch.zeros((0,)), TrainParams(local_steps=1), 1.0)


# ---------------------------------------------------------------- top-k (shared vocabulary)


def _topk_pack(vocab: str = "v1") -> Pack:
    top = (((5, -0.1), (7, -2.5)), ((9, -0.3), (5, -1.4)))
    return Pack((), (), "teacher", 1.0, (_open(1),), ("answer",), ((5, 9),), (top,), vocab)


def test_topk_pack_round_trips_and_is_used_only_with_the_same_vocabulary():
    pack = _topk_pack()
    back = Pack.from_bytes(pack.to_bytes())
    assert back == pack
    (item,) = back.topk_items("v1")
    assert item.token_ids == (5, 9) and item.topk[1] == ((9, -0.3), (5, -1.4))
    assert back.topk_items("another tokenizer") == [] and back.open_items() == [(_open(1), "answer")]
    body = json.loads(pack.to_bytes())
    for change, msg in ((dict(token_ids=[[5]]), "do not match"),
                        (dict(vocab=""), "do not match"),
                        (dict(topk=[[[[5, 0.5], [7, -1.0]], [[9, -0.3], [5, -1.4]]]]), "finite and <= 0"),
                        (dict(token_ids=[[5, -9]]), "non-negative integers"),
                        (dict(token_ids=[[5, "9"]]), "non-negative integers")):
        with pytest.raises(ValidationError, match=msg):
            Pack.from_bytes(json.dumps({**body, **change}).encode())


def test_cut_first_line_keeps_the_teacher_context_whole(tiny_teacher):
    from common.distill import cut_first_line
    from common.models import load_tokenizer

    tok = load_tokenizer(tiny_teacher)
    ids = tok("\nParis is\nthe answer", add_special_tokens=False).input_ids
    cut = cut_first_line(tok, ids, tok.eos_token_id)
    assert tok.decode(cut).strip() == "Paris is"            # a leading line break stays (it is the teacher's context)
    assert cut_first_line(tok, ids + [tok.eos_token_id], tok.eos_token_id)[:1] == cut[:1]


def _topk_ce_value(model, tok, items) -> float:
    from common.distill import _topk_ce

    model.zero_grad()
    value = _topk_ce(model, tok, items, 0.0, 96)
    model.zero_grad()
    return value


def test_token_level_kd_fits_the_teacher_topk(tiny_teacher):
    from common.distill import TopkItem

    model, tok = load_model(tiny_teacher)
    model = wrap(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj")))
    ids = tok(" the answer is four", add_special_tokens=False).input_ids
    items = [TopkItem(_open(i), tuple(ids), tuple(((t, -0.2), (t + 1, -1.8)) for t in ids)) for i in range(3)]
    before = _topk_ce_value(model, tok, items)
    result = train_distill(model, tok, [], torch.zeros((0,)), TrainParams(local_steps=6, batch_size=3, learning_rate=5e-3),
                           1.0, open_items=[(items[0].prompt, "ignored when top-k is given")], topk_items=items)
    after = _topk_ce_value(model, tok, items)
    assert result.steps == 6 and result.topk and result.metrics()["topk_kd"] == 1.0
    assert after < before - 0.1


async def test_schools_sharing_the_teacher_vocabulary_learn_from_its_topk(tmp_path, tiny_teacher, exchange_data,
                                                                        start_coordinator, start_school):
    """Schools on the teacher's tokenizer: the labelled pack carries the teacher's per-token
    top-k and every school trains token-level on it (its receipt says so)."""
    from tests.conftest import school_config
    from tests.test_exchange import exchange_config

    cfg = exchange_config(tmp_path, tiny_teacher, tiny_teacher, exchange_data, ("distill",), 1,
                          rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=120.0),
                          distill=dict(pool_file=exchange_data / "public" / "pool.jsonl", slice_size=2, kd_weight=1.0,
                                       open_slice_size=3, max_new_tokens=5, top_k=3, local_steps=1))
    cfg = dataclasses.replace(cfg, schools=cfg.schools[:2])
    rc = await start_coordinator(cfg)
    for k in (1, 2):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", exchange_data, tiny_teacher))
    await asyncio.wait_for(rc.run_task, timeout=240)
    (rnd,) = rc.store.rounds()
    assert rnd.status == "committed"
    pack = Pack.from_bytes(rc.engine.artifacts.get(rnd.plan["pack"]))
    assert pack.vocab and len(pack.topk) == 3 and all(len(t) == len(i) for t, i in zip(pack.topk, pack.token_ids))
    assert all(len(pos) == 3 for seq in pack.topk for pos in seq)
    receipts = rc.store.receipts(rnd.round)
    assert len(receipts) == 2 and all(r.metrics.get("topk_kd") == 1.0 for r in receipts)


# ---------------------------------------------------------------- schools' answers to open prompts


def test_answer_texts_round_trip_and_the_vote_needs_a_majority():
    from common.distill import answer_texts, answers_to_bytes, validate_answer_set, vote_texts
    from common.wire import bytes_to_tensors

    qs, prompts = [_mc(1)], [_open(1), _open(2), _open(3)]
    payload = answers_to_bytes(torch.tensor([[0.5, 0.5]]), ["Paris", "", "caf\u00e9 au lait"])
    probs, texts = validate_answer_set(payload, qs, prompts)
    assert texts == ["Paris", "", "caf\u00e9 au lait"] and answer_texts(bytes_to_tensors(payload)) == texts
    # three schools: two agree (up to case and punctuation), one poisoned school alone cannot win
    votes = vote_texts([["Paris", "blue", "x"], ["paris.", "red", ""], ["BUY NOW", "green", ""]], 3)
    assert votes == ["Paris", "", ""]
    assert vote_texts([["a"], ["b"]], 1) == [""]   # a tie is no majority
    assert vote_texts([], 2) == ["", ""]


def test_an_answer_that_recites_the_school_data_is_withheld():
    from common.distill import leaks_own_data, own_ngrams

    questions = [Question("s:1", "s", "s", "Which organelle of the cell makes most of the energy it uses every day?",
                    ("mitochondria", "ribosome"), 0, "mitochondria")]
    own = own_ngrams(questions)   # built once per school
    assert leaks_own_data("well: which organelle of the cell makes most of the energy it uses", own)
    assert not leaks_own_data("mitochondria", own) and not leaks_own_data("the energy it uses every day", own)


def test_a_student_answers_open_prompts_in_one_line(tiny_model):
    from common.distill import MAX_ANSWER_CHARS, generate_answers

    model, tok = load_model(tiny_model)
    side = tok.padding_side
    answers = generate_answers(model, tok, [_open(1), _open(2)], 5)
    assert len(answers) == 2 and all("\n" not in a and len(a) <= MAX_ANSWER_CHARS for a in answers)
    assert tok.padding_side == side   # restored
    assert generate_answers(model, tok, [], 5) == []


def test_a_generated_answer_is_cleaned_to_what_the_coordinator_accepts():
    from common.distill import _one_line, answers_to_bytes, validate_answer_set

    text = _one_line("  Paris\tis\u200bthe  capital\nnext line" + "x" * 900)
    assert text.startswith("Paris is the capital") and "\n" not in text and len(text) <= 400
    validate_answer_set(answers_to_bytes(torch.tensor([[0.5, 0.5]]), [text]), [_mc(1)], [_open(1)])
