"""The device registry: what the coordinator knows of each device, from its presence messages.

Presence is the retained status each agent publishes (birth, refreshed every
``status_interval_s``) and its Last Will (death). Statuses are totally ordered
(``DeviceStatus.order``: process ``seq``, connection, birth before death, message counter): one
not later than the latest accepted is a replay, a redelivery or a stale Will, and is ignored, so
no copy of an earlier status can move a device back. A device whose status has not been
refreshed for ``status_max_age_s`` is not counted as ready (a wrong state cannot stick). With
device keys, a status must be signed by its device (``require_signatures``: unsigned ones are
refused). The records live in ``CoordinatorState.devices`` and are persisted with it;
``online`` is re-learnt after a restart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from broker_coordinator.state import DeviceRecord
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import Verifier
from fedmq_protocol.topics import Topics

log = logging.getLogger("fedmq.coordinator")


@dataclass(frozen=True)
class Presence:
    """What one accepted status says about its device."""

    device_id: str
    online: bool
    back: bool  # (re)appeared: restarted, reconnected or asked to announce itself again


class DeviceRegistry:
    def __init__(self, devices: dict[str, DeviceRecord], topics: Topics, offline_grace_s: float, *,
                 status_max_age_s: float | None = None, verifier: Verifier | None = None,
                 signatures_required: bool = False) -> None:
        self.devices = devices
        self.topics = topics
        self.offline_grace_s = offline_grace_s
        self.status_max_age_s = status_max_age_s
        self.verifier = verifier
        self.signatures_required = signatures_required
        self._announce_expected: set[str] = set()  # after the broker lost our session
        self._relearn = set(devices)  # after a restart, the retained status (order seen before) counts once
        self.replays_ignored = 0  # statuses not later than the latest accepted (replays, stale Wills)
        for dev in devices.values():
            dev.online = False  # presence is re-learnt from the retained status topics

    def on_status(self, topic: str, payload: bytes, arrived_at: float | None = None) -> Presence | None:
        """Record a status message (None: cleared or stale); ProtocolError when it is invalid."""
        if not payload:
            return None  # a cleared retained status
        device_id = self.topics.device_id_from(topic)
        st = m.DeviceStatus.from_json(payload)
        if st.device_id != device_id:
            raise ProtocolError(f"status names device {st.device_id!r} but was published on {topic!r}")
        self._check_signature(st)
        dev = self.devices.setdefault(device_id, DeviceRecord(device_id))
        order = list(st.order)
        if dev.order is not None and (order < dev.order or (order == dev.order and device_id not in self._relearn)):
            self.replays_ignored += 1
            return None  # a replay, a QoS 1 redelivery, or a stale Will or birth from an earlier connection
        if dev.order is None and st.seq < dev.seq:
            return None  # a record of an earlier release: only seq was kept
        self._relearn.discard(device_id)
        was_online, was_seq = dev.online, dev.seq
        dev.seq, dev.order, dev.online = st.seq, order, st.online
        dev.last_seen = time.time() if arrived_at is None else arrived_at  # never the status's own ts
        dev.state = st.state if st.online else "offline"
        if st.online:
            dev.method, dev.model, dev.tokenizer = st.method, st.model, st.tokenizer
            dev.num_samples, dev.eval_samples = st.num_samples or 0, st.eval_samples or 0
            dev.applied_version = st.applied_version
            dev.resources = st.resources.model_dump() if st.resources else None
            dev.memory = st.memory.model_dump(mode="json", exclude_none=True) if st.memory else None
            if st.memory is not None and st.memory.refused and dev.state == "refused":
                log.warning("device %s refuses to train: %s", device_id, st.memory.refused)
        if was_online != dev.online:
            log.info("device %s is %s%s", device_id, "online" if dev.online else "offline",
                     " (Last Will)" if st.will else "")
        back = not was_online or st.seq > was_seq or device_id in self._announce_expected
        if st.online:
            self._announce_expected.discard(device_id)
        return Presence(device_id, st.online, back)

    def _check_signature(self, st: m.DeviceStatus) -> None:
        if self.verifier is None:
            return
        if not self.signatures_required and (st.signature is None or st.device_id not in self.verifier.keys):
            return  # optional: unsigned or unknown devices pass, a bad signature does not
        self.verifier.verify_status(st)

    def expect_announcements(self, device_ids: set[str]) -> None:
        """These devices' next status counts as their coming back (the broker lost our session)."""
        self._announce_expected = set(device_ids)

    def fresh(self, dev: DeviceRecord, now: float | None = None) -> bool:
        """Its status was refreshed within ``status_max_age_s`` (no limit: always)."""
        if self.status_max_age_s is None:
            return True
        return (time.time() if now is None else now) - dev.last_seen <= self.status_max_age_s

    def ready(self) -> list[DeviceRecord]:
        now = time.time()
        return [d for d in self.devices.values() if d.ready and self.fresh(d, now)]

    def ready_with_data(self) -> int:
        return len([d for d in self.ready() if d.num_samples > 0])

    def online(self) -> list[DeviceRecord]:
        return [d for d in self.devices.values() if d.online]

    def may_answer(self, device_id: str, task_id: str | None, now: float) -> bool:
        """Online, or offline for less than ``offline_grace_s`` (a broker restart fires every Will),
        and neither refusing to train nor stopped over its memory budget for ``task_id``."""
        dev = self.devices.get(device_id)
        if dev is None or dev.declined(task_id):
            return False
        return dev.online or now - dev.last_seen < self.offline_grace_s

    def record_participation(self, selected: list[str], accepted: set[str]) -> None:
        for d in selected:
            rec = self.devices.get(d)
            if rec:
                if d in accepted:
                    rec.rounds_participated += 1
                else:
                    rec.rounds_missed += 1
