"""Benchmarks: each module runs with `python -m benchmarks.NAME`; results in README.md."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import Any


def status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, ...); {} where there is none."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def print_results(table: str, result: dict[str, Any], json_path: Path | None) -> None:
    """The table on stdout, and the raw numbers as JSON when asked for."""
    print()
    print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {json_path}")


def timed(obj: Any, name: str, label: str, times: dict[str, list[float]]) -> Any:
    """Wrap `obj.name` (a function or coroutine function) so that each call's wall time is
    appended to times[label]; returns the original, for the caller to put back."""
    fn = getattr(obj, name)
    wrapper: Any
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - t)
    else:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - t)
    setattr(obj, name, wrapper)
    return fn
