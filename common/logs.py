"""structlog set-up: JSON lines under systemd (or when asked), readable console otherwise.

In JSON mode everything a process writes to stderr is one JSON object per line, so
`journalctl -o cat | jq` reads the whole stream: stdlib `logging` records of the libraries
(transformers, peft, bitsandbytes, grpc, asyncio) go through the same renderer, Python
`warnings` are captured as log records, an uncaught exception is logged (with its traceback
inside the JSON) instead of printed, and progress bars are off."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

# Read by tqdm and huggingface_hub when they are imported: set before that where possible
# (the systemd units set them too), and turned off at run time below for what is imported.
PROGRESS_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

_HANDLER_MARK = "_school_federation_handler"


def _quiet_progress_bars() -> None:
    for key, value in PROGRESS_ENV.items():
        os.environ.setdefault(key, value)
    std = sys.modules.get("tqdm.std")   # imported already (torch imports it): TQDM_DISABLE came too late
    if std is not None and not getattr(std.tqdm, _HANDLER_MARK, False):
        # what TQDM_DISABLE=1 does at import: disable=True as the default of every tqdm bar
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
        setattr(std.tqdm, _HANDLER_MARK, True)
    try:
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()
    except Exception:   # pragma: no cover - optional, version-dependent
        pass


def _route_transformers_logging() -> None:
    """transformers logs through its own stderr handler (propagate=False): send its records
    to the root logger instead, and turn its progress bars off."""
    try:
        from transformers.utils import logging as tlog
    except Exception:   # pragma: no cover - transformers is a dependency
        return
    tlog.disable_default_handler()
    tlog.enable_propagation()
    tlog.disable_progress_bar()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Call once from a process's main(). `json=None` picks JSON when stderr is not a TTY
    or when running under systemd (JOURNAL_STREAM is set)."""
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks as plain text in both modes, never with local variables (rich's pretty
    # tracebacks show every frame's locals: session tokens, keys, a school's whole request),
    # rendered before redact_secrets so that it reads them too.
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_secrets, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # One write per line (message and newline together): lines of several threads never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,   # loggers made at import (get_logger) follow this configuration
    )
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel: a
    # FutureWarning per model load that no caller can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    # The libraries' stdlib logging, through the same renderer; quiet below WARNING.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, redact_secrets, renderer],
    ))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _CancelledRpcFilter) for f in cygrpc.filters):
        cygrpc.addFilter(_CancelledRpcFilter())
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _OptionalKernelsFilter) for f in bnb.filters):
        bnb.addFilter(_OptionalKernelsFilter())
    if json:
        logging.captureWarnings(True)   # warnings.warn -> the "py.warnings" logger -> a JSON line
        _quiet_progress_bars()
        _route_transformers_logging()
        _log_uncaught_exceptions()


class _CancelledRpcFilter(logging.Filter):
    """grpc's aio server logs an RPC handler that was cancelled (the client went away, or the
    server's stop grace ran out) as "Exception not handled" with a CancelledError traceback.
    A cancellation is not an error: drop those records, keep every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


class _OptionalKernelsFilter(logging.Filter):
    """bitsandbytes warns at every 4-bit load on CPU that the optional `kernels` package (faster
    CPU kernels from the Hugging Face hub, which these hosts do not reach) is missing; it then
    uses its own CPU code. Nothing to act on: drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _log_uncaught_exceptions() -> None:
    """An exception that ends the process (or a thread) becomes a JSON line with its traceback."""
    crash = logging.getLogger("uncaught")

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        crash.critical("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]

    sys.excepthook = hook
    threading.excepthook = thread_hook


def get_logger(component: str, **fields: object) -> structlog.typing.FilteringBoundLogger:
    """Lazy: the logger is assembled from the configuration current at each call, so one made
    at import time (before configure_logging) still logs in the configured format and level."""
    return structlog.get_logger(component=component, **fields)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- secrets never logged
# Field names whose value is a secret: replaced whole. Exact names, and these suffixes ("tokens",
# a count of tokens, is not one of them).
SECRET_FIELDS = frozenset({
    "token", "session_token", "enrolment_token", "enrollment_token", "authorization", "x-session-token",
    "password", "secret", "private_key", "key_pem", "token_file_content",
})
SECRET_SUFFIXES = ("_token", "_password", "_secret", "_private_key", "_key_pem")
REDACTED = "[redacted]"
# Secrets with a recognisable shape inside any text (a message, a traceback, a repr of metadata).
_SECRET_PATTERNS = (
    (re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.S),
     "-----BEGIN PRIVATE KEY----- [redacted] -----END PRIVATE KEY-----"),
    (re.compile(r"((?:x-session-token|session_token|authorization)['\"]?\s*[,:=]\s*\(?['\"]?)"
                r"(?!(?:Bearer\s+)?(?:\[redacted\]|<))(?:Bearer\s+)?[^\s'\",)\]}]+", re.I), r"\1[redacted]"),
    (re.compile(r"(Bearer\s+)(?!\[redacted\]|<)[^\s'\",)\]}]+", re.I), r"\1[redacted]"),
)
_SECRET_HINTS = ("private key", "bearer", "session-token", "session_token", "authorization")


def _is_secret_field(key: str) -> bool:
    k = key.lower()
    return k in SECRET_FIELDS or k.endswith(SECRET_SUFFIXES)


def scrub(text: str) -> str:
    """`text` with every secret of a recognisable shape replaced (PEM private keys, bearer
    tokens, session-token metadata). Cheap when there is nothing to replace."""
    low = text.lower()
    if not any(h in low for h in _SECRET_HINTS):
        return text
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor, last before the renderer (after the traceback is rendered to text):
    secret-named fields are replaced whole, and secret-shaped text in any string field (the
    event, an error, the traceback) is replaced where it stands. Belt and braces: no code logs a
    token or a key on purpose."""
    for key, value in event_dict.items():
        if _is_secret_field(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = scrub(value)
        elif isinstance(value, (dict, list, tuple)):
            text = repr(value)
            if scrub(text) != text:   # a secret inside a structure: the structure goes as scrubbed text
                event_dict[key] = scrub(text)
    return event_dict


# ---------------------------------------------------------------- text a school chose
SCHOOL_TEXT_MAX = 300   # characters of a school's own text (a failure message...) in one log line


def school_text(text: str, limit: int = SCHOOL_TEXT_MAX) -> str:
    """A school's own text (a failure message, a model name in a refusal), fit for a log line:
    control characters escaped (no forged lines in the console format), secrets scrubbed, and at
    most `limit` characters, marked when cut."""
    text = str(text)
    n = len(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    text = scrub(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated: {n} characters]"


class LineBudget:
    """Rate limit for log lines that carry a school's own text, per school (or per peer): a
    token bucket of `burst` lines, refilled at `per_s` lines a second. Lines over the budget are
    counted, not written; the count rides on the key's next written line (`suppressed=N`), and
    every `summary_s` one summary line names the keys with lines held back. A school that fails
    in a loop or floods refused calls costs the log a few lines a minute, not a line per call.
    One event loop (or one thread) per budget."""

    def __init__(self, per_s: float = 0.2, burst: int = 10, summary_s: float = 60.0, max_keys: int = 10_000,
                 clock: Any = time.monotonic) -> None:
        self.per_s, self.burst, self.summary_s, self.max_keys = per_s, burst, summary_s, max_keys
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}   # key -> [tokens, refilled at]
        self._held: dict[str, int] = {}              # key -> lines not written since its last written line
        self._summary_at = clock()

    def allow(self, key: str) -> tuple[bool, int]:
        """(write this line?, lines of `key` held back before it, when it is written)."""
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:   # many keys (peers): forget the full, idle buckets
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.per_s < self.burst or k in self._held}
            b = self._buckets[key] = [float(self.burst), now]
        b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.per_s)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True, self._held.pop(key, 0)
        self._held[key] = self._held.get(key, 0) + 1
        return False, 0

    def log(self, logger: Any, level: str, event: str, key: str, **fields: Any) -> bool:
        """Write `event` at `level` if `key` has budget (with `suppressed=N` when lines were held
        back); else count it. Writes the window's summary line first when one is due."""
        self.summarise(logger)
        ok, held = self.allow(key)
        if ok:
            getattr(logger, level)(event, **({"suppressed": held} if held else {}), **fields)
        return ok

    def summarise(self, logger: Any, force: bool = False) -> None:
        """One line naming the keys with lines held back (at most 20 by name), once per window."""
        now = self.clock()
        if not force and now - self._summary_at < self.summary_s:
            return
        self._summary_at = now
        if not self._held:
            return
        top = dict(sorted(self._held.items(), key=lambda kv: -kv[1])[:20])
        logger.warning("log lines held back", total=sum(self._held.values()), keys=len(self._held), top=top,
                       note=f"lines carrying a school's own text, over {self.burst} at once or "
                            f"{self.per_s * 60:g} a minute per school; counted, not written")
        self._held.clear()


def _safe_defaults() -> None:
    """Before configure_logging (tests, scripts, a library user): structlog's default console
    output, but with plain tracebacks (no local variables) and secrets redacted."""
    if structlog.is_configured():
        return
    structlog.configure(processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.processors.format_exc_info,
        redact_secrets,
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
    ])


_safe_defaults()
