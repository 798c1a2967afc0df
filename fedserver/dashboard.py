"""The coordinator's live dashboard: one read-only page (no build step, nothing fetched from
the internet: the HTML, CSS, JavaScript and SVG plots are all in fedserver/dashboard.html),
its data as JSON at /api/state, and the same pushed as server-sent events at /api/events.

Served by aiohttp on the coordinator's event loop, on a port of its own ([monitor]
dashboard_listen). Bound beyond loopback it needs an operator token (dashboard_token_file),
given as `?token=` or `Authorization: Bearer`."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from common import __version__
from common.errors import ConfigError
from common.logs import get_logger
from common.monitoring import parse_listen, url_host
from fedserver.report import build_report

if TYPE_CHECKING:
    from fedserver.engine import RoundEngine

PAGE = (Path(__file__).parent / "dashboard.html").read_text()
PUSH_EVERY_S = 1.0
KEEPALIVE_S = 15.0
MIN_TOKEN_CHARS = 16


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"[monitor] dashboard_token_file {path}: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"[monitor] dashboard_token_file {path}: use a random secret of at least {MIN_TOKEN_CHARS} "
                          "characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def live_part(engine: RoundEngine) -> dict[str, Any]:
    """What is happening now; read on the event loop (the engine's dictionaries live there)."""
    cfg = engine.cfg
    rnd = engine.current
    now = time.monotonic()
    schools = []
    participants = set(rnd.participants) if rnd is not None else set()   # a list: `in` per school was O(participants)
    for entry in cfg.schools:
        sess = engine.sessions.get(entry.id)
        participant = entry.id in participants
        if rnd is not None and entry.id in rnd.accepted:
            state = "result accepted"
        elif rnd is not None and entry.id in rnd.failed:
            state = "failed"
        elif sess is None:
            state = "offline"
        elif participant:
            state = "working"
        else:
            state = "idle"
        schools.append({
            "id": entry.id, "connected": sess is not None, "participant": participant, "state": state,
            "progress": sess.progress if sess is not None else "",
            "failure": rnd.failed.get(entry.id, "") if rnd is not None else "",
            "seen_s_ago": round(now - sess.last_seen, 1) if sess is not None else None,
        })
    planning = engine.planning if rnd is None else None   # (number, kind) while the next round is planned
    return {
        "time": time.time(),
        "phase": engine.phase,
        "round": rnd.number if rnd else planning[0] if planning else None,
        "kind": rnd.kind if rnd else planning[1] if planning else None,
        "deadline_in_s": round(rnd.deadline - time.time(), 1) if rnd and rnd.deadline else None,
        "participants": len(rnd.participants) if rnd else 0,
        "accepted": len(rnd.accepted) if rnd else 0,
        "connected": len(engine.sessions),
        "schools": schools,
        "failures": [n.as_dict() for n in reversed(engine.metrics.recent)],
    }


def settings_part(engine: RoundEngine) -> dict[str, Any]:
    cfg = engine.cfg
    teacher = None
    if cfg.teacher.model:
        teacher = {"model": cfg.teacher.model, "backend": cfg.teacher.backend, "quantization": cfg.teacher.quantization}
    return {
        "version": __version__,
        "model": cfg.model.base,
        "strategy": {"name": cfg.strategy.name, "options": dict(cfg.strategy.options),
                     "wrappers": [dict(w) for w in cfg.strategy.wrappers]},
        "schedule": list(cfg.schedule.rounds),
        "rounds": {"total": cfg.rounds.total, "min_schools": cfg.rounds.min_schools, "quorum": cfg.rounds.quorum,
                   "fraction": cfg.rounds.fraction, "deadline_s": cfg.rounds.deadline_s},
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha},
        "train": {"local_steps": cfg.train.local_steps, "learning_rate": cfg.train.learning_rate},
        "teacher": teacher,
        "distill": ({"slice_size": cfg.distill.slice_size, "kd_weight": cfg.distill.kd_weight,
                     "ensemble": cfg.distill.ensemble} if teacher else None),
        "enrolled": len(cfg.schools),
        "eval_file": bool(cfg.evaluation.eval_file),
    }


def history_part(engine: RoundEngine) -> dict[str, Any]:
    """Rounds and evaluations from the state database (on a worker thread)."""
    cfg = engine.cfg
    teacher = (cfg.teacher.model, cfg.teacher.quantization) if cfg.teacher.model else None
    report = build_report(engine.store, cfg.model.base, str(cfg.evaluation.eval_file or ""), teacher)
    series: dict[str, list[list[float | None]]] = {}
    for e in engine.store.evals():   # ordered by round
        m = e["metrics"]
        if "accuracy" in m and e["num_examples"] > 0:
            series.setdefault(e["source"], []).append([e["round"], m["accuracy"], m.get("loss")])
    rounds = [{k: r.get(k) for k in ("round", "kind", "status", "accepted", "eval_accuracy", "eval_loss",
                                     "school_eval_accuracy", "train_loss", "bytes_up", "bytes_down", "seconds")}
              | {"participants": len(r["participants"]), "failures": r["failures"]}
              for r in report["rounds"]]
    return {"rounds": rounds, "evals": series, "base_accuracy": report["base_eval_accuracy"],
            "eval_count": report["eval_set"]["count"]}


class Dashboard:
    def __init__(self, engine: RoundEngine, token: str | None) -> None:
        self.engine = engine
        self.token = token
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._cache: tuple[float, str] = (0.0, "")
        self._cache_lock = asyncio.Lock()
        self.log = get_logger("dashboard")

    @classmethod
    async def start(cls, engine: RoundEngine, listen: str, token: str | None) -> Dashboard:
        dash = cls(engine, token)
        app = web.Application(middlewares=[dash._guard])
        app.router.add_get("/", dash._page)
        app.router.add_get("/api/state", dash._state)
        app.router.add_get("/api/events", dash._events)
        app.router.add_get("/healthz", dash._health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = parse_listen(listen)
        site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot serve the dashboard on {listen}: {exc.strerror or exc}") from None
        dash._runner = runner
        bound = runner.addresses[0][1]
        dash.url = f"http://{url_host(host)}:{bound}/"
        return dash

    async def close(self) -> None:
        for t in list(self._streams):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- access
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET"], text="this dashboard is read-only\n")
        if self.token is not None and request.path != "/healthz":
            given = request.query.get("token", "")
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[7:]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(text="this dashboard needs the operator token: open it as /?token=<the secret "
                                                "in [monitor] dashboard_token_file>\n")
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # ---- handlers
    async def _page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'")
        return web.Response(text=PAGE.replace("{{NONCE}}", nonce), content_type="text/html",
                            headers={"Content-Security-Policy": csp})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "phase": self.engine.phase})

    async def snapshot(self) -> str:
        """The whole state as JSON, computed at most once per PUSH_EVERY_S for all viewers."""
        async with self._cache_lock:
            at, text = self._cache
            if time.monotonic() - at < PUSH_EVERY_S * 0.9 and text:
                return text
            live = live_part(self.engine)
            history = await asyncio.to_thread(history_part, self.engine)
            text = json.dumps({"live": live, "settings": settings_part(self.engine), "history": history},
                              default=_json_default)
            self._cache = (time.monotonic(), text)
            return text

    async def _state(self, request: web.Request) -> web.Response:
        return web.Response(text=await self.snapshot(), content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        last, quiet_since = "", time.monotonic()
        try:
            while True:
                text = await self.snapshot()
                if text != last:
                    await resp.write(f"data: {text}\n\n".encode())
                    last, quiet_since = text, time.monotonic()
                elif time.monotonic() - quiet_since > KEEPALIVE_S:
                    await resp.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                await asyncio.sleep(PUSH_EVERY_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
        return resp


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
