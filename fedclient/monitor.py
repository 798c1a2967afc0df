"""What a school's IT admin sees: the daemon's Prometheus metrics (off unless [monitor]
metrics_listen is set; bound to loopback by default) and its status file,
STATE_DIR/status.json, which `fedclient status` reads without contacting the coordinator.

The status file is rewritten (atomically) on every change and every STATUS_EVERY_S while the
daemon runs, so a reader can tell a running daemon from one that stopped."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from common import __version__
from common.files import atomic_write_text
from common.monitoring import lag_metrics

NS = "schoolfed_daemon"
STATUS_FILE = "status.json"
STATUS_EVERY_S = 10.0
STALE_AFTER_S = 3 * STATUS_EVERY_S
KEEP_ROUNDS = 20
WORK_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class DaemonMetrics:
    """One registry per daemon (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        Info(f"{NS}_build", "The school daemon's version", registry=r).info({"version": __version__})
        self.connected = Gauge(f"{NS}_connected", "1 while the daemon holds a session with the coordinator", registry=r)
        self.joins = Counter(f"{NS}_joins", "Successful joins (a reconnect counts again)", registry=r)
        self.last_round = Gauge(f"{NS}_last_round", "The last round whose result the coordinator received", registry=r)
        self.rounds = Counter(f"{NS}_rounds", "Rounds worked on, by kind and outcome (delivered or failed)",
                              ["kind", "outcome"], registry=r)
        self.work_seconds = Histogram(f"{NS}_work_duration_seconds", "Local work per round (training, distilling, "
                                      "answering, evaluating)", ["kind"], buckets=WORK_BUCKETS, registry=r)
        self.tokens = Counter(f"{NS}_train_tokens", "Answer tokens that carried the training loss (train rounds; "
                              "prompts are read but not counted)", registry=r)
        self.tokens_per_s = Gauge(f"{NS}_train_tokens_per_second", "Loss-carrying answer tokens per second of "
                                  "local work in the last train round", registry=r)
        self.retries = Counter(f"{NS}_transfer_retries", "Transfers interrupted and resumed (dropped link, "
                               "coordinator restart)", registry=r)
        self.sent = Counter(f"{NS}_sent_bytes", "Result bytes sent to the coordinator (never the school's data)",
                            ["kind"], registry=r)
        self.received = Counter(f"{NS}_received_bytes", "Artefact bytes downloaded from the coordinator", registry=r)
        self.lag, self.lag_hist = lag_metrics(r, NS)


class DaemonStatus:
    """The daemon's own account of itself, kept in memory and mirrored to status.json."""

    def __init__(self, state_dir: Path, coordinator: str) -> None:
        self.path = state_dir / STATUS_FILE
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "version": __version__, "started_at": time.time(), "updated_at": time.time(),
            "coordinator": coordinator, "school_id": "", "connected": False, "ever_connected": False,
            "connected_since": None, "last_joined_at": None, "joins": 0, "last_error": "", "last_error_at": None,
            "current": None, "rounds": [], "stopped": None,
            "totals": {"sent_bytes": {}, "results": {}, "received_bytes": 0, "transfer_retries": 0},
        }
        self._rounds: deque[dict[str, Any]] = deque(maxlen=KEEP_ROUNDS)
        previous = read_status(self.path)
        if previous is not None:   # totals and history carry over restarts
            self.data["totals"] = {**self.data["totals"], **previous.get("totals", {})}
            self.data["ever_connected"] = bool(previous.get("ever_connected"))
            self._rounds.extend(previous.get("rounds", [])[-KEEP_ROUNDS:])
            self.data["rounds"] = list(self._rounds)

    def joined(self, school_id: str) -> None:
        now = time.time()
        self.data.update(school_id=school_id, connected=True, ever_connected=True, connected_since=now,
                         last_joined_at=now, joins=self.data["joins"] + 1, last_error="", last_error_at=None)
        self.write()

    def disconnected(self, error: str = "") -> None:
        self.data.update(connected=False, connected_since=None)
        if error:
            self.data.update(last_error=error[:500], last_error_at=time.time())
        self.write()

    def working(self, round_: int, kind: str, phase: str, fraction: float | None = None) -> None:
        self.data["current"] = {"round": round_, "kind": kind, "phase": phase,
                                "progress": None if fraction is None else round(fraction, 3), "since": time.time()}

    def finished(self, round_: int, kind: str, outcome: str, **info: Any) -> None:
        entry = {"round": round_, "kind": kind, "outcome": outcome, "at": time.time(), **info}
        self._rounds.append(entry)
        self.data["rounds"] = list(self._rounds)
        self.data["current"] = None
        if outcome == "delivered" and "bytes" in info:
            sent = self.data["totals"]["sent_bytes"]
            sent[kind] = sent.get(kind, 0) + int(info["bytes"])
            results = self.data["totals"]["results"]
            results[kind] = results.get(kind, 0) + 1
        self.write()

    def evaluated(self, round_: int, accuracy: float, questions: int) -> None:
        self.data["last_evaluation"] = {"round": round_, "accuracy": round(accuracy, 4), "questions": questions,
                                        "at": time.time()}
        self.data["current"] = None
        self.write()

    def add(self, key: str, n: int) -> None:
        self.data["totals"][key] = self.data["totals"].get(key, 0) + n

    def stopped(self, reason: str) -> None:
        self.data.update(stopped={"at": time.time(), "reason": reason}, connected=False, current=None)
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = time.time()
        try:
            atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n", fsync=False)
        except OSError:
            pass   # a full or read-only disk must not stop the daemon; the log says the rest


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by another user (the service account)
    return True


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes under each top-level entry of `root` (files and folders)."""
    out: dict[str, int] = {}
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            continue
        if entry.is_file():
            out[entry.name] = entry.stat().st_size
        elif entry.is_dir():
            out[entry.name + "/"] = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and not p.is_symlink())
    return out


def describe(status: dict[str, Any] | None, state_dir: Path, data_dir: Path, now: float | None = None) -> dict[str, Any]:
    """The admin's view, as a dictionary (`fedclient status --json` prints it)."""
    now = time.time() if now is None else now
    disk = disk_usage(state_dir)
    data_bytes = (sum(p.stat().st_size for p in data_dir.rglob("*.jsonl")) if data_dir.is_dir()
                  else data_dir.stat().st_size if data_dir.is_file() else 0)
    if status is None:
        return {"state": "never started", "running": False, "connected": False, "state_dir": str(state_dir),
                "disk": disk, "data_dir": str(data_dir), "data_bytes": data_bytes}
    age = now - float(status.get("updated_at") or 0)
    running = status.get("stopped") is None and pid_alive(int(status.get("pid") or 0)) and age < STALE_AFTER_S
    connected = running and bool(status.get("connected"))
    if not running:
        state = "stopped" if status.get("stopped") else "not running (no update for {:.0f} s)".format(age)
    elif connected:
        state = "connected"
    elif status.get("ever_connected"):
        state = "running, reconnecting to the coordinator"
    else:
        state = "running, has never reached the coordinator"
    rounds = status.get("rounds", [])
    return {
        "state": state, "running": running, "connected": connected, "school_id": status.get("school_id", ""),
        "coordinator": status.get("coordinator", ""), "pid": status.get("pid"), "version": status.get("version"),
        "updated_s_ago": round(age, 1), "connected_since": status.get("connected_since"),
        "last_error": status.get("last_error", ""), "last_error_at": status.get("last_error_at"),
        "current": status.get("current") if running else None, "last_round": rounds[-1] if rounds else None,
        "last_evaluation": status.get("last_evaluation"),
        "rounds": rounds, "totals": status.get("totals", {}), "stopped": status.get("stopped"),
        "state_dir": str(state_dir), "disk": disk, "data_dir": str(data_dir), "data_bytes": data_bytes,
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = now - t
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def format_status(view: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    stopped = view.get("stopped") or {}
    lines = [f"daemon:      {view['state']}" + (f" (pid {view['pid']})" if view.get("running") else "")
             + (f" {_ago(stopped.get('at'), now)}: {stopped.get('reason', '')}" if stopped and not view.get("running") else "")]
    if view.get("school_id") or view.get("coordinator"):
        lines.append(f"school:      {view.get('school_id') or '(not yet joined)'} -> coordinator {view.get('coordinator')}")
    if view.get("connected"):
        lines.append(f"connected:   since {_ago(view.get('connected_since'), now)}")
    if view.get("last_error"):
        lines.append(f"last error:  {view['last_error']} ({_ago(view.get('last_error_at'), now)})")
    cur = view.get("current")
    if cur:
        prog = f" {cur['progress']:.0%}" if cur.get("progress") is not None else ""
        lines.append(f"now:         round {cur['round']} ({cur['kind']}): {cur['phase']}{prog}")
    last = view.get("last_round")
    if last:
        extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()
                          if k not in ("round", "kind", "outcome", "at", "bytes"))
        sent_text = f", sent {_mb(last['bytes'])}" if last.get("bytes") else ""
        lines.append(f"last round:  {last['round']} ({last['kind']}) {last['outcome']} {_ago(last.get('at'), now)}{sent_text}"
                     + (f"; {extra}" if extra else ""))
    elif "rounds" in view:
        lines.append("last round:  none yet")
    ev = view.get("last_evaluation")
    if ev:
        lines.append(f"evaluation:  round {ev['round']} adapter: accuracy {ev['accuracy']:.3f} on {ev['questions']} of this "
                     f"school's held-out questions ({_ago(ev.get('at'), now)})")
    totals = view.get("totals") or {}
    sent = totals.get("sent_bytes") or {}
    if sent:
        lines.append("uploaded:    " + ", ".join(f"{kind}: {_n(totals.get('results', {}).get(kind, 0), 'result')}, {_mb(n)}"
                                                  for kind, n in sorted(sent.items()))
                     + " (model updates and answer distributions only; never the school's questions)")
    if totals.get("received_bytes"):
        lines.append(f"downloaded:  {_mb(totals['received_bytes'])}; transfers resumed: {totals.get('transfer_retries', 0)}")
    lines.append(f"on disk:     {view['state_dir']}: " + (", ".join(f"{k} {_mb(v)}" for k, v in view["disk"].items()) or "empty"))
    lines.append(f"school data: {view['data_dir']} ({_mb(view['data_bytes'])}; stays here)")
    return "\n".join(lines)
