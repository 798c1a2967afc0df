"""Keeps benchmarks/train_memory.py from rotting: every mode once on the tiny model, one step
(two modes through the real fresh-process runner, two in this process to save the start-up).
The numbers themselves come from the real run (benchmarks/README.md)."""

from __future__ import annotations

from benchmarks import train_memory as tm
from common.data import write_jsonl
from common.models import load_model


def test_train_memory_bench_runs_every_mode(tiny_model, tmp_path):
    lines: list[str] = []
    result = tm.run(["hf_full", "ckpt-64"], tiny_model, None, steps=1, batch=2, max_len=64, threads=1, repeats=1,
                    say=lines.append)
    assert len(lines) == 2 and "| ckpt-64 |" in tm.format_table(result)
    s = result["summary"]
    first = s["hf_full"]["first_loss"]
    assert abs(s["ckpt-64"]["first_loss"] - first) < 1e-4        # the same loss, computed another way
    assert all(m["peak_above_loaded_mib"] >= 0 and m["median_step_s"] > 0 for m in s.values())

    _, tok = load_model(tiny_model)
    qfile = tmp_path / "q.jsonl"
    write_jsonl(qfile, tm.longest_questions(tok, 2, 64))
    for mode in ("answer", "micro-64"):
        r = tm.child(mode, tiny_model, None, steps=1, batch=2, max_len=64, threads=1, questions_file=qfile)
        assert abs(r["losses"][0] - first) < 1e-4, mode
