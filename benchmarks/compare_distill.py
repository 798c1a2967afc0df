"""FedAvg alone against FedAvg with the exchange channel, on the same split and seeds, with
the same number of rounds that update the schools' adapter and the same local steps:

    A  fedavg:  train, train, train
    B  distill: train, distill, train, teach   (distill: the 4-bit teacher teaches; teach: the
                                                schools teach the teacher; teach leaves the
                                                schools' adapter as it is)

Each run is one `fedserver demo` (coordinator + 3 school daemons as processes, SmolLM2-135M
schools, the packaged Qwen2.5-Coder-1.5B teacher in nf4). Measured where it counts: the
schools' held-out distribution (the coordinator's eval set and each school's own held-out
questions) and a source no school and no pool slice contains (OpenBookQA). The teacher is
scored before and after it learned from the schools on both.

    .venv/bin/python -m benchmarks.compare_distill --out compare-distill [--json FILE]

Runs whose report exists are skipped, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--schools", "3", "--local-steps", "16", "--seed", "0", "--pool-size", "300", "--slice-size", "32",
          "--teacher-eval", "40", "--ood-source", "openbookqa", "--distill-steps", "0"]
RUNS = {
    "fedavg": ["--schedule", "train", "--rounds", "3"],
    "distill": ["--schedule", "train,distill,train,teach", "--rounds", "4"],
}


def run(name: str, out: Path, cache: Path) -> dict[str, Any]:
    target = out / name
    report = target / "report.json"
    if not report.exists():
        if target.exists():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        cmd = [sys.executable, "-m", "fedserver.cli", "demo", "--out", str(target), "--cache-dir", str(cache), *COMMON, *RUNS[name]]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, stdout=open(out / f"{name}.out", "w"), stderr=open(out / f"{name}.log", "w"))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {proc.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
    return json.loads(report.read_text())


def teacher_ood(out: Path, cache: Path) -> dict[str, Any]:
    """The teacher on the out-of-distribution questions, before and after its teach round."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.data import read_jsonl
    from common.evaluation import evaluate_choices
    from common.models import load_tokenizer, resolve
    from fedserver.teacher import bnb_config

    cached = out / "teacher_ood.json"
    if cached.exists():
        return json.loads(cached.read_text())
    spec = "packaged:qwen2.5-coder-1.5b-instruct"
    questions = read_jsonl(out / "distill" / "data" / "eval" / "ood.jsonl")
    adapter = sorted((out / "distill" / "rounds").glob("*/teacher-adapter"))[-1]
    tok = load_tokenizer(spec, cache)
    import torch

    from fedserver.teacher import no_cpu_repack

    model = AutoModelForCausalLM.from_pretrained(resolve(spec, cache), quantization_config=bnb_config("nf4"),
                                                 device_map="cpu", dtype=torch.float32)
    no_cpu_repack(model)   # a repacked 4-bit layer scores wrongly once an adapter is added
    before = evaluate_choices(model, tok, questions)
    after = evaluate_choices(PeftModel.from_pretrained(model, str(adapter)), tok, questions)
    result = {"count": len(questions), "before": {"accuracy": before.accuracy, "loss": before.loss},
              "after": {"accuracy": after.accuracy, "loss": after.loss}, "adapter": str(adapter)}
    cached.write_text(json.dumps(result, indent=2))
    return result


def summarise(reports: dict[str, dict[str, Any]], t_ood: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    rows, result = [], {}
    for name, rep in reports.items():
        updating = [r for r in rep["rounds"] if r["kind"] in ("train", "distill") and r["status"] == "committed"]
        last = updating[-1] if updating else {}
        school = [r for r in rep["rounds"] if r.get("school_eval_accuracy") is not None]
        res = {
            "schedule": [r["kind"] for r in rep["rounds"]],
            "base_eval_accuracy": rep["base_eval_accuracy"],
            "final_eval_accuracy": last.get("eval_accuracy"), "final_eval_loss": last.get("eval_loss"),
            "school_heldout_accuracy": school[-1]["school_eval_accuracy"] if school else None,
            "school_heldout_loss": school[-1].get("school_eval_loss") if school else None,
            "ood": rep.get("ood"), "teacher": rep.get("teacher"), "seconds_total": rep.get("seconds_total"),
            "bytes_up": sum(r["bytes_up"] for r in rep["rounds"]), "bytes_down": sum(r["bytes_down"] for r in rep["rounds"]),
        }
        result[name] = res
        ood = res["ood"] or {}
        rows.append(f"| {name} | {', '.join(res['schedule'])} | {res['base_eval_accuracy']:.3f} | "
                    f"{_f(res['final_eval_accuracy'])} / {_f(res['final_eval_loss'])} | "
                    f"{_f(res['school_heldout_accuracy'])} / {_f(res['school_heldout_loss'])} | "
                    f"{_f(ood.get('base_accuracy'))} → {_f(ood.get('adapter_accuracy'))} | "
                    f"{res['bytes_up'] / 1e6:.1f} / {res['bytes_down'] / 1e6:.1f} | {_f(res['seconds_total'], '.0f')} |")
    table = ["| run | rounds | base acc | final acc / loss (held-out, 200) | schools' own held-out acc / loss | OOD acc base → final "
             "| MB up / down | seconds |",
             "|---|---|---|---|---|---|---|---|", *rows]
    t = (reports.get("distill") or {}).get("teacher")
    if t:
        after = t["after_teach_rounds"][-1] if t["after_teach_rounds"] else {}
        table.append("")
        table.append(f"Teacher {t['model']} ({t['quantization']}), held-out ({t['eval_count']} questions): "
                     f"accuracy {_f(t['before']['accuracy'])} → {_f(after.get('accuracy'))}, "
                     f"loss {_f(t['before']['loss'])} → {_f(after.get('loss'))}")
        if t_ood:
            table.append(f"Teacher on the OOD source ({t_ood['count']} questions): accuracy {t_ood['before']['accuracy']:.3f} → "
                         f"{t_ood['after']['accuracy']:.3f}, loss {t_ood['before']['loss']:.3f} → {t_ood['after']['loss']:.3f}")
        result["teacher_ood"] = t_ood
    return "\n".join(table), result


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("compare-distill"))
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-teacher-ood", action="store_true", help="skip scoring the teacher on the OOD source")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {name: run(name, args.out, args.cache_dir) for name in RUNS}
    t_ood = None if args.no_teacher_ood else teacher_ood(args.out, args.cache_dir)
    table, result = summarise(reports, t_ood)
    from benchmarks import print_results

    print_results(table, result, args.json)


if __name__ == "__main__":
    main()
