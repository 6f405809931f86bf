"""systemd notification protocol (sd_notify) without libsystemd.

``Type=notify`` units read datagrams like ``READY=1`` from the unix socket named in
``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with ``@``). With ``WatchdogSec=``
systemd sets ``$WATCHDOG_USEC`` and restarts the service unless ``WATCHDOG=1`` arrives within that
interval. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

:class:`Watchdog` pings only while the process proves it is alive: the work loop (and the training
progress callback) refresh a liveness timestamp; when that stops moving for longer than the watchdog
interval, the pings stop and systemd restarts the hung process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("fedmq.sdnotify")


class Notifier:
    """Sends sd_notify datagrams; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or None
        if addr is not None and addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif addr is not None and not addr.startswith("/"):
            log.warning("ignoring NOTIFY_SOCKET %r: neither a path nor an abstract socket", addr)
            addr = None
        self.address = addr
        self.watchdog_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when sent."""
        if self.address is None:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as exc:  # systemd gone or socket vanished: never fatal to the service
                log.debug("sd_notify failed: %s", exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds of ``$WATCHDOG_USEC`` when the watchdog is meant for this process, else None."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # set for another process (e.g. a parent shell)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Feeds the systemd watchdog while ``alive_at()`` (a ``time.monotonic`` stamp) is fresh.

    Pings every ``interval / 2``; a stamp older than the full interval means the work loop is stuck,
    so pings stop and systemd's own timer expires. ``status`` (optional) returns a short text sent
    as ``STATUS=`` whenever it changes (shown by ``systemctl status``). ``allowance`` (optional)
    returns how stale the stamp may be right now, for phases that cannot report progress (loading a
    multi-GB model); it defaults to the watchdog interval.
    """

    def __init__(
        self,
        notifier: Notifier,
        alive_at: Callable[[], float],
        status: Callable[[], str] | None = None,
        allowance: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.alive_at = alive_at
        self.status_fn = status
        self.allowance = allowance
        self.clock = clock
        self.interval = notifier.watchdog_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None
        self.pings = 0
        self.withheld = 0

    def tick(self) -> bool:
        """One check: ping if alive; returns whether a ping was sent."""
        if self.status_fn is not None:
            try:
                text = self.status_fn()
            except Exception:  # noqa: BLE001 - a status read must never stop the watchdog
                text = None
            if text and text != self._last_status:
                self._last_status = text
                self.notifier.status(text)
        if self.interval is None:
            return False
        # the allowance before the stamp: a phase that ends (its allowance gone) stamps first
        limit = self.interval if self.allowance is None else max(self.interval, self.allowance())
        age = self.clock() - self.alive_at()
        if age <= limit:
            self.pings += self.notifier.watchdog()
            return True
        self.withheld += 1
        log.error("no progress for %.0fs (allowed %.0fs): withholding WATCHDOG=1", age, limit)
        return False

    def start(self) -> Watchdog:
        if not self.notifier.enabled or self._thread is not None:
            return self
        period = self.interval / 2 if self.interval else 5.0
        period = max(0.05, min(period, 5.0)) if self.interval is None else max(0.05, period)

        def loop() -> None:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(period)

        self._thread = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
