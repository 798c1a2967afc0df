"""Coordinator memory over many rounds: is its resident set flat, and within start-up + 4x the
adapter's size?

Run:  .venv/bin/python -m benchmarks.memory_bench [--rounds 100] [--schools 4] [--json FILE]
          [--cache-dir .cache/models] [--quick]

The real coordinator (`fedserver serve`, FedAvg, insecure on 127.0.0.1, no evaluation) and K
no-op schools (benchmarks/noop_school.py, one process) that download the global adapter and
upload a constant delta (scale 0, so the adapter moves by the same small step every round and
never overflows). The coordinator's VmRSS is sampled every 50 ms from /proc; its own log says
when each round opened and committed.

Reported:
  start_mib     VmRSS when round 1 opens (all schools joined, the adapter loaded, nothing
                uploaded yet): "after start-up"
  peak_mib      VmHWM at the end (the kernel's own high-water mark)
  budget_mib    start + 4 x the adapter's bytes (the target: peak <= budget)
  per_decile    the highest sample in each tenth of the rounds: flat means the last tenth is
                not above the first by more than the noise
  growth_mib    highest sample in the last tenth - highest sample in the first tenth
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.round_bench import (
    DEFAULT_CACHE, DEFAULT_MODEL, BenchError, Child, _safetensors_info, coordinator_timeline, status_kib,
    write_coordinator_config,
)


def _sampler(pid: int, out: list[tuple[float, int]], stop: threading.Event, every_s: float = 0.05) -> None:
    while not stop.is_set():
        try:
            out.append((time.time(), status_kib(pid, "VmRSS")))
        except (OSError, ValueError):
            return
        stop.wait(every_s)


def run(rounds: int = 100, schools: int = 4, model: str = DEFAULT_MODEL, cache_dir: Path = DEFAULT_CACHE,
        workdir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    root = Path(workdir or tempfile.mkdtemp(prefix="memory-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tokens = [(f"school-{i:03d}", secrets.token_urlsafe(24)) for i in range(schools)]
    token_files = []
    for sid, tok in tokens:
        f = root / f"{sid}.token"
        f.write_text(tok)
        token_files.append(f)
    cfg = root / "coordinator.toml"
    write_coordinator_config(cfg, root / "state", model, cache_dir, tokens, rounds)
    port_file = root / "port"
    coord = Child("coordinator", [sys.executable, "-m", "fedserver.cli", "serve", "--config", str(cfg),
                                  "--port-file", str(port_file)], root / "coordinator.log", control=False)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(coord.pid, samples, stop), daemon=True)
    sampler.start()
    school_proc = None
    try:
        end = time.monotonic() + 600
        while not port_file.exists():
            if coord.proc.poll() is not None or time.monotonic() > end:
                raise BenchError(f"the coordinator did not start; its log ends:\n{coord.log_tail()}")
            time.sleep(0.1)
        address = port_file.read_text().strip()
        argv = [sys.executable, "-m", "benchmarks.noop_school", "--coordinator", address, "--scale", "0",
                "--constant", "1e-4"]
        for f in token_files:
            argv += ["--token-file", str(f)]
        school_proc = Child("schools", argv, root / "schools.log", control=False)
        t0 = time.monotonic()
        last = -1
        while coord.proc.poll() is None:
            if time.monotonic() - t0 > 60 + 30 * rounds:
                raise BenchError(f"{rounds} rounds did not finish in time; the coordinator's log ends:\n{coord.log_tail()}")
            done = sum(1 for v in coordinator_timeline(coord.log_path).values() if "committed" in v)
            if not quiet and done // 10 != last // 10:
                rss = samples[-1][1] / 1024 if samples else 0.0
                print(f"  {done:4d}/{rounds} rounds committed, coordinator RSS {rss:.0f} MiB", flush=True)
            last = done
            time.sleep(1.0)
        peak_kib = max(v for _, v in samples) if samples else 0
    finally:
        stop.set()
        sampler.join(timeout=5)
        if school_proc is not None:
            school_proc.stop(timeout=30)
        code = coord.stop(timeout=60)
    if code != 0:
        raise BenchError(f"the coordinator exited with code {code}; its log ends:\n{coord.log_tail()}")
    timeline = coordinator_timeline(coord.log_path)
    committed = sorted(r for r, v in timeline.items() if "committed" in v)
    if len(committed) < rounds:
        raise BenchError(f"only {len(committed)} of {rounds} rounds committed")
    first_open = timeline[1]["opened"]
    before = [v for t, v in samples if t <= first_open]
    start_kib = before[-1] if before else samples[0][1]
    # each round's highest sample, from its open to its commit
    per_round = []
    for r in committed:
        a, b = timeline[r].get("opened", first_open), timeline[r]["committed"]
        vals = [v for t, v in samples if a <= t <= b + 0.05]
        per_round.append(max(vals) if vals else 0)
    # where in a round the memory is: the highest sample while uploads arrive (open -> last
    # accepted) and while the round closes (last accepted -> committed), median over rounds
    phases: dict[str, list[int]] = {"uploads": [], "close": []}
    for r in committed:
        t = timeline[r]
        a, m, b = t.get("opened", first_open), t.get("last_accepted", t["committed"]), t["committed"]
        for name, (lo, hi) in (("uploads", (a, m)), ("close", (m, b + 0.05))):
            vals = [v for ts, v in samples if lo <= ts <= hi]
            if vals:
                phases[name].append(max(vals))
    tenth = max(1, len(per_round) // 10)
    deciles = [max(per_round[i:i + tenth]) / 1024 for i in range(0, len(per_round), tenth)]
    adapter_bytes = sum(p.stat().st_size for p in (root / "state" / "artifacts").iterdir()) // max(1, len(committed) + 1)
    tensors, params = _safetensors_info(next((root / "state" / "artifacts").iterdir()))
    budget_kib = start_kib + 4 * adapter_bytes / 1024
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.memory_bench " + " ".join(sys.argv[1:]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": model, "schools": schools, "rounds": len(committed),
        "adapter_bytes": adapter_bytes, "tensors": tensors, "parameters": params,
        "start_mib": round(start_kib / 1024, 1),
        "peak_mib": round(peak_kib / 1024, 1),
        "budget_mib": round(budget_kib / 1024, 1),
        "peak_over_start_mib": round((peak_kib - start_kib) / 1024, 1),
        "peak_over_start_adapters": round((peak_kib - start_kib) * 1024 / max(1, adapter_bytes), 2),
        "per_decile_mib": [round(d, 1) for d in deciles],
        "growth_mib": round(deciles[-1] - deciles[0], 1),
        "within_budget": peak_kib <= budget_kib,
        "phase_peak_over_start_mib": {k: round((sorted(v)[len(v) // 2] - start_kib) / 1024, 1) for k, v in phases.items() if v},
        "phase_highest_over_start_mib": {k: round((max(v) - start_kib) / 1024, 1) for k, v in phases.items() if v},
        "workdir": str(root),
    }
    return result


def format_result(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['model']}: adapter {r['adapter_bytes']:,} bytes ({r['parameters']:,} parameters); {r['schools']} schools, "
        f"{r['rounds']} rounds",
        f"coordinator RSS after start-up {r['start_mib']} MiB, peak {r['peak_mib']} MiB "
        f"(+{r['peak_over_start_mib']} MiB = {r['peak_over_start_adapters']} x the adapter); "
        f"budget start + 4 x adapter = {r['budget_mib']} MiB: {'within' if r['within_budget'] else 'OVER'}",
        "highest RSS per tenth of the rounds (MiB): " + " ".join(f"{d:.0f}" for d in r["per_decile_mib"]),
        f"growth, last tenth - first tenth: {r['growth_mib']:+.1f} MiB",
        "a round's highest RSS above start-up, median over rounds: "
        + ", ".join(f"{k} +{v} MiB" for k, v in r.get("phase_peak_over_start_mib", {}).items())
        + "; highest of all: "
        + ", ".join(f"{k} +{v} MiB" for k, v in r.get("phase_highest_over_start_mib", {}).items()),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--schools", type=int, default=4)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="smoke test: the tiny test model, 2 schools, 4 rounds")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    model, rounds, schools = args.model, args.rounds, args.schools
    if args.quick:
        from common.models import build_tiny_model

        tiny = Path(tempfile.mkdtemp(prefix="memory-bench-tiny-")) / "model"
        model = "dir:" + str(build_tiny_model(tiny))
        rounds, schools = min(rounds, 4), 2
    try:
        result = run(rounds, schools, model, args.cache_dir.resolve(), args.workdir, args.quiet)
    except BenchError as exc:
        print(f"memory_bench: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
