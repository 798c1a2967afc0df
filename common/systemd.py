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


STALL_WARN_S = 5.0   # a wake-up this late means the loop (or the whole machine) was stalled


async def watchdog(notify: Notify, every_s: float = WATCHDOG_PING_S, stall_warn_s: float = STALL_WARN_S,
                   on_stall: Callable[[float], None] | None = None) -> None:
    """Ping until cancelled. Runs on the event loop, so a blocked loop stops the pings.
    A wake-up more than `stall_warn_s` late is reported to `on_stall` (seconds late): a
    blocked loop, or a machine stalled by memory pressure; it tells an operator whose side
    a session timeout was on."""
    loop = asyncio.get_running_loop()
    while True:
        notify("WATCHDOG=1")
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        late = loop.time() - due
        if late > stall_warn_s and on_stall is not None:
            on_stall(late)
