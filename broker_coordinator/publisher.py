"""The global publisher: puts each new global on the broker, retained, where devices find it.

A snapshot goes on ``{base}/global`` and makes every retained difference obsolete (they are
cleared); a difference from version v-1 goes on ``{base}/global/diff/{v}`` and stays retained
until the next snapshot, so a device that was away catches up from the snapshot and the
differences after it. The mode's own retained messages (zo: ledger rounds) go first, as the
global depends on them. Which differences are retained, and in how many chunks, is part of the
persisted state: a restarted coordinator still clears them.

Every payload goes out sealed (``fedmq_protocol.seal``: topic, round, version, a growing counter,
signed with the coordinator key when configured). What each retained topic should hold is kept
(``retained``), so a forged copy the broker took instead is replaced by ``republish``.
"""

from __future__ import annotations

import logging
import time

from broker_coordinator.modes import CoordinatorMode
from broker_coordinator.state import CoordinatorState
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import chunk_topic
from fedmq_protocol.seal import Sealer
from fedmq_protocol.topics import QOS_GLOBAL, Topics
from fedmq_protocol.transport import MqttTransport

log = logging.getLogger("fedmq.coordinator")


class GlobalPublisher:
    def __init__(
        self, transport: MqttTransport, topics: Topics, mode: CoordinatorMode, state: CoordinatorState,
        sealer: Sealer | None = None,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.mode = mode
        self.state = state
        self.sealer = sealer or Sealer(topics.federation)
        self.retained: dict[str, bytes] = {}  # logical topic -> what it should hold (b"": cleared)
        self.mode_filters: set[str] = set()  # parents (``P/#``) of the mode's retained topics

    def _publish_sealed(self, topic: str, body: bytes, gm: m.GlobalModel) -> int:
        payload = self.sealer.seal(topic, body, round_no=gm.round, version=gm.version)
        self.retained[topic] = payload
        return self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=True).bytes

    def republish(self, topic: str) -> bool:
        """Put back what ``topic`` should hold (a forged copy replaced it); False: not ours."""
        payload = self.retained.get(topic)
        if payload is None:
            return False
        if payload:
            self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=True)
        else:
            self.transport.publish(topic, b"", qos=QOS_GLOBAL, retain=True)
        return True

    def publish(self, message: m.GlobalModel | None = None, *, everything: bool = False) -> tuple[int, float]:
        """Publish ``message`` (default: the current global, a snapshot) and what it depends on.
        ``everything``: also the mode's retained messages published before (the broker lost
        them). Returns (bytes sent, seconds spent publishing the global)."""
        gm = message or self.state.global_model
        assert gm is not None
        extra = 0
        for topic, body in self.mode.retained_messages(self.topics.base, everything):
            self.mode_filters.add(topic.rsplit("/", 1)[0] + "/#")
            if body:
                extra += self._publish_sealed(topic, body, gm)
            else:  # an empty body clears its retained topic (e.g. ledger rounds folded into a checkpoint)
                self.retained[topic] = b""
                extra += self.transport.publish(topic, b"", qos=QOS_GLOBAL, retain=True).bytes
        t0 = time.perf_counter()
        payload = gm.to_msgpack()
        if gm.is_snapshot:
            n = self._publish_sealed(self.topics.global_model, payload, gm)
            for v, chunks in sorted(self.state.retained_diffs.items()):
                self._clear_retained(self.topics.global_diff(v), chunks)
            self.state.retained_diffs.clear()
        else:
            topic = self.topics.global_diff(gm.version)
            sealed = self.sealer.seal(topic, payload, round_no=gm.round, version=gm.version)
            self.retained[topic] = sealed
            sent = self.transport.publish(topic, sealed, qos=QOS_GLOBAL, retain=True, framed=True)
            n, self.state.retained_diffs[gm.version] = sent.bytes, sent.chunks
        return n + extra, time.perf_counter() - t0

    def _clear_retained(self, topic: str, chunks: int) -> None:
        self.retained[topic] = b""
        try:
            self.transport.publish(topic, b"", qos=QOS_GLOBAL, retain=True)
            for i in range(chunks):  # known from state even after a restart
                self.transport.publish(chunk_topic(topic, i), b"", qos=QOS_GLOBAL, retain=True)
        except Exception as exc:  # noqa: BLE001 - a stale retained difference is harmless (older than any snapshot)
            log.warning("could not clear retained %s: %s", topic, exc)
