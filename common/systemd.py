"""systemd's service protocol for both daemons: READY/STOPPING notifications and the watchdog."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Notify = Callable[[str], None]
WATCHDOG_PING_S = 10.0   # the units set WatchdogSec=60: ping well inside it while the loop lives


def notifier() -> Notify:
    """sd_notify, or a no-op outside systemd (sdnotify itself ignores a missing NOTIFY_SOCKET)."""
    try:
        import sdnotify

        return sdnotify.SystemdNotifier().notify  # type: ignore[no-any-return]
    except Exception:  # pragma: no cover - sdnotify is a dependency; stay up without it
        return lambda _msg: None


async def watchdog(notify: Notify, every_s: float = WATCHDOG_PING_S) -> None:
    """Ping until cancelled. Runs on the event loop, so a blocked loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(every_s)
