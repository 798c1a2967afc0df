"""What a school may send: the length and form of every field it chooses, checked once where
the servicer unpacks a message, before anything else reads it. A field out of bounds is refused
with INVALID_ARGUMENT (ProtocolError) naming the field and what is allowed, without echoing
the value. No string a school sends is used as a path or handed to a filesystem call; the
model a school names is compared as text (docs/HARDENING.md).

Numbers a school reports about its work (num_examples, metrics) have their own bounds in
fedserver/validation.py; this module checks the strings and the counts that have no other check."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common import digest
from common.errors import ProtocolError
from common.messages import Capabilities, Event, Failure, Progress, UploadHeader
from common.models import parse_spec

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")   # as common.models reads a bare hub id
_SPEC_KINDS = ("hub", "dir", "gguf", "packaged")


@dataclass(frozen=True)
class Rule:
    max_len: int
    allowed: str                       # said in the refusal: what the field may hold
    form: re.Pattern[str] | None = None   # None: printable text (see `multiline`)
    min_len: int = 0
    multiline: bool = False            # free text that may hold line breaks and tabs


# Each field a school fills, by the name its refusal gives it.
NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
RULES: dict[str, Rule] = {
    "capabilities.model": Rule(512, "a model spec of printable characters (e.g. packaged:smollm2-135m-instruct)"),
    "capabilities.hardware": Rule(200, "printable text (e.g. 'cpu x8, 32 GiB')"),
    "capabilities.client_version": Rule(64, "letters, digits and '.+-_'", re.compile(r"[A-Za-z0-9.+_-]*\Z")),
    "progress.phase": Rule(32, "a lower-case name (letters, digits, '_' or '-')", NAME, min_len=1),
    "progress.detail": Rule(200, "printable text"),
    "failure.phase": Rule(32, "a lower-case name (letters, digits, '_' or '-')", NAME, min_len=1),
    "failure.message": Rule(1000, "text without control characters other than line breaks and tabs", multiline=True),
    "upload_id": Rule(128, "letters, digits, '-' or '_'", re.compile(r"[A-Za-z0-9_-]+\Z"), min_len=1),
    "sha256": Rule(64, "a sha256 hex digest (64 lower-case hex digits)", re.compile(r"[0-9a-f]{64}\Z"), min_len=64),
    "blake3": Rule(64, "a BLAKE3 hex digest (64 lower-case hex digits)", re.compile(r"[0-9a-f]{64}\Z"), min_len=64),
    "base_sha256": Rule(64, "empty or a sha256 hex digest (64 lower-case hex digits)", re.compile(r"(?:[0-9a-f]{64})?\Z")),
    "encoding": Rule(16, "empty or a codec name such as int8 or topk", re.compile(r"(?:[a-z][a-z0-9_-]*)?\Z")),
    "kind": Rule(16, "empty or an upload kind such as delta or answers", re.compile(r"(?:[a-z][a-z0-9_-]*)?\Z")),
}
MAX_LORA_RANK = 4096
MAX_EXAMPLES = 10_000_000   # a school's reported training examples (capabilities.num_examples)


def text(name: str, value: str, rule: Rule | None = None) -> str:
    """`value` if it fits field `name`'s rule; else ProtocolError (INVALID_ARGUMENT) saying
    what the field may hold. The value is never echoed (it may be huge, or a terminal escape)."""
    r = rule or RULES[name]
    if not r.min_len <= len(value) <= r.max_len:
        size = "empty" if not value else f"{len(value)} characters"
        raise ProtocolError(f"{name}: {size}; allowed: {r.min_len}-{r.max_len} characters of {r.allowed}")
    if r.form is not None:
        ok = r.form.match(value) is not None
    elif r.multiline:
        ok = value.replace("\n", " ").replace("\t", " ").isprintable()
    else:
        ok = value.isprintable()
    if not ok:
        raise ProtocolError(f"{name}: holds characters that are not allowed; allowed: {r.allowed}")
    return value


def count(name: str, value: int, most: int) -> int:
    if not 0 <= value <= most:
        raise ProtocolError(f"{name}: {value}; allowed: 0-{most:,}")
    return value


def capabilities(c: Capabilities) -> Capabilities:
    text("capabilities.model", c.model)
    text("capabilities.hardware", c.hardware)
    text("capabilities.client_version", c.client_version)
    count("capabilities.lora_rank", c.lora_rank, MAX_LORA_RANK)
    count("capabilities.num_examples", c.num_examples, MAX_EXAMPLES)
    return c


def header(h: UploadHeader) -> UploadHeader:
    """The strings of an upload header (its numbers: transfers.py and validation.py)."""
    text("upload_id", h.upload_id)
    algorithm, hex_digest = digest.split(h.digest)
    if algorithm != digest.SHA256 and algorithm not in digest.offered():
        raise ProtocolError(f"{algorithm}: this coordinator does not take uploads named by {algorithm} (its JoinResponse "
                            "lists the digests it takes besides sha256); name the payload by sha256")
    text(algorithm, hex_digest)
    text("base_sha256", h.base_sha256)
    text("encoding", h.encoding)
    text("kind", h.kind)
    return h


def event(ev: Event) -> Event:
    """A Session event other than a heartbeat (EvalReport numbers: validation.eval_report_problem,
    which logs and drops a bad report rather than ending the stream)."""
    if isinstance(ev, Progress):
        text("progress.phase", ev.phase)
        text("progress.detail", ev.detail)
        if not (math.isfinite(ev.fraction) and 0.0 <= ev.fraction <= 1.0):
            raise ProtocolError("progress.fraction: allowed: a number in [0, 1]")
    elif isinstance(ev, Failure):
        text("failure.phase", ev.phase)
        text("failure.message", ev.message)
    return ev


def spec_text(model: str) -> str:
    """The coordinator's own model spec in canonical text (`kind:ref`); its bare forms are
    resolved as `parse_spec` does (the operator's string, the coordinator's disk)."""
    try:
        return str(parse_spec(model))
    except ValueError:
        return model.strip()


def same_model(school_model: str, canonical: str) -> bool:
    """Whether the model a school names is `canonical` (spec_text of the coordinator's), read
    as text only: a bare value may stand for a directory or a hub id, and is taken as either.
    The school's string never reaches the filesystem (it names a path on the school's disk)."""
    s = school_model.strip()
    kind, sep, ref = s.partition(":")
    if sep and kind in _SPEC_KINDS:
        forms = {f"{kind}:{ref}"}
    elif s.endswith(".gguf"):
        forms = {f"gguf:{s}"}
    else:
        forms = {f"dir:{s}"} | ({f"hub:{s}"} if _HUB_ID.match(s) else set())
    return canonical in forms
