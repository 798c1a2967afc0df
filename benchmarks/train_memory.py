"""Training memory benchmark: one school's LoRA steps on SmolLM2-135M, three ways side by side.

Run:  .venv/bin/python -m benchmarks.train_memory [--steps 3] [--repeats 2] [--json out.json]

Every measurement is a fresh process (peak RSS is a per-process number), the modes interleaved
and their order flipped every repeat, so machine noise hits all of them alike:

  hf_full    the plain Hugging Face step: right padding, model(**batch).loss, i.e. logits for
             every position of the batch (49,152 floats each for SmolLM2); this is what
             common.training did before answer-only logits.
  answer     common.training.train_lora with max_batch_tokens = 0: left padding, the vocabulary
             projection only over the answer columns, the whole batch at once.
  micro-N    the same with max_batch_tokens = N: gradient accumulation over micro-batches of at
             most N padded tokens (same update, less in flight).
  ckpt-N     micro-N with activation (gradient) checkpointing: each decoder layer's activations
             are recomputed in the backward pass instead of kept ([school] gradient_checkpointing).

The batches are the longest questions of the packaged data (the worst case a school meets:
batch_size 8 at max_seq_len 256, about 2,000 tokens a step). Reported: peak RSS above the
loaded, LoRA-wrapped model (MiB), median seconds per step, the first step's loss (which
every mode must reproduce), and the RSS the process keeps after its steps, before and after
common.training.release_memory() (glibc malloc_trim; the daemon calls it after every round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import print_results, status_kb

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"
REPO = Path(__file__).resolve().parent.parent


def _rss_mib(field: str) -> float:
    kb = status_kb(field)
    if field not in kb:
        raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")
    return kb[field] / 1024


def longest_questions(tok: Any, n: int, max_len: int) -> list[Any]:
    from common.data import answer_text, load_questions, prompt_text
    from common.training import encode

    pool = load_questions()   # by characters first (cheap), then by tokens among the longest
    pool.sort(key=lambda q: -len(prompt_text(q)) - len(answer_text(q, q.answer_index)))
    pool = pool[:4 * n]
    pool.sort(key=lambda q: -len(encode(tok, q, max_len)[0]))
    return pool[:n]


def child(mode: str, model_spec: str, cache_dir: Path | None, steps: int, batch: int, max_len: int, threads: int,
          questions_file: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from common.data import read_jsonl
    from common.lora import LoraSettings, wrap
    from common.models import load_model
    from common.training import TrainParams, enable_checkpointing, encode, release_memory, train_lora

    torch.set_num_threads(threads)
    base, tok = load_model(model_spec, cache_dir)
    if mode.startswith("ckpt-"):
        enable_checkpointing(base)
    torch.manual_seed(0)
    model = wrap(base, LoraSettings())
    questions = read_jsonl(questions_file)
    loaded = _rss_mib("VmRSS")
    seconds, losses, tokens = [], [], []
    for step in range(steps):
        qs = questions[step * batch:(step + 1) * batch]
        t = time.perf_counter()
        if mode == "hf_full":
            rows = [encode(tok, q, max_len) for q in qs]
            width = max(len(x) for x, _ in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (x, y) in enumerate(rows):
                ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)
            model.train()
            loss = model(input_ids=ids, labels=labels, attention_mask=mask).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            tokens.append(int(mask.sum()))
        else:
            budget = 0 if mode == "answer" else int(mode.split("-")[1])
            r = train_lora(model, tok, qs, TrainParams(local_steps=1, batch_size=batch, learning_rate=3e-4,
                                                       max_seq_len=max_len), max_batch_tokens=budget)
            losses.append(r.mean_loss)
        seconds.append(time.perf_counter() - t)
        if mode != "hf_full":   # counted outside the timed part
            tokens.append(sum(len(encode(tok, q, max_len)[0]) for q in qs))
    peak = _rss_mib("VmHWM")
    retained = _rss_mib("VmRSS")
    release_memory()
    return {"mode": mode, "loaded_mib": loaded, "peak_mib": peak, "peak_above_loaded_mib": peak - loaded,
            "retained_above_loaded_mib": retained - loaded, "after_release_above_loaded_mib": _rss_mib("VmRSS") - loaded,
            "seconds": seconds, "losses": losses, "tokens_per_step": tokens}


def run(modes: list[str], model_spec: str, cache_dir: Path | None, steps: int, batch: int, max_len: int,
        threads: int, repeats: int, say: Any = print) -> dict[str, Any]:
    from common.data import write_jsonl
    from common.models import load_tokenizer

    tok = load_tokenizer(model_spec, cache_dir)

    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "longest.jsonl"
        write_jsonl(qfile, longest_questions(tok, steps * batch, max_len))
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for rep in range(repeats):
            order = modes if rep % 2 == 0 else modes[::-1]
            for mode in order:
                cmd = [sys.executable, "-m", "benchmarks.train_memory", "--child", mode, "--model", model_spec,
                       "--steps", str(steps), "--batch", str(batch), "--max-len", str(max_len),
                       "--threads", str(threads), "--questions", str(qfile)]
                if cache_dir is not None:
                    cmd += ["--cache-dir", str(cache_dir)]
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[mode].append(r)
                say(f"repeat {rep + 1} {mode:>10}: peak +{r['peak_above_loaded_mib']:.0f} MiB, "
                    f"steps {', '.join(f'{s:.2f}' for s in r['seconds'])} s, loss {r['losses'][0]:.4f}")
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {
            "peak_above_loaded_mib": statistics.median(r["peak_above_loaded_mib"] for r in rs),
            "retained_above_loaded_mib": statistics.median(r["retained_above_loaded_mib"] for r in rs),
            "after_release_above_loaded_mib": statistics.median(r["after_release_above_loaded_mib"] for r in rs),
            "median_step_s": statistics.median(s for r in rs for s in r["seconds"]),
            "first_loss": rs[0]["losses"][0],
            "tokens_per_step": rs[0]["tokens_per_step"],
        }
    return {"model": model_spec, "steps": steps, "batch_size": batch, "max_seq_len": max_len, "threads": threads,
            "repeats": repeats, "machine": f"{platform.machine()} x{os.cpu_count()}", "runs": runs, "summary": summary,
            "date": time.strftime("%Y-%m-%d")}


def format_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    base = s.get("hf_full")
    lines = [f"{result['model']}: batch {result['batch_size']} x max_seq_len {result['max_seq_len']}, "
             f"{result['steps']} steps x {result['repeats']} repeats, {result['threads']} torch threads, "
             f"{result['machine']}, {result['date']}",
             "", "| mode | peak RSS above the loaded model | vs hf_full | median step | vs hf_full | first-step loss "
             "| RSS kept after the steps | after release_memory() |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in s.items():
        mem_ratio = f"{m['peak_above_loaded_mib'] / base['peak_above_loaded_mib']:.2f}x" if base else "-"
        t_ratio = f"{m['median_step_s'] / base['median_step_s']:.2f}x" if base else "-"
        lines.append(f"| {mode} | {m['peak_above_loaded_mib']:.0f} MiB | {mem_ratio} | {m['median_step_s']:.2f} s | "
                     f"{t_ratio} | {m['first_loss']:.4f} | {m['retained_above_loaded_mib']:.0f} MiB "
                     f"| {m['after_release_above_loaded_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--steps", type=int, default=3, help="training steps per measurement (default 3)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8, the coordinator's default)")
    p.add_argument("--max-len", type=int, default=256, help="max_seq_len (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per mode (default 2)")
    p.add_argument("--modes", default="hf_full,answer,micro-1024,micro-512,ckpt-1024",
                   help="comma-separated: hf_full, answer, micro-N, ckpt-N (default hf_full,answer,micro-1024,micro-512,ckpt-1024)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--questions", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        r = child(args.child, args.model, args.cache_dir, args.steps, args.batch, args.max_len, args.threads, args.questions)
        print(json.dumps(r))
        return 0
    result = run(args.modes.split(","), args.model, args.cache_dir, args.steps, args.batch, args.max_len, args.threads,
                 args.repeats)
    print_results(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
