"""Benchmarks: each module runs with `python -m benchmarks.NAME`; results in README.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_results(table: str, result: dict[str, Any], json_path: Path | None) -> None:
    """The table on stdout, and the raw numbers as JSON when asked for."""
    print()
    print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {json_path}")
