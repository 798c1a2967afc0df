"""A real coordinator and three real school daemons over gRPC sockets, tiny model, two rounds."""

from __future__ import annotations

import asyncio

import torch
from peft import PeftModel

from common.lora import adapter_state
from common.models import load_model
from fedserver.report import build_report
from tests.conftest import coordinator_config, school_config, wait_for


async def test_two_rounds_three_schools(tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    cfg = coordinator_config(tmp_path, tiny_model, eval_file=fed_data / "eval" / "eval.jsonl")
    rc = await start_coordinator(cfg)
    for k in (1, 2, 3):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=180)

    rounds = rc.store.rounds()
    assert [r.status for r in rounds] == ["committed", "committed"]
    assert all(r.metrics["updates"] == 3 for r in rounds)
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in rounds)
    # Round 2 started from round 1's adapter.
    assert rounds[1].global_in == rounds[0].global_out
    report = build_report(rc.store, tiny_model, "eval")
    assert report["base_eval_accuracy"] is not None
    assert all(r["eval_accuracy"] is not None for r in report["rounds"])
    # Schools evaluated locally and reported metrics only.
    assert {e["source"] for e in rc.store.evals(1)} >= {"server", "school-1", "school-2", "school-3"}
    # Each round's checkpoint is a PEFT directory that peft loads onto the base model.
    ckpt = cfg.server.state_dir / "rounds" / "2" / "adapter"
    base, _ = load_model(tiny_model)
    model = PeftModel.from_pretrained(base, str(ckpt))
    from common.wire import bytes_to_tensors

    saved = bytes_to_tensors(rc.coord.engine.artifacts.get(rounds[1].global_out))
    loaded = adapter_state(model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


async def test_school_joining_late_waits_for_min_schools(tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    cfg = coordinator_config(tmp_path, tiny_model, rounds=dict(total=1, min_schools=2, quorum=2))
    rc = await start_coordinator(cfg)
    await start_school(school_config(tmp_path, rc.address, "school-1", fed_data, tiny_model))
    await wait_for(lambda: "school-1" in rc.engine.sessions, 20, "school-1 to attach")
    await asyncio.sleep(0.5)
    assert rc.store.rounds() == []   # one school is not enough to start
    await start_school(school_config(tmp_path, rc.address, "school-2", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=120)
    assert [r.status for r in rc.store.rounds()] == ["committed"]


async def test_replaced_stream_reconnects_and_only_the_finish_stops_the_daemon(tmp_path, tiny_model, fed_data,
                                                                             start_coordinator, start_school):
    """The coordinator ends a school's stream when a newer session of that school attaches
    (shutdown with final = false): the daemon reconnects and keeps going. Only the federation's
    end (final = true) stops it."""
    from common.messages import Capabilities

    cfg = coordinator_config(tmp_path, tiny_model, rounds=dict(total=1, min_schools=2, quorum=2))
    rc = await start_coordinator(cfg)
    daemon, _, task = await start_school(school_config(tmp_path, rc.address, "school-1", fed_data, tiny_model))
    await wait_for(lambda: "school-1" in rc.engine.sessions, 20, "school-1 to attach")
    first = rc.engine.sessions["school-1"]
    intruder = rc.engine.attach("school-1", Capabilities())   # what a second session of school-1 does
    await wait_for(lambda: rc.engine.sessions.get("school-1") not in (first, intruder), 20, "school-1 to reconnect")
    assert not task.done() and daemon.shutdown_reason is None
    await start_school(school_config(tmp_path, rc.address, "school-2", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=120)
    assert [r.status for r in rc.store.rounds()] == ["committed"]
    assert await asyncio.wait_for(task, timeout=20) == 0
    assert daemon.shutdown_reason is not None and "finished" in daemon.shutdown_reason


async def test_schools_report_the_last_rounds_evaluation_before_shutdown(tmp_path, tiny_model, fed_data,
                                                                        start_coordinator, start_school):
    """The coordinator waits for the schools' evaluation of the final round before telling
    them to shut down (a slow school's report used to be lost); a school with nothing held
    out answers with zero questions, so it is not waited for."""
    import dataclasses
    import time

    cfg = coordinator_config(tmp_path, tiny_model, rounds=dict(total=1, min_schools=3, quorum=3))
    rc = await start_coordinator(cfg)
    daemons = []
    for k in (1, 2, 3):
        sc = school_config(tmp_path, rc.address, f"school-{k}", fed_data, tiny_model)
        if k == 3:
            sc = dataclasses.replace(sc, school=dataclasses.replace(sc.school, heldout_file=None))
        daemons.append((await start_school(sc))[0])
    slow = daemons[0].model
    fast_evaluate = slow.evaluate

    def evaluate_slowly(*args, **kwargs):   # runs on the daemon's worker thread
        time.sleep(2.0)
        return fast_evaluate(*args, **kwargs)

    slow.evaluate = evaluate_slowly
    await asyncio.wait_for(rc.run_task, timeout=120)
    sources = {e["source"] for e in rc.store.evals(1)}
    assert {"school-1", "school-2"} <= sources and "school-3" not in sources
    assert not rc.engine._evals_due[1]
