"""The site aggregator (``fedmq aggregator --config site.yaml``): hierarchical aggregation on a
site broker bridged to the coordinator's broker.

It connects to its site broker, where the bridge brings the coordinator's (sealed) tasks, globals
and status down, and where the site's devices publish their updates, which the bridge does not
carry up. For each fit fan-out it has seen tasks of, it checks every site device's update with the
coordinator's own intake (``UpdateIntake``: decode bounds, device signature for the fan-out's
nonce, duplicates, task match, the mode's validation against the global the devices hold) and
folds it into one float64 running sum (``RunningMean``, the coordinator's linear rule: FedAvg, with
or without a fixed ``clip_norm``). It publishes that sum as a signed :class:`PartialAggregate` on
``{root}/{federation}/partials/{site_id}`` (bridged up) when every site device tasked has answered
or is offline (and no new task came for ``settle_s``), or ``flush_margin_s`` before the fan-out's deadline at the
latest; updates that arrive after a flush go into the next partial (``seq`` 1, 2, ...). Evaluate and
init results are not aggregated: they are relayed unchanged (still device-signed) on
``{root}/{federation}/sites/{site_id}/relay/{device_id}``.

Site devices are those listed in ``devices``, or else those whose status is on the site broker
(the bridge carries statuses up, not down). Threading is the coordinator's: the network thread
only queues, one thread decides.

An aggregator that restarts mid-round loses the sums it had not sent: the coordinator's next
attempt of the round asks those devices again (nothing it accepted is lost).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import Collection, UpdateIntake
from broker_coordinator.robust import AggregationConfig
from broker_coordinator.strategy import RunningMean
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.partials import PartialAggregate, PartialMember, SiteStatus, encode_sums, sign_partial
from fedmq_protocol.rejections import RejectionLog
from fedmq_protocol.seal import SealOpener
from fedmq_protocol.signing import Signer, Verifier
from fedmq_protocol.topics import QOS_GLOBAL, QOS_STATUS, QOS_TASK, QOS_UPDATE, Topics, check_level
from fedmq_protocol.transport import MqttTransport, WillMessage
from fedmq_protocol.transport.config import BrokerConfig

log = logging.getLogger("fedmq.aggregator")

REJECTION_LOG_EVERY_S = 10.0
FANOUT_GRACE_S = 60.0  # a fan-out is forgotten this long after its deadline


class SiteAggregatorConfig(BaseModel):
    """The aggregator YAML (configs/site.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_id: str = Field(description="this site's id: its partials' topic level and its key's name in the "
                         "coordinator's aggregator_keys")
    federation: str = "default"
    topic_root: str = "fedmq"
    aggregator_id: str | None = Field(None, description="MQTT client id (default aggregator-<site_id>)")
    broker: BrokerConfig = Field(BrokerConfig(), description="the site broker (bridged to the coordinator's)")
    signing_key: Path = Field(description="Ed25519 private key (PEM, `fedmq keys generate`) signing every partial")
    coordinator_public_key: str | None = Field(
        None, description="the coordinator's Ed25519 public key (file or base64): tasks and globals must carry "
        "its signature")
    devices: list[str] | None = Field(
        None, description="the site's device ids; null: every device whose status is on the site broker")
    device_keys: dict[str, str] = Field(
        default_factory=dict, description="device_id -> Ed25519 public key: device updates are checked as the "
        "coordinator checks them")
    require_signatures: bool | None = Field(
        None, description="refuse unsigned device updates (default: on when device_keys is set)")
    aggregation: AggregationConfig = Field(
        AggregationConfig(), description="the coordinator's aggregation (only fedavg, with or without a fixed "
        "clip_norm: the linear rules a site can pre-aggregate)")
    flush_margin_s: float = Field(
        5.0, gt=0, description="a fan-out's partial is published this long before its deadline at the latest "
        "(at half the deadline when the deadline is shorter than twice this)")
    settle_s: float = Field(
        1.0, ge=0, description="once every tasked site device answered, publish when no new task came for this long")

    @model_validator(mode="after")
    def _check(self) -> SiteAggregatorConfig:
        check_level(self.site_id, "site_id")
        check_level(self.federation, "federation")
        check_level(self.topic_root, "topic_root")
        if self.aggregator_id is not None:
            check_level(self.aggregator_id, "aggregator_id")
        reason = self.aggregation.nonlinear_reason
        if reason:
            raise ValueError(f"aggregation: a site cannot pre-aggregate this rule ({reason}); "
                             "use fedavg, with or without a fixed clip_norm")
        from fedmq_protocol.signing import SigningKeyError, check_public_keys, load_public_key

        try:
            Signer.from_file(self.signing_key)
        except SigningKeyError as exc:
            raise ValueError(f"signing_key: {exc}") from None
        if self.coordinator_public_key is not None:
            try:
                load_public_key(self.coordinator_public_key)
            except SigningKeyError as exc:
                raise ValueError(f"coordinator_public_key: {exc}") from None
        check_public_keys(self.device_keys, "device_keys")
        for device_id in self.devices or []:
            check_level(device_id, f"devices[{device_id!r}]")
        if self.require_signatures and not self.device_keys:
            raise ValueError("require_signatures needs device_keys (device_id: public key)")
        return self

    @property
    def client_id(self) -> str:
        return self.aggregator_id or f"aggregator-{self.site_id}"


@dataclass
class SiteCounters(CoordinatorCounters):
    """The coordinator's intake counters, and the aggregator's own."""

    tasks_seen: int = 0  # fit tasks for this site's devices (each device once per fan-out)
    partials_sent: int = 0
    relayed: int = 0  # evaluate and init results forwarded unchanged
    held_for_global: int = 0  # updates that waited for the global their task names
    tasks_refused: int = 0  # tasks and globals whose seal did not open


@dataclass
class SiteFanout:
    """One fit fan-out as this site sees it: the site devices tasked, what they sent, what went up."""

    collection: Collection
    flush_at: float  # monotonic: the latest time its partial goes up
    forget_at: float
    last_task_at: float
    seq: int = 0
    sent: set[str] = field(default_factory=set)
    waiting: list[tuple[str, bytes, float]] = field(default_factory=list)  # updates before their global

    def unsent(self) -> list[str]:
        return sorted(set(self.collection.accepted) - self.sent)

    def complete(self, offline: set[str]) -> bool:
        """Every tasked site device answered, or is offline (its Will or last status says so)."""
        return self.collection.expected - offline <= set(self.collection.accepted)


class SiteAggregator:
    def __init__(self, config: SiteAggregatorConfig, *, transport: MqttTransport | None = None) -> None:
        from broker_coordinator.config import CoordinatorConfig
        from broker_coordinator.coordinator import Inbox
        from broker_coordinator.modes import create_mode
        from fedmq_protocol.signing import load_public_key

        self.cfg = config
        self.topics = Topics(config.topic_root, config.federation)
        self.counters = SiteCounters()
        # the coordinator's adapter mode, holding the global the site's devices hold: its validation
        # and its fold are the coordinator's own
        self.mode = create_mode(CoordinatorConfig(federation=config.federation, topic_root=config.topic_root,
                                                  broker=config.broker, aggregation=config.aggregation,
                                                  mode="adapter"))
        verifier = Verifier.from_config(config.device_keys, config.federation) if config.device_keys else None
        required = bool(config.device_keys) if config.require_signatures is None else config.require_signatures
        self.intake = UpdateIntake(self.topics, self.mode, self.counters,
                                   max_message_bytes=config.broker.max_message_bytes,
                                   verifier=verifier, signatures_required=required)
        public = load_public_key(config.coordinator_public_key) if config.coordinator_public_key else None
        self.opener = SealOpener(config.federation, public, require_signatures=public is not None,
                                 max_bytes=config.broker.max_message_bytes)
        self.sync = GlobalSync(max_elements=config.broker.max_message_bytes)
        self.signer = Signer.from_file(config.signing_key)
        will = WillMessage(self.topics.site_status(config.site_id),
                           SiteStatus(site_id=config.site_id, online=False).to_json(), QOS_STATUS, True)
        self.transport = transport or MqttTransport(config.broker, config.client_id, will=will)
        self.rejections = RejectionLog(log, REJECTION_LOG_EVERY_S)
        self.fanouts: dict[str, SiteFanout] = {}
        self.site_devices: set[str] = set(config.devices or [])
        self.offline: set[str] = set()  # site devices whose latest status says offline
        self._relay_awaited: dict[str, float] = {}  # device -> until when its evaluate/init result is awaited
        self._events = Inbox()
        self._stop = threading.Event()
        self.alive_at = time.monotonic()

    # ------------------------------------------------------------------ wiring
    def _enqueue(self, kind: str) -> Any:
        def handler(topic: str, payload: bytes) -> None:
            cls = {"task": "control", "global": "control", "status": "status"}.get(kind, "update")
            if kind == "update" and self._awaited(topic):
                cls = "awaited"
            if not self._events.put(cls, (kind, topic, payload, time.time())):
                self.counters.dropped += 1

        return handler

    def _awaited(self, topic: str) -> bool:
        try:
            device_id = self.topics.device_id_from(topic)
            if self._relay_awaited.get(device_id, 0.0) > time.monotonic():
                return True
            return any(device_id in fo.collection.expected for fo in list(self.fanouts.values()))
        except (ProtocolError, RuntimeError):
            return False

    def start(self) -> None:
        t = self.topics
        self.transport.subscribe(f"{t.base}/devices/+/task", self._enqueue("task"), qos=QOS_TASK, framed=True)
        self.transport.subscribe(t.global_model, self._enqueue("global"), qos=QOS_GLOBAL, framed=True)
        self.transport.subscribe(t.all_global_diffs, self._enqueue("global"), qos=QOS_GLOBAL, framed=True)
        self.transport.subscribe(t.all_device_status, self._enqueue("status"), qos=QOS_STATUS)
        self.transport.subscribe(t.all_device_updates, self._enqueue("update"), qos=QOS_UPDATE, framed=True)
        self.transport.on_connect.append(lambda session_present: self.publish_status())
        self.transport.connect(self.cfg.broker.connect_timeout_s)
        log.info("site %s: aggregating on %s", self.cfg.site_id, self.cfg.broker.url)

    def publish_status(self, online: bool = True) -> None:
        status = SiteStatus(site_id=self.cfg.site_id, online=online, global_version=self.sync.version,
                            devices=len(self.site_devices), counters=self.counters.as_dict())
        try:
            self.transport.publish(self.topics.site_status(self.cfg.site_id), status.to_json(), qos=QOS_STATUS,
                                   retain=True)
        except Exception as exc:  # noqa: BLE001 - status is best effort
            log.warning("could not publish the site status: %s", exc)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            if self.transport.connected:
                self.publish_status(online=False)
        finally:
            self.transport.close()

    def run(self) -> None:
        """Until ``stop``: handle events, publish partials when they are due."""
        self.start()
        try:
            while not self._stop.is_set():
                self.pump(0.2)
        finally:
            log.info("figures %s", json.dumps(self.figures(), sort_keys=True))

    def pump(self, timeout: float) -> None:
        self.alive_at = time.monotonic()
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = None
        while event is not None:
            self._handle(*event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                event = None
        self.tick(time.monotonic())

    # ------------------------------------------------------------------ events
    def _handle(self, kind: str, topic: str, payload: bytes, arrived_at: float) -> None:
        try:
            if kind == "task":
                self.on_task(topic, payload)
            elif kind == "global":
                self.on_global(topic, payload)
            elif kind == "status":
                self.on_status(topic, payload)
            elif kind == "update":
                self.on_update(topic, payload, arrived_at)
        except ProtocolError as exc:
            self._reject(kind, topic, str(exc))
        except Exception as exc:
            self.counters.errors += 1
            log.exception("unexpected error handling %s on %s", kind, topic)
            self._reject(kind, topic, f"{type(exc).__name__}: {exc}")

    def _reject(self, kind: str, topic: str, reason: str) -> None:
        if kind == "update":
            self.counters.updates_rejected += 1
        elif kind in ("task", "global"):
            self.counters.tasks_refused += 1
        self.counters.last_rejection = f"{topic}: {reason}"[:1000]
        self.rejections.add(topic, reason, what=f"rejected {kind}")

    def on_status(self, topic: str, payload: bytes) -> None:
        """A device on the site broker: one of the site's (unless ``devices`` lists them); offline
        ones are not waited for before a partial goes up (a forged offline status only makes the
        partial go up early: what comes later goes in the next one)."""
        device_id = self.topics.device_id_from(topic)
        if self.cfg.devices is None:
            self.site_devices.add(device_id)
        if not payload:
            return
        status = m.DeviceStatus.from_json(payload)
        if status.device_id != device_id:
            raise ProtocolError(f"status names device {status.device_id!r} but was published on {topic!r}")
        if status.online:
            self.offline.discard(device_id)
        else:
            self.offline.add(device_id)

    def on_task(self, topic: str, payload: bytes) -> None:
        device_id = self.topics.device_id_from(topic)
        if device_id not in self.site_devices:
            return  # a device behind another site (the bridge brings every task down)
        opened = self.opener.open(topic, payload, kind="task")
        if opened is None:
            return
        task = m.Task.from_msgpack(opened.body, max_bytes=self.cfg.broker.max_message_bytes)
        if task.device_id != device_id:
            raise ProtocolError(f"task names device {task.device_id!r} but was published on {topic!r}")
        now = time.monotonic()
        if task.kind != "fit":  # evaluate and init results are relayed, not aggregated
            self._relay_awaited[device_id] = now + task.deadline_s
            return
        fo = self.fanouts.get(task.task_id)
        if fo is None:
            c = Collection("fit", task.task_id, task.round, task.global_version, set(), nonce=task.nonce,
                           deadline_s=task.deadline_s)
            margin = min(self.cfg.flush_margin_s, task.deadline_s / 2)
            fo = SiteFanout(c, flush_at=now + task.deadline_s - margin,
                            forget_at=now + task.deadline_s + FANOUT_GRACE_S, last_task_at=now)
            self.fanouts[task.task_id] = fo
        elif task.nonce != fo.collection.nonce or task.global_version != fo.collection.base_version:
            raise ProtocolError(f"task {task.task_id} for {device_id} differs from the fan-out's other tasks")
        if device_id not in fo.collection.expected:
            fo.collection.expected.add(device_id)
            fo.last_task_at = now
            self.counters.tasks_seen += 1

    def on_global(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a difference cleared once a newer snapshot landed
        opened = self.opener.open(topic, payload, kind="global")
        if opened is None:
            return
        gm = m.GlobalModel.from_msgpack(opened.body, max_bytes=self.cfg.broker.max_message_bytes)
        if self.sync.offer(gm) and self.sync.arrays is not None:
            # the global as the devices hold it: what their differences are relative to
            self.mode.adopt_initial(self.sync.arrays)
            log.info("site %s: global v%s", self.cfg.site_id, self.sync.version)
            for fo in list(self.fanouts.values()):
                if fo.waiting and fo.collection.base_version == self.sync.version:
                    waiting, fo.waiting = fo.waiting, []
                    for args in waiting:
                        self._handle("update", *args)

    def on_update(self, topic: str, payload: bytes, arrived_at: float) -> None:
        device_id = self.topics.device_id_from(topic)
        if device_id not in self.site_devices:
            raise ProtocolError(f"device {device_id} is not one of site {self.cfg.site_id}'s devices")
        upd = m.Update.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        if upd.kind != "fit":
            self.transport.publish(self.topics.site_relay(self.cfg.site_id, device_id), payload, qos=QOS_UPDATE,
                                   framed=True)
            self.counters.relayed += 1
            return
        fo = self.fanouts.get(upd.task_id)
        if fo is None:
            self.counters.late += 1
            raise ProtocolError(f"update for task {upd.task_id!r} (round {upd.round}): no task of it reached "
                                f"site {self.cfg.site_id}, or its partial is closed; refused")
        if self.sync.version != fo.collection.base_version:
            if len(fo.waiting) >= 4 * max(1, len(fo.collection.expected)):
                raise ProtocolError(f"update for task {upd.task_id}: global v{fo.collection.base_version} "
                                    f"has not reached site {self.cfg.site_id}; too many waiting")
            fo.waiting.append((topic, payload, arrived_at))
            self.counters.held_for_global += 1
            return
        accepted = self.intake.receive(topic, payload, arrived_at, fo.collection)
        if accepted is None:
            return
        self.counters.updates_accepted += 1
        self.counters.fit_accepted += 1
        if device_id in fo.sent:  # cannot happen: a second copy is a duplicate
            raise RuntimeError(f"{device_id} counted twice at site {self.cfg.site_id}")

    # ------------------------------------------------------------------ partials
    def tick(self, now: float) -> None:
        for task_id, fo in list(self.fanouts.items()):
            unsent = fo.unsent()
            due = now >= fo.flush_at or (fo.complete(self.offline) and now - fo.last_task_at >= self.cfg.settle_s)
            if unsent and due:
                try:
                    self.flush(fo)
                except Exception as exc:  # noqa: BLE001 - disconnected: the next tick tries again
                    log.warning("site %s: partial for %s not published yet: %s", self.cfg.site_id, task_id, exc)
            if now >= fo.forget_at:
                del self.fanouts[task_id]

    def build_partial(self, fo: SiteFanout) -> tuple[PartialAggregate, bytes]:
        """The next partial of ``fo`` (the updates accepted since the last one), signed."""
        c = fo.collection
        running = c.running
        members = fo.unsent()
        if not isinstance(running, RunningMean) or running.count != len(members):
            raise RuntimeError(f"running sum of {c.task_id} does not hold its {len(members)} unsent update(s)")
        agg = self.cfg.aggregation
        partial = PartialAggregate(
            site_id=self.cfg.site_id, seq=fo.seq, task_id=c.task_id, round=c.round_no, base_version=c.base_version,
            nonce=c.nonce, clip_norm=agg.clip_norm,
            members=tuple(PartialMember(device_id=d, num_samples=c.accepted[d].num_samples,
                                        metrics=c.accepted[d].metrics) for d in members),
            total_weight=running.total, sums=encode_sums(running.sums, running.shapes))
        return partial, sign_partial(partial, self.cfg.federation, self.signer)

    def flush(self, fo: SiteFanout) -> PartialAggregate:
        partial, payload = self.build_partial(fo)
        self.transport.publish(self.topics.site_partial(self.cfg.site_id), payload, qos=QOS_UPDATE, framed=True)
        fo.sent |= set(partial.device_ids)
        fo.seq += 1
        fo.collection.running = None  # later updates go into the next partial
        self.counters.partials_sent += 1
        self.publish_status()
        log.info("site %s: partial %d of %s published: %d device(s), %d samples, %d bytes", self.cfg.site_id,
                 partial.seq, partial.task_id, len(partial.members), int(partial.total_weight), len(payload))
        return partial

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = self.counters.as_dict()
        out["rejected_by_reason"] = dict(sorted(self.rejections.by_reason.items(), key=lambda kv: -kv[1])[:20])
        out["global_version"] = self.sync.version
        out["site_devices"] = len(self.site_devices)
        return out
