"""Shared monitoring parts: listen addresses, the Prometheus HTTP endpoint (prometheus-client's
own server, on a thread: it answers even while the event loop is stalled, which the lag metric
then shows), and an event-loop lag probe."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:port') -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port {port!r} is not a number (in {value!r})") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range (in {value!r})")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve to anything


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class HttpEndpoint:
    """A running HTTP server on a thread; close() stops it."""

    url: str
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(listen: str, registry: CollectorRegistry) -> HttpEndpoint:
    """Serve `registry` at http://listen/metrics. OSError (port in use...) says which address."""
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    bound = server.server_address[1]
    return HttpEndpoint(f"http://{url_host(host)}:{bound}/metrics", server, thread)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lag_metrics(registry: CollectorRegistry, prefix: str) -> tuple[Gauge, Histogram]:
    gauge = Gauge(f"{prefix}_event_loop_lag_seconds", "How late the event loop woke the last lag probe "
                  "(a busy or blocked loop delays every RPC)", registry=registry)
    hist = Histogram(f"{prefix}_event_loop_lag_probe_seconds", "Event-loop lateness per probe",
                     buckets=LAG_BUCKETS, registry=registry)
    return gauge, hist


async def probe_loop_lag(gauge: Gauge, hist: Histogram, every_s: float = 0.5,
                         on_sample: Callable[[float], None] | None = None) -> None:
    """Sleep `every_s` over and over and record how late each wake-up is, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        late = max(0.0, loop.time() - due)
        gauge.set(late)
        hist.observe(late)
        if on_sample is not None:
            on_sample(late)
