"""End to end on the real SmolLM2-135M-Instruct (the packaged GGUF, converted once into
.cache/models): two schools, one round, and the saved adapter beats the base model's
answer loss on held-out questions when loaded with peft."""

from __future__ import annotations

import asyncio

import pytest
from peft import PeftModel

from common.data import read_jsonl
from common.evaluation import evaluate_choices
from common.models import load_model, resolve
from tests.conftest import MODEL_CACHE, coordinator_config, school_config

SMOL = "packaged:smollm2-135m-instruct"


@pytest.mark.slow
async def test_real_smollm2_round(tmp_path, fed_data, start_coordinator, start_school):
    path = "dir:" + await asyncio.to_thread(resolve, SMOL, MODEL_CACHE)   # converts the GGUF on first use (~40 s)
    cfg = coordinator_config(tmp_path, path, schools=2, eval_file=fed_data / "eval" / "eval.jsonl",
                             lora=dict(rank=16, alpha=32.0),
                             rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=600.0),
                             train=dict(local_steps=6, batch_size=4, learning_rate=1e-3, max_seq_len=128),
                             evaluation=dict(eval_file=fed_data / "eval" / "eval.jsonl", max_examples=12, school_max_examples=0, threads=2))
    rc = await start_coordinator(cfg)
    for sid in ("school-1", "school-2"):
        await start_school(school_config(tmp_path, rc.address, sid, fed_data, path))
    await asyncio.wait_for(rc.run_task, timeout=600)
    assert rc.store.get_round(1).status == "committed"
    # The 4,884,480-parameter adapter of the issue: r=16 on all seven projections.
    assert sum(s.shape[0] * s.shape[1] for s in rc.engine.layout.values()) == 4_884_480

    base, tok = await asyncio.to_thread(load_model, path)
    questions = read_jsonl(fed_data / "eval" / "eval.jsonl")[:12]
    before = await asyncio.to_thread(evaluate_choices, base, tok, questions)
    tuned = PeftModel.from_pretrained(base, str(cfg.server.state_dir / "rounds" / "1" / "adapter"))
    after = await asyncio.to_thread(evaluate_choices, tuned, tok, questions)
    assert after.loss < before.loss, (before, after)
    # The coordinator's own evaluation agrees with this independent one.
    server = {e["round"]: e["metrics"] for e in rc.store.evals() if e["source"] == "server"}
    assert server[0]["loss"] == pytest.approx(before.loss, rel=1e-3)
    assert server[1]["loss"] == pytest.approx(after.loss, rel=1e-3)
