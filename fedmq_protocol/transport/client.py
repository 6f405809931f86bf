"""``MqttClient``: one connection to one broker over paho-mqtt 2.x; knows nothing of framing.

- ``connect()`` fails fast with one line naming the URL and the reason; afterwards paho
  reconnects with back-off (see :mod:`fedmq_protocol.transport.connection`: session, TLS, Will).
- Subscriptions are remembered and re-made in ``on_connect``: they survive reconnects and broker
  restarts. ``subscribe()`` waits for the SUBACK.
- Handlers and hooks run on paho's network thread; every call is wrapped so an exception is
  logged and counted and never kills the loop. Nothing called from there waits for an
  acknowledgement (that would dead-lock the network thread): a publish is only queued.
- ``publish()`` hands ONE message to paho and returns its completion, a ``Future`` kept per
  message id in an :class:`~fedmq_protocol.transport.acks.AckTable`. ``publish_many()`` sends
  messages in order with at most ``max_inflight`` unacknowledged and waits for all, raising
  :class:`TransportError` when an acknowledgement does not come in time or the broker rejects one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmq_protocol.transport.acks import AckTable
from fedmq_protocol.transport.config import BrokerConfig
from fedmq_protocol.transport.connection import WillMessage, abort_socket, connect_first_time, new_paho_client
from fedmq_protocol.transport.errors import SubscriptionRefused, TransportError

Handler = Callable[[str, bytes], None]


def refuses_mqtt5(reason: str) -> bool:
    """A first-connect failure that means the broker does not speak MQTT 5 (closed before the
    CONNACK, or refused as an unsupported protocol version)."""
    return ("before CONNACK" in reason and "TLS failure" not in reason) or "protocol version" in reason.lower()


@dataclass(frozen=True, eq=False)
class RawSubscription:
    """MQTT filters whose messages go, as received, to one handler; ``unsubscribe(name)`` ends it."""

    name: str
    filters: tuple[str, ...]
    qos: int
    handler: Handler


def _matched_filter(topic_filter: str) -> str:
    """The filter a topic is matched against: ``$share/group/F`` delivers topics matching ``F``."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


class MqttClient:
    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: WillMessage | None = None,
        clean_start: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.url = config.url
        self.log = logger or logging.getLogger("fedmq.transport")
        self._v5 = config.mqtt_version == "5"
        self._clean_start = clean_start
        self._will = will
        self._paho = self._new_paho()

        self._lock = threading.Lock()
        # Held from paho.publish() until its id is registered, and while on_connect drops and
        # re-sends messages: every message paho holds is then either pending or abandoned.
        self._handoff_lock = threading.Lock()
        self._publish_lock = threading.Lock()  # one publish_many() at a time keeps messages in order
        self._network = threading.local()
        self._subscriptions: list[RawSubscription] = []
        self._publishes: AckTable[ReasonCode] = AckTable()
        self._subacks: AckTable[list[ReasonCode]] = AckTable()
        self._connected = threading.Event()
        self._connack: tuple[int, str] | None = None
        # SUBACK of the subscriptions the latest CONNACK sent again (made before connect())
        self._resubscribed: Future[list[ReasonCode]] | None = None
        self._loop_started = False
        self._closed = False
        self.max_packet_size: int | None = None
        self.session_present = False

        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_received = 0
        self.handler_errors = 0
        self.publish_failures = 0
        self.connects = 0
        self.disconnects = 0
        #: ``hook(session_present: bool)`` after every successful (re)connect.
        self.on_connect: list[Callable[[bool], None]] = []
        #: ``hook(reason: str)`` after every loss of connection (not after ``close()``).
        self.on_disconnect: list[Callable[[str], None]] = []

    # -- connection -------------------------------------------------------------------------
    def _new_paho(self) -> mqtt.Client:
        client = new_paho_client(self.config, self.client_id, will=self._will, clean_start=self._clean_start)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        return client

    def set_will(self, will: WillMessage) -> None:
        """The Last Will of the next connection (the current one keeps the Will it connected with)."""
        self._will = will
        self._paho.will_set(will.topic, will.payload, will.qos, will.retain)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_messages(self) -> int:
        """Message ids (PUBLISH and SUBSCRIBE) still awaiting an acknowledgement someone tracks."""
        return self._publishes.pending + self._subacks.pending

    @property
    def abandoned_messages(self) -> int:
        """Message ids given up on whose acknowledgement may still come (forgotten at the reconnect)."""
        return self._publishes.abandoned + self._subacks.abandoned

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def connect(self, timeout: float | None = None) -> None:
        """Connect and wait for the CONNACK, then for the SUBACK of the subscriptions made before;
        afterwards reconnect automatically with back-off.

        A message published by another client once this returns reaches those subscriptions. A
        filter the broker refuses here is logged (subscribe after connecting to have it raised).
        """
        if self._closed:
            raise TransportError(f"transport to {self.url} is closed")
        if self.connected:
            return
        with self._lock:
            self._connack = None
        wait = self.config.connect_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        try:
            connect_first_time(self._paho, self.config, self.client_id, clean_start=self._clean_start,
                               timeout=wait, connack=self._read_connack)
        except TransportError as exc:
            if not (self._v5 and refuses_mqtt5(str(exc))):
                raise
            # a broker that speaks 3.1.1 only (RabbitMQ 3.10's MQTT plugin) drops an MQTT 5 CONNECT
            self.log.warning("broker %s refused MQTT 5 (%s); retrying with MQTT 3.1.1", self.url, exc)
            self.config = self.config.model_copy(update={"mqtt_version": "3.1.1"})
            self._v5 = False
            self._paho = self._new_paho()
            with self._lock:
                self._connack = None
            connect_first_time(self._paho, self.config, self.client_id, clean_start=self._clean_start,
                               timeout=wait, connack=self._read_connack)
        if not self._loop_started:
            self._paho.loop_start()
            self._loop_started = True
        self._await_resubscribed(deadline, wait)

    def _await_resubscribed(self, deadline: float, wait: float) -> None:
        with self._lock:
            granted, self._resubscribed = self._resubscribed, None
        if granted is None:
            return
        try:
            codes = self._subacks.result_within(granted, deadline - time.monotonic())
        except TransportError:
            if not self.connected:  # lost before the SUBACK: the reconnect subscribes again
                return
            raise
        if codes is None:
            raise TransportError(f"connected to {self.url} but no SUBACK for the subscriptions within {wait:g}s")

    def _read_connack(self) -> tuple[int, str] | None:
        with self._lock:
            return self._connack

    def close(self) -> None:
        """Disconnect cleanly (no Will), stop the loop, fail what still waits for an acknowledgement."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.connected:
                self._paho.disconnect()
            if self._loop_started:
                self._paho.loop_stop()
            else:
                abort_socket(self._paho)
        finally:
            self._connected.clear()
            closed = TransportError(f"transport to {self.url} is closed")
            self._publishes.close(closed)
            self._subacks.close(closed)

    # -- paho callbacks (network thread) ----------------------------------------------------
    @contextmanager
    def _network_thread(self) -> Iterator[None]:
        """Marks code run from a paho callback: what it publishes or subscribes is not awaited."""
        before = getattr(self._network, "active", False)
        self._network.active = True
        try:
            yield
        finally:
            self._network.active = before

    def _on_network_thread(self) -> bool:
        return bool(getattr(self._network, "active", False))

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
        reason_code: ReasonCode, properties: Properties | None,
    ) -> None:
        with self._network_thread():
            code = reason_code.value
            with self._lock:
                self._connack = (code, str(reason_code))
            if code != 0:
                self.log.warning("broker %s refused connection: %s", self.url, reason_code)
                return
            self.session_present = bool(flags.session_present)
            mps = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
            self.max_packet_size = int(mps) if mps else None
            self._drop_abandoned_messages()
            with self._lock:
                subs = list(self._subscriptions)
            pairs = [(f, s.qos) for s in subs for f in s.filters]
            granted = self._send_subscribe(pairs) if pairs else None
            with self._lock:
                self._resubscribed = granted
            self.connects += 1
            self._connected.set()
            self.log.info("connected to %s as %r (session present: %s)", self.url, self.client_id, self.session_present)
            for hook in list(self.on_connect):
                self._safe_call(hook, "on_connect hook", self.session_present)

    def _drop_abandoned_messages(self) -> None:
        """Before paho re-sends what it holds: drop the messages given up on, or one the broker
        refuses (over its size limit: Mosquitto drops the connection) is re-sent forever.

        paho's only public way is ``drop_out_messages()``, which drops them all, so the ones still
        awaited are handed to paho again under new ids (QoS 1 allows the duplicate this may cause;
        fedmq sends no QoS 2). The reconnect reset paho's in-flight count, so no slot stays taken.
        """
        if not self._publishes.has_abandoned():
            return
        with self._handoff_lock:
            for message in self._paho.drop_out_messages():
                if not self._publishes.is_pending(message.mid):
                    self._publishes.forget_abandoned(message.mid)
                    continue
                info = self._paho.publish(
                    message.topic, message.payload, message.qos, message.retain, message.properties
                )
                self._publishes.moved(message.mid, info.mid)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.log.debug("reconnect to %s failed", self.url)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode, properties: Properties | None,
    ) -> None:
        with self._network_thread():
            was = self._connected.is_set()
            self._connected.clear()
            # paho forgets unwritten QoS 0 packets and SUBSCRIBEs on a disconnect.
            lost = f"connection to {self.url} lost before"
            self._publishes.connection_lost(TransportError(f"{lost} a QoS 0 message was written"))
            self._subacks.connection_lost(TransportError(f"{lost} the SUBACK"))
            if self._closed or not was:
                return
            self.disconnects += 1
            self.log.warning("disconnected from %s: %s; reconnecting", self.url, reason_code)
            for hook in list(self.on_disconnect):
                self._safe_call(hook, "on_disconnect hook", str(reason_code))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int,
        reason_codes: list[ReasonCode], properties: Properties | None,
    ) -> None:
        self._subacks.settle(mid, list(reason_codes))
        for rc in reason_codes:
            if rc.is_failure:
                self.log.warning("broker %s refused a subscription: %s", self.url, rc)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties,
    ) -> None:
        if reason_code.is_failure:
            self.publish_failures += 1
            self.log.warning("broker %s rejected a publish (mid %s): %s", self.url, mid, reason_code)
        self._publishes.settle(mid, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._network_thread():
            try:
                topic = msg.topic
                payload = bytes(msg.payload)
                self.bytes_received += len(payload)
                self.messages_received += 1
                with self._lock:
                    subs = list(self._subscriptions)
                for sub in subs:
                    if any(mqtt.topic_matches_sub(_matched_filter(f), topic) for f in sub.filters):
                        self._safe_call(sub.handler, f"handler for {sub.name!r}", topic, payload)
            except Exception:
                self.log.exception("error while dispatching a message")

    def _safe_call(self, fn: Callable[..., None], what: str, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.handler_errors += 1
            self.log.exception("%s raised", what)

    # -- subscribe --------------------------------------------------------------------------
    def _send_subscribe(self, pairs: Sequence[tuple[str, int]]) -> Future[list[ReasonCode]] | None:
        if self._v5:
            rc, mid = self._paho.subscribe([(f, SubscribeOptions(qos=q)) for f, q in pairs])
        else:
            rc, mid = self._paho.subscribe(list(pairs))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        return self._subacks.expect(mid, survives_reconnect=False)

    def subscribe(
        self, name: str, filters: Sequence[str], handler: Handler, *, qos: int = 1, timeout: float | None = None,
    ) -> RawSubscription:
        """Subscribe to ``filters`` (now if connected, and again after every reconnect).

        When connected (and not called from a handler) waits for the SUBACK and raises
        ``SubscriptionRefused`` if the broker refuses a filter, ``TransportError`` on timeout.
        """
        if not name or not filters or not all(filters) or qos not in (0, 1, 2):
            raise ValueError(f"bad subscription {name!r} to {list(filters)} qos={qos}")
        sub = RawSubscription(name, tuple(filters), qos, handler)
        with self._lock:
            self._subscriptions.append(sub)
        if not self.connected:
            return sub
        granted = self._send_subscribe([(f, qos) for f in sub.filters])
        if granted is None or self._on_network_thread():
            return sub
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        codes = self._subacks.result_within(granted, timeout)
        if codes is None:
            raise TransportError(f"no SUBACK for {name!r} from {self.url} within {timeout:g}s")
        refused = [str(c) for c in codes if c.is_failure]
        if refused:
            with self._lock:
                if sub in self._subscriptions:
                    self._subscriptions.remove(sub)
            raise SubscriptionRefused(f"broker {self.url} refused subscription to {name!r}: {refused[0]}")
        return sub

    def unsubscribe(self, name: str) -> None:
        """End every subscription called ``name``; filters another subscription uses stay."""
        with self._lock:
            gone = [s for s in self._subscriptions if s.name == name]
            self._subscriptions = [s for s in self._subscriptions if s.name != name]
            still = {f for s in self._subscriptions for f in s.filters}
        filters = sorted({f for s in gone for f in s.filters} - still)
        if filters and self.connected:
            self._paho.unsubscribe(filters)

    # -- publish ----------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Mapping[str, Any] | None = None) -> Future[ReasonCode]:
        """Hand one message to paho, never waiting; ``TransportError`` if paho refuses it.

        The future's result is the broker's reason code (``is_failure``: rejected) once the message
        is acknowledged (QoS 0: written); it fails with ``TransportError`` when the connection drops
        under a QoS 0 message or the client closes.
        """
        if self._closed:
            raise TransportError(f"transport to {self.url} is closed")
        props = self._publish_properties(properties)
        with self._handoff_lock:
            info = self._paho.publish(topic, payload, qos, retain, props)
            # Not connected: paho keeps a QoS >= 1 message and sends it after the reconnect.
            queued = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued:
                raise TransportError(f"publish to {topic!r} on {self.url} failed: {mqtt.error_string(info.rc)}")
            done = self._publishes.expect(info.mid, survives_reconnect=qos > 0)
        self.bytes_sent += len(payload)
        return done

    def _publish_properties(self, properties: Mapping[str, Any] | None) -> Properties | None:
        """MQTT 5 PUBLISH properties by paho name (``ResponseTopic``, ``CorrelationData``, ...);
        none on MQTT 3.1.1, which has no properties."""
        if not properties or not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in properties.items():
            setattr(props, name, value)
        return props

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = False,
        timeout: float | None = None, properties: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish ``(topic, payload)`` messages in order and wait until every one is acknowledged
        (QoS 0: written), at most ``max_inflight`` outstanding at a time; raises ``TransportError``
        when ``timeout`` (default ``publish_timeout_s``) passes first or the broker rejects one.
        From paho's network thread the messages are only queued."""
        if self._on_network_thread():
            for topic, payload in messages:
                self.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            return
        timeout = self.config.publish_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._publish_lock:
            window: deque[tuple[str, Future[ReasonCode]]] = deque()
            try:
                for topic, payload in messages:
                    while len(window) >= self.config.max_inflight:
                        self._await_ack(*window.popleft(), deadline, timeout)
                    window.append((topic, self.publish(topic, payload, qos=qos, retain=retain,
                                                       properties=properties)))
                while window:
                    self._await_ack(*window.popleft(), deadline, timeout)
            except BaseException:
                for _, unacknowledged in window:  # their late acks are ignored
                    self._publishes.abandon(unacknowledged)
                raise

    def _await_ack(self, topic: str, done: Future[ReasonCode], deadline: float, timeout: float) -> None:
        reason = self._publishes.result_within(done, deadline - time.monotonic())
        if reason is None:
            state = (
                "connected"
                if self.connected
                else "disconnected; a broker drops the connection on a message over its size limit, "
                "publish large payloads with framed=True"
            )
            raise TransportError(f"publish to {topic!r} not acknowledged by {self.url} within {timeout:g}s ({state})")
        if reason.is_failure:
            raise TransportError(f"broker {self.url} rejected publish to {topic!r}: {reason}")
