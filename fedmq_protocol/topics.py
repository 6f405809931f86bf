"""The topic namespace: ``{root}/{federation}/...``.

Every topic's direction, QoS and retained flag is documented in docs/protocol.md;
the constants below are the single source of those flags in code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmq_protocol.errors import ProtocolError

# A level must be a plain MQTT topic level: no wildcards, separators or NUL.
_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

QOS_STATUS = 1
QOS_TELEMETRY = 0
QOS_TASK = 1
QOS_UPDATE = 1
QOS_GLOBAL = 1
QOS_ROUNDS = 1


def check_level(value: str, what: str) -> str:
    """Return ``value`` if it is usable as one topic level, else raise naming ``what``."""
    if not isinstance(value, str) or not _LEVEL.match(value):
        raise ProtocolError(
            f"{what} {value!r} is not a valid topic level (1-64 chars of A-Z a-z 0-9 _ . -)"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation."""

    root: str = "fedmq"
    federation: str = "default"

    def __post_init__(self) -> None:
        check_level(self.root, "topic root")
        check_level(self.federation, "federation name")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.federation}"

    # -- device side (written by the agent with id ``device_id``) --------------------------
    def device_status(self, device_id: str) -> str:
        """JSON, retained, QoS 1: birth message; the Last Will publishes the matching death."""
        return f"{self.base}/devices/{check_level(device_id, 'device id')}/status"

    def device_telemetry(self, device_id: str) -> str:
        """JSON, not retained, QoS 0: resources and progress."""
        return f"{self.base}/devices/{check_level(device_id, 'device id')}/telemetry"

    def device_update(self, device_id: str) -> str:
        """msgpack (framed, chunked), not retained, QoS 1: fit/eval/init results."""
        return f"{self.base}/devices/{check_level(device_id, 'device id')}/update"

    # -- coordinator side -------------------------------------------------------------------
    def device_task(self, device_id: str) -> str:
        """msgpack (framed), not retained, QoS 1: a task for one device."""
        return f"{self.base}/devices/{check_level(device_id, 'device id')}/task"

    @property
    def global_model(self) -> str:
        """msgpack (framed, chunked), retained, QoS 1: the latest snapshot of the global adapter."""
        return f"{self.base}/global"

    def global_diff(self, version: int) -> str:
        """msgpack (framed, chunked), retained, QoS 1: global ``version`` as a difference from
        ``version - 1``; retained from the latest snapshot on, cleared when the next snapshot lands."""
        if not isinstance(version, int) or version < 1:
            raise ProtocolError(f"invalid global version {version!r}")
        return f"{self.base}/global/diff/{version}"

    @property
    def all_global_diffs(self) -> str:
        return f"{self.base}/global/diff/+"

    @property
    def coordinator_status(self) -> str:
        """JSON, retained, QoS 1: coordinator birth / will / progress."""
        return f"{self.base}/coordinator/status"

    @property
    def rounds(self) -> str:
        """JSON, retained (last round), QoS 1: per-round metrics."""
        return f"{self.base}/coordinator/rounds"

    # -- site aggregators (written by ``fedmq aggregator`` on its site broker, bridged up) ----
    def site_partial(self, site_id: str) -> str:
        """msgpack (framed, chunked), not retained, QoS 1: a site's partial aggregate."""
        return f"{self.base}/partials/{check_level(site_id, 'site id')}"

    @property
    def all_partials(self) -> str:
        return f"{self.base}/partials/+/#"

    def site_from(self, topic: str) -> str:
        """The site id of a ``{base}/partials/{site}`` or ``{base}/sites/{site}/...`` topic."""
        for prefix in (f"{self.base}/partials/", f"{self.base}/sites/"):
            if topic.startswith(prefix):
                return check_level(topic[len(prefix):].split("/", 1)[0], f"site id in topic {topic!r}")
        raise ProtocolError(f"topic {topic!r} is not a site topic of {self.base!r}")

    def site_relay(self, site_id: str, device_id: str) -> str:
        """msgpack (framed), not retained, QoS 1: a site device's evaluate or init result, as the
        device published it, forwarded by its site aggregator."""
        return (f"{self.base}/sites/{check_level(site_id, 'site id')}/relay/"
                f"{check_level(device_id, 'device id')}")

    def site_status(self, site_id: str) -> str:
        """JSON, retained, QoS 1: a site aggregator's birth / Will and counters."""
        return f"{self.base}/sites/{check_level(site_id, 'site id')}/status"

    @property
    def all_site_relays(self) -> str:
        return f"{self.base}/sites/+/relay/+/#"

    def relayed_device_from(self, topic: str) -> str:
        """The device id of a ``{base}/sites/{site}/relay/{device}[/...]`` topic."""
        parts = topic[len(self.base) + 1:].split("/") if topic.startswith(self.base + "/") else []
        if len(parts) < 4 or parts[0] != "sites" or parts[2] != "relay":
            raise ProtocolError(f"topic {topic!r} is not a relay topic of {self.base!r}")
        return check_level(parts[3], f"device id in topic {topic!r}")

    # -- subscription filters ---------------------------------------------------------------
    @property
    def all_device_status(self) -> str:
        return f"{self.base}/devices/+/status"

    @property
    def all_device_updates(self) -> str:
        # ``update/#`` also matches ``update`` itself and its chunk sub-topics.
        return f"{self.base}/devices/+/update/#"

    @property
    def all_device_telemetry(self) -> str:
        return f"{self.base}/devices/+/telemetry"

    def device_id_from(self, topic: str) -> str:
        """Extract and validate the device id of a ``{base}/devices/{id}/...`` topic."""
        prefix = f"{self.base}/devices/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not under {prefix!r}")
        rest = topic[len(prefix):].split("/", 1)
        return check_level(rest[0], f"device id in topic {topic!r}")
