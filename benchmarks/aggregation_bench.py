"""Aggregation benchmark: time and coordinator peak memory of folding N uploads into the
strategy, streaming against holding everything in memory, measured in the same run.

Run:  .venv/bin/python -m benchmarks.aggregation_bench --uploads 10 50 100 --out results.json
      .venv/bin/python -m benchmarks.aggregation_bench --quick --out quick.json   (smoke run)

The payload is the real SmolLM2-135M adapter layout (LoRA r=16, alpha=32 on q, k, v, o, gate,
up and down over 30 layers: 420 tensors, 4,884,480 float32 parameters), built from a
transformers.LlamaConfig by common.lora.expected_layout; no weights are read. N synthetic
uploads (seeded random float32 deltas of LoRA scale) and a global adapter are written once as
safetensors files in a temporary state directory laid out like the coordinator's
(state/updates/round-1/<school>.safetensors). --quick uses 3 and 5 uploads of a tiny 2-layer
layout instead.

Every configuration runs in its own fresh Python subprocess, so peak memory is per
configuration. The worker imports torch and the strategies, records its RSS (the baseline)
and resets the kernel's RSS high-water mark, then does what the round engine does: for each
upload it reads the file's bytes, parses them with common.wire.bytes_to_tensors, calls
strategy.accumulate(ClientUpdate(...)) and drops its references; then strategy.finalize().
Wall time covers the read/parse/accumulate loop plus finalize. Peak memory is the process's
peak RSS minus the baseline: getrusage(RUSAGE_SELF).ru_maxrss and VmHWM from /proc/self/status,
plus a 10 ms sampler that splits the peak into anonymous memory and file-backed pages. The
driver process (this one) imports nothing heavy: ru_maxrss survives exec, so a worker spawned
from a process that holds torch would report the parent's RSS as its own peak. The layout and
the files are made by a separate --prepare subprocess for the same reason.

Configurations (all in one run, on the same files):
  fedavg      stream      the production FedAvg: running float64 sums, O(adapter) memory
  hold_all    memory      the baseline: a naive FedAvg that keeps every upload and averages at
                          the end (defined below; same arithmetic, so the same bits as fedavg)
  median      memory      buffer_mb=65536: every update stays in the strategy's buffer
  median      spill       buffer_mb=0: every update is read back from its upload file
  krum (f=1)  memory / spill   likewise

krum is optional: when its time projected from the same configuration at a smaller N (loop
linear in N, finalize quadratic) exceeds --budget-s, it is skipped and recorded as skipped.
Torch runs with --threads intra-op threads (default 1; 0 keeps torch's default): on a shared
2-core machine, multi-threaded MKL SVDs slow down by an order of magnitude whenever another
job holds a core, which swamps everything else the robust rules do.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import status_kb

REPO = Path(__file__).resolve().parent.parent

SMOLLM2_PARAMETERS = 4_884_480   # the adapter the federation trains (benchmarks/README.md)
RANK, ALPHA = 16, 32.0
SEED = 1234
DELTA_STD = 1e-3                 # per-round factor deltas of LoRA scale (lr ~1e-3, a few steps)
GLOBAL_B_STD = 1e-3              # the global adapter's B: small random (after a round or two)
IN_MEMORY_MB = 65536             # buffer_mb that keeps every update in memory
BASELINE = ("hold_all", "memory")
QUICK_UPLOADS = (3, 5)


@dataclass(frozen=True)
class Config:
    strategy: str            # registry name, or "hold_all" for the baseline defined here
    mode: str                # stream | memory | spill
    options: tuple[tuple[str, Any], ...] = ()
    growth: float = 1.0      # exponent of N in the projected finalize time (krum's Gram matrix: 2)
    optional: bool = False   # may be skipped when its projected time exceeds --budget-s

    @property
    def label(self) -> str:
        return f"{self.strategy}/{self.mode}"


CONFIGS: tuple[Config, ...] = (
    Config("fedavg", "stream"),
    Config("hold_all", "memory"),
    Config("median", "memory", (("buffer_mb", IN_MEMORY_MB),)),
    Config("median", "spill", (("buffer_mb", 0),)),
    Config("krum", "memory", (("buffer_mb", IN_MEMORY_MB), ("f", 1)), growth=2.0, optional=True),
    Config("krum", "spill", (("buffer_mb", 0), ("f", 1)), growth=2.0, optional=True),
)

# Which configuration must give the same aggregate as which (bit for bit), in the same run.
SAME_AS = {("fedavg", "stream"): ("hold_all", "memory"), ("median", "spill"): ("median", "memory"),
           ("krum", "spill"): ("krum", "memory")}


# --------------------------------------------------------------------------- layout and files
# (run in the --prepare subprocess: these import torch and transformers)


def smollm2_config(num_layers: int = 30) -> Any:
    """SmolLM2-135M's architecture (sizes only): hidden 576, intermediate 1536, 9 heads of 64,
    3 KV heads (k/v project to 192), 49,152-token vocabulary, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=8192)


def tiny_config() -> Any:
    """--quick: 2 layers, hidden 128, intermediate 512, 4 heads of 32, 2 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                       max_position_embeddings=256)


def build_layout(quick: bool) -> dict[str, tuple[int, ...]]:
    from common.lora import LoraSettings, expected_layout

    layout = expected_layout(tiny_config() if quick else smollm2_config(), LoraSettings(rank=RANK, alpha=ALPHA))
    shapes = {k: tuple(v.shape) for k, v in sorted(layout.items())}
    if not quick and num_params(shapes) != SMOLLM2_PARAMETERS:
        raise AssertionError(f"SmolLM2 adapter layout has {num_params(shapes):,} parameters, expected {SMOLLM2_PARAMETERS:,}")
    return shapes


def num_params(shapes: Mapping[str, Sequence[int]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def write_inputs(state_dir: Path, shapes: Mapping[str, Sequence[int]], n: int, seed: int = SEED) -> dict[str, Any]:
    """The global adapter (A as PEFT initialises it, B small random) and n upload files, laid out
    like the coordinator's state directory. Deterministic for a given seed."""
    import torch

    from common.files import atomic_write_bytes
    from common.wire import tensors_to_bytes

    gen = torch.Generator().manual_seed(seed)
    glob: dict[str, torch.Tensor] = {}
    for name, shape in sorted(shapes.items()):
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            glob[name] = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        else:
            glob[name] = torch.randn(shape, generator=gen) * GLOBAL_B_STD
    state_dir.mkdir(parents=True, exist_ok=True)
    global_path = state_dir / "global.safetensors"
    atomic_write_bytes(global_path, tensors_to_bytes(glob), fsync=False)

    updates_dir = state_dir / "updates" / "round-1"
    updates_dir.mkdir(parents=True, exist_ok=True)
    uploads = []
    for i in range(n):
        school = f"school-{i + 1:03d}"
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        delta = {name: torch.randn(shape, generator=g) * DELTA_STD for name, shape in sorted(shapes.items())}
        path = updates_dir / f"{school}.safetensors"
        atomic_write_bytes(path, tensors_to_bytes(delta), fsync=False)
        uploads.append({"school_id": school, "num_examples": 16 + 8 * (i % 5), "path": str(path)})
    return {"global": str(global_path), "uploads": uploads, "upload_bytes": os.path.getsize(uploads[0]["path"])}


def prepare(spec: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    shapes = build_layout(spec["quick"])
    t = time.perf_counter()
    inputs = write_inputs(Path(spec["state_dir"]), shapes, spec["uploads"])
    return {"layout": {k: list(v) for k, v in shapes.items()}, **inputs, "write_s": time.perf_counter() - t,
            "torch": torch.__version__}


# --------------------------------------------------------------------------- the worker


class _Sampler(threading.Thread):
    """Peak anonymous and file-backed RSS, sampled every `interval` s (VmHWM has no split)."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def sample(self) -> None:
        for k, v in status_kb("RssAnon", "RssFile").items():
            self.peak[k] = max(self.peak[k], v)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


def _hold_all_class() -> type:
    import torch

    from fedserver.strategy import lowrank
    from fedserver.strategy.base import AggregateResult, ClientUpdate, State, Strategy

    class HoldAllFedAvg(Strategy):
        """The naive baseline: keep every upload's tensors in a list, average at the end. The
        arithmetic (float64 sums in arrival order, then / Σn, global + mean) and the metrics are
        FedAvg's, so the result is bit-identical and only the memory pattern differs."""

        name = "hold_all"
        summary = "Benchmark baseline: every update held in memory until finalize."

        def begin_round(self, round_: int, global_state: State) -> None:
            self.global_state = {k: v.detach().clone() for k, v in global_state.items()}
            self.held: list[tuple[float, Mapping[str, torch.Tensor]]] = []

        def accumulate(self, update: ClientUpdate) -> None:
            if update.num_examples <= 0:
                raise ValueError(f"update from {update.school_id} claims {update.num_examples} examples")
            self.held.append((float(update.num_examples), update.delta))

        def finalize(self) -> AggregateResult:
            total = sum(w for w, _ in self.held)
            state, step = {}, {}
            for k, g in self.global_state.items():
                acc = torch.zeros_like(g, dtype=torch.float64)
                for w, delta in self.held:
                    acc.add_(delta[k].to(torch.float64), alpha=w)
                step[k] = 1.0 * (acc / total)
                state[k] = (g.to(torch.float64) + step[k]).to(g.dtype)
            metrics = {"updates": float(len(self.held)), "examples": total,
                       "update_norm": float(torch.sqrt(sum((v ** 2).sum() for v in step.values()))),
                       "step_norm": lowrank.step_norm(self.global_state, state, self.context.scale)}
            self.held = []
            return AggregateResult(state, metrics)

    return HoldAllFedAvg


def state_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of every tensor, in name order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: imports, baseline, then the engine's loop."""
    import gc
    import resource

    import torch

    from common.lora import LoraSettings, TensorSpec
    from common.wire import bytes_to_tensors
    from fedserver.strategy import ClientUpdate, StrategyContext, create

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    hold_all = _hold_all_class()
    gc.collect()

    # Baseline: RSS after imports. Writing 5 to clear_refs resets the high-water mark (VmHWM and
    # the mm part of ru_maxrss) to the current RSS, so the peaks below are this run's alone.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base = status_kb("VmRSS", "RssAnon", "RssFile")
    sampler = _Sampler()
    sampler.sample()
    sampler.start()

    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    layout = {k: TensorSpec(tuple(v), torch.float32) for k, v in spec["layout"].items()}
    work_dir = Path(spec["state_dir"]) / "strategy" / "scratch"
    enrolled = tuple(u["school_id"] for u in spec["uploads"])
    strategy = hold_all() if spec["strategy"] == "hold_all" else create(spec["strategy"], dict(spec["options"]))
    strategy.setup(StrategyContext(settings, layout, enrolled, work_dir))
    global_state = bytes_to_tensors(Path(spec["global"]).read_bytes())
    strategy.begin_round(1, global_state)
    del global_state

    read_s = acc_s = 0.0
    t0 = time.perf_counter()
    for u in spec["uploads"]:
        a = time.perf_counter()
        path = Path(u["path"])
        tensors = bytes_to_tensors(path.read_bytes())
        b = time.perf_counter()
        strategy.accumulate(ClientUpdate(u["school_id"], 1, u["num_examples"], tensors, {}, path))
        del tensors
        c = time.perf_counter()
        read_s += b - a
        acc_s += c - b
    t1 = time.perf_counter()
    result = strategy.finalize()
    t2 = time.perf_counter()

    sampler.stop.set()
    sampler.join()
    sampler.sample()
    status = status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    base_kb = base.get("VmRSS", 0)
    return {
        "seconds": t2 - t0, "loop_s": t1 - t0, "read_parse_s": read_s, "accumulate_s": acc_s, "finalize_s": t2 - t1,
        "baseline_rss_mb": base_kb / 1024,
        "peak_rss_mb": (maxrss_kb - base_kb) / 1024,
        "peak_vmhwm_mb": (status.get("VmHWM", 0) - base_kb) / 1024,
        "peak_anon_mb_sampled": (sampler.peak["RssAnon"] - base.get("RssAnon", 0)) / 1024,
        "peak_file_mb_sampled": (sampler.peak["RssFile"] - base.get("RssFile", 0)) / 1024,
        "hwm_reset": hwm_reset,
        "torch_threads": torch.get_num_threads(),
        "sha256": state_sha256(result.state),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
    }


# --------------------------------------------------------------------------- the driver (stdlib only)


def _child(mode: str, spec: Mapping[str, Any], work: Path, name: str, timeout: float | None,
           threads: int = 0) -> dict[str, Any] | None:
    """Run this module with --<mode> on a JSON spec in a fresh interpreter; its JSON answer, or
    None on timeout."""
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:   # the OpenMP/MKL pools too, not only torch's intra-op setting
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "benchmarks.aggregation_bench", f"--{mode}", str(spec_path), "--child-out", str(out_path)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(out_path.read_text())
    spec_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    return out


def projected_seconds(cfg: Config, n: int, done: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest measured N of this configuration below n, scaled up: loop linear, finalize ^growth."""
    prev = [r for r in done if (r["strategy"], r["mode"]) == (cfg.strategy, cfg.mode) and not r.get("skipped")
            and r["uploads"] < n]
    if not prev:
        return None
    r = max(prev, key=lambda r: r["uploads"])
    f = n / r["uploads"]
    return r["loop_s"] * f + r["finalize_s"] * f ** cfg.growth


def min_updates(cfg: Config) -> int:
    return int(dict(cfg.options).get("f", 0)) + 3 if "krum" in cfg.strategy else 1


def run_benchmark(uploads: Sequence[int], *, quick: bool = False, workdir: Path | None = None, budget_s: float = 600.0,
                  threads: int = 1, configs: Sequence[Config] = CONFIGS, keep: bool = False,
                  progress: Callable[[str], None] = print) -> dict[str, Any]:
    uploads = sorted(set(uploads))
    tmp = Path(tempfile.mkdtemp(prefix="aggbench-", dir=workdir))
    state_dir = tmp / "state"
    try:
        t = time.perf_counter()
        prep = _child("prepare", {"quick": quick, "state_dir": str(state_dir), "uploads": max(uploads)}, tmp, "prepare", None)
        assert prep is not None
        shapes = prep["layout"]
        progress(f"wrote {max(uploads)} uploads of {prep['upload_bytes']:,} bytes ({num_params(shapes):,} parameters, "
                 f"{len(shapes)} tensors) to {tmp} in {time.perf_counter() - t:.1f} s")
        records: list[dict[str, Any]] = []
        for n in uploads:
            for cfg in configs:
                rec: dict[str, Any] = {"strategy": cfg.strategy, "mode": cfg.mode, "options": dict(cfg.options), "uploads": n}
                proj = projected_seconds(cfg, n, records)
                if n < min_updates(cfg):
                    rec.update(skipped=True, reason=f"{cfg.strategy} with f={dict(cfg.options).get('f')} "
                                                    f"needs at least {min_updates(cfg)} updates")
                elif cfg.optional and proj is not None and proj > budget_s:
                    rec.update(skipped=True, projected_s=proj, reason=f"projected {proj:.0f} s from the run at fewer "
                                                                      f"uploads, over the {budget_s:.0f} s budget")
                else:
                    spec = {"strategy": cfg.strategy, "options": dict(cfg.options), "layout": shapes,
                            "state_dir": str(state_dir), "global": prep["global"], "uploads": prep["uploads"][:n],
                            "threads": threads}
                    timeout = max(3 * budget_s, 120.0) if cfg.optional else None
                    t = time.perf_counter()
                    out = _child("worker", spec, tmp, f"{cfg.strategy}-{cfg.mode}-{n}", timeout, threads)
                    if out is None:
                        rec.update(skipped=True, reason=f"timed out after {timeout:.0f} s")
                    else:
                        rec.update(out, process_s=time.perf_counter() - t)
                records.append(rec)
                if rec.get("skipped"):
                    progress(f"{cfg.label:16s} n={n:<4d} skipped: {rec['reason']}")
                else:
                    progress(f"{cfg.label:16s} n={n:<4d} {rec['seconds']:8.2f} s (finalize {rec['finalize_s']:.2f})  "
                             f"peak RSS +{rec['peak_rss_mb']:7.1f} MB (VmHWM +{rec['peak_vmhwm_mb']:.1f}; "
                             f"anon +{rec['peak_anon_mb_sampled']:.0f}, file +{rec['peak_file_mb_sampled']:.0f})")
        add_ratios(records)
        return {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": prep["torch"], "torch_threads": threads or "default"},
            "layout": {"model": "tiny 2-layer Llama (--quick)" if quick else "SmolLM2-135M", "tensors": len(shapes),
                       "parameters": num_params(shapes), "upload_bytes": prep["upload_bytes"], "rank": RANK, "alpha": ALPHA},
            "uploads": uploads, "budget_s": budget_s, "baseline": "/".join(BASELINE), "quick": quick,
            "records": records,
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each record against the hold-everything baseline at the same N, and the same-result checks."""
    base = {r["uploads"]: r for r in records if (r["strategy"], r["mode"]) == BASELINE and not r.get("skipped")}
    for r in records:
        b = base.get(r["uploads"])
        if r.get("skipped") or b is None:
            continue
        r["seconds_vs_baseline"] = r["seconds"] / b["seconds"]
        r["rss_vs_baseline"] = r["peak_rss_mb"] / b["peak_rss_mb"] if b["peak_rss_mb"] > 0 else None
    by = {(r["strategy"], r["mode"], r["uploads"]): r for r in records if not r.get("skipped")}
    for (s, m, n), r in by.items():
        other = SAME_AS.get((s, m))
        if other and (*other, n) in by:
            r["same_result_as"] = "/".join(other)
            r["same_result"] = r["sha256"] == by[(*other, n)]["sha256"]


def _f(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def format_table(result: Mapping[str, Any]) -> str:
    rows = ["| strategy | mode | uploads | seconds | × baseline | finalize s | peak RSS MB | × baseline | anon / file MB | same result |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["records"]:
        if r.get("skipped"):
            if r.get("projected_s") is not None or "timed out" in r["reason"]:
                what = f"projected {r['projected_s']:.0f} s" if r.get("projected_s") is not None else r["reason"]
                rows.append(f"| {r['strategy']} | {r['mode']} | {r['uploads']} | skipped ({what}) | | | | | | |")
            continue
        same = "" if "same_result" not in r else ("yes" if r["same_result"] else "**NO**") + f" (= {r['same_result_as']})"
        rows.append(f"| {r['strategy']} | {r['mode']} | {r['uploads']} | {r['seconds']:.2f} | "
                    f"{_f(r.get('seconds_vs_baseline'), '.2f')} | {r['finalize_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{_f(r.get('rss_vs_baseline'), '.3f')} | {r['peak_anon_mb_sampled']:.0f} / "
                    f"{r['peak_file_mb_sampled']:.0f} | {same} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.aggregation_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, nargs="+", default=[10, 50, 100], help="upload counts (default: 10 50 100)")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: uploads {' '.join(map(str, QUICK_UPLOADS))} "
                                                          "of a tiny 2-layer layout")
    ap.add_argument("--budget-s", type=float, default=600.0,
                    help="skip krum at an N whose projected time exceeds this many seconds (default 600)")
    ap.add_argument("--threads", type=int, default=1, help="torch/MKL threads in the workers (default 1; 0 = torch default)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temporary state directory (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary upload files")
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare or args.worker:
        spec = json.loads((args.prepare or args.worker).read_text())
        out = prepare(spec) if args.prepare else worker(spec)
        args.child_out.write_text(json.dumps(out))
        return 0

    uploads = list(QUICK_UPLOADS) if args.quick else args.uploads
    if min(uploads) < 1:
        ap.error("--uploads must be >= 1")
    result = run_benchmark(uploads, quick=args.quick, workdir=args.workdir, budget_s=args.budget_s, threads=args.threads,
                           keep=args.keep, progress=lambda s: print(s, file=sys.stderr, flush=True))
    result["command"] = "python -m benchmarks.aggregation_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(result))
    for r in result["records"]:
        if r.get("skipped"):
            print(f"skipped: {r['strategy']}/{r['mode']} at {r['uploads']} uploads: {r['reason']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
