"""The coordinator's Prometheus metrics, and start-up of what the operator sees (the /metrics
endpoint and the live dashboard, each on its own port; see [monitor] in coordinator.toml).

Counts that the state database holds (rounds by kind and outcome, the latest evaluations,
enrolled schools) are read from it at scrape time, so they agree with `fedserver status` and
survive restarts; what only this process sees (bytes on the wire, uploads, timings, refusals,
event-loop lag) is counted as it happens."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common import __version__
from common.files import atomic_write_text
from common.logs import get_logger
from common.monitoring import HttpEndpoint, lag_metrics, probe_loop_lag, serve_metrics

if TYPE_CHECKING:
    from fedserver.engine import RoundEngine

NS = "schoolfed"
ROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
FAST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FAILURE_PHASES = ("download", "train", "distill", "teach", "evaluate", "upload", "command")
RECENT_FAILURES = 50


def reason_label(exc: BaseException) -> str:
    """A bounded label for a refusal: the error's class, snake_case, without 'Error'."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class FailureNote:
    """A recent failure for the dashboard: who, which round, what, why (school text is cut)."""

    at: float
    school: str
    round: int
    what: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "school": self.school, "round": self.round, "what": self.what, "reason": self.reason}


class _StateCollector(Collector):
    """Families read from the state database (and the engine's sessions) at scrape time."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        eng = self.m.engine
        if eng is None:
            return
        store = eng.store
        rounds = CounterMetricFamily(f"{NS}_rounds", "Rounds closed, by kind and outcome (from the state database)",
                                     labels=["kind", "outcome"])
        counts = store.round_counts()   # store.rounds() parsed every round's participants and plan per scrape
        for (kind, status), n in sorted(counts.items()):
            rounds.add_metric([kind, status], n)
        yield rounds
        acc = GaugeMetricFamily(f"{NS}_eval_accuracy", "Held-out accuracy of the newest evaluated round: source=server "
                                "(the coordinator's eval set), schools (example-weighted mean of the schools' own "
                                "held-out questions), teacher", labels=["source"])
        loss = GaugeMetricFamily(f"{NS}_eval_loss", "Held-out loss (mean negative log-likelihood of the right option) "
                                 "of the newest evaluated round", labels=["source"])
        which = GaugeMetricFamily(f"{NS}_eval_round", "Which round the eval_accuracy and eval_loss series describe "
                                  "(0 = the base model)", labels=["source"])
        evals = store.evals()   # one read per scrape, shared by the families below
        for source, (number, a, lo) in sorted(latest_evals(evals).items()):
            acc.add_metric([source], a)
            if lo is not None:
                loss.add_metric([source], lo)
            which.add_metric([source], number)
        yield acc
        yield loss
        yield which
        if self.m.school_labels:
            per = GaugeMetricFamily(f"{NS}_school_connected", "1 while the school holds a session (opted in: "
                                    "[monitor] school_labels)", labels=["school"])
            sessions = set(eng.sessions)
            for s in eng.cfg.schools:
                per.add_metric([s.id], 1.0 if s.id in sessions else 0.0)
            yield per
            school_acc = GaugeMetricFamily(f"{NS}_school_eval_accuracy", "Each school's newest accuracy on its own "
                                           "held-out questions (opted in: [monitor] school_labels)", labels=["school"])
            for source, (_, a, _lo) in sorted(latest_evals(evals, per_school=True).items()):
                school_acc.add_metric([source], a)
            yield school_acc


def latest_evals(evals: list[dict[str, Any]], per_school: bool = False) -> dict[str, tuple[int, float, float | None]]:
    """source -> (round, accuracy, loss) of the newest round evaluated. With per_school, the
    schools one by one; otherwise 'server', 'teacher' and 'schools' (their example-weighted
    mean over the newest round any school reported)."""
    out: dict[str, tuple[int, float, float | None]] = {}
    by_round: dict[int, list[dict[str, Any]]] = {}
    for e in evals:   # ordered by round
        m = e["metrics"]
        if "accuracy" not in m:
            continue
        if e["source"] in ("server", "teacher"):
            if not per_school:
                out[e["source"]] = (e["round"], float(m["accuracy"]), m.get("loss"))
        elif per_school:
            out[e["source"]] = (e["round"], float(m["accuracy"]), m.get("loss"))
        elif e["num_examples"] > 0:
            by_round.setdefault(e["round"], []).append(e)
    if by_round and not per_school:
        number = max(by_round)
        rows = by_round[number]
        n = sum(e["num_examples"] for e in rows)
        a = sum(e["metrics"]["accuracy"] * e["num_examples"] for e in rows) / n
        lo = (sum(e["metrics"]["loss"] * e["num_examples"] for e in rows) / n
              if all("loss" in e["metrics"] for e in rows) else None)
        out["schools"] = (number, a, lo)
    return out


class CoordinatorMetrics:
    """One registry per coordinator (tests run several in one process). The engine and the
    servicer call the small hooks below; nothing here blocks."""

    def __init__(self, school_labels: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.school_labels = school_labels
        self.engine: RoundEngine | None = None
        r = self.registry
        Info(f"{NS}_build", "The coordinator's version", registry=r).info({"version": __version__})
        self.round_seconds = Histogram(f"{NS}_round_duration_seconds", "Wall time of a round, from its command to "
                                       "its commit or failure", ["kind", "outcome"], buckets=ROUND_BUCKETS, registry=r)
        self.phase_seconds = Histogram(f"{NS}_round_phase_duration_seconds", "Wall time of each phase of a round: plan "
                                       "(e.g. the teacher labels a pack), collect (schools work and upload), commit "
                                       "(aggregation and the checkpoint)", ["kind", "phase"], buckets=ROUND_BUCKETS,
                                       registry=r)
        self.current_round = Gauge(f"{NS}_current_round", "The open round's number (0 between rounds)", registry=r)
        self.participants = Gauge(f"{NS}_round_participants", "Schools asked to take part in the open round", registry=r)
        self.accepted = Gauge(f"{NS}_round_results_accepted", "Results accepted so far in the open round", registry=r)
        self.connected = Gauge(f"{NS}_schools_connected", "Schools holding a session now", registry=r)
        self.enrolled = Gauge(f"{NS}_schools_enrolled", "Schools enrolled in coordinator.toml", registry=r)
        self.uploads = Counter(f"{NS}_uploads_accepted", "Results accepted (receipted), by round kind", ["kind"], registry=r)
        self.refused = Counter(f"{NS}_uploads_refused", "Upload attempts refused, by reason (wrong_round, duplicate_upload, "
                               "checksum, too_large, validation, protocol, ...)", ["reason"], registry=r)
        self.rpc_refused = Counter(f"{NS}_rpc_refusals", "Calls answered with an error status, by method and status code",
                                   ["method", "code"], registry=r)
        self.school_failures = Counter(f"{NS}_school_failures", "Failures the schools reported, by phase",
                                       ["phase"], registry=r)
        self.bytes_received = Counter(f"{NS}_received_bytes", "Payload bytes received from schools (uploads)", registry=r)
        self.bytes_sent = Counter(f"{NS}_sent_bytes", "Payload bytes sent to schools (adapter and pack downloads)",
                                  registry=r)
        self.validation_seconds = Histogram(f"{NS}_upload_validation_seconds", "Checking a complete upload (hash, "
                                            "shapes, values) before its receipt", ["kind"], buckets=FAST_BUCKETS,
                                            registry=r)
        self.fold_seconds = Histogram(f"{NS}_aggregation_fold_seconds", "Folding one accepted result into the round's "
                                      "aggregate", ["kind"], buckets=FAST_BUCKETS, registry=r)
        self.commit_seconds = Histogram(f"{NS}_aggregation_commit_seconds", "Closing a round: the strategy's finalize "
                                        "(or the teacher's learning) and the new artefact", ["kind"],
                                        buckets=FAST_BUCKETS, registry=r)
        self.quarantined = Counter(f"{NS}_state_files_quarantined", "Files read back from the state directory that "
                                   "failed verification (the sha256 recorded for them, or their values) and were moved "
                                   "to STATE_DIR/quarantine, by what they held", ["what"], registry=r)
        self.global_fallbacks = Counter(f"{NS}_global_adapter_fallbacks", "Times the global adapter of record was lost "
                                        "(damaged, no intact copy) and the federation continued from an older one",
                                        registry=r)
        self.lag, self.lag_hist = lag_metrics(r, NS)
        if school_labels:
            self.school_uploads = Counter(f"{NS}_school_uploads_accepted", "Results accepted per school (opted in: "
                                          "[monitor] school_labels)", ["school"], registry=r)
        self.recent: deque[FailureNote] = deque(maxlen=RECENT_FAILURES)
        r.register(_StateCollector(self))

    def bind(self, engine: RoundEngine) -> None:
        self.engine = engine
        self.enrolled.set(len(engine.cfg.schools))
        self.connected.set_function(lambda: len(engine.sessions))

    # ---- hooks
    def note_failure(self, school: str, round_: int, what: str, reason: str) -> None:
        self.recent.append(FailureNote(time.time(), school, round_, what, reason[:300]))

    def school_failure(self, school: str, round_: int, phase: str, message: str) -> None:
        self.school_failures.labels(phase if phase in FAILURE_PHASES else "other").inc()
        self.note_failure(school, round_, f"school reported ({phase[:40]})", message)

    def refusal(self, method: str, code: str, exc: BaseException, school: str = "") -> None:
        self.rpc_refused.labels(method, code).inc()
        if method in ("Upload", "UploadStatus"):
            self.refused.labels(reason_label(exc)).inc()
            self.note_failure(school, 0, f"{method} refused ({code})", str(exc))

    def upload_accepted(self, kind: str, school: str, validate_s: float, fold_s: float) -> None:
        self.uploads.labels(kind).inc()
        self.validation_seconds.labels(kind).observe(validate_s)
        self.fold_seconds.labels(kind).observe(fold_s)
        if self.school_labels:
            self.school_uploads.labels(school).inc()


@dataclass
class Monitor:
    """The running endpoints; close() stops them."""

    metrics: HttpEndpoint | None = None
    dashboard: Any = None   # fedserver.dashboard.Dashboard
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def urls(self) -> dict[str, str]:
        return {"metrics": self.metrics.url if self.metrics else "",
                "dashboard": self.dashboard.url if self.dashboard else ""}

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.dashboard is not None:
            await self.dashboard.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)


async def start_monitor(engine: RoundEngine, state_dir: Path) -> Monitor:
    """Start what [monitor] asks for; writes STATE_DIR/monitor.json with the URLs. A port that
    cannot be bound is a configuration error (the operator picks another or turns it off)."""
    from common.errors import ConfigError
    from fedserver.dashboard import Dashboard, read_token

    cfg = engine.cfg.monitor
    log = get_logger("monitor")
    mon = Monitor()
    mon.tasks.append(asyncio.create_task(probe_loop_lag(engine.metrics.lag, engine.metrics.lag_hist)))
    try:
        if cfg.metrics_listen:
            mon.metrics = await asyncio.to_thread(serve_metrics, cfg.metrics_listen, engine.metrics.registry)
        if cfg.dashboard_listen:
            token = read_token(cfg.dashboard_token_file) if cfg.dashboard_token_file else None
            mon.dashboard = await Dashboard.start(engine, cfg.dashboard_listen, token)
    except OSError as exc:
        await mon.close()
        raise ConfigError(f"[monitor] {exc}; choose another port or set it to '' to turn it off") from None
    urls = mon.urls()
    await asyncio.to_thread(atomic_write_text, state_dir / "monitor.json", json.dumps(urls) + "\n")
    if any(urls.values()):
        log.info("monitoring", **{k: v for k, v in urls.items() if v})
    return mon
