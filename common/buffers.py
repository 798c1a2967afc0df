"""Tensors as the buffers under them: the whole storage of a view, and runs of pieces that lie
back to back, so that work on many small tensors (a 420-tensor adapter) is done in a few long
reads, writes and operations instead of one per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def storage_view(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole storage under `t`, as a 1-D tensor of `dtype` (t's own by default)."""
    return torch.empty(0, dtype=dtype or t.dtype).set_(t.untyped_storage())


def merge_runs(pieces: Iterable[tuple[tuple[Any, ...], ...]]) -> Iterator[list[list[Any]]]:
    """Pieces laid out along one or more axes at once, each axis given as (where, start,
    length, *extra): consecutive pieces that continue on every axis (the same `where`, starting
    at the previous start + length) are merged into one run, which keeps its first piece's
    extras. Yields each run as [[where, start, length, *extra] per axis] once the next piece
    does not continue it (lazily: a caller may free what it has processed)."""
    run: list[list[Any]] | None = None
    for piece in pieces:
        if run is not None and all(a[0] == p[0] and a[1] + a[2] == p[1] for a, p in zip(run, piece)):
            for a, p in zip(run, piece):
                a[2] += p[2]
            continue
        if run is not None:
            yield run
        run = [list(p) for p in piece]
    if run is not None:
        yield run


def memory_axis(t: torch.Tensor, in_bytes: bool = False) -> tuple[int, int, int, torch.Tensor]:
    """`t` (contiguous) as a merge_runs axis: its storage, its start and its length in elements
    (or bytes), and `t` itself kept as the extra."""
    size = t.element_size() if in_bytes else 1
    return t.untyped_storage().data_ptr(), int(t.storage_offset()) * size, t.numel() * size, t


def joined_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Memory spans (address, bytes) with each one that starts where the previous ends merged
    into it."""
    out: list[tuple[int, int]] = []
    for at, n in spans:
        if out and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((at, n))
    return out
