"""Keeps benchmarks/aggregation_bench.py from rotting: the --quick run (3 and 5 uploads of a tiny
2-layer adapter, every configuration in its own subprocess) end to end, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.aggregation_bench import CONFIGS, QUICK_UPLOADS

REPO = Path(__file__).resolve().parent.parent


def test_aggregation_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aggregation_bench", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| strategy | mode | uploads |" in proc.stdout

    result = json.loads(out.read_text())
    assert result["quick"] and result["uploads"] == list(QUICK_UPLOADS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("aggbench-")]   # temp files deleted
    recs = {(r["strategy"], r["mode"], r["uploads"]): r for r in result["records"]}
    assert set(recs) == {(c.strategy, c.mode, n) for c in CONFIGS for n in QUICK_UPLOADS}   # every configuration

    for (strategy, _mode, n), r in recs.items():
        if strategy == "krum" and n < 4:     # krum with f=1 is defined from f + 3 = 4 updates on
            assert r["skipped"] and "at least 4" in r["reason"]
            continue
        assert not r.get("skipped"), r
        assert r["seconds"] > 0 and r["finalize_s"] > 0 and r["loop_s"] > 0
        assert r["peak_rss_mb"] >= 0 and r["baseline_rss_mb"] > 0
        assert r["seconds_vs_baseline"] > 0
        assert len(r["sha256"]) == 64
        assert r["metrics"]["updates"] == n

    for n in QUICK_UPLOADS:
        # the spilled buffer really spilled, and gives the in-memory buffer's aggregate bit for bit
        assert recs[("median", "memory", n)]["metrics"]["spilled"] == 0
        assert recs[("median", "spill", n)]["metrics"]["spilled"] == n
        assert recs[("median", "spill", n)]["sha256"] == recs[("median", "memory", n)]["sha256"]
        assert recs[("median", "spill", n)]["same_result"] is True
        # streaming FedAvg and the hold-everything baseline do the same arithmetic
        assert recs[("fedavg", "stream", n)]["sha256"] == recs[("hold_all", "memory", n)]["sha256"]
    assert recs[("krum", "spill", 5)]["sha256"] == recs[("krum", "memory", 5)]["sha256"]
    assert recs[("median", "memory", 3)]["sha256"] != recs[("median", "memory", 5)]["sha256"]
