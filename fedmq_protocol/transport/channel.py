"""``MqttTransport``: the framed channel fedmq sends and receives on, over one :class:`MqttClient`.

- A *framed* subscription to an exact filter ``F`` subscribes to both ``F`` and ``F/c/+`` (the
  chunk sub-topics); a filter ending in ``#`` already covers them and is used as is. Each framed
  subscription has its own :class:`~fedmq_protocol.chunking.Reassembler`; its handler receives
  ``(logical_topic, payload)``. Malformed manifests and chunks are counted and logged, never fatal.
- ``publish(framed=True)`` sends a payload as is, or in chunks (each payload one msgpack object:
  :mod:`fedmq_protocol.chunking`) above the configured chunk size, capped below the broker's
  MQTT 5 Maximum-Packet-Size when announced, and returns :class:`Published` (bytes and chunks).
- A manifest that arrives without its chunks (a retained one, on a broker that delivers retained
  messages to exact-topic subscriptions only, as RabbitMQ does) makes the channel subscribe to
  the exact chunk topics it lists, until the payload completes.
- A retained framed payload leaves retained chunk topics behind; the channel remembers how many
  per topic and clears the stale higher-index ones when a retained payload shrinks or is cleared.
- Connecting, re-subscribing after reconnects, in-flight limiting, acknowledgement timeouts and
  "never wait on the network thread" are the client's (:mod:`fedmq_protocol.transport.client`).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmq_protocol.chunking import CHUNK_OVERHEAD, Reassembler, chunk_topic, frame_payload, split_chunk_topic
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.transport.client import Handler, MqttClient
from fedmq_protocol.transport.config import BrokerConfig
from fedmq_protocol.transport.connection import WillMessage
from fedmq_protocol.transport.errors import SubscriptionRefused, TransportError

_PACKET_OVERHEAD = 64  # fixed header, lengths, packet id, properties: generous
CATCH_UP = "catch-up:"  # name prefix of the exact chunk-topic subscriptions of one manifest
MAX_CATCH_UP_TOPICS = 4096


@dataclass(frozen=True)
class Published:
    """What one ``publish()`` put on the wire."""

    bytes: int  # payload bytes including chunk and manifest maps, without MQTT headers
    chunks: int  # chunk sub-topic messages (``T/c/i``; the manifest on ``T`` not counted); 0: one message


@dataclass
class Subscription:
    topic_filter: str
    handler: Handler
    qos: int
    framed: bool
    wire_filters: tuple[str, ...]
    reassembler: Reassembler | None


def wire_filters_for(topic_filter: str, framed: bool) -> tuple[str, ...]:
    """The MQTT filters subscribed for one subscription (see the module docstring)."""
    if not framed or topic_filter == "#" or topic_filter.endswith("/#"):
        return (topic_filter,)
    return (topic_filter, topic_filter + "/c/+")


class MqttTransport:
    """The framed channel (see the module docstring); ``client`` is its :class:`MqttClient`."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: WillMessage | None = None,
        clean_start: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = MqttClient(config, client_id, will=will, clean_start=clean_start, logger=logger)
        self.config = config
        self.client_id = client_id
        self.url = config.url
        self.log = self.client.log
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._retained_chunks: dict[str, int] = {}
        # (sha256, wall time handed to the broker) of the last retained messages this client
        # published, per MQTT topic (chunks included), newest last
        self.retained_history: dict[str, collections.deque[tuple[bytes, float]]] = {}
        self.messages_rejected = 0
        self.last_reject_reason: str | None = None
        self.catch_ups = 0  # manifests whose chunks were asked for on their exact topics

    # -- connection: the client's -----------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Connect and wait for the CONNACK; afterwards reconnect automatically with back-off."""
        self.client.connect(timeout)

    def set_will(self, will: WillMessage) -> None:
        """The Last Will of the next connection (the current one keeps the Will it connected with)."""
        self.client.set_will(will)

    def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the Will) and stop the loop."""
        self.client.close()

    def __enter__(self) -> MqttTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.client.wait_connected(timeout)

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def session_present(self) -> bool:
        return self.client.session_present

    @property
    def max_packet_size(self) -> int | None:
        return self.client.max_packet_size

    @property
    def on_connect(self) -> list[Callable[[bool], None]]:
        """``hook(session_present: bool)`` after every successful (re)connect."""
        return self.client.on_connect

    @property
    def on_disconnect(self) -> list[Callable[[str], None]]:
        """``hook(reason: str)`` after every loss of connection (not after ``close()``)."""
        return self.client.on_disconnect

    # -- counters: the client's -------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received

    @property
    def messages_received(self) -> int:
        return self.client.messages_received

    @property
    def handler_errors(self) -> int:
        return self.client.handler_errors

    @property
    def publish_failures(self) -> int:
        return self.client.publish_failures

    @property
    def connects(self) -> int:
        return self.client.connects

    @property
    def disconnects(self) -> int:
        return self.client.disconnects

    # -- subscribe --------------------------------------------------------------------------
    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        framed: bool = False,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe (now if connected, and again after every reconnect).

        When connected (and not called from a handler) waits for the SUBACK and raises
        ``TransportError`` if the broker refuses the filter.
        """
        if not topic_filter or qos not in (0, 1, 2):
            raise ValueError(f"bad subscription {topic_filter!r} qos={qos}")
        reassembler = None
        if framed:
            reassembler = Reassembler(
                max_message_bytes=self.config.max_message_bytes,
                max_pending_bytes=self.config.pending_bytes_limit,
                timeout_s=self.config.reassembly_timeout_s,
            )
        sub = Subscription(topic_filter, handler, qos, framed, wire_filters_for(topic_filter, framed), reassembler)
        with self._lock:
            self._subs.append(sub)
        deliver = handler if reassembler is None else self._reassembling(handler, reassembler)
        try:
            self.client.subscribe(topic_filter, sub.wire_filters, deliver, qos=qos, timeout=timeout)
        except SubscriptionRefused:
            with self._lock:
                self._subs.remove(sub)
            raise
        return sub

    def _reassembling(self, handler: Handler, reassembler: Reassembler) -> Handler:
        """A handler of raw frames that calls ``handler`` with each reassembled payload."""

        catching_up: set[str] = set()

        def deliver(topic: str, frame: bytes) -> None:
            for reason in reassembler.expire():
                self.log.warning("%s", reason)
            try:
                done = reassembler.feed(topic, frame)
            except ProtocolError as exc:
                self._reject(str(exc))
                return
            if done is not None:
                if done[0] in catching_up:
                    catching_up.discard(done[0])
                    self.client.unsubscribe(CATCH_UP + done[0])
                handler(done[0], done[1])
            elif split_chunk_topic(topic)[1] is None:
                # A manifest whose chunks did not come with it: some brokers (RabbitMQ) deliver
                # retained messages to exact-topic subscriptions only, so ask for each chunk topic
                missing = reassembler.missing_chunks(topic)
                if 0 < len(missing) <= MAX_CATCH_UP_TOPICS:
                    if topic in catching_up:  # a newer manifest: its chunks instead
                        self.client.unsubscribe(CATCH_UP + topic)
                    catching_up.add(topic)
                    self.catch_ups += 1
                    self.client.subscribe(CATCH_UP + topic, [chunk_topic(topic, i) for i in missing], deliver,
                                          qos=1)

        return deliver

    def _reject(self, reason: str) -> None:
        self.messages_rejected += 1
        self.last_reject_reason = reason
        self.log.warning("rejected message: %s", reason)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s.topic_filter != topic_filter]
        self.client.unsubscribe(topic_filter)

    # -- publish ----------------------------------------------------------------------------
    def effective_chunk_size(self, topic: str) -> int:
        """The configured chunk size, capped below the broker's Maximum-Packet-Size."""
        cs = self.config.chunk_size
        max_packet_size = self.client.max_packet_size
        if max_packet_size:
            cap = max_packet_size - CHUNK_OVERHEAD - len(topic.encode()) - 16 - _PACKET_OVERHEAD
            if cap < 1:
                raise TransportError(f"broker {self.url} Maximum-Packet-Size {max_packet_size} is too small")
            cs = min(cs, cap)
        return cs

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        framed: bool = False,
        timeout: float | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> Published:
        """Publish; returns what went on the wire (payloads incl. chunk maps, no MQTT headers).
        ``properties``: MQTT 5 PUBLISH properties by paho name (e.g. ``ResponseTopic``,
        ``CorrelationData``) on every message sent; dropped on MQTT 3.1.1.

        Waits until every QoS >= 1 message is acknowledged (QoS 0: written), at most
        ``max_inflight`` outstanding at a time; raises ``TransportError`` on timeout or when the
        broker rejects a message.
        """
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to topic {topic!r}")
        if self.client.closed:
            raise TransportError(f"transport to {self.url} is closed")
        payload = bytes(payload)
        if framed:
            try:
                frames = frame_payload(payload, self.effective_chunk_size(topic))
            except ValueError as exc:
                raise TransportError(f"cannot publish to {topic!r} on {self.url}: {exc}") from None
        else:
            max_packet_size = self.client.max_packet_size
            if max_packet_size and len(payload) + len(topic.encode()) + _PACKET_OVERHEAD > max_packet_size:
                raise TransportError(
                    f"cannot publish {len(payload)} bytes to {topic!r}: broker {self.url} "
                    f"Maximum-Packet-Size is {max_packet_size} (use framed=True)"
                )
            frames = [("", payload)]
        n_chunks = len(frames) - 1  # frame_payload: the chunks, then the manifest (or the message as is)
        messages = [(topic + suffix, frame) for suffix, frame in frames]
        if retain:
            with self._lock:
                retained_before = self._retained_chunks.get(topic, 0)
            messages += [(chunk_topic(topic, i), b"") for i in range(n_chunks, retained_before)]
            with self._lock:
                now = time.time()
                for wire_topic, frame in messages:
                    hist = self.retained_history.setdefault(wire_topic, collections.deque(maxlen=4))
                    hist.append((hashlib.sha256(frame).digest(), now))
        self.client.publish_many(messages, qos=qos, retain=retain, timeout=timeout, properties=properties)
        if retain:
            with self._lock:
                if n_chunks:
                    self._retained_chunks[topic] = n_chunks
                else:
                    self._retained_chunks.pop(topic, None)
        return Published(bytes=sum(len(frame) for _, frame in messages), chunks=n_chunks)

    def retained_by_us(self, wire_topic: str, payload: bytes, arrived_at: float, echo_s: float = 2.0) -> bool | None:
        """Whether a message that arrived on ``wire_topic`` is what this client retained there
        (None: it never retained anything there): the latest, or an earlier one arriving within
        ``echo_s`` of its successor being published (the echo of a quick succession)."""
        with self._lock:
            hist = list(self.retained_history.get(wire_topic, ()))
        if not hist:
            return None
        digest = hashlib.sha256(payload).digest()
        if digest == hist[-1][0]:
            return True
        return any(d == digest and arrived_at - nxt[1] < echo_s for (d, _), nxt in itertools.pairwise(hist))

    def publish_json(
        self, topic: str, obj: Any, *, qos: int = 1, retain: bool = False, timeout: float | None = None
    ) -> Published:
        """Publish raw JSON (never framed): bytes as is, objects with ``to_json()``, or json.dumps."""
        if isinstance(obj, (bytes, bytearray, memoryview)):
            data = bytes(obj)
        elif hasattr(obj, "to_json"):
            data = obj.to_json()
        else:
            data = json.dumps(obj, separators=(",", ":")).encode()
        return self.publish(topic, data, qos=qos, retain=retain, framed=False, timeout=timeout)

    def clear_retained(self, topic: str, *, timeout: float | None = None) -> None:
        """Clear the retained message on ``topic`` and any chunk topics this client retained."""
        self.publish(topic, b"", qos=1, retain=True, framed=False, timeout=timeout)

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            subs = list(self._subs)
        out: dict[str, Any] = {
            "connected": self.connected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_received": self.messages_received,
            "messages_rejected": self.messages_rejected,
            "last_reject_reason": self.last_reject_reason,
            "handler_errors": self.handler_errors,
            "publish_failures": self.publish_failures,
            "connects": self.connects,
            "disconnects": self.disconnects,
        }
        for s in subs:
            if s.reassembler is not None:
                out[f"reassembly[{s.topic_filter}]"] = s.reassembler.stats()
        return out
