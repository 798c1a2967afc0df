"""The exchange channel's costs: teacher-host throughput and bytes per round kind.

1. Throughput, interleaved in one run on the same model: the host's batched scoring (`label`:
   8 questions a batch, each prompt run once and its KV cache fanned out to its options)
   against a plain loop that runs one forward per (question, option); the host's batched
   greedy generation against a per-prompt `generate` loop. Medians over repeats.
2. Bytes on the wire per round kind for the same pool slice: a pool pack (questions), a
   labelled pack (+ teacher distributions), one school's answer set (distributions only), the
   text and top-k variants of sequence-level KD (generated answers; per-token top-k ids and
   log-probs), next to one SmolLM2 LoRA delta (r = 16, all projections).

    .venv/bin/python -m benchmarks.exchange_bench [--model packaged:qwen2.5-coder-0.5b-instruct]
        [--quantization nf4] [--questions 16] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import print_results

REPO = Path(__file__).resolve().parents[1]


def per_example_scores(teacher: Any, questions: list[Any]) -> torch.Tensor:
    """The baseline: one forward per (question, option), no batching, no shared prompt pass."""
    from common.data import answer_text, prompt_text

    out = []
    with torch.no_grad():
        for q in questions:
            row = []
            for i in range(len(q.choices)):
                lp = teacher.continuation_logprobs([prompt_text(q)], [answer_text(q, i)])[0]
                row.append(sum(lp) / len(lp))
            out.append(torch.tensor(row).softmax(-1))
    return torch.nn.utils.rnn.pad_sequence(out, batch_first=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    p.add_argument("--data", type=Path, default=None, help="a prepare-data folder (default: written to a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import tempfile

    from common.data import open_answer, prepare_federation_data, prompt_text, read_pool
    from common.distill import Pack, answers_to_bytes
    from common.lora import LoraSettings, expected_layout
    from common.models import load_config
    from common.wire import tensors_to_bytes
    from fedserver.config import TeacherSection
    from fedserver.teacher import LocalTeacher

    torch.set_num_threads(args.threads)
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp()) / "data"
        prepare_federation_data(data, 3, 200, 0, pool_size=300, ood_source="openbookqa", open_pool_size=64)
    questions, open_prompts = read_pool(data / "public" / "pool.jsonl")
    questions = questions[: args.questions]
    cfg = TeacherSection(model=args.model, quantization=args.quantization, threads=args.threads)
    t0 = time.perf_counter()
    teacher = LocalTeacher(cfg, args.cache_dir)
    load_s = time.perf_counter() - t0

    batched, loop, gen_b, gen_l = [], [], [], []
    # generation on the pool's open prompts (what distill rounds send as text), else on questions
    asked = open_prompts[:8] if open_prompts else questions[:8]
    prompts = [prompt_text(q) for q in asked]
    for _ in range(args.repeats):   # interleaved: both ways see the same machine state
        t = time.perf_counter()
        probs = teacher.label(questions, 1.0)
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = per_example_scores(teacher, questions)
        loop.append(time.perf_counter() - t)
        t = time.perf_counter()
        gens = teacher.generate(prompts, args.new_tokens, top_k=5)
        gen_b.append(time.perf_counter() - t)
        t = time.perf_counter()
        for pr in prompts:
            teacher.generate([pr], args.new_tokens, top_k=5)
        gen_l.append(time.perf_counter() - t)
    agree = float((probs.argmax(-1) == ref.argmax(-1)).float().mean())
    tokens = teacher.count_tokens(questions)

    # bytes per round kind, for the same slice
    pool = Pack(tuple(questions))
    labelled = dataclasses.replace(pool, probs=tuple(tuple(float(x) for x in r) for r in probs), teacher=args.model)
    answers = answers_to_bytes(probs)
    # a labelled pack of the open prompts with the teacher's answers, scaled to the slice size
    text_pack = Pack((), (), args.model, 1.0, tuple(asked), tuple(open_answer(g.text) for g in gens)) if open_prompts else None
    text = len(text_pack.to_bytes()) * len(questions) / len(asked) if text_pack else 0
    topk = sum(len(g.top) for g in gens) * 5 * 8 * len(questions) / len(gens)                # k × (int32 id + float32 log p) a token
    smol = load_config("packaged:smollm2-135m-instruct", args.cache_dir)
    layout = expected_layout(smol, LoraSettings(16, 32.0, 0.0))
    delta = len(tensors_to_bytes({k: torch.zeros(v.shape) for k, v in layout.items()}))

    m = statistics.median
    result: dict[str, Any] = {
        "model": args.model, "quantization": args.quantization, "questions": len(questions), "threads": args.threads,
        "load_s": round(load_s, 1), "tokens_scored": tokens,
        "score_batched_s": m(batched), "score_loop_s": m(loop), "score_speedup": m(loop) / m(batched),
        "score_tokens_per_s": tokens / m(batched), "argmax_agreement": agree,
        "generate_batched_s": m(gen_b), "generate_loop_s": m(gen_l), "generate_speedup": m(gen_l) / m(gen_b),
        "bytes": {"pool_pack": len(pool.to_bytes()), "labelled_pack": len(labelled.to_bytes()), "answer_set": len(answers),
                  "open_prompt_pack": int(text), "topk5_est": int(topk), "lora_delta": delta},
    }
    b = result["bytes"]
    table = "\n".join([
        f"teacher {args.model} ({args.quantization}), {len(questions)} pool questions, {args.threads} threads, "
        f"medians of {args.repeats}",
        "| operation | host (batched) | plain loop | speed-up |", "|---|---|---|---|",
        f"| score options ({tokens} tokens) | {m(batched):.2f} s | {m(loop):.2f} s | {m(loop) / m(batched):.2f}x |",
        f"| greedy generation, 8 prompts x {args.new_tokens} tokens | {m(gen_b):.2f} s | {m(gen_l):.2f} s | "
        f"{m(gen_l) / m(gen_b):.2f}x |",
        f"(top option of batched vs loop scoring agrees on {agree:.0%} of questions)",
        "",
        f"| payload for {len(questions)} pool questions | bytes | vs one LoRA delta |", "|---|---|---|",
        *(f"| {k} | {v:,} | {v / delta:.2e} |" for k, v in b.items()),
    ])
    print_results(table, result, args.json)


if __name__ == "__main__":
    main()
