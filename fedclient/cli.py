"""`fedclient run --config school.toml`: the school daemon's entry point. Exit codes: 0 done
or stopped, 1 crash (systemd restarts), 78 configuration/credentials wrong (no restart)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from common import systemd
from common.config import load_toml
from common.errors import ConfigError
from common.logs import configure_logging, get_logger
from fedclient import preflight
from fedclient.config import SchoolConfig
from fedclient.daemon import EXIT_CONFIG, SchoolDaemon
from fedclient.worker import SchoolModel


async def _run(cfg: SchoolConfig, token: str) -> int:
    s = cfg.school
    heldout = preflight.heldout_path(s)
    notify = systemd.notifier()
    notify("STATUS=reading the school's data")
    try:
        model = await asyncio.to_thread(SchoolModel, cfg.model.base, cfg.model.cache_dir, s.data_dir, heldout, s.torch_threads, s.state_dir,
                                    s.max_batch_tokens, s.gradient_checkpointing)
    except (ValueError, OSError) as exc:   # no data, unreadable data: a configuration problem
        raise ConfigError(f"school data: {exc}") from None
    # READY=1 when "active" is true (see fedclient.service): joined the coordinator, model loaded.
    daemon = SchoolDaemon(cfg, token, model, on_ready=lambda: notify("READY=1"),
                          on_status=lambda line: notify(f"STATUS={line}"))
    metrics = None
    if cfg.monitor.metrics_listen:
        from common.monitoring import serve_metrics

        try:
            metrics = await asyncio.to_thread(serve_metrics, cfg.monitor.metrics_listen, daemon.metrics.registry)
        except OSError as exc:
            raise ConfigError(f"[monitor] {exc}; choose another port or set metrics_listen = '' to turn it off") from None
        daemon.log.info("metrics", url=metrics.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dog = asyncio.create_task(systemd.watchdog(   # pings from the start, READY or not
        notify, on_stall=lambda s: daemon.log.warning("event loop stalled; the coordinator may drop this session",
                                                      late_s=round(s, 1))))
    from common.monitoring import probe_loop_lag

    lag = asyncio.create_task(probe_loop_lag(daemon.metrics.lag, daemon.metrics.lag_hist))
    try:
        return await daemon.run(stop)
    finally:
        notify("STOPPING=1")
        dog.cancel()
        lag.cancel()
        if metrics is not None:
            await asyncio.to_thread(metrics.close)


def _status(cfg: SchoolConfig, as_json: bool) -> int:
    """Exit 0 when the daemon runs and is connected, 3 when it is not running (as systemctl
    status does), 1 when it runs but is not connected."""
    import json

    from fedclient.monitor import STATUS_FILE, describe, format_status, read_status

    state_dir = cfg.school.state_dir
    view = describe(read_status(state_dir / STATUS_FILE), state_dir, cfg.school.data_dir)
    print(json.dumps(view, indent=2) if as_json else format_status(view))
    return 0 if view["connected"] else 1 if view["running"] else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclient", description="School federation: the school daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join the federation and serve its commands until told to stop")
    run.add_argument("--config", type=Path, required=True, help="school.toml")
    check = sub.add_parser("check-config", help="load and validate a config, print it, exit")
    check.add_argument("--config", type=Path, required=True)
    status = sub.add_parser("status", help="is the daemon running and connected, its last round, what it sent and "
                                           "keeps on disk (from its state directory; does not contact the coordinator)")
    status.add_argument("--config", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args(argv)
    try:
        cfg = load_toml(SchoolConfig, args.config)
        if args.command == "status":
            return _status(cfg, args.json)
        configure_logging(cfg.school.log_level)
        # token, data, directories, model: the same checks and messages for check-config and run
        token, warnings = preflight.require(cfg, str(args.config))
        if args.command == "check-config":
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(f"{args.config}: {preflight.summary(cfg)}")
            return 0
        for w in warnings:
            get_logger("school").warning(w)
        return asyncio.run(_run(cfg, token))
    except ConfigError as exc:
        print(f"fedclient: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # logged for journald; systemd restarts on 1
        get_logger("school").error("crashed", error=repr(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
