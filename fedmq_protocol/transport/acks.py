"""``AckTable``: one :class:`concurrent.futures.Future` per MQTT message id awaiting its acknowledgement.

Used by :class:`~fedmq_protocol.transport.client.MqttClient` for PUBLISH (PUBACK/PUBCOMP, or
"written" for QoS 0) and SUBSCRIBE (SUBACK). Every entry leaves the table exactly once: when its
acknowledgement comes (:meth:`settle`), when its waiter gives up (:meth:`abandon`), when the
connection drops and the acknowledgement can no longer come (:meth:`connection_lost`), or at
:meth:`close`.

Two races are handled here so the client need not:

- paho assigns the message id inside ``publish()``/``subscribe()`` and its network thread may
  process the acknowledgement before that call returns; an acknowledgement for an id nobody
  expects yet is held (bounded) until :meth:`expect` claims it.
- an id given up on is remembered as *abandoned* so its late acknowledgement is ignored rather
  than held; the client forgets it once paho no longer holds the message (after a reconnect).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Acknowledgements that came before their id was registered; claimed within microseconds, so
# more than this means something registers no ids (a bug): drop the oldest instead of growing.
_MAX_EARLY = 1024


@dataclass(eq=False)
class _Entry(Generic[T]):
    future: Future[T] = field(default_factory=Future)
    # False: paho forgets the message on a disconnect (QoS 0 packets, SUBSCRIBE), so its
    # acknowledgement cannot come any more; True: paho re-sends it after the reconnect.
    survives_reconnect: bool = True


class AckTable(Generic[T]):
    """Message id -> completion, safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, _Entry[T]] = {}
        self._mid_of: dict[Future[T], int] = {}
        self._early: OrderedDict[int, T] = OrderedDict()
        self._abandoned: dict[int, bool] = {}  # id -> survives_reconnect

    @property
    def pending(self) -> int:
        """Ids still awaiting their acknowledgement (held early acknowledgements included)."""
        with self._lock:
            return len(self._pending) + len(self._early)

    @property
    def abandoned(self) -> int:
        """Ids given up on whose message paho may still hold."""
        with self._lock:
            return len(self._abandoned)

    def expect(self, mid: int, *, survives_reconnect: bool) -> Future[T]:
        """Register ``mid`` (just returned by paho); completes at once if its ack came first."""
        entry: _Entry[T] = _Entry(survives_reconnect=survives_reconnect)
        with self._lock:
            self._abandoned.pop(mid, None)  # an id paho hands out again is no longer abandoned
            if mid in self._early:
                outcome = self._early.pop(mid)
            else:
                self._pending[mid] = entry
                self._mid_of[entry.future] = mid
                return entry.future
        entry.future.set_result(outcome)
        return entry.future

    def settle(self, mid: int, outcome: T) -> None:
        """The acknowledgement of ``mid`` arrived (network thread)."""
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                if self._abandoned.pop(mid, None) is None:
                    self._early[mid] = outcome
                    while len(self._early) > _MAX_EARLY:
                        self._early.popitem(last=False)
                return
            del self._mid_of[entry.future]
        entry.future.set_result(outcome)

    def abandon(self, future: Future[T]) -> bool:
        """Give up on ``future``'s id; False when it completed meanwhile (use its outcome)."""
        with self._lock:
            mid = self._mid_of.pop(future, None)
            if mid is None:
                return False
            entry = self._pending.pop(mid)
            self._abandoned[mid] = entry.survives_reconnect
        return True

    def result_within(self, future: Future[T], timeout: float) -> T | None:
        """``future``'s result within ``timeout`` s, or None after abandoning its id."""
        try:
            return future.result(timeout=max(0.0, timeout))
        except FutureTimeout:
            if self.abandon(future):
                return None
            return future.result()  # acknowledged while we gave up

    def is_pending(self, mid: int) -> bool:
        with self._lock:
            return mid in self._pending

    def has_abandoned(self) -> bool:
        with self._lock:
            return bool(self._abandoned)

    def forget_abandoned(self, mid: int) -> bool:
        """True if ``mid`` was abandoned (now forgotten: paho dropped its message)."""
        with self._lock:
            return self._abandoned.pop(mid, None) is not None

    def moved(self, old_mid: int, new_mid: int) -> None:
        """The message of ``old_mid`` was handed to paho again and now has ``new_mid``."""
        with self._lock:
            entry = self._pending.pop(old_mid, None)
            if entry is None:  # abandoned in the meantime: so is its new id
                self._abandoned[new_mid] = True
                return
            self._pending[new_mid] = entry
            self._mid_of[entry.future] = new_mid

    def fail(self, mid: int, error: BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                return
            del self._mid_of[entry.future]
        entry.future.set_exception(error)

    def connection_lost(self, error: BaseException) -> None:
        """Fail the entries whose acknowledgement cannot come after a reconnect."""
        with self._lock:
            lost = [mid for mid, e in self._pending.items() if not e.survives_reconnect]
            entries = [self._pending.pop(mid) for mid in lost]
            for entry in entries:
                del self._mid_of[entry.future]
            self._abandoned = {mid: s for mid, s in self._abandoned.items() if s}
        for entry in entries:
            entry.future.set_exception(error)

    def close(self, error: BaseException) -> None:
        """Fail every pending entry and forget everything."""
        with self._lock:
            entries = list(self._pending.values())
            self._pending.clear()
            self._mid_of.clear()
            self._early.clear()
            self._abandoned.clear()
        for entry in entries:
            entry.future.set_exception(error)
