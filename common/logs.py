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
import sys
import threading
import warnings
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
        from huggingface_hub.utils import disable_progress_bars

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
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer] if json else [*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # One write per line (message and newline together): lines of several threads never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel: a
    # FutureWarning per model load that no caller can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    # The libraries' stdlib logging, through the same renderer; quiet below WARNING.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *([structlog.processors.format_exc_info] if json else []), renderer],
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
