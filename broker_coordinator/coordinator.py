"""The coordinator: its parts wired to one broker connection and one thread of decisions.

- ``registry``: presence of devices (``broker_coordinator.registry``);
- ``intake``: decoding and checking every update (``broker_coordinator.intake``);
- ``rounds``: selection, tasks, collection, retries, the open-round journal (``broker_coordinator.rounds``);
- ``publisher``: the retained global (``broker_coordinator.publisher``);
- ``mode``: what is federated and how updates combine (``broker_coordinator.modes``).

Threading: paho's network thread only enqueues raw payloads; every decision and every piece of
state is handled on the coordinator's own thread, so no state is shared between threads.

Intake is bounded per message class (``Inbox``): updates from devices the open fan-out awaits
come first and are never dropped for room; other updates, statuses and copies of the
coordinator's own retained topics each have a bounded queue whose overflow is dropped and
counted, so junk cannot starve the work. Refusals are counted per source topic and reason and
logged at most once per topic per ``REJECTION_LOG_EVERY_S``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from broker_coordinator.buffered import BufferedRounds
from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import UpdateIntake
from broker_coordinator.modes import CoordinatorMode, create_mode
from broker_coordinator.publisher import GlobalPublisher
from broker_coordinator.registry import DeviceRegistry
from broker_coordinator.rounds import RoundFailed, RoundRunner
from broker_coordinator.state import CoordinatorState, FileStateStore, StateStore
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import split_chunk_topic
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.rejections import RejectionLog
from fedmq_protocol.seal import Sealer
from fedmq_protocol.signing import Signer, Verifier
from fedmq_protocol.topics import QOS_ROUNDS, QOS_STATUS, QOS_UPDATE, Topics
from fedmq_protocol.transport import MqttTransport, WillMessage

log = logging.getLogger("fedmq.coordinator")

STATUS_COUNTERS_EVERY_S = 1.0  # at most this often, a rejection republishes the status (counters)
REJECTION_LOG_EVERY_S = 10.0  # refused input: one log line per source topic at most this often
# events held per class before new ones are dropped (counted); "awaited" (updates from devices
# the open fan-out waits for) and "control" are never dropped
INBOX_LIMITS = {"update": 64, "status": 2048, "retained": 256}
INBOX_ORDER = ("control", "awaited", "status", "update", "retained")

Event = tuple[str, str, bytes, float]


class Inbox:
    """The coordinator's bounded queues of events, one per class, taken in ``INBOX_ORDER``."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._q: dict[str, collections.deque[Event]] = {c: collections.deque() for c in INBOX_ORDER}
        self.dropped: dict[str, int] = {}

    def put(self, cls: str, event: Event) -> bool:
        with self._cv:
            q = self._q[cls]
            limit = INBOX_LIMITS.get(cls)
            if limit is not None and len(q) >= limit:
                self.dropped[cls] = self.dropped.get(cls, 0) + 1
                return False
            q.append(event)
            self._cv.notify()
            return True

    def _take(self) -> Event | None:
        for cls in INBOX_ORDER:
            if self._q[cls]:
                return self._q[cls].popleft()
        return None

    def get(self, timeout: float | None = None) -> Event:
        with self._cv:
            event = self._take()
            if event is None and self._cv.wait_for(lambda: any(self._q.values()), timeout=timeout):
                event = self._take()
        if event is None:
            raise queue.Empty
        return event

    def get_nowait(self) -> Event:
        return self.get(timeout=0)

    def put_event(self, event: Event) -> None:
        """An event of the coordinator's own (control class)."""
        self.put("control", event)

__all__ = ["Coordinator", "RoundFailed"]


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        mode: CoordinatorMode | None = None,
        store: StateStore | None = None,
        transport: MqttTransport | None = None,
        on_round: Callable[[m.RoundSummary], None] | None = None,
    ) -> None:
        self.cfg = config
        self.topics = Topics(config.topic_root, config.federation)
        self.store = store or FileStateStore(config.state_dir)
        self.state = self.store.load() or CoordinatorState()
        self.mode = mode or create_mode(config)
        self.mode.restore(self.state)
        self.counters = CoordinatorCounters()
        self.on_round = on_round
        # (kind, topic, payload, arrival wall time): arrival is stamped on the network thread
        self._events = Inbox()
        self.rejections = RejectionLog(log, REJECTION_LOG_EVERY_S)
        signer = Signer.from_file(config.coordinator_key) if config.coordinator_key is not None else None
        self.sealer = Sealer(config.federation, signer)
        self._guarded_at: dict[str, float] = {}  # logical topic -> when its real copy was last put back
        self._guard_filters: set[str] = set()
        self._stop = threading.Event()
        self.alive_at = time.monotonic()  # liveness for a supervisor (systemd watchdog)
        self._counters_published: dict[str, int] = {}
        self._counters_published_at = 0.0
        self._last_status_state = "starting"
        self._connected_before = False
        self._status_seq = int(time.time() * 1000)
        will = WillMessage(self.topics.coordinator_status,
                           m.CoordinatorStatus(online=False, seq=self._status_seq, state="offline").to_json(),
                           QOS_STATUS, True)
        self.transport = transport or MqttTransport(config.broker, config.coordinator_id, will=will)
        verifier = Verifier.from_config(config.device_keys, config.federation) if config.device_keys else None
        self.registry = DeviceRegistry(self.state.devices, self.topics, config.offline_grace_s,
                                       status_max_age_s=config.status_max_age_s, verifier=verifier,
                                       signatures_required=config.signatures_required)
        self.intake = UpdateIntake(self.topics, self.mode, self.counters,
                                   max_message_bytes=config.broker.max_message_bytes,
                                   verifier=verifier, signatures_required=config.signatures_required)
        partials = None
        if config.aggregator_keys:
            from broker_coordinator.partials import PartialIntake
            from fedmq_protocol.signing import load_public_key

            partials = PartialIntake(self.topics, self.mode, self.counters,
                                     max_message_bytes=config.broker.max_message_bytes,
                                     aggregator_keys={s: load_public_key(k) for s, k in config.aggregator_keys.items()})
        self.publisher = GlobalPublisher(self.transport, self.topics, self.mode, self.state, self.sealer)
        runner = BufferedRounds if config.asynchronous.enabled else RoundRunner
        self.rounds = runner(config, self.topics, self.transport, self.store, self.state, self.mode,
                                  self.registry, self.intake, self.publisher, self.counters,
                                  pump=self._pump, stopped=self._stop.is_set, set_status=self._publish_status,
                                  handle=self._handle, sealer=self.sealer, partials=partials)

    # ------------------------------------------------------------------ wiring
    def _enqueue(self, kind: str) -> Callable[[str, bytes], None]:
        def handler(topic: str, payload: bytes) -> None:
            cls = kind
            if (kind == "update" and self._awaited(topic)) or (kind == "partial" and self._known_site(topic)):
                cls = "awaited"  # a partial stands for many awaited updates: never dropped for room
            elif kind == "partial":
                cls = "update"  # from a site without a key: bounded, refused when handled
            if not self._events.put(cls, (kind, topic, payload, time.time())):
                self.counters.dropped += 1

        return handler

    def _relayed(self, topic: str, payload: bytes) -> None:
        """(network thread) A site device's result its aggregator relayed: handled as the device's
        own update (its signature, when device keys are configured, still covers it)."""
        try:
            if self.topics.site_from(topic) not in self.cfg.aggregator_keys:
                raise ProtocolError(f"relay from site {self.topics.site_from(topic)!r}, which has no aggregator key")
            device_topic = self.topics.device_update(self.topics.relayed_device_from(topic))
        except ProtocolError as exc:
            self._events.put_event(("rejected", topic, str(exc).encode(), time.time()))
            return
        self._enqueue("update")(device_topic, payload)

    def _known_site(self, topic: str) -> bool:
        try:
            return self.topics.site_from(topic) in self.cfg.aggregator_keys
        except ProtocolError:
            return False

    def _awaited(self, topic: str) -> bool:
        """(network thread) An update from a device the open fan-out (or the round to restore) awaits."""
        try:
            return self.topics.device_id_from(topic) in self.rounds.awaited()
        except (ProtocolError, RuntimeError):  # junk topic; a set resized while read
            return False

    def start(self) -> None:
        self.transport.subscribe(self.topics.all_device_status, self._enqueue("status"), qos=QOS_STATUS)
        self.transport.subscribe(self.topics.all_device_updates, self._enqueue("update"), qos=QOS_UPDATE, framed=True)
        if self.cfg.aggregator_keys:  # site aggregators: partial aggregates, and results they relay
            self.transport.subscribe(self.topics.all_partials, self._enqueue("partial"), qos=QOS_UPDATE, framed=True)
            self.transport.subscribe(self.topics.all_site_relays, self._relayed, qos=QOS_UPDATE, framed=True)
        # the coordinator's own retained topics: a copy it did not publish is a forgery, replaced
        self._guard(f"{self.topics.global_model}/#")
        self._guard(self.topics.global_model)
        self._guard(self.topics.coordinator_status)
        self.transport.on_connect.append(lambda session_present: self._publish_status("running"))
        # handled on the coordinator thread: after a broker restart re-assert what the broker lost
        self.transport.on_connect.append(
            lambda session_present: self._events.put_event(
                ("connected", "", b"1" if session_present else b"", time.time())))
        self.transport.connect(self.cfg.broker.connect_timeout_s)
        self._publish_status("starting")

    def _guard(self, topic_filter: str) -> None:
        if topic_filter in self._guard_filters:
            return
        self._guard_filters.add(topic_filter)
        self.transport.subscribe(topic_filter, self._enqueue("retained"), qos=QOS_STATUS)

    def stop(self) -> None:
        self._stop.set()

    def close(self, final_state: str = "offline") -> None:
        try:
            if self.transport.connected:
                self._publish_status(final_state, online=False)
        finally:
            self.transport.close()

    def _publish_status(self, state: str, online: bool = True) -> None:
        self._last_status_state = state
        self.counters.frames_rejected = getattr(self.transport, "messages_rejected", 0)
        counters = self.counters.as_dict()
        self._counters_published, self._counters_published_at = counters, time.monotonic()
        msg = m.CoordinatorStatus(
            online=online, seq=self._status_seq, state=state, round=self.state.round_completed,
            global_version=self.state.global_version if self.state.global_model else None,
            rounds_total=self.rounds_total, counters=counters,
            last_rejection=self.counters.last_rejection[:500] or None,
        )
        try:
            self.transport.publish(self.topics.coordinator_status, msg.to_json(), qos=QOS_STATUS, retain=True)
        except Exception as exc:  # noqa: BLE001 - status is best effort; the loop must go on
            log.warning("could not publish coordinator status: %s", exc)

    @property
    def rounds_total(self) -> int:
        """Rounds of the run: synchronous rounds, or the versions of an asynchronous run."""
        return self.cfg.async_versions if self.cfg.asynchronous.enabled else self.cfg.rounds

    # ------------------------------------------------------------------ event handling
    def _pump(self, timeout: float) -> None:
        """Handle events for up to ``timeout`` seconds (returns after the first batch)."""
        self.alive_at = time.monotonic()
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        self._handle(*event)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._handle(*event)
        self._maybe_publish_counters()
        for topic_filter in sorted(self.publisher.mode_filters - self._guard_filters):
            self._guard(topic_filter)

    def _maybe_publish_counters(self) -> None:
        """Republish the status (with its counters) after rejections, at most once a second."""
        self.counters.frames_rejected = getattr(self.transport, "messages_rejected", 0)
        if (self.counters.as_dict() != self._counters_published
                and time.monotonic() - self._counters_published_at >= STATUS_COUNTERS_EVERY_S):
            self._publish_status(self._last_status_state)

    def _handle(self, kind: str, topic: str, payload: bytes, arrived_at: float) -> None:
        try:
            if kind == "status":
                presence = self.registry.on_status(topic, payload, arrived_at)
                if presence is not None:
                    self.rounds.on_presence(presence)
            elif kind == "update":
                self.rounds.on_update(topic, payload, arrived_at)
            elif kind == "partial":
                self.rounds.on_partial(topic, payload, arrived_at)
            elif kind == "rejected":
                raise ProtocolError(payload.decode(errors="replace"))
            elif kind == "retained":
                self._on_retained_copy(topic, payload, arrived_at)
            elif kind == "connected":
                self._on_connected(session_present=bool(payload))
        except ProtocolError as exc:
            self._reject(kind, topic, str(exc))
        except Exception as exc:
            self.counters.errors += 1
            log.exception("unexpected error handling %s on %s", kind, topic)
            self._reject(kind, topic, f"{type(exc).__name__}: {exc}")

    def _reject(self, kind: str, topic: str, reason: str) -> None:
        if kind in ("update", "rejected"):
            self.counters.updates_rejected += 1
        elif kind == "partial":
            self.counters.partials_rejected += 1
        elif kind == "status":
            self.counters.status_rejected += 1
        self.counters.last_rejection = f"{topic}: {reason}"[:1000]
        self.rejections.add(topic, reason, what=f"rejected {kind}")

    def _on_retained_copy(self, wire_topic: str, payload: bytes, arrived_at: float) -> None:
        """A message on one of the coordinator's retained topics: if it is not what the coordinator
        put there (a forgery, a replay, a clear), the real one is published again (at most once
        per ``retained_guard_s`` per topic). One that arrived before the coordinator last published
        the topic is superseded already (what a predecessor left retained, say)."""
        ours = self.transport.retained_by_us(wire_topic, payload, arrived_at)
        if ours:
            return
        if ours is None and not payload:
            return  # a topic we never held, empty: nothing to put back
        history = self.transport.retained_history.get(wire_topic)
        if history and arrived_at <= history[-1][1]:
            return  # arrived before our latest publish there, which replaced it
        logical = split_chunk_topic(wire_topic)[0]
        self.counters.retained_forged += 1
        now = time.monotonic()
        if now - self._guarded_at.get(logical, -1e9) < self.cfg.retained_guard_s:
            return
        self._guarded_at[logical] = now
        if logical == self.topics.coordinator_status:
            self._publish_status(self._last_status_state)
        elif not self.publisher.republish(logical):
            if ours is None and wire_topic == logical:
                return  # not one of ours: a forged message a receiver refuses (no seal of ours)
            self.transport.publish(wire_topic, b"", qos=QOS_STATUS, retain=True)  # a chunk we never wrote
        self.counters.retained_restored += 1
        log.warning("%s held a message this coordinator did not publish; the real one is back", wire_topic)

    def _on_connected(self, session_present: bool) -> None:
        if not self._connected_before:
            self._connected_before = True
            return
        self.counters.reconnects += 1
        if not session_present:  # with the session kept, subscriptions and queued messages are there
            self.rounds.on_session_lost()

    def figures(self) -> dict[str, Any]:
        """Counters for operators and tests (logged as one JSON line after every round)."""
        out: dict[str, Any] = self.counters.as_dict()
        out["dropped_by_class"] = dict(self._events.dropped)
        out["rejected_total"] = self.rejections.total
        out["rejected_by_topic"] = self.rejections.top_topics()
        out["rejected_by_reason"] = dict(sorted(self.rejections.by_reason.items(), key=lambda kv: -kv[1])[:20])
        out["status_replays_ignored"] = self.registry.replays_ignored
        stats = self.transport.stats()
        out.update({k: stats[k] for k in ("connects", "disconnects", "messages_rejected") if k in stats})
        for key in ("expired", "duplicates"):  # chunked transfers dropped idle / frames seen twice
            out[f"reassembly_{key}"] = sum(v.get(key, 0) for k, v in stats.items()
                                           if k.startswith("reassembly[") and isinstance(v, dict))
        out["round_completed"] = self.state.round_completed
        out["rss_mb"] = _rss_mb()
        return out

    # ------------------------------------------------------------------ the run
    def _finish_round(self, summary: m.RoundSummary) -> None:
        traffic = self.rounds.traffic.take()
        summary = summary.model_copy(update={"uplink_bytes_by_device": traffic["up"],
                                             "downlink_bytes_by_device": traffic["down"]})
        self.state.history.append(summary)
        self.store.save(self.state)
        try:
            self.transport.publish(self.topics.rounds, summary.to_json(), qos=QOS_ROUNDS, retain=True)
        except Exception as exc:  # noqa: BLE001 - the round is saved already; publishing it is best effort
            log.warning("could not publish round summary: %s", exc)
        if self.on_round:
            self.on_round(summary)

    def run(self) -> CoordinatorState:
        """Run until ``cfg.rounds`` rounds are complete (resuming from persisted state)."""
        self.start()
        try:
            if self.state.global_model is None:
                self.rounds.initialize_global()
            else:
                self.publisher.publish()  # a restarted coordinator re-asserts its retained global
            if not self.state.history and self.cfg.evaluate:
                self.rounds.wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
                t0 = time.monotonic()
                loss, n_dev, up, down = self.rounds.evaluate(0)
                eval_s = time.monotonic() - t0
                self._finish_round(m.RoundSummary(round=0, global_version=self.state.global_version, eval_loss=loss,
                                                  eval_devices=n_dev, uplink_bytes=up, downlink_bytes=down,
                                                  duration_s=eval_s, fit_s=0.0, eval_s=eval_s))
            if isinstance(self.rounds, BufferedRounds):
                self.rounds.run_async(self._finish_round)
            while self.state.round_completed < self.rounds_total and not self._stop.is_set():
                summary = self.rounds.run_round(self.state.round_completed + 1)
                self._finish_round(summary)
                log.info("round %d done: %d participants, eval loss %s, up %d B, down %d B",
                         summary.round, len(summary.participants),
                         "n/a" if summary.eval_loss is None else f"{summary.eval_loss:.4f}",
                         summary.uplink_bytes, summary.downlink_bytes)
                log.info("figures %s", json.dumps(self.figures(), sort_keys=True))
            self._publish_status("finished" if self.state.round_completed >= self.rounds_total else "stopped")
        finally:
            self.rounds.open = None
            log.info("figures %s", json.dumps(self.figures(), sort_keys=True))
        return self.state


def _rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return None
