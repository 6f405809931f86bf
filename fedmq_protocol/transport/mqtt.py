"""``MqttTransport``: the small send/receive surface fedmq uses, over paho-mqtt 2.x.

- Persistent session (MQTT 5: clean start only when asked, session expiry from the config;
  3.1.1: clean_session=False) so QoS 1 messages queued while a device is briefly away arrive.
- Subscriptions are remembered and re-made in ``on_connect``: they survive reconnects and broker
  restarts. For a *framed* subscription to an exact filter ``F`` the transport subscribes to
  both ``F`` and ``F/c/+`` (the chunk sub-topics); a filter ending in ``#`` already covers
  them and is used as is. Each framed subscription has its own
  :class:`~fedmq_protocol.chunking.Reassembler`; its handler receives ``(logical_topic, payload)``.
- Handlers and hooks run on paho's network thread; every call is wrapped so an exception is
  logged and counted and never kills the loop. A ``publish`` made from a handler or hook does
  not wait for acknowledgements (that would dead-lock the network thread); it is queued.
- ``publish(framed=True)`` chunks with the configured chunk size (capped below the broker's
  MQTT 5 Maximum-Packet-Size when announced) and keeps at most ``max_inflight`` unacknowledged
  messages, raising :class:`TransportError` when an acknowledgement does not come in time.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmq_protocol.chunking import CHUNK_OVERHEAD, Reassembler, chunk_topic, frame_payload
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.transport.config import BrokerConfig

Handler = Callable[[str, bytes], None]

# MQTT 5 CONNACK reason codes (paho converts 3.1.1 return codes to these).
_AUTH_CODES = {134: "bad user name or password", 135: "not authorized"}
_PACKET_OVERHEAD = 64  # fixed header, lengths, packet id, properties: generous


class TransportError(RuntimeError):
    """The broker could not be reached or did not accept/acknowledge something in time.

    The message is one line naming the broker URL and the reason.
    """


@dataclass(frozen=True)
class WillMessage:
    """Last Will: published by the broker if this client vanishes without a clean disconnect."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = True


@dataclass
class Subscription:
    topic_filter: str
    handler: Handler
    qos: int
    framed: bool
    wire_filters: tuple[str, ...]
    reassembler: Reassembler | None


def _match_filter(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def wire_filters_for(topic_filter: str, framed: bool) -> tuple[str, ...]:
    """The MQTT filters subscribed for one subscription (see the module docstring)."""
    if not framed or topic_filter == "#" or topic_filter.endswith("/#"):
        return (topic_filter,)
    return (topic_filter, topic_filter + "/c/+")


class MqttTransport:
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
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else clean_start,
        )
        if config.username:
            self._client.username_pw_set(config.username, config.resolved_password())
        if config.tls:
            self._client.tls_set(
                ca_certs=str(config.ca_file) if config.ca_file else None,
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
                cert_reqs=ssl.CERT_NONE if config.tls_insecure else ssl.CERT_REQUIRED,
            )
            if config.tls_insecure:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.max_inflight_messages_set(config.max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail

        self._lock = threading.RLock()
        self._publish_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._tls_state = threading.local()
        self._subs: list[Subscription] = []
        self._suback: dict[int, list[Any]] = {}
        self._pub_failures: dict[int, tuple[str, float]] = {}
        self._retained_chunks: dict[str, int] = {}
        self._connected_evt = threading.Event()
        self._connack: tuple[int, str] | None = None
        self._loop_started = False
        self._closed = False
        self.max_packet_size: int | None = None
        self.session_present = False

        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_received = 0
        self.messages_rejected = 0
        self.last_reject_reason: str | None = None
        self.handler_errors = 0
        self.publish_failures = 0
        self.connects = 0
        self.disconnects = 0
        #: ``hook(session_present: bool)`` after every successful (re)connect.
        self.on_connect: list[Callable[[bool], None]] = []
        #: ``hook(reason: str)`` after every loss of connection (not after ``close()``).
        self.on_disconnect: list[Callable[[str], None]] = []

    # -- connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected_evt.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected_evt.wait(timeout)

    def _fail(self, reason: str) -> TransportError:
        return TransportError(f"cannot connect to {self.url} as {self.client_id!r}: {reason}")

    def connect(self, timeout: float | None = None) -> None:
        """Connect and wait for the CONNACK; afterwards reconnect automatically with back-off."""
        if self._closed:
            raise TransportError(f"transport to {self.url} is closed")
        if self.connected:
            return
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._client.connect_timeout = max(0.1, timeout)
        self._connack = None
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            kwargs["properties"] = props
            kwargs["clean_start"] = mqtt.MQTT_CLEAN_START_FIRST_ONLY if self._clean_start else False
        try:
            self._client.connect(self.config.host, self.config.port, self.config.keepalive_s, **kwargs)
        except ssl.SSLError as exc:
            raise self._fail(f"TLS failure ({exc.reason or exc})") from None
        except ConnectionRefusedError:
            raise self._fail("connection refused (is a broker listening there?)") from None
        except socket.gaierror as exc:
            raise self._fail(f"unreachable: cannot resolve host ({exc.strerror or exc})") from None
        except (socket.timeout, TimeoutError):
            raise self._fail(f"unreachable: no TCP connection within {timeout:g}s") from None
        except OSError as exc:
            raise self._fail(f"unreachable ({exc.strerror or exc})") from None
        # Drive the network loop ourselves until the CONNACK: no automatic retries on a first
        # failure, so a wrong URL or password fails fast with one clear error.
        while True:
            with self._lock:
                connack = self._connack
            if connack is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abort_socket()
                raise self._fail(f"no CONNACK within {timeout:g}s")
            try:
                rc = self._client.loop(timeout=min(0.05, remaining))
            except ssl.SSLError as exc:
                self._abort_socket()
                raise self._fail(f"TLS failure ({exc.reason or exc})") from None
            except OSError as exc:
                self._abort_socket()
                raise self._fail(f"connection lost before CONNACK ({exc})") from None
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._connack is None:
                self._abort_socket()
                why = mqtt.error_string(rc)
                raise self._fail(
                    f"connection closed before CONNACK ({why}; TLS or protocol mismatch, or the broker "
                    "rejected the client)"
                )
        code, reason = connack
        if code != 0:
            self._abort_socket()
            if code in _AUTH_CODES:
                raise self._fail(
                    f"not authorized: broker says {reason!r} (check username/password and the ACL)"
                )
            raise self._fail(f"refused by broker: {reason} (reason code {code})")
        if not self._loop_started:
            self._client.loop_start()
            self._loop_started = True

    def _abort_socket(self) -> None:
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort
            pass
        try:
            self._client.loop(timeout=0.01)
        except Exception:  # noqa: BLE001
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not publish the Will) and stop the loop."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.connected:
                info = self._client.disconnect()
                del info
            if self._loop_started:
                self._client.loop_stop()
            else:
                self._abort_socket()
        finally:
            self._connected_evt.clear()

    def __enter__(self) -> "MqttTransport":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        code = int(getattr(reason_code, "value", reason_code))
        with self._lock:
            self._connack = (code, str(reason_code))
        if code != 0:
            self.log.warning("broker %s refused connection: %s", self.url, reason_code)
            return
        self.session_present = bool(getattr(flags, "session_present", False))
        mps = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.max_packet_size = int(mps) if mps else None
        with self._lock:
            subs = list(self._subs)
        pairs = [(f, s.qos) for s in subs for f in s.wire_filters]
        if pairs:
            self._send_subscribe(pairs)
        self.connects += 1
        self._connected_evt.set()
        self.log.info("connected to %s as %r (session present: %s)", self.url, self.client_id, self.session_present)
        for hook in list(self.on_connect):
            self._safe_call(hook, "on_connect hook", self.session_present)

    def _on_connect_fail(self, client, userdata) -> None:  # noqa: ANN001
        self.log.debug("reconnect to %s failed", self.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        was = self._connected_evt.is_set()
        self._connected_evt.clear()
        if self._closed or not was:
            return
        self.disconnects += 1
        self.log.warning("disconnected from %s: %s; reconnecting", self.url, reason_code)
        for hook in list(self.on_disconnect):
            self._safe_call(hook, "on_disconnect hook", str(reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._cond:
            if len(self._suback) > 1000:
                self._suback.clear()
            self._suback[mid] = list(reason_codes)
            self._cond.notify_all()
        for rc in reason_codes:
            if int(getattr(rc, "value", rc)) >= 0x80:
                self.log.warning("broker %s refused a subscription: %s", self.url, rc)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self.publish_failures += 1
            now = time.monotonic()
            with self._lock:
                for k in [k for k, (_, t) in self._pub_failures.items() if now - t > 300]:
                    del self._pub_failures[k]
                self._pub_failures[mid] = (str(reason_code), now)
            self.log.warning("broker %s rejected a publish (mid %s): %s", self.url, mid, reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        self._tls_state.in_callback = True
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
            self.bytes_received += len(payload)
            self.messages_received += 1
            with self._lock:
                subs = list(self._subs)
            for sub in subs:
                if not any(mqtt.topic_matches_sub(_match_filter(f), topic) for f in sub.wire_filters):
                    continue
                if sub.reassembler is None:
                    self._safe_call(sub.handler, f"handler for {sub.topic_filter!r}", topic, payload)
                    continue
                for reason in sub.reassembler.expire():
                    self.log.warning("%s", reason)
                try:
                    done = sub.reassembler.feed(topic, payload)
                except ProtocolError as exc:
                    self._reject(str(exc))
                    continue
                if done is not None:
                    self._safe_call(sub.handler, f"handler for {sub.topic_filter!r}", done[0], done[1])
        except Exception:  # noqa: BLE001 - never let anything kill the loop
            self.log.exception("error while dispatching a message")
        finally:
            self._tls_state.in_callback = False

    def _reject(self, reason: str) -> None:
        self.messages_rejected += 1
        self.last_reject_reason = reason
        self.log.warning("rejected message: %s", reason)

    def _safe_call(self, fn: Callable[..., Any], what: str, *args: Any) -> None:
        prev = getattr(self._tls_state, "in_callback", False)
        self._tls_state.in_callback = True
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            self.handler_errors += 1
            self.log.exception("%s raised", what)
        finally:
            self._tls_state.in_callback = prev

    def _in_network_thread(self) -> bool:
        return bool(getattr(self._tls_state, "in_callback", False)) or (
            threading.current_thread() is getattr(self._client, "_thread", None)
        )

    # -- subscribe --------------------------------------------------------------------------
    def _send_subscribe(self, pairs: list[tuple[str, int]]) -> int | None:
        if self._v5:
            req: list[Any] = [(f, SubscribeOptions(qos=q)) for f, q in pairs]
        else:
            req = pairs
        rc, mid = self._client.subscribe(req)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return mid

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
        if not self.connected:
            return sub
        mid = self._send_subscribe([(f, qos) for f in sub.wire_filters])
        if mid is None or self._in_network_thread():
            return sub
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._suback:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"no SUBACK for {topic_filter!r} from {self.url} within {timeout:g}s")
                self._cond.wait(remaining)
            codes = self._suback.pop(mid)
        bad = [str(c) for c in codes if int(getattr(c, "value", c)) >= 0x80]
        if bad:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)
            raise TransportError(f"broker {self.url} refused subscription to {topic_filter!r}: {bad[0]}")
        return sub

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            gone = [s for s in self._subs if s.topic_filter == topic_filter]
            self._subs = [s for s in self._subs if s.topic_filter != topic_filter]
            still = {f for s in self._subs for f in s.wire_filters}
        filters = sorted({f for s in gone for f in s.wire_filters} - still)
        if filters and self.connected:
            self._client.unsubscribe(filters)

    # -- publish ----------------------------------------------------------------------------
    def effective_chunk_size(self, topic: str) -> int:
        """The configured chunk size, capped below the broker's Maximum-Packet-Size."""
        cs = self.config.chunk_size
        if self.max_packet_size:
            cap = self.max_packet_size - CHUNK_OVERHEAD - len(topic.encode()) - 16 - _PACKET_OVERHEAD
            if cap < 1:
                raise TransportError(f"broker {self.url} Maximum-Packet-Size {self.max_packet_size} is too small")
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
    ) -> int:
        """Publish; returns the bytes sent on the wire (payload incl. frames, no MQTT headers).

        Waits until every QoS >= 1 message is acknowledged (QoS 0: written), at most
        ``max_inflight`` outstanding at a time; raises ``TransportError`` on timeout or when the
        broker rejects a message.
        """
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to topic {topic!r}")
        if self._closed:
            raise TransportError(f"transport to {self.url} is closed")
        payload = bytes(payload)
        if framed:
            try:
                frames = frame_payload(payload, self.effective_chunk_size(topic))
            except ValueError as exc:
                raise TransportError(f"cannot publish to {topic!r} on {self.url}: {exc}") from None
        else:
            if self.max_packet_size and len(payload) + len(topic.encode()) + _PACKET_OVERHEAD > self.max_packet_size:
                raise TransportError(
                    f"cannot publish {len(payload)} bytes to {topic!r}: broker {self.url} "
                    f"Maximum-Packet-Size is {self.max_packet_size} (use framed=True)"
                )
            frames = [("", payload)]
        n_chunks = len(frames) - 1
        msgs = [(topic + suffix, frame) for suffix, frame in frames]
        if retain:
            old = self._retained_chunks.get(topic, 0)
            msgs += [(chunk_topic(topic, i), b"") for i in range(n_chunks, old)]
        timeout = self.config.publish_timeout_s if timeout is None else timeout
        sent = self._publish_many(msgs, qos, retain, timeout, topic)
        if retain:
            if n_chunks:
                self._retained_chunks[topic] = n_chunks
            else:
                self._retained_chunks.pop(topic, None)
        return sent

    def _publish_many(self, msgs: list[tuple[str, bytes]], qos: int, retain: bool, timeout: float, what: str) -> int:
        sent = 0
        if self._in_network_thread():
            for t, frame in msgs:
                info = self._client.publish(t, frame, qos, retain)
                self._check_rc(info, qos, t)
                sent += len(frame)
                self.bytes_sent += len(frame)
            return sent
        start = time.monotonic()
        deadline = start + timeout
        with self._publish_lock:
            window: deque[tuple[Any, str]] = deque()
            try:
                for t, frame in msgs:
                    while len(window) >= self.config.max_inflight:
                        self._wait(*window[0], deadline, timeout, start)
                        window.popleft()
                    info = self._client.publish(t, frame, qos, retain)
                    window.append((info, t))
                    self._check_rc(info, qos, t)
                    sent += len(frame)
                    self.bytes_sent += len(frame)
                while window:
                    self._wait(*window[0], deadline, timeout, start)
                    window.popleft()
            except TransportError:
                self._abandon([info for info, _ in window])
                raise
        return sent

    def _abandon(self, infos: list[Any]) -> None:
        """Drop unacknowledged messages from paho's queue after a failed publish.

        Otherwise paho re-sends them after every reconnect; a message the broker refuses (e.g.
        over its size limit: Mosquitto then drops the connection) would loop forever.
        Best effort: uses paho internals and does nothing if they change.
        """
        client = self._client
        try:
            waiting = {mqtt.mqtt_ms_wait_for_puback, mqtt.mqtt_ms_wait_for_pubrec, mqtt.mqtt_ms_wait_for_pubcomp}
            with client._out_message_mutex:
                for info in infos:
                    m = client._out_messages.get(info.mid)
                    if m is not None and m.info is info:
                        del client._out_messages[info.mid]
                        if m.state in waiting and client._inflight_messages > 0:
                            client._inflight_messages -= 1
        except Exception:  # noqa: BLE001
            self.log.debug("could not drop abandoned messages from paho's queue", exc_info=True)

    def _check_rc(self, info: Any, qos: int, topic: str) -> None:
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps QoS >= 1 messages and sends them after the reconnect.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            return
        raise TransportError(f"publish to {topic!r} on {self.url} failed: {mqtt.error_string(rc)}")

    def _wait(self, info: Any, topic: str, deadline: float, timeout: float, start: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            info.wait_for_publish(remaining)
        if not info.is_published():
            state = (
                "connected"
                if self.connected
                else "disconnected; a broker drops the connection on a message over its size limit, "
                "publish large payloads with framed=True"
            )
            raise TransportError(
                f"publish to {topic!r} not acknowledged by {self.url} within {timeout:g}s ({state})"
            )
        with self._lock:
            failure = self._pub_failures.get(info.mid)
            if failure is not None and failure[1] >= start:
                del self._pub_failures[info.mid]
            else:
                failure = None
        if failure is not None:
            raise TransportError(f"broker {self.url} rejected publish to {topic!r}: {failure[0]}")

    def publish_json(
        self, topic: str, obj: Any, *, qos: int = 1, retain: bool = False, timeout: float | None = None
    ) -> int:
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
