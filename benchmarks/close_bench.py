"""Where a round's close goes: the coordinator's round engine alone (no network, no schools'
processes), the federation's adapter, each stage of the close timed.

Run:  .venv/bin/python -m benchmarks.close_bench [--rounds 12] [--schools 2] [--json FILE]
          [--cache-dir .cache/models] [--model packaged:smollm2-135m-instruct]

A RoundEngine on a temporary state directory with FedAvg (as `fedserver serve` builds it),
`--schools` schools attached in process; each round opens, every school's upload is handed to
the engine as the servicer does once its bytes are in (a payload file, checked as it arrived,
then `accept_upload`), and the round is closed. Timed per round (wall, medians over the rounds
after the first two):

  close       RoundEngine._close: from the last result to the committed round
  finalize    the strategy's aggregate: the mean, the server step, the new adapter
  write       what is left of writing the new adapter once finalize returns: for FedAvg,
              which hands each buffer of the new adapter over as it is made (written and
              hashed meanwhile, inside `finalize`), StreamedTensors.commit (the last writes and
              hashes, the fsync, the rename); for a strategy that does not, ArtifactStore.put_tensors
              (serialise, hash, write and fsync the whole adapter)
  files       the committed round's files (strategy state, PEFT checkpoint)
  hold        reading the new adapter's header to hold it as its file (FileState)
  open        the next round's open (RoundEngine._open_next)

With `--eval-storm N`, it then also measures what follows a commit at scale: N connected
schools answering the round's EvaluateCommand at once (RoundEngine.report_eval for each, all
concurrently, as N Session streams would deliver them): wall and CPU seconds of this process
until every report is stored, and the store's transactions.

Compare two commits by running this in a worktree of each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import timed

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


async def run(rounds: int, schools: int, model: str, cache_dir: Path, eval_storm: int = 0) -> dict[str, Any]:
    import torch

    from common.lora import LoraSettings, expected_layout
    from common.messages import Capabilities, UploadHeader
    from common.models import load_config
    from common.wire import sha256_hex, tensors_to_bytes
    from fedserver import strategy as strategies
    from fedserver.artifacts import ArtifactStore, StreamedTensors
    from fedserver.auth import hash_token
    from fedserver.config import CoordinatorConfig, ModelSection, RoundsSection, SchoolEntry, ServerSection, ServerTLSSection
    from fedserver.engine import RoundEngine
    from fedserver.store import Store

    layout = expected_layout(load_config(model, cache_dir), LoraSettings())
    ids = [f"school-{i}" for i in range(1, schools + 1)]
    with tempfile.TemporaryDirectory(prefix="close-bench-") as tmp:
        state = Path(tmp) / "coordinator"
        cfg = CoordinatorConfig(
            server=ServerSection(listen="127.0.0.1:0", state_dir=state, tls=ServerTLSSection(insecure=True)),
            model=ModelSection(base=model, cache_dir=cache_dir),
            rounds=RoundsSection(total=0, min_schools=schools, quorum=schools, fraction=1.0, deadline_s=600.0),
            schools=tuple(SchoolEntry(sid, hash_token(f"token-{sid}")) for sid in ids))
        state.mkdir(parents=True)
        eng = RoundEngine(cfg, Store(state / "state.sqlite"), ArtifactStore(state / "artifacts"), layout,
                          strategies.build(cfg.strategy), state / "rounds", state / "updates")
        await eng.start()
        for sid in ids:
            eng.attach(sid, Capabilities())
        times: dict[str, list[float]] = {}
        timed(eng, "_close", "close", times)
        timed(eng.strategy, "finalize", "finalize", times)
        timed(eng.artifacts, "put_tensors", "write", times)
        streamed_commit = timed(StreamedTensors, "commit", "write", times)   # a class attribute: put back afterwards
        try:
            timed(eng, "_commit_files", "files", times)
            timed(eng, "_hold_global", "hold", times)
            timed(eng, "_open_next", "open", times)
            payload = tensors_to_bytes({k: torch.full(v.shape, 1e-3) for k, v in layout.items()})
            digest = sha256_hex(payload)
            (state / "uploads").mkdir(exist_ok=True)
            for n in range(rounds):
                if eng.current is None and not await eng._open_next():
                    raise RuntimeError("the round did not open")
                rnd = eng.current
                assert rnd is not None
                for sid in ids:
                    part = state / "uploads" / f"{sid}.{n}.part"
                    part.write_bytes(payload)
                    h = UploadHeader(rnd.number, f"r{rnd.number}-{sid}", 100, digest, len(payload), 0, rnd.global_sha)
                    check = eng.stream_check(sid, h)
                    if check is not None:
                        check.feed(payload)
                    await eng.accept_upload(sid, h, part, digest, check)
                if not await eng._close(rnd):
                    raise RuntimeError(f"round {rnd.number} failed")
                for task in list(eng._eval_tasks):   # the close's background work (second copy) done
                    await task
            storm: dict[str, Any] = {}
            if eval_storm:
                from common.messages import EvalReport

                number = eng.store.committed_rounds()
                for k in range(eval_storm):
                    eng.attach(f"storm-{k}", Capabilities())
                eng._evals_due[number] = {f"storm-{k}" for k in range(eval_storm)}
                writer = getattr(eng, "_eval_rows", None)
                before = writer.batches if writer is not None else 0
                w0, c0 = time.perf_counter(), time.process_time()
                await asyncio.gather(*(eng.report_eval(f"storm-{k}", EvalReport(number, 8, {"accuracy": 0.5, "loss": 1.0}))
                                       for k in range(eval_storm)))
                storm = {"reports": eval_storm, "wall_s": round(time.perf_counter() - w0, 3),
                         "cpu_s": round(time.process_time() - c0, 3),
                         "stored": len([e for e in eng.store.evals(number) if e["source"].startswith("storm-")]),
                         "transactions": (writer.batches - before) if writer is not None else eval_storm}
            eng.store.close()
        finally:
            StreamedTensors.commit = streamed_commit   # type: ignore[method-assign]
    skip = min(2, rounds - 1)
    return {"rounds": rounds, "schools": schools, "adapter_bytes": len(payload), "tensors": len(layout),
            "median_ms": {k: round(statistics.median(v[skip:]) * 1000, 2) for k, v in times.items() if v[skip:]},
            **({"eval_storm": storm} if storm else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--schools", type=int, default=2)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--eval-storm", type=int, default=0, help="then N schools report an evaluation at once")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.schools < 1:
        p.error("--rounds and --schools must be at least 1")
    result = asyncio.run(run(args.rounds, args.schools, args.model, args.cache_dir.resolve(), args.eval_storm))
    print(f"{args.model}: {result['tensors']} tensors, {result['adapter_bytes']:,} bytes; {args.schools} schools, "
          f"{args.rounds} rounds (medians after the first {min(2, args.rounds - 1)})")
    for k, v in result["median_ms"].items():
        print(f"  {k:9s} {v:8.2f} ms")
    if "eval_storm" in result:
        e = result["eval_storm"]
        print(f"  {e['reports']:,} evaluation reports at once: {e['wall_s']:.3f} s wall, {e['cpu_s']:.3f} s CPU, "
              f"{e['stored']:,} stored in {e['transactions']:,} transactions")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
