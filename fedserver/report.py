"""The per-round report (report.json and the console table) built from the state store."""

from __future__ import annotations

from typing import Any

from fedserver.store import Store


def build_report(store: Store, model: str, eval_name: str) -> dict[str, Any]:
    evals = store.evals()
    server = {e["round"]: e for e in evals if e["source"] == "server"}
    base = server.get(0)
    rounds = []
    for r in store.rounds():
        ev = server.get(r.round, {}).get("metrics", {})
        local = [e for e in evals if e["round"] == r.round and e["source"] != "server"]
        n_local = sum(e["num_examples"] for e in local)
        rounds.append({
            "round": r.round,
            "status": r.status,
            "participants": r.participants,
            "accepted": int(r.metrics.get("updates", 0)),
            "failures": r.failures,
            "eval_accuracy": ev.get("accuracy"),
            "eval_loss": ev.get("loss"),
            "school_eval_accuracy": (sum(e["metrics"]["accuracy"] * e["num_examples"] for e in local) / n_local) if n_local else None,
            "train_loss": r.metrics.get("train_loss"),
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "seconds": r.metrics.get("seconds"),
            "adapter_sha256": r.global_out,
        })
    return {
        "model": model,
        "eval_set": {"name": eval_name, "count": int(base["num_examples"]) if base else 0},
        "base_eval_accuracy": base["metrics"]["accuracy"] if base else None,
        "base_eval_loss": base["metrics"]["loss"] if base else None,
        "rounds": rounds,
    }


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"base model: accuracy {_f(report['base_eval_accuracy'], '.3f')}  loss {_f(report.get('base_eval_loss'), '.3f')}"
             f"  on {report['eval_set']['count']} held-out questions",
             f"{'round':>5} {'status':>9} {'schools':>7} {'accuracy':>8} {'loss':>7} {'school acc':>10} {'train loss':>10} {'MB up':>7} {'MB down':>7} {'seconds':>7}"]
    for r in report["rounds"]:
        lines.append(f"{r['round']:>5} {r['status']:>9} {r['accepted']:>3}/{len(r['participants']):<3} {_f(r['eval_accuracy'], '.3f'):>8} "
                     f"{_f(r['eval_loss'], '.3f'):>7} {_f(r['school_eval_accuracy'], '.3f'):>10} {_f(r['train_loss'], '.3f'):>10} "
                     f"{r['bytes_up'] / 1e6:>7.1f} {r['bytes_down'] / 1e6:>7.1f} {_f(r['seconds'], '.0f'):>7}")
    return "\n".join(lines)
