"""The global publisher: puts each new global on the broker, retained, where devices find it.

A snapshot goes on ``{base}/global`` and makes every retained difference obsolete (they are
cleared); a difference from version v-1 goes on ``{base}/global/diff/{v}`` and stays retained
until the next snapshot, so a device that was away catches up from the snapshot and the
differences after it. The mode's own retained messages (zo: ledger rounds) go first, as the
global depends on them. Which differences are retained, and in how many chunks, is part of the
persisted state: a restarted coordinator still clears them.
"""

from __future__ import annotations

import logging
import time

from broker_coordinator.modes import CoordinatorMode
from broker_coordinator.state import CoordinatorState
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import chunk_topic
from fedmq_protocol.topics import QOS_GLOBAL, Topics
from fedmq_protocol.transport import MqttTransport

log = logging.getLogger("fedmq.coordinator")


class GlobalPublisher:
    def __init__(
        self, transport: MqttTransport, topics: Topics, mode: CoordinatorMode, state: CoordinatorState,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.mode = mode
        self.state = state

    def publish(self, message: m.GlobalModel | None = None, *, everything: bool = False) -> tuple[int, float]:
        """Publish ``message`` (default: the current global, a snapshot) and what it depends on.
        ``everything``: also the mode's retained messages published before (the broker lost
        them). Returns (bytes sent, seconds spent publishing the global)."""
        # an empty payload clears its retained topic (and the chunks it was sent in)
        extra = sum(self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=bool(payload)).bytes
                    for topic, payload in self.mode.retained_messages(self.topics.base, everything))
        gm = message or self.state.global_model
        assert gm is not None
        t0 = time.perf_counter()
        payload = gm.to_msgpack()
        if gm.is_snapshot:
            sent = self.transport.publish(self.topics.global_model, payload, qos=QOS_GLOBAL, retain=True, framed=True)
            n = sent.bytes
            for v, chunks in sorted(self.state.retained_diffs.items()):
                self._clear_retained(self.topics.global_diff(v), chunks)
            self.state.retained_diffs.clear()
        else:
            topic = self.topics.global_diff(gm.version)
            sent = self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=True)
            n, self.state.retained_diffs[gm.version] = sent.bytes, sent.chunks
        return n + extra, time.perf_counter() - t0

    def _clear_retained(self, topic: str, chunks: int) -> None:
        try:
            self.transport.publish(topic, b"", qos=QOS_GLOBAL, retain=True)
            for i in range(chunks):  # known from state even after a restart
                self.transport.publish(chunk_topic(topic, i), b"", qos=QOS_GLOBAL, retain=True)
        except Exception as exc:  # noqa: BLE001 - a stale retained difference is harmless (older than any snapshot)
            log.warning("could not clear retained %s: %s", topic, exc)
