"""Keeps benchmarks/scale_bench.py from rotting: the real coordinator (`fedserver serve` in a
subprocess) with 50 schools held by 2 client processes, rounds of 10 participants. Checks the
shape and sanity of what it reports; no timing thresholds (this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_scale_bench_runs_with_50_schools(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_bench", "--schools", "50", "--procs", "2",
                           "--participants", "10", "--cpu-window", "2", "--settle", "1", "--eval-spread", "0.5",
                           "--deadline", "60", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["schools"] == 50 and r["procs"] == 2 and r["participants"] == 10
    assert r["join"]["joined"] == 50 and r["join"]["failed"] == 0 and r["join"]["connected"] == 50
    # memory and descriptors measured from outside: one connection (descriptor) per school
    assert r["before"]["rss_kb"] > 0 and r["connected"]["rss_kb"] >= r["before"]["rss_kb"] * 0.9
    assert r["connected"]["fds"] - r["before"]["fds"] >= 50
    hb = r["heartbeat"]
    assert hb["beats_per_s"] == 10.0 and 0 <= hb["cpu_percent"] < 200
    assert hb["cpu_percent_event_loop_thread"] >= 0 and hb["cpu_percent_other_threads"] >= 0

    # every connected school got each fan-out
    fan = r["fanout"]
    assert set(fan) >= {"evaluate_after_round_1", "round_2_open", "evaluate_after_round_2", "final_shutdown"}
    for name in ("evaluate_after_round_1", "evaluate_after_round_2"):
        assert fan[name]["receivers"] == 50, (name, fan[name])
        assert -1 < fan[name]["seconds"] < 60
    # a round's open reaches its participants only: no IdleCommand to the 40 not selected
    assert fan["round_2_open"]["receivers"] == fan["round_2_open"]["train"] == 10 and fan["round_2_open"]["idle"] == 0
    assert -1 < fan["round_2_open"]["seconds"] < 60

    # the measured round: 10 participants, each uploaded a valid delta, committed in time
    rd = r["round"]
    assert rd["participants"] == 10 and rd["accepted"] == 10 and rd["committed"] and rd["closed_within_deadline"]
    assert 0 < rd["seconds"] <= rd["deadline_s"] == 60
    assert r["round_1"]["committed"] and r["round_1"]["accepted"] == 10
    c = r["clients"]
    assert c["work_ok"] == 20 and c["work_failed"] == 0 and c["downloads"] == 20, c
    assert c["eval_reports"] == 100 and c["join_failed"] == 0, c
    assert r["rounds_phase"]["coordinator_exit"] == 0
    assert r["log"]["lines"] > 0 and "round committed" in r["log"]["by_event"]
    assert "school" in proc.stdout and "fan-out" in proc.stdout   # the printed summary


def test_session_lines_are_summarised_past_the_burst() -> None:
    """A join storm (thousands of schools reconnecting) writes SESSION_LINES per-school lines
    per window, then one summary line with the counts, instead of a line per event."""
    import structlog

    from fedserver.engine import RoundEngine

    eng = object.__new__(RoundEngine)   # only the session-logging state is needed
    eng.log = structlog.get_logger("engine")
    eng.sessions = {}
    eng._notes_start, eng._notes_lines, eng._notes_skipped = float("-inf"), 0, {}   # as __init__ sets them
    with structlog.testing.capture_logs() as logs:
        for k in range(RoundEngine.SESSION_LINES + 30):
            eng.note_session("school attached", f"s{k}")
        eng.note_session("session timed out", "s1", warn=True, silent_s=31.0)
        eng.flush_session_notes(force=True)
    per_school = [e for e in logs if e["event"] == "school attached"]
    assert len(per_school) == RoundEngine.SESSION_LINES
    (summary,) = [e for e in logs if e["event"] == "school sessions"]
    assert summary["school_attached"] == 30 and summary["session_timed_out"] == 1
    assert summary["log_level"] == "warning"   # a timeout among them: the summary is a warning
    eng.flush_session_notes(force=True)         # nothing counted since: no second summary
    with structlog.testing.capture_logs() as logs:
        eng.note_session("school detached", "s0")   # a new window: per-school lines again
    assert [e["event"] for e in logs] == ["school detached"]


def test_live_status_lists_schools_up_to_a_bound() -> None:
    from fedserver.engine import RoundEngine, SchoolSession
    from common.messages import Capabilities

    eng = object.__new__(RoundEngine)
    eng.current, eng.phase = None, "waiting for schools"
    eng.sessions = {f"s{k:05d}": SchoolSession(f"s{k:05d}", Capabilities()) for k in range(5)}
    live = eng.live_status()
    assert live["connected"] == 5 and live["schools_listed"] == "all"
    assert live["schools"] == {f"s{k:05d}": "connected" for k in range(5)}

    n = RoundEngine.LIVE_SCHOOLS_MAX + 10
    eng.sessions = {f"s{k:05d}": SchoolSession(f"s{k:05d}", Capabilities()) for k in range(n)}
    eng.sessions["s00003"].progress = "train 50%"
    live = eng.live_status()
    assert live["connected"] == n and live["schools"] == {"s00003": "train 50%"}
    assert live["schools_listed"] == "1 with progress to report"
