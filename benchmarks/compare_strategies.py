"""Strategies compared on a small real federation: each configuration is one `fedserver demo`
run (coordinator + school daemons as processes, the packaged SmolLM2, non-IID ARC/SciQ/OBQA
schools, the same seed and data), and the table reads their report.json files.

    .venv/bin/python -m benchmarks.compare_strategies --out compare-out [--only fedavg,flora]

Each run takes several minutes on 2 cores; runs are skipped when their report already exists,
so an interrupted comparison resumes. `--table` only prints the table from what exists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = ["--rounds", "3", "--local-steps", "8", "--eval-size", "100", "--train-per-school", "400", "--seed", "0",
          # training rounds only, on the split these results were measured on (no pool, no OOD source)
          "--schedule", "train", "--pool-size", "0", "--ood-source", ""]

RUNS: dict[str, dict] = {
    "fedavg": {"args": ["--schools", "3"], "what": "FedAvg (FedIT)"},
    "fedprox": {"args": ["--schools", "3", "--proximal-mu", "0.01"], "what": "FedAvg + FedProx μ=0.01 (school side)"},
    "fedadam": {"args": ["--schools", "3", "--strategy", "fedadam"], "what": "FedAdam (η=1e-2, τ=1e-3)"},
    "ffa_lora": {"args": ["--schools", "3", "--strategy", "ffa_lora"], "what": "FFA-LoRA (A frozen)"},
    "flora": {"args": ["--schools", "3", "--strategy", "flora"], "what": "FLoRA (stacking, merged)"},
    "fedavg_4": {"args": ["--schools", "4"], "what": "FedAvg, 4 honest schools (reference for the attacks)"},
    "fedavg_attacked": {"args": ["--schools", "4", "--attackers", "1", "--attack", "sign_flip", "--attack-scale", "3"],
                        "what": "FedAvg, 1 of 4 schools sends −3·Δ"},
    "median_attacked": {"args": ["--schools", "4", "--attackers", "1", "--attack", "sign_flip", "--attack-scale", "3",
                                 "--strategy", "median"], "what": "Median, 1 of 4 schools sends −3·Δ"},
}


def run(name: str, out: Path) -> Path:
    target = out / name
    report = target / "report.json"
    if report.exists():
        return report
    if target.exists():   # an interrupted run: start it again
        subprocess.run(["rm", "-rf", str(target)], check=True)
    cmd = [sys.executable, "-m", "fedserver.cli", "demo", "--out", str(target), *COMMON, *RUNS[name]["args"]]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(out / f"{name}.log", "w"))
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {proc.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
    return report


def table(out: Path) -> str:
    lines = ["| run | configuration | base acc | final acc | Δ acc | final eval loss | train loss (last) | s/round | MB up/round | MB down (last round) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, spec in RUNS.items():
        path = out / name / "report.json"
        if not path.exists():
            lines.append(f"| {name} | {spec['what']} | — | — | — | — | — | — | — | not run |")
            continue
        rep = json.loads(path.read_text())
        rounds = [r for r in rep["rounds"] if r["status"] == "committed"]
        last = rounds[-1] if rounds else {}
        base, acc = rep.get("base_eval_accuracy"), last.get("eval_accuracy")
        delta = f"{acc - base:+.3f}" if acc is not None and base is not None else "—"
        secs = sum(r.get("seconds") or 0 for r in rounds) / max(1, len(rounds))
        mb_up = sum(r.get("bytes_up") or 0 for r in rounds) / max(1, len(rounds)) / 1e6
        mb_down = (last.get("bytes_down") or 0) / 1e6

        def f(x, fmt=".3f"):
            return format(x, fmt) if isinstance(x, (int, float)) else "—"

        lines.append(f"| {name} | {spec['what']} | {f(base)} | {f(acc)} | {delta} | {f(last.get('eval_loss'))} | "
                     f"{f(last.get('train_loss'))} | {secs:.0f} | {mb_up:.1f} | {mb_down:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only.split(",") if args.only else RUNS) if n]
    unknown = set(names) - set(RUNS)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    if not args.table:
        for name in names:
            run(name, args.out)
    text = table(args.out)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
