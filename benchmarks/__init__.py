"""Benchmarks: each module runs with `python -m benchmarks.NAME`; results in README.md."""

from __future__ import annotations

import json
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
