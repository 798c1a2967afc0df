"""The per-round report (report.json and the console table) built from the state store."""

from __future__ import annotations

import json
from typing import Any

from fedserver.store import Store


def build_report(store: Store, model: str, eval_name: str, teacher: tuple[str, str] | None = None) -> dict[str, Any]:
    """`teacher`: (model, quantization) when the federation ran with one. Left empty, the model,
    the eval set and the teacher are those the coordinator recorded at its last start."""
    if not model:
        model = store.get_meta("model") or ""
    if not eval_name:
        eval_name = store.get_meta("eval_file") or ""
    if teacher is None and store.get_meta("teacher"):
        t = json.loads(store.get_meta("teacher") or "{}")
        teacher = (t.get("model", ""), t.get("quantization", ""))
    evals = store.evals()
    server = {e["round"]: e for e in evals if e["source"] == "server"}
    teacher_evals = {e["round"]: e for e in evals if e["source"] == "teacher"}
    base = server.get(0)
    rounds = []
    for r in store.rounds():
        ev = server.get(r.round, {}).get("metrics", {})
        local = [e for e in evals if e["round"] == r.round and e["source"] not in ("server", "teacher")
                 and "accuracy" in e["metrics"]]
        n_local = sum(e["num_examples"] for e in local)
        rounds.append({
            "round": r.round,
            "kind": r.kind,
            "status": r.status,
            "participants": r.participants,
            "accepted": int(r.metrics.get("updates", r.metrics.get("answer_sets", r.metrics.get("reports", 0)))),
            "failures": r.failures,
            "eval_accuracy": ev.get("accuracy"),
            "eval_loss": ev.get("loss"),
            "school_eval_accuracy": (sum(e["metrics"]["accuracy"] * e["num_examples"] for e in local) / n_local) if n_local else None,
            "school_eval_loss": (sum(e["metrics"].get("loss", 0.0) * e["num_examples"] for e in local) / n_local) if n_local else None,
            "teacher_tokens_scored": r.metrics.get("teacher_tokens_scored"),
            "teacher_tokens_generated": r.metrics.get("teacher_tokens_generated"),
            "pool_questions": r.metrics.get("pack_questions"),
            "pool_open_prompts": r.metrics.get("pack_prompts"),
            "ensemble_accuracy": r.metrics.get("ensemble_accuracy"),
            "train_loss": r.metrics.get("train_loss"),
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "seconds": r.metrics.get("seconds"),
            "adapter_sha256": r.global_out,
        })
    out_teacher = None
    if teacher is not None or teacher_evals:
        before = teacher_evals.get(0, {}).get("metrics", {})
        out_teacher = {
            "model": teacher[0] if teacher else "",
            "quantization": teacher[1] if teacher else "",
            "eval_count": int(teacher_evals[0]["num_examples"]) if 0 in teacher_evals else 0,
            "before": {"accuracy": before.get("accuracy"), "loss": before.get("loss")},
            "after_teach_rounds": [{"round": n, "accuracy": e["metrics"]["accuracy"], "loss": e["metrics"]["loss"]}
                                   for n, e in sorted(teacher_evals.items()) if n > 0],
        }
    return {
        "model": model,
        "teacher": out_teacher,
        "eval_set": {"name": eval_name, "count": int(base["num_examples"]) if base else 0},
        "base_eval_accuracy": base["metrics"]["accuracy"] if base else None,
        "base_eval_loss": base["metrics"]["loss"] if base else None,
        "rounds": rounds,
    }


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"model: {report['model']}" + (f"   eval set: {report['eval_set']['name']}" if report["eval_set"].get("name") else "")]
    lines = lines if report.get("model") else []
    lines.append(f"base model: accuracy {_f(report['base_eval_accuracy'], '.3f')}  loss {_f(report.get('base_eval_loss'), '.3f')}"
                 f"  on {report['eval_set']['count']} held-out questions")
    t = report.get("teacher")
    if t:
        after = "".join(f"; after teach round {a['round']}: {a['accuracy']:.3f} / {a['loss']:.3f}" for a in t["after_teach_rounds"])
        lines.append(f"teacher {t['model'] or '(model not recorded)'}" + (f" ({t['quantization']})" if t["quantization"] else "")
                     + f": accuracy / loss before {_f(t['before']['accuracy'], '.3f')} / "
                     f"{_f(t['before']['loss'], '.3f')} on {t['eval_count']} held-out questions{after}")
    lines.append(f"{'round':>5} {'kind':>8} {'status':>9} {'schools':>7} {'accuracy':>8} {'loss':>7} {'school acc':>10} {'train loss':>10} "
                 f"{'MB up':>7} {'MB down':>7} {'seconds':>7}")
    for r in report["rounds"]:
        lines.append(f"{r['round']:>5} {r.get('kind', 'train'):>8} {r['status']:>9} {r['accepted']:>3}/{len(r['participants']):<3} "
                     f"{_f(r['eval_accuracy'], '.3f'):>8} "
                     f"{_f(r['eval_loss'], '.3f'):>7} {_f(r['school_eval_accuracy'], '.3f'):>10} {_f(r['train_loss'], '.3f'):>10} "
                     f"{r['bytes_up'] / 1e6:>7.1f} {r['bytes_down'] / 1e6:>7.1f} {_f(r['seconds'], '.0f'):>7}")
    return "\n".join(lines)
