"""What an idle connection, and an idle stream on it, cost a bare grpc.aio server in memory.

The coordinator holds one Session stream per connected school (docs/SCALING.md). This measures
the floor under it: a bare `grpc.aio` server with the project's channel options and one
stream-stream method that echoes, and N clients in other processes that each open their own
connection and either one call that has sent and received one message (the shape of an idle
Session), or no call at all (`--no-call`: the connection alone). It reports the server's RSS
growth per connection (KB of 1024 bytes, as docs/SCALING.md counts), and with `--python-memory` the part of it that is Python objects
(tracemalloc, which itself inflates RSS: take the two figures from separate runs).

    .venv/bin/python -m benchmarks.stream_floor [--connections 2000] [--no-call] [--python-memory]
        [--option grpc.http2.hpack_table_size.decoder=0 ...] [--json FILE]

Imports neither torch nor the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import grpc

# common.wire.grpc_options() (not imported: common.wire imports torch)
OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]
METHOD = "/floor.Echo/Session"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def _serve(extra: list[tuple[str, Any]], python_memory: bool, to_parent: Any, from_parent: Any) -> None:
    server = grpc.aio.server(options=OPTIONS + extra)

    async def session(requests: Any, context: Any) -> Any:
        async for message in requests:
            yield message

    handler = grpc.method_handlers_generic_handler("floor.Echo", {"Session": grpc.stream_stream_rpc_method_handler(session)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    if python_memory:
        import tracemalloc

        tracemalloc.start()
    to_parent.put(port)
    while True:
        what = await loop.run_in_executor(None, from_parent.get)
        if what == "mark" and python_memory:
            import tracemalloc

            to_parent.put(tracemalloc.get_traced_memory()[0])
        elif what == "mark":
            to_parent.put(0)
        else:
            break
    await server.stop(0)


def _server_main(extra: list[tuple[str, Any]], python_memory: bool, to_parent: Any, from_parent: Any) -> None:
    asyncio.run(_serve(extra, python_memory, to_parent, from_parent))


async def _clients(port: int, n: int, call: bool, ready: Any, stop: Any) -> None:
    held: list[Any] = []
    for _ in range(n):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS + [("grpc.use_local_subchannel_pool", 1)])
        if call:
            stream = channel.stream_stream(METHOD)()
            await stream.write(b"hello")
            await stream.read()
            held.append(stream)
        else:
            await channel.channel_ready()
        held.append(channel)
    ready.put(n)
    await asyncio.get_running_loop().run_in_executor(None, stop.get)


def _client_main(port: int, n: int, call: bool, ready: Any, stop: Any) -> None:
    asyncio.run(_clients(port, n, call, ready, stop))


def measure(connections: int, procs: int = 2, call: bool = True, extra: list[tuple[str, Any]] | None = None,
            python_memory: bool = False, settle_s: float = 3.0) -> dict[str, Any]:
    """The server's RSS (and, with python_memory, traced Python bytes) per client connection."""
    need = connections // procs + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, connections + 64) > hard:
        raise SystemExit(f"{connections} connections need {connections + 64} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, connections + 64), hard))   # inherited by the children
    ctx = mp.get_context("spawn")   # gRPC does not survive a fork once its threads run
    to_parent, to_server, ready, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=_server_main, args=(extra or [], python_memory, to_parent, to_server))
    server.start()
    clients: list[Any] = []
    try:
        port = to_parent.get(timeout=60)
        time.sleep(1.0)
        to_server.put("mark")
        py0 = to_parent.get(timeout=60)
        rss0 = rss_kib(server.pid)
        per = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
        clients = [ctx.Process(target=_client_main, args=(port, n, call, ready, stop)) for n in per if n]
        for c in clients:
            c.start()
        for _ in clients:
            ready.get(timeout=max(120.0, need / 20))
        time.sleep(settle_s)
        rss1 = rss_kib(server.pid)
        to_server.put("mark")
        py1 = to_parent.get(timeout=60)
    finally:
        for _ in clients:
            stop.put(1)
        for c in clients:
            c.join(30)
        to_server.put("stop")
        server.join(30)
        for p in (server, *clients):
            if p.is_alive():
                p.kill()
    return {"connections": connections, "call_per_connection": call, "options": [list(o) for o in extra or []],
            "server_rss_start_kib": rss0, "server_rss_kib": rss1,
            # KB = 1024 bytes, as benchmarks/scale_bench.py and docs/SCALING.md count them
            "rss_kb_per_connection": (rss1 - rss0) / connections,
            "python_kb_per_connection": (py1 - py0) / 1024 / connections if python_memory else None,
            "grpcio": grpc.__version__, "python": sys.version.split()[0]}


def _option(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"--option takes NAME=VALUE, got {text!r}")
    return name, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--no-call", action="store_true", help="connections only, no stream on them")
    p.add_argument("--python-memory", action="store_true", help="also the Python objects' share (tracemalloc)")
    p.add_argument("--option", type=_option, action="append", default=[], help="a server channel option NAME=VALUE")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    r = measure(args.connections, args.procs, not args.no_call, args.option, args.python_memory)
    what = "connections" if args.no_call else "connections with one idle stream each"
    line = f"{r['connections']} {what}: server RSS +{r['rss_kb_per_connection']:.1f} KB per connection"
    if r["python_kb_per_connection"] is not None:
        line += f", of which Python objects {r['python_kb_per_connection']:.1f} KB (RSS inflated by tracemalloc)"
    print(line + (f"; options {args.option}" if args.option else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    raise SystemExit(main())
