"""Keeps benchmarks/transfer_bench.py from rotting: one repeat over a tiny synthetic adapter
(a few hundred KB, layout from a small LlamaConfig; no model weights, no real SmolLM2)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from benchmarks import transfer_bench as tb


def _tiny_config_dir(tmp: Path) -> str:
    """A config.json is all load_config/expected_layout need (`dir:` specs read no weights)."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    out = tmp / "tiny-config"
    cfg.save_pretrained(out)
    return f"dir:{out}"


async def test_transfer_bench_runs_on_a_tiny_adapter(tmp_path: Path) -> None:
    spec = _tiny_config_dir(tmp_path)
    lines: list[str] = []
    result = await tb.run_benchmark(spec, cache_dir=None, repeats=1, warmup=0, workdir=tmp_path / "work",
                                    progress=lines.append, stages=True, floor=True)

    # r=16 on q,k,v,o (128->128, 128->64 twice, 128->128) and gate,up,down (128<->512), 2 layers
    per_layer = 16 * (128 + 128) + 2 * 16 * (128 + 64) + 16 * (128 + 128) + 3 * 16 * (128 + 512)
    assert result["tensors"] == 2 * 7 * 2
    assert result["parameters"] == tb.num_params(tb.load_layout(spec, None)) == 2 * per_layer
    assert 100_000 < result["upload_bytes"] < 1_500_000          # "a few hundred KB"
    assert result["download_bytes"] == result["upload_bytes"]    # same layout, same safetensors size
    assert result["accepted_uploads"] == 1                       # the upload reached a receipt
    for series in tb.SERIES:
        assert len(result["wall_s"][series]) == 1 and result["wall_s"][series][0] > 0
    for direction in ("download", "upload"):
        d = result["summary"][direction]
        assert d["project"]["median_s"] > 0 and d["plain"]["median_s"] > 0
        assert d["ratio_median"] > 0
    assert 0 < result["summary"]["validate_update"]["share_of_project_upload"]

    stages = result["upload_stages_s"]   # --stages: the coordinator's own functions timed, then put back
    assert set(stages) == {key for key, _ in tb.STAGES} and all(v["n"] == 1 for v in stages.values())
    assert stages["fsync"]["median_s"] <= stages["receive"]["median_s"] and stages["fold"]["median_s"] <= stages["accept"]["median_s"]
    from fedserver import rounds, transfers
    from fedserver.engine import RoundEngine
    for fn in (transfers.UploadReceiver.receive, transfers._sync, RoundEngine.accept_upload, rounds.TrainKind.fold):
        assert not hasattr(fn, "__wrapped__"), fn   # put back

    floor = result["summary"]["floor"]   # --floor: each part timed alone, and the bound they set
    assert set(floor["parts"]) == {key for key, _ in tb.FLOOR_PARTS}
    assert all(part["cpu_median_s"] > 0 for part in floor["parts"].values())
    assert floor["plain_cpu_s"] < floor["cpu_s_without_fold"] < floor["cpu_s_with_fold"]
    assert not list((tmp_path / "work").glob("floor.part"))   # its file removed

    table = tb.format_table(result)
    assert "A project" in table and "B plain gRPC" in table and "validate_update" in table
    assert "where A's upload time goes" in table and "fsync" in table
    assert "the floor of an upload to its receipt" in table and "the 80% target allows" in table
    json.dumps(result)   # --json must be able to write it
    assert any(line.startswith("repeat 1/1") for line in lines)


def test_the_upload_floor_is_plain_cpu_plus_the_parts_over_the_cores() -> None:
    """--floor's bound: (plain's CPU + the parts before the fold) / cores, against B's median / 0.8."""
    summary = {"upload": {"plain": {"cpu_median_s": 0.020, "median_s": 0.014}}}
    parts = {"school_hash": {"cpu_median_s": 0.004}, "receive_work": {"cpu_median_s": 0.014},
             "fold": {"cpu_median_s": 0.010}}
    two = tb.floor_summary(summary, parts, cores=2)
    assert two["wall_floor_s_without_fold"] == pytest.approx(0.019) and two["wall_floor_s_with_fold"] == pytest.approx(0.024)
    assert two["target_wall_s"] == pytest.approx(0.0175) and two["target_reachable_on_paper"] is False
    assert tb.floor_summary(summary, parts, cores=4)["target_reachable_on_paper"] is True


def test_exchange_bench_runs_on_a_tiny_teacher(tmp_path: Path, tiny_teacher: str, exchange_data: Path) -> None:
    """benchmarks/exchange_bench.py end to end on the tiny teacher (one repeat, 4 questions)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.exchange_bench", "--model", tiny_teacher, "--quantization",
                           "none", "--questions", "4", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
                           "--data", str(exchange_data), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["score_batched_s"] > 0 and result["score_loop_s"] > 0 and result["tokens_scored"] > 0
    assert result["argmax_agreement"] >= 0.75   # both ways score the options alike (random weights: near ties)
    b = result["bytes"]
    assert 0 < b["answer_set"] < b["labelled_pack"] and b["lora_delta"] > 1_000_000
    assert "| score options" in proc.stdout


def test_close_bench_times_every_stage_of_the_close(tmp_path: Path) -> None:
    """benchmarks/close_bench.py on the tiny layout: every stage timed, every round committed."""
    from benchmarks import close_bench

    out = tmp_path / "close.json"
    assert close_bench.main(["--rounds", "3", "--schools", "2", "--model", _tiny_config_dir(tmp_path),
                             "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--eval-storm", "50"]) == 0
    r = json.loads(out.read_text())
    assert r["rounds"] == 3 and r["schools"] == 2 and r["tensors"] == 2 * 7 * 2
    assert set(r["median_ms"]) == {"close", "finalize", "write", "files", "hold", "open"}
    assert all(v > 0 for v in r["median_ms"].values())
    assert r["median_ms"]["close"] >= r["median_ms"]["finalize"]
    e = r["eval_storm"]   # 50 schools' evaluations at once: all stored, in fewer transactions than reports
    assert e["reports"] == e["stored"] == 50 and 1 <= e["transactions"] < 50 and e["wall_s"] > 0


async def test_transfer_bench_holds_more_schools_than_one_connection_takes(tmp_path: Path) -> None:
    """One school per upload: 34 repeats need 35 Session streams, more than the coordinator
    lets one connection hold (32); the benchmark spreads them (it hung here before)."""
    spec = _tiny_config_dir(tmp_path)
    result = await asyncio.wait_for(tb.run_benchmark(spec, cache_dir=None, repeats=34, warmup=0,
                                                     workdir=tmp_path / "work", progress=lambda _: None), 240)
    assert result["accepted_uploads"] == 34


def test_stream_floor_holds_its_connections_and_reports_per_connection_memory() -> None:
    """benchmarks/stream_floor.py with a few connections: every client connects (each with its
    idle stream, or none), the server's RSS is read before and after, and nothing is left running."""
    import multiprocessing

    from benchmarks import stream_floor

    for call in (True, False):
        r = stream_floor.measure(12, procs=2, call=call, settle_s=0.2,
                                 extra=[("grpc.http2.hpack_table_size.decoder", 0)], python_memory=call)
        assert r["connections"] == 12 and r["call_per_connection"] is call
        assert r["server_rss_kib"] > 0 and r["server_rss_start_kib"] > 0
        assert isinstance(r["rss_kb_per_connection"], float)
        assert (r["python_kb_per_connection"] is not None) is call
        assert r["options"] == [["grpc.http2.hpack_table_size.decoder", 0]]
        assert r["fanout"] is None
    r = stream_floor.measure(12, procs=2, settle_s=0.2, fanout=True, writes=True)   # one message to every stream
    f = r["fanout"]
    assert f["streams"] == f["received"] == 12
    assert 0 < f["last_write_s"] and 0 < f["last_received_s"] < 60 and r["handler"] == "context.read/write"
    assert not multiprocessing.active_children()
    with pytest.raises(SystemExit, match="hard limit"):
        stream_floor.measure(10**9)
