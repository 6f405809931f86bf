"""The paho client built from a :class:`BrokerConfig`, and its first connection attempt.

- Persistent session (MQTT 5: clean start only when asked, session expiry from the config;
  3.1.1: clean_session=False) so QoS 1 messages queued while a device is briefly away arrive.
  TLS, username/password and the Last Will come from the config and the caller.
- The first connect drives paho's network loop itself until the CONNACK: no automatic retries
  on a first failure, so a wrong URL or password fails fast with one line naming the URL and the
  reason (refused, unreachable, TLS, not authorized). Afterwards paho's loop thread reconnects
  with back-off (``reconnect_min_s`` .. ``reconnect_max_s``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq_protocol.transport.config import BrokerConfig
from fedmq_protocol.transport.errors import TransportError

# MQTT 5 CONNACK reason codes (paho converts 3.1.1 return codes to these).
_AUTH_CODES = {134: "bad user name or password", 135: "not authorized"}


@dataclass(frozen=True)
class WillMessage:
    """Last Will: published by the broker if this client vanishes without a clean disconnect."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = True


def new_paho_client(
    config: BrokerConfig, client_id: str, *, will: WillMessage | None, clean_start: bool
) -> mqtt.Client:
    """A configured paho client (no callbacks yet, not connected)."""
    v5 = config.mqtt_version == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean_start,
    )
    if config.username:
        client.username_pw_set(config.username, config.resolved_password())
    if config.tls:
        client.tls_set(
            ca_certs=str(config.ca_file) if config.ca_file else None,
            certfile=str(config.cert_file) if config.cert_file else None,
            keyfile=str(config.key_file) if config.key_file else None,
            cert_reqs=ssl.CERT_NONE if config.tls_insecure else ssl.CERT_REQUIRED,
        )
        if config.tls_insecure:
            client.tls_insecure_set(True)
    if will is not None:
        client.will_set(will.topic, will.payload, will.qos, will.retain)
    client.max_inflight_messages_set(config.max_inflight)
    client.max_queued_messages_set(0)
    # paho annotates the delays as int; it computes with them as float seconds.
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
    return client


def connect_first_time(
    client: mqtt.Client,
    config: BrokerConfig,
    client_id: str,
    *,
    clean_start: bool,
    timeout: float,
    connack: Callable[[], tuple[int, str] | None],
) -> None:
    """Connect and drive the loop until the CONNACK, which ``connack()`` reads (on_connect sets it).

    Raises ``TransportError`` with one line naming the URL and the reason.
    """

    def failure(reason: str) -> TransportError:
        return TransportError(f"cannot connect to {config.url} as {client_id!r}: {reason}")

    deadline = time.monotonic() + timeout
    client.connect_timeout = max(0.1, timeout)
    properties: Properties | None = None
    clean: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY  # 3.1.1: clean_session decides
    if config.mqtt_version == "5":
        # paho's Properties constructor has no annotations.
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = config.session_expiry_s
        clean = mqtt.MQTT_CLEAN_START_FIRST_ONLY if clean_start else False
    try:
        client.connect(config.host, config.port, config.keepalive_s, clean_start=clean, properties=properties)
    except ssl.SSLError as exc:
        raise failure(f"TLS failure ({exc.reason or exc})") from None
    except ConnectionRefusedError:
        raise failure("connection refused (is a broker listening there?)") from None
    except socket.gaierror as exc:
        raise failure(f"unreachable: cannot resolve host ({exc.strerror or exc})") from None
    except TimeoutError:
        raise failure(f"unreachable: no TCP connection within {timeout:g}s") from None
    except OSError as exc:
        raise failure(f"unreachable ({exc.strerror or exc})") from None
    while (answer := connack()) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            abort_socket(client)
            raise failure(f"no CONNACK within {timeout:g}s")
        try:
            rc = client.loop(timeout=min(0.05, remaining))
        except ssl.SSLError as exc:
            abort_socket(client)
            raise failure(f"TLS failure ({exc.reason or exc})") from None
        except OSError as exc:
            abort_socket(client)
            raise failure(f"connection lost before CONNACK ({exc})") from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and connack() is None:
            abort_socket(client)
            raise failure(
                f"connection closed before CONNACK ({mqtt.error_string(rc)}; TLS or protocol mismatch, "
                "or the broker rejected the client)"
            )
    code, reason = answer
    if code != 0:
        abort_socket(client)
        if code in _AUTH_CODES:
            raise failure(f"not authorized: broker says {reason!r} (check username/password and the ACL)")
        raise failure(f"refused by broker: {reason} (reason code {code})")


def abort_socket(client: mqtt.Client) -> None:
    """Drop a connection that is not (yet) run by paho's loop thread; best effort."""
    with contextlib.suppress(Exception):
        client.disconnect()
    with contextlib.suppress(Exception):
        client.loop(timeout=0.01)
