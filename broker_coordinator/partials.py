"""Partial intake: a site aggregator's partial aggregate counts as the updates of the devices it
names, after the same kind of checks a device's update gets.

Checks, in order: the payload decodes within the size limit; the site named in it is the one
whose topic it came on; it is signed by that site's configured aggregator key for this fan-out's
nonce (``aggregator_keys``); a fan-out with that task id is open; round and base version match; a
second copy of an accepted partial (same site and ``seq``) is a duplicate; every device it names
was selected, is named once, reports samples and plausible metrics, and is not counted yet
(neither by its own update nor by another partial: counted twice is refused, with the device);
its total weight is the sum of its devices' samples; the mode combines its sums
(``CoordinatorMode.fold_partial``: the names and shapes of the global, finite values, the same
fixed clip). An accepted partial puts its devices into the fan-out, each with its sample count
and metrics, and its sums into the round's running mean.
"""

from __future__ import annotations

from typing import Any

from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import Collection, check_update_fields
from broker_coordinator.modes import CoordinatorMode
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.partials import PartialAggregate, verify_partial
from fedmq_protocol.topics import Topics


class PartialIntake:
    def __init__(self, topics: Topics, mode: CoordinatorMode, counters: CoordinatorCounters, *,
                 max_message_bytes: int, aggregator_keys: dict[str, Any]) -> None:
        self.topics = topics
        self.mode = mode
        self.counters = counters
        self.max_message_bytes = max_message_bytes
        self.keys = aggregator_keys

    def receive(self, topic: str, payload: bytes, arrived_at: float, c: Collection | None) -> PartialAggregate | None:
        """The partial accepted into ``c`` (None: a copy of one already accepted); ProtocolError
        naming the reason when it is refused. ``c`` is left unchanged unless it is accepted."""
        site = self.topics.site_from(topic)
        p = PartialAggregate.from_msgpack(payload, max_bytes=self.max_message_bytes)
        if p.site_id != site:
            raise ProtocolError(f"partial names site {p.site_id!r} but was published on {topic!r}")
        if c is None or p.task_id != c.task_id:
            self.counters.late += 1
            raise ProtocolError(
                f"partial from site {site} for task {p.task_id!r} (round {p.round}) is not open; refused")
        try:
            verify_partial(p, self.topics.federation, self.keys, c.nonce)
        except ProtocolError:
            self.counters.partial_signature_rejected += 1
            raise
        if c.kind != "fit" or p.round != c.round_no or p.base_version != c.base_version:
            raise ProtocolError(f"partial from site {site} (round {p.round}, base v{p.base_version}) does not match "
                                f"task {c.task_id} (round {c.round_no}, base v{c.base_version})")
        key = p.key
        devices = p.device_ids
        if devices and all(c.via_partial.get(d) == key for d in devices):
            self.counters.duplicates += 1
            return None
        if len(set(devices)) != len(devices):
            raise ProtocolError(f"partial {key} names a device more than once")
        members: list[m.Update] = []
        for mb in p.members:
            if mb.device_id not in c.expected:
                raise ProtocolError(f"partial {key}: device {mb.device_id} was not selected for task {c.task_id}")
            if mb.device_id in c.accepted:
                self.counters.counted_twice += 1
                where = c.via_partial.get(mb.device_id, "its own update")
                raise ProtocolError(f"partial {key}: device {mb.device_id} is already counted in {where}; refused")
            upd = m.Update(kind="fit", task_id=c.task_id, round=c.round_no, device_id=mb.device_id,
                           base_version=c.base_version, num_samples=mb.num_samples, metrics=mb.metrics)
            check_update_fields(upd)
            members.append(upd)
        total = float(sum(u.num_samples for u in members))
        if p.total_weight != total:
            raise ProtocolError(f"partial {key}: total weight {p.total_weight} is not its devices' "
                                f"{total:.0f} samples")
        c.running = self.mode.fold_partial(c.running, p)
        for upd in members:
            c.accepted[upd.device_id] = upd
            c.received_at[upd.device_id] = arrived_at
            c.via_partial[upd.device_id] = key
        c.bytes_in += len(payload)
        return p
