"""What an idle connection, and an idle stream on it, cost a bare grpc.aio server in memory.

The coordinator holds one Session stream per connected school (docs/SCALING.md). This measures
the floor under it: a bare `grpc.aio` server with the project's channel options and one
stream-stream method that echoes, and N clients in other processes that each open their own
connection and either one call that has sent and received one message (the shape of an idle
Session), or no call at all (`--no-call`: the connection alone). It reports the server's RSS
growth per connection (KB of 1024 bytes, as docs/SCALING.md counts), and with `--python-memory` the part of it that is Python objects
(tracemalloc, which itself inflates RSS: take the two figures from separate runs).

    .venv/bin/python -m benchmarks.stream_floor [--connections 2000] [--no-call] [--python-memory]
        [--fanout] [--writes] [--option grpc.http2.hpack_table_size.decoder=0 ...] [--json FILE]

`--fanout` then writes one small message to every stream at once (as the coordinator sends a
command to every school) and reports when the server's last write returned and when the last
client had it: the floor under the coordinator's fan-out (docs/SCALING.md).

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
COMMAND = b"\x0a\x26" + b"c" * 38   # a small command, about an EvaluateCommand's size


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def _serve(extra: list[tuple[str, Any]], python_memory: bool, to_parent: Any, from_parent: Any,
                 writes: bool = False) -> None:
    server = grpc.aio.server(options=OPTIONS + extra)
    command = asyncio.Event()   # "fanout": every stream is sent one command
    sent: list[float] = []      # when each stream's write of it returned

    async def session(requests: Any, context: Any) -> Any:   # an async generator, as the coordinator's
        async for message in requests:
            yield message   # the hello, echoed: the stream is up
            break
        await command.wait()
        yield COMMAND
        sent.append(time.time())
        async for _ in requests:   # held until the client ends it
            pass

    async def session_writes(requests: Any, context: Any) -> None:   # context.read() / context.write()
        await context.write(await context.read())
        await command.wait()
        await context.write(COMMAND)
        sent.append(time.time())
        while await context.read() is not grpc.aio.EOF:
            pass

    method = grpc.stream_stream_rpc_method_handler(session_writes if writes else session)
    handler = grpc.method_handlers_generic_handler("floor.Echo", {"Session": method})
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
        elif what == "fanout":
            start = time.time()
            command.set()
            expected = await loop.run_in_executor(None, from_parent.get)   # the number of streams
            while len(sent) < expected:
                await asyncio.sleep(0.005)
            to_parent.put((start, max(sent)))
        else:
            break
    await server.stop(0)


def _server_main(extra: list[tuple[str, Any]], python_memory: bool, to_parent: Any, from_parent: Any,
                 writes: bool) -> None:
    asyncio.run(_serve(extra, python_memory, to_parent, from_parent, writes))


async def _clients(port: int, n: int, call: bool, ready: Any, stop: Any) -> None:
    held: list[Any] = []
    streams: list[Any] = []
    for _ in range(n):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS + [("grpc.use_local_subchannel_pool", 1)])
        if call:
            stream = channel.stream_stream(METHOD)()
            await stream.write(b"hello")
            await stream.read()
            streams.append(stream)
        else:
            await channel.channel_ready()
        held.append(channel)

    async def command(stream: Any) -> float:
        got = await stream.read()
        if got != COMMAND:
            raise RuntimeError(f"expected the command, got {got!r}")
        return time.time()

    waiting = [asyncio.ensure_future(command(s)) for s in streams]
    ready.put(n)
    await asyncio.get_running_loop().run_in_executor(None, stop.get)   # (a fan-out, if any, lands meanwhile)
    done = [t.result() for t in waiting if t.done() and not t.cancelled() and t.exception() is None]
    ready.put((len(done), max(done, default=0.0)))
    for t in waiting:
        t.cancel()
    for s in streams:
        s.cancel()


def _client_main(port: int, n: int, call: bool, ready: Any, stop: Any) -> None:
    asyncio.run(_clients(port, n, call, ready, stop))


def measure(connections: int, procs: int = 2, call: bool = True, extra: list[tuple[str, Any]] | None = None,
            python_memory: bool = False, settle_s: float = 3.0, fanout: bool = False,
            writes: bool = False) -> dict[str, Any]:
    """The server's RSS (and, with python_memory, traced Python bytes) per client connection.
    `fanout` (streams only): then one small message is written to every stream at once; how
    long until the server's last write returned, and until the last client had it. `writes`:
    the server's handler uses context.read() / context.write(), not an async generator."""
    need = connections // procs + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, connections + 64) > hard:
        raise SystemExit(f"{connections} connections need {connections + 64} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, connections + 64), hard))   # inherited by the children
    ctx = mp.get_context("spawn")   # gRPC does not survive a fork once its threads run
    to_parent, to_server, ready, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=_server_main, args=(extra or [], python_memory, to_parent, to_server, writes))
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
        fan: dict[str, Any] | None = None
        if fanout and call:
            to_server.put("fanout")
            to_server.put(connections)
            start, last_write = to_parent.get(timeout=max(120.0, connections / 50))
            time.sleep(settle_s)
    finally:
        for _ in clients:
            stop.put(1)
        got = [ready.get(timeout=60) for _ in clients] if clients else []
        for c in clients:
            c.join(30)
        to_server.put("stop")
        server.join(30)
        for p in (server, *clients):
            if p.is_alive():
                p.kill()
    if fanout and call:
        received = sum(n for n, _ in got)
        fan = {"streams": connections, "received": received, "last_write_s": last_write - start,
               "last_received_s": max(t for _, t in got) - start if received else None}
    return {"connections": connections, "call_per_connection": call, "options": [list(o) for o in extra or []],
            "fanout": fan if fanout and call else None,
            "handler": "context.read/write" if writes else "async generator",
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
    p.add_argument("--fanout", action="store_true", help="then write one message to every stream at once and time it")
    p.add_argument("--writes", action="store_true",
                   help="the server's handler calls context.read()/write() instead of being an async generator")
    p.add_argument("--option", type=_option, action="append", default=[], help="a server channel option NAME=VALUE")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    r = measure(args.connections, args.procs, not args.no_call, args.option, args.python_memory, fanout=args.fanout,
                writes=args.writes)
    what = "connections" if args.no_call else "connections with one idle stream each"
    line = f"{r['connections']} {what}: server RSS +{r['rss_kb_per_connection']:.1f} KB per connection"
    if r["python_kb_per_connection"] is not None:
        line += f", of which Python objects {r['python_kb_per_connection']:.1f} KB (RSS inflated by tracemalloc)"
    print(line + (f"; options {args.option}" if args.option else ""))
    if r["fanout"] is not None:
        f = r["fanout"]
        print(f"fan-out of one message to {f['streams']} streams: the server's last write returned after "
              f"{f['last_write_s']:.3f} s; {f['received']} received, the last after {f['last_received_s']:.3f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    raise SystemExit(main())
