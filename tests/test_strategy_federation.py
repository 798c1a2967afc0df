"""Strategies chosen by name in the coordinator's config, each running a real federation
(tiny model, real daemons over gRPC), including one added through a Python entry point."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest

from common.lora import split_merge
from common.wire import bytes_to_tensors, bytes_to_tensors_with_metadata
from fedserver.config import StrategySection
from tests.conftest import coordinator_config, school_config

CASES = {
    "ffa_lora": StrategySection("ffa_lora"),
    "fedsa_lora": StrategySection("fedsa_lora"),
    "hetlora": StrategySection("hetlora", {"ranks": {"school-1": 2}}),
    "fedadam+compress": StrategySection("fedadam", {}, ({"name": "compress", "kind": "int8"},)),
    "median+clip": StrategySection("median", {}, ({"name": "clip", "max_norm": 5.0},)),
    "dp": StrategySection("fedavg", {"weighting": "uniform"}, ({"name": "dp", "clip_norm": 1.0, "noise_multiplier": 0.5},)),
    "flexlora": StrategySection("flexlora"),
    "fedex_lora": StrategySection("fedex_lora"),
}


async def run_federation(tmp_path, tiny_model, fed_data, start_coordinator, start_school, section, rounds=2, quorum=3):
    cfg = coordinator_config(tmp_path, tiny_model, strategy=dict(name=section.name, options=section.options, wrappers=section.wrappers),
                             rounds=dict(total=rounds, min_schools=3, quorum=quorum),
                             evaluation=dict(eval_file=None, school_max_examples=0))
    assert not cfg.problems()
    rc = await start_coordinator(cfg)
    for k in (1, 2, 3):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=180)
    rounds_ = rc.store.rounds()
    assert [r.status for r in rounds_] == ["committed"] * rounds, [(r.status, r.failures) for r in rounds_]
    return cfg, rc, rounds_


@pytest.mark.parametrize("case", list(CASES))
async def test_strategy_runs_a_real_federation(case, tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    cfg, rc, rounds = await run_federation(tmp_path, tiny_model, fed_data, start_coordinator, start_school, CASES[case])
    art = rc.coord.engine.artifacts
    first = bytes_to_tensors(art.get(rounds[0].global_in))
    last, merged = split_merge(bytes_to_tensors(art.get(rounds[-1].global_out)))
    assert bool(merged) == (case == "fedex_lora")
    assert first.keys() == last.keys() and all(first[k].shape == last[k].shape for k in first)
    moved = {k for k in first if not bool((first[k] == last[k]).all())}
    assert moved, "two rounds left the global adapter unchanged"
    m = rounds[-1].metrics
    assert m["updates"] == 3 and "train_loss" in m
    if case == "ffa_lora":
        assert all("lora_B" in k for k in moved), "FFA-LoRA must never change A"
        # Schools leave the zero A deltas out: about half the bytes (A is r x d_in per module).
        assert 0.3 * m["upload_bytes_dense"] < m["upload_bytes"] < 0.7 * m["upload_bytes_dense"]
    if case == "fedsa_lora":
        personal = [bytes_to_tensors((tmp_path / f"school-{k}" / "personal.safetensors").read_bytes()) for k in (1, 2, 3)]
        assert all(p and all("lora_B" in k for k in p) for p in personal)
        key = next(iter(personal[0]))
        assert not bool((personal[0][key] == personal[1][key]).all()), "each school keeps its own B"
    if case == "fedadam+compress":
        assert 0 < m["upload_bytes"] < m["upload_bytes_dense"]
        assert m["upload_bytes_saved"] == m["upload_bytes_dense"] - m["upload_bytes"]
        assert (tmp_path / "school-1" / "feedback-int8.safetensors").exists()
        saved, header = bytes_to_tensors_with_metadata((cfg.server.state_dir / "strategy" / "round-2.safetensors").read_bytes())
        assert any(k.startswith("m::") for k in saved) and any(k.startswith("v::") for k in saved)
        assert '"fedadam"' in header["strategy"]
    if case == "dp":
        eps = [r.metrics["dp_epsilon"] for r in rounds]
        assert 0 < eps[0] < eps[1]
    if case in ("flexlora", "median+clip"):
        assert "truncation_error" in m


def _remaining() -> list[str]:
    from fedserver.strategy import STRATEGIES

    covered = {c.name for c in CASES.values()} | {"flora"}
    return sorted(set(STRATEGIES) - covered)


@pytest.mark.parametrize("name", _remaining())
async def test_every_other_registered_strategy_runs_a_round(name, tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    """Every built-in strategy not exercised above, selected by name, commits a real round
    (three schools: the Krum family with f = 0, which three updates allow)."""
    options = {"f": 0} if name in ("krum", "multi_krum", "bulyan") else {}
    _, _, rounds = await run_federation(tmp_path, tiny_model, fed_data, start_coordinator, start_school,
                                        StrategySection(name, options), rounds=1)
    assert rounds[0].metrics["updates"] == 3


async def test_flora_merges_reach_schools_and_the_evaluator(tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    cfg = coordinator_config(tmp_path, tiny_model, eval_file=fed_data / "eval" / "eval.jsonl", strategy=dict(name="flora"),
                             rounds=dict(total=2, min_schools=3, quorum=3))
    rc = await start_coordinator(cfg)
    for k in (1, 2, 3):
        await start_school(school_config(tmp_path, rc.address, f"school-{k}", fed_data, tiny_model))
    await asyncio.wait_for(rc.run_task, timeout=180)
    rounds = rc.store.rounds()
    assert [r.status for r in rounds] == ["committed", "committed"]
    assert rounds[1].metrics["merge_rank"] == 2 * 3 * cfg.lora.rank      # K·r per round, exact
    last = bytes_to_tensors(rc.coord.engine.artifacts.get(rounds[1].global_out))
    assert any(".merged_A." in k for k in last)
    assert (cfg.server.state_dir / "rounds" / "2" / "merged_base_delta.safetensors").exists()
    for task in list(rc.engine._eval_tasks):
        await task
    sources = {e["source"] for e in rc.store.evals(2)}
    assert {"server", "school-1"} <= sources     # both the coordinator and the schools applied the merge
    # `fedserver evaluate` on the round-2 checkpoint (PEFT dir + merged base delta) scores what the coordinator scored.
    import json
    import subprocess

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "fedserver.cli", "evaluate", "--model", tiny_model, "--adapter",
                           str(cfg.server.state_dir / "rounds" / "2" / "adapter"), "--eval-file", str(fed_data / "eval" / "eval.jsonl"),
                           "--max-examples", str(cfg.evaluation.max_examples), "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = json.loads(proc.stdout.strip().splitlines()[-1])
    server = next(e for e in rc.store.evals(2) if e["source"] == "server")["metrics"]
    assert cli["merged_base_delta"] and cli["loss"] == pytest.approx(server["loss"], rel=1e-4)


async def test_restarted_coordinator_restores_server_moments(tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    section = StrategySection("fedadam")
    cfg, rc, _ = await run_federation(tmp_path, tiny_model, fed_data, start_coordinator, start_school, section, rounds=1)
    before = {k: v.clone() for k, v in rc.coord.engine.strategy.m.items()}
    from fedserver.app import create_server

    coord = await create_server(cfg)
    try:
        await coord.engine.start()
        after = coord.engine.strategy.m
        assert before.keys() == after.keys() and all(bool((before[k].float() == after[k].float()).all()) for k in before)
    finally:
        coord.store.close()


PLUGIN = textwrap.dedent('''
    """A third-party strategy: FedAvg that applies only half of the mean step."""
    from dataclasses import dataclass

    from fedserver.strategy.fedavg import AvgOptions, FedAvg


    @dataclass(frozen=True)
    class HalfOptions(AvgOptions):
        server_lr: float = 0.5


    class HalfAvg(FedAvg):
        name = "half_avg"
        summary = "FedAvg at half step (a test plugin)."
        Options = HalfOptions
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution that declares a strategy through the entry-point group."""
    site = tmp_path / "site"
    (site / "half_avg_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "half_avg_plugin.py").write_text(PLUGIN)
    (site / "half_avg_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: half-avg-plugin\nVersion: 1.0\n")
    (site / "half_avg_plugin-1.0.dist-info" / "entry_points.txt").write_text("[schoolfed.strategies]\nhalf_avg = half_avg_plugin:HalfAvg\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("half_avg_plugin", None)


async def test_entry_point_strategy_is_found_and_used(plugin, tmp_path, tiny_model, fed_data, start_coordinator, start_school):
    from fedserver.strategy import available

    assert "half_avg" in available()
    _, rc, rounds = await run_federation(tmp_path, tiny_model, fed_data, start_coordinator, start_school,
                                         StrategySection("half_avg"), rounds=1)
    assert type(rc.coord.engine.strategy).__name__ == "HalfAvg"
    assert rc.coord.engine.strategy.options.server_lr == 0.5 and rounds[0].metrics["updates"] == 3


def test_broken_entry_point_is_reported(tmp_path, monkeypatch):
    from common.errors import ConfigError
    from fedserver.strategy import create

    site = tmp_path / "site"
    (site / "broken-1.0.dist-info").mkdir(parents=True)
    (site / "broken-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (site / "broken-1.0.dist-info" / "entry_points.txt").write_text("[schoolfed.strategies]\nbroken = no_such_module:X\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match="failed to import"):
        create("broken")
