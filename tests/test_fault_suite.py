"""benchmarks/fault_suite.py --quick against real coordinator processes: SIGKILLs at targeted
and random moments (with a byte flipped in a receipted update and the global adapter
truncated while it is down), a school killed mid-upload, a catalogue of bad requests over
real gRPC, and hostile HTTP/2 streams. The promises of docs/RELIABILITY.md, checked against
an independent recomputation of every committed round: no acknowledged update lost or
applied twice, no round off, no UNKNOWN or INTERNAL answer, and the coordinator still there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(900)
def test_fault_suite_quick(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fault_suite", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    s = res["summary"]
    crash = res["crash"]
    # faults were really injected: every coordinator kill restarted, the school's too
    assert sum(crash["injected_by_kind"].values()) >= 4, crash["faults"]
    assert crash["restarts"] >= 3 and crash["restarts_failed"] == 0, crash["faults"]
    assert crash["injected_by_kind"].get("school") == 1, crash["faults"]
    school = next(f for f in crash["faults"] if f["kind"] == "school")
    assert school["after_restart"]["acknowledged"], school
    assert crash["acks"] >= crash["check"]["committed"] >= 10, crash["check"]
    # the promises
    assert s["updates_lost"] == 0, crash["check"]
    assert s["updates_applied_twice"] == 0, crash["check"]
    assert s["mismatching_rounds"] == 0, [r for r in crash["check"]["rounds"] if not r.get("ok", True)]
    assert s["acked_in_failed_rounds"] == 0 and s["nonfinite_globals"] == 0 and s["chain_breaks"] == 0, s
    assert s["updates_metric_mismatch"] == 0, s   # a round's own `updates` figure equals its receipts
    # damage done while it was down was found, quarantined and recovered from
    damaged = [f["corrupted"]["what"] for f in crash["faults"] if "corrupted" in f]
    assert damaged, crash["faults"]
    assert len(crash["check"]["quarantined"]) >= len(damaged), crash["check"]
    # bad input: a clear status each, nothing changed, still serving
    inputs = res["inputs"]
    assert s["unknown_or_internal"] == 0, [c for c in inputs["cases"] if c["code"] in ("UNKNOWN", "INTERNAL")]
    assert "NO STATUS" not in inputs["by_code"], inputs["by_code"]
    assert inputs["state_changed"] == [], inputs["state_changed"]
    assert sum(inputs["by_code"].values()) >= 60
    assert s["coordinator_alive"], (crash["finished"], inputs.get("health_after"), inputs.get("finished"),
                                    {k: v["coordinator_alive"] for k, v in res["hostile"]["scenarios"].items()})
    # the report renders
    assert "## Crashes" in proc.stdout and "## Bad inputs by outcome" in proc.stdout and "## Memory under hostile streams" in proc.stdout
