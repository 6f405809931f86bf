"""Refused input, counted per source topic and reason, logged at a bounded rate.

A flood of junk must not flood the log: on each topic, the first refusal of each kind of reason
is logged at once (up to ``KINDS_PER_WINDOW`` kinds per window of ``every_s``), the others in a
window are counted and the first refusal after the window logs a line with the count since the
last line. Every refusal is counted (``by_topic``, ``by_reason``) whatever is logged.
"""

from __future__ import annotations

import logging
import re
import threading
import time

KINDS_PER_WINDOW = 8
MAX_TOPICS = 4096  # distinct topics tracked (junk may invent topics); the rest count under "other"
_DETAIL = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def reason_key(reason: str) -> str:
    """A reason without its particulars (quoted values, numbers): refusals of one kind group."""
    return _DETAIL.sub("_", reason)[:120]


class RejectionLog:
    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.log = logger
        self.every_s = every_s
        self.by_topic: dict[str, int] = {}
        self.by_reason: dict[str, int] = {}
        self.total = 0
        self._pending: dict[str, int] = {}  # refusals per topic since its last log line
        self._logged_at: dict[str, float] = {}  # start of the topic's current window
        self._kinds: dict[str, set[str]] = {}  # reason kinds logged in that window
        self._lock = threading.Lock()

    def add(self, topic: str, reason: str, *, what: str = "rejected") -> None:
        now = time.monotonic()
        with self._lock:
            if topic not in self.by_topic and len(self.by_topic) >= MAX_TOPICS:
                topic = "other"
            self.total += 1
            self.by_topic[topic] = self.by_topic.get(topic, 0) + 1
            key = reason_key(reason)
            if key in self.by_reason or len(self.by_reason) < MAX_TOPICS:
                self.by_reason[key] = self.by_reason.get(key, 0) + 1
            self._pending[topic] = self._pending.get(topic, 0) + 1
            last = self._logged_at.get(topic)
            kinds = self._kinds.setdefault(topic, set())
            if last is not None and now - last < self.every_s:
                if key in kinds or len(kinds) >= KINDS_PER_WINDOW:
                    return
            else:
                kinds.clear()
                self._logged_at[topic] = now
            kinds.add(key)
            n = self._pending.pop(topic)
        more = f" ({n} refused on this topic since the last line)" if n > 1 else ""
        self.log.warning("%s on %s: %s%s", what, topic, reason[:500], more)

    def top_topics(self, n: int = 20) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.by_topic.items(), key=lambda kv: -kv[1])[:n])
