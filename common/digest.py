"""Content digests of transferred bytes: sha256, and BLAKE3 where both ends have it.

sha256 stays every artefact's identity (its name on disk, in the state, in the protocol). What
the transfers check can be BLAKE3 instead, negotiated: the coordinator offers it in its
JoinResponse (`upload_digests`) and in the `blake3` field of every artefact it announces; a
school that has the `blake3` package checks downloads against that and names its uploads with
it, one that has not (or a coordinator that does not offer it) uses sha256 as before. BLAKE3
took 2.5-2.7 ms against sha256's 10.3-10.7 ms for the 19.6 MB SmolLM2 adapter on the 2-core machine the
benchmarks run on, and a transfer is hashed at both ends (benchmarks/README.md).

Inside the coordinator a digest is one string, "tagged": a sha256 digest is its bare 64 hex
digits (as stored before BLAKE3 existed), any other is "<algorithm>:<64 hex digits>"."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

_blake3: Any
try:   # a wheel on PyPI for the platforms we run on; without it, sha256 only
    import blake3 as _blake3
except ImportError:   # pragma: no cover - exercised by monkeypatching BLAKE3_AVAILABLE
    _blake3 = None

SHA256 = "sha256"
BLAKE3 = "blake3"
BLAKE3_AVAILABLE = _blake3 is not None
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...
    def hexdigest(self) -> str: ...


def _constructors() -> dict[str, Callable[[], Hasher]]:
    made: dict[str, Callable[[], Hasher]] = {SHA256: hashlib.sha256}
    if BLAKE3_AVAILABLE and _blake3 is not None:
        made[BLAKE3] = _blake3.blake3
    return made


def supported() -> tuple[str, ...]:
    """The algorithms this process can compute, fastest first."""
    return tuple(a for a in (BLAKE3, SHA256) if a in _constructors())


def offered() -> tuple[str, ...]:
    """What a coordinator lists in JoinResponse.upload_digests: the algorithms it takes for
    uploads besides sha256 (which it always takes)."""
    return tuple(a for a in supported() if a != SHA256)


def upload_algorithm(offered_by_coordinator: Iterable[str]) -> str:
    """The algorithm a school names its uploads by: BLAKE3 if the coordinator offers it and
    this process has it, else sha256."""
    return BLAKE3 if BLAKE3 in set(offered_by_coordinator) and BLAKE3 in supported() else SHA256


def check_by(sha256: str, blake3: str = "") -> tuple[str, str]:
    """(algorithm, expected hex) to check bytes announced with `sha256` and, perhaps, their
    `blake3`: BLAKE3 when it is given and this process has it, else sha256."""
    return (BLAKE3, blake3) if blake3 and BLAKE3 in supported() else (SHA256, sha256)


def hasher(algorithm: str, data: Any = b"") -> Hasher:
    """A fresh incremental hasher (`update`, `hexdigest`), fed `data` first."""
    try:
        h = _constructors()[algorithm]()
    except KeyError:
        raise ValueError(f"digest algorithm {algorithm!r} is not available here (have: {', '.join(supported())})") from None
    if len(data):
        h.update(data)
    return h


def tag(algorithm: str, hex_digest: str) -> str:
    """The one-string form: bare hex for sha256, '<algorithm>:<hex>' otherwise."""
    return hex_digest if algorithm == SHA256 else f"{algorithm}:{hex_digest}"


def split(tagged: str) -> tuple[str, str]:
    """(algorithm, hex) of a tagged digest. Only a known tag counts as one: any other string
    is taken for a sha256 digest (and fails as one if it is not)."""
    if tagged.startswith(BLAKE3 + ":"):
        return BLAKE3, tagged[len(BLAKE3) + 1:]
    return SHA256, tagged


def well_formed(tagged: str) -> bool:
    algorithm, hex_digest = split(tagged)
    return algorithm in (SHA256, BLAKE3) and _HEX64.match(hex_digest) is not None


def of(data: Any, algorithm: str) -> str:
    """The tagged digest of `data` (bytes, bytearray or a contiguous memoryview)."""
    return tag(algorithm, hasher(algorithm, data).hexdigest())


def same_algorithm(data: Any, tagged: str) -> str:
    """The tagged digest of `data` in the algorithm of `tagged` (to compare the two)."""
    return of(data, split(tagged)[0])


def short(tagged: str) -> str:
    """For messages: '3f2a9c01b2e4…' or 'blake3:3f2a9c01b2e4…'."""
    algorithm, hex_digest = split(tagged)
    return tag(algorithm, hex_digest[:12]) + "…"
