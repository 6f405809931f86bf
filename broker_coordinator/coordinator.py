"""The coordinator: tracks devices, runs rounds, aggregates, persists, republishes.

Threading: paho's network thread only enqueues raw payloads; every decision and every piece of
state is handled on the coordinator's own thread, so no state is shared between threads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.downlink import ServerModel
from broker_coordinator.state import CoordinatorState, DeviceRecord, FileStateStore, StateStore
from broker_coordinator.strategy import FedAvg, Strategy
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import chunk_topic
from fedmq_protocol.codec import DecodedTensor
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import Verifier, new_nonce
from fedmq_protocol.topics import QOS_GLOBAL, QOS_ROUNDS, QOS_STATUS, QOS_TASK, QOS_UPDATE, Topics
from fedmq_protocol.transport import MqttTransport, WillMessage

log = logging.getLogger("fedmq.coordinator")


class RoundFailed(RuntimeError):
    pass


@dataclass
class _Collect:
    """Results awaited for one task fan-out."""

    kind: str
    task_id: str
    round_no: int
    base_version: int
    expected: set[str]
    nonce: bytes | None = None  # Task.nonce of this fan-out; signed updates must echo it
    accepted: dict[str, m.Update] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    decoded: dict[str, dict[str, DecodedTensor]] = field(default_factory=dict)
    bytes_in: int = 0
    decode_s: float = 0.0
    attempt: int = 0
    deadline_s: float = 0.0
    # accepted updates carried over from earlier attempts of the round: [{task_id, nonce, devices}]
    earlier: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CoordinatorCounters:
    updates_accepted: int = 0
    updates_rejected: int = 0
    duplicates: int = 0
    late: int = 0
    fit_accepted: int = 0  # fit updates accepted (all are aggregated: a retry carries them over)
    restored: int = 0  # accepted before a restart, read back from the open round on disk
    tasks_resent: int = 0  # open tasks sent again to a device that restarted, or after a broker restart
    reconnects: int = 0
    globals_reasserted: int = 0  # retained global re-published after the broker lost it
    signature_rejected: int = 0  # also counted in updates_rejected
    status_rejected: int = 0
    frames_rejected: int = 0  # refused by the transport before decoding (framing, chunking, size)
    errors: int = 0  # unexpected exceptions while handling input (a bug; counted, logged, survived)
    last_rejection: str = ""

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


MAX_METRICS = 256
MAX_NUM_SAMPLES = 1 << 40
STATUS_COUNTERS_EVERY_S = 1.0  # at most this often, a rejection republishes the status (counters)


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        strategy: Strategy | None = None,
        store: StateStore | None = None,
        transport: MqttTransport | None = None,
        on_round: Callable[[m.RoundSummary], None] | None = None,
    ) -> None:
        self.cfg = config
        self.topics = Topics(config.topic_root, config.federation)
        self.strategy = strategy or _default_strategy(config)
        self.store = store or FileStateStore(config.state_dir)
        self.state = self.store.load() or CoordinatorState()
        self.counters = CoordinatorCounters()
        self.verifier = Verifier.from_config(config.device_keys, config.federation) if config.device_keys else None
        self._counters_published: dict[str, int] = {}
        self._counters_published_at = 0.0
        self._last_status_state = "starting"
        self.on_round = on_round
        # (kind, topic, payload, arrival wall time): arrival is stamped on the network thread
        self._events: queue.Queue[tuple[str, str, bytes, float]] = queue.Queue()
        self._stop = threading.Event()
        self.alive_at = time.monotonic()  # liveness for a supervisor (systemd watchdog)
        self._bytes_by: dict[str, dict[str, int]] = {"up": {}, "down": {}}  # this round, per device
        self._collect: _Collect | None = None
        self._server_model: ServerModel | None = None
        self._restoring = False  # replaying the open round's accepted updates from disk
        self._connected_before = False
        self._resend_on_announce: set[str] = set()  # after the broker lost our session
        self._status_seq = int(time.time() * 1000)
        will = WillMessage(
            self.topics.coordinator_status,
            m.CoordinatorStatus(online=False, seq=self._status_seq, state="offline").to_json(),
            QOS_STATUS,
            True,
        )
        self.transport = transport or MqttTransport(config.broker, config.coordinator_id, will=will)
        for dev in self.state.devices.values():
            dev.online = False  # presence is re-learnt from the retained status topics

    # ------------------------------------------------------------------ wiring
    def _enqueue(self, kind: str) -> Callable[[str, bytes], None]:
        def handler(topic: str, payload: bytes) -> None:
            self._events.put((kind, topic, payload, time.time()))

        return handler

    def start(self) -> None:
        self.transport.subscribe(self.topics.all_device_status, self._enqueue("status"), qos=QOS_STATUS)
        self.transport.subscribe(
            self.topics.all_device_updates, self._enqueue("update"), qos=QOS_UPDATE, framed=True
        )
        self.transport.on_connect.append(lambda session_present: self._publish_status("running"))
        # handled on the coordinator thread: after a broker restart re-assert what the broker lost
        self.transport.on_connect.append(
            lambda session_present: self._events.put(("connected", "", b"1" if session_present else b"", time.time())))
        self.transport.connect(self.cfg.broker.connect_timeout_s)
        self._publish_status("starting")

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
            online=online,
            seq=self._status_seq,
            state=state,
            round=self.state.round_completed,
            global_version=self.state.global_version if self.state.global_model else None,
            rounds_total=self.cfg.rounds,
            counters=counters,
            last_rejection=self.counters.last_rejection[:500] or None,
        )
        try:
            self.transport.publish(self.topics.coordinator_status, msg.to_json(), qos=QOS_STATUS, retain=True)
        except Exception as exc:  # status is best effort; the loop must go on
            log.warning("could not publish coordinator status: %s", exc)

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

    def _maybe_publish_counters(self) -> None:
        """Republish the status (with its counters) after rejections, at most once a second."""
        self.counters.frames_rejected = getattr(self.transport, "messages_rejected", 0)
        if (self.counters.as_dict() != self._counters_published
                and time.monotonic() - self._counters_published_at >= STATUS_COUNTERS_EVERY_S):
            self._publish_status(self._last_status_state)

    def _handle(self, kind: str, topic: str, payload: bytes, arrived_at: float) -> None:
        try:
            if kind == "status":
                self._on_status(topic, payload)
            elif kind == "update":
                self._on_update(topic, payload, arrived_at)
            elif kind == "connected":
                self._on_connected(session_present=bool(payload))
        except ProtocolError as exc:
            self._reject(kind, topic, str(exc))
        except Exception as exc:  # noqa: BLE001 - input must never stop the coordinator
            self.counters.errors += 1
            log.exception("unexpected error handling %s on %s", kind, topic)
            self._reject(kind, topic, f"{type(exc).__name__}: {exc}")

    def _reject(self, kind: str, topic: str, reason: str) -> None:
        if kind == "update":
            self.counters.updates_rejected += 1
        elif kind == "status":
            self.counters.status_rejected += 1
        self.counters.last_rejection = f"{topic}: {reason}"[:1000]
        log.warning("rejected %s on %s: %s", kind, topic, reason[:1000])

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        device_id = self.topics.device_id_from(topic)
        st = m.DeviceStatus.from_json(payload)
        if st.device_id != device_id:
            raise ProtocolError(f"status names device {st.device_id!r} but was published on {topic!r}")
        dev = self.state.devices.setdefault(device_id, DeviceRecord(device_id))
        if st.seq < dev.seq:
            return  # a stale Will or birth from an earlier connection
        was_online, was_seq = dev.online, dev.seq
        dev.seq, dev.online, dev.last_seen = st.seq, st.online, time.time()
        dev.state = st.state if st.online else "offline"
        if st.online:
            dev.method, dev.model = st.method, st.model
            dev.num_samples, dev.eval_samples = st.num_samples or 0, st.eval_samples or 0
            dev.applied_version = st.applied_version
            dev.resources = st.resources.model_dump() if st.resources else None
            dev.memory = st.memory.model_dump(mode="json", exclude_none=True) if st.memory else None
            if st.memory is not None and st.memory.refused and dev.state == "refused":
                log.warning("device %s refuses to train: %s", device_id, st.memory.refused)
        if was_online != dev.online:
            log.info("device %s is %s", device_id, "online" if dev.online else "offline")
        c = self._collect
        back = not was_online or st.seq > was_seq or device_id in self._resend_on_announce
        if st.online:
            self._resend_on_announce.discard(device_id)
        if (st.online and back and c is not None
                and device_id in c.expected and device_id not in c.accepted):
            # the device restarted (or came back) while its task is open and may have lost the
            # task: send it again (a device that still has it ignores the duplicate task id; one
            # that already answered re-sends the same update, which is then a harmless duplicate)
            log.info("device %s is back while %s is open; task sent again", device_id, c.task_id)
            self._publish_task(c, device_id)
            self.counters.tasks_resent += 1

    def _on_update(self, topic: str, payload: bytes, arrived_at: float) -> None:
        t0 = time.perf_counter()
        device_id = self.topics.device_id_from(topic)
        upd = m.Update.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        decode_s = time.perf_counter() - t0
        if upd.device_id != device_id:
            raise ProtocolError(f"update names device {upd.device_id!r} but was published on {topic!r}")
        c = self._collect
        if c is None or upd.task_id != c.task_id:
            self.counters.late += 1
            raise ProtocolError(f"update for task {upd.task_id!r} (round {upd.round}) is not open; refused")
        if device_id not in c.expected:
            raise ProtocolError(f"device {device_id} was not selected for task {c.task_id}")
        _check_update_fields(upd)
        self._check_signature(upd, c)
        if device_id in c.accepted:
            self.counters.duplicates += 1
            log.info("duplicate update from %s for %s ignored", device_id, c.task_id)
            return
        if upd.kind != c.kind or upd.round != c.round_no or upd.base_version != c.base_version:
            raise ProtocolError(
                f"update (kind {upd.kind}, round {upd.round}, base v{upd.base_version}) does not match "
                f"task {c.task_id} (kind {c.kind}, round {c.round_no}, base v{c.base_version})"
            )
        if upd.kind == "fit":
            c.decoded[device_id] = self.strategy.validate_fit(self._global_arrays(), upd)
            if upd.num_samples <= 0:
                raise ProtocolError("fit update reports no samples")
        elif upd.kind == "evaluate":
            loss = upd.metrics.get("eval_loss")
            if loss is None or not math.isfinite(loss):
                raise ProtocolError("evaluate result carries no finite eval_loss")
        elif upd.kind == "init":
            # decoding checks sizes against the payload and refuses non-finite values
            c.decoded[device_id] = upd.tensors.decode(max_elements=self.cfg.broker.max_message_bytes, where="init tensors")
            if not c.decoded[device_id]:
                raise ProtocolError("init result carries no tensors")
        c.accepted[device_id] = upd
        c.received_at[device_id] = arrived_at
        c.bytes_in += len(payload)
        self._count_bytes("up", device_id, len(payload))
        c.decode_s += decode_s
        if self._restoring:
            self.counters.restored += 1
        else:
            self.counters.updates_accepted += 1
            self.counters.fit_accepted += c.kind == "fit"
            if c.kind == "fit":  # on disk before anything else happens: survives a crash
                self._save_open_round(c, device_id, payload)

    def _check_signature(self, upd: m.Update, c: _Collect) -> None:
        """End-to-end identity: the update must be signed by its device's key for this fan-out."""
        if self.verifier is None:
            return
        required = self.cfg.signatures_required
        if not required and (upd.signature is None or upd.device_id not in self.verifier.keys):
            return  # signatures optional: unsigned or unknown devices pass, a bad signature does not
        try:
            self.verifier.verify(upd.to_obj(), c.nonce)
        except ProtocolError:
            self.counters.signature_rejected += 1
            raise

    # ------------------------------------------------------------------ helpers
    def _server(self) -> ServerModel:
        """Exact weights, optimizer state and the devices' copy (rebuilt from persisted state)."""
        if self._server_model is None:
            gm = self.state.global_model
            assert gm is not None and gm.is_snapshot
            published = gm.tensors.decode_dense(max_elements=self.cfg.broker.max_message_bytes)
            self._server_model = ServerModel.from_blob(
                self.state.server, published, self.cfg.downlink, self.cfg.server_optimizer)
        return self._server_model

    def _global_arrays(self) -> dict[str, np.ndarray]:
        """The global as devices hold it: what their differences are relative to."""
        return self._server().published

    def ready_devices(self) -> list[DeviceRecord]:
        return [d for d in self.state.devices.values() if d.ready]

    def _wait_for_devices(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len([d for d in self.ready_devices() if d.num_samples > 0]) < n:
            if self._stop.is_set():
                raise RoundFailed("stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RoundFailed(
                    f"only {len(self.ready_devices())} device(s) ready after {timeout:.0f}s, need {n}"
                )
            self._pump(min(left, 0.5))

    def _send_tasks(self, kind: str, round_no: int, attempt: int, devices: list[str], deadline_s: float) -> tuple[_Collect, int]:
        gv = self.state.global_version
        task_id = f"r{round_no}-{kind}-v{gv}-a{attempt}"
        c = _Collect(kind, task_id, round_no, gv, set(devices), nonce=new_nonce(), attempt=attempt, deadline_s=deadline_s)
        self._collect = c
        sent = 0
        for dev in devices:
            sent += self._publish_task(c, dev)
        return c, sent

    def _publish_task(self, c: _Collect, dev: str) -> int:
        """Publish the task of ``c`` to ``dev`` (also to send it again: same task id)."""
        task = m.Task(
            kind=c.kind,
            task_id=c.task_id,
            round=c.round_no,
            device_id=dev,
            global_version=c.base_version,
            deadline_s=c.deadline_s,
            adapter=self.cfg.adapter,
            fit=self.cfg.fit.model_copy(update={"seed": self.cfg.fit.seed + c.round_no * 7919 + c.attempt}),
            model=self.cfg.model,
            nonce=c.nonce,
            **self.strategy.task_fields(c.kind, c.round_no, self.state),
        )
        n = self.transport.publish(self.topics.device_task(dev), task.to_msgpack(), qos=QOS_TASK, framed=True).bytes
        self._count_bytes("down", dev, n)
        return n

    # ------------------------------------------------------------------ faults: restarts of either side
    def _may_answer(self, device_id: str, now: float) -> bool:
        """Online, or offline for less than ``offline_grace_s`` (a broker restart fires every Will)."""
        dev = self.state.devices.get(device_id)
        if dev is not None and dev.declined(self._collect.task_id if self._collect is not None else None):
            return False  # refused (memory budget) or stopped this task over budget: not coming
        return dev is not None and (dev.online or now - dev.last_seen < self.cfg.offline_grace_s)

    @staticmethod
    def _carry_over(old: _Collect, new: _Collect) -> None:
        """Updates accepted under an earlier attempt of the round count in the next one: nothing
        accepted is dropped, and those devices are not asked to train again."""
        if not old.accepted:
            return
        new.earlier = [*old.earlier, {"task_id": old.task_id, "nonce": getattr(old, "nonce", None),
                                      "devices": sorted(set(old.accepted) - {d for e in old.earlier for d in e["devices"]})}]
        new.expected |= set(old.accepted)
        for d, u in old.accepted.items():
            new.accepted[d], new.received_at[d] = u, old.received_at[d]
            if d in old.decoded:
                new.decoded[d] = old.decoded[d]
        new.bytes_in += old.bytes_in
        new.decode_s += old.decode_s

    def _save_open_round(self, c: _Collect, device_id: str | None = None, payload: bytes | None = None) -> None:
        doc: dict[str, Any] = {"task_id": c.task_id, "kind": c.kind, "round": c.round_no,
                               "base_version": c.base_version, "attempt": c.attempt,
                               "selected": sorted(c.expected), "accepted": sorted(c.accepted),
                               "earlier": [{**e, "nonce": e["nonce"].hex() if e["nonce"] else None} for e in c.earlier]}
        if c.nonce is not None:
            doc["nonce"] = c.nonce.hex()
        self.store.save_open_round(doc, device_id, payload)

    def _resume_open_round(self, round_no: int) -> _Collect | None:
        """The fit task of ``round_no`` that was open when this coordinator died, with the updates it
        had accepted read back from disk (through the same checks as on arrival), or None."""
        try:
            found = self.store.load_open_round()
        except Exception as exc:  # noqa: BLE001 - an unreadable record only costs a fresh attempt
            log.warning("open round unreadable, starting the round afresh: %s", exc)
            found = None
        if found is None:
            return None
        doc, payloads = found
        if (doc.get("kind") != "fit" or doc.get("round") != round_no
                or doc.get("base_version") != self.state.global_version
                or not isinstance(doc.get("attempt"), int) or doc["attempt"] > self.cfg.round_retries):
            log.info("discarding the open round recorded before the restart (%s)", doc.get("task_id"))
            self.store.clear_open_round()
            return None
        self._wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
        c = _Collect("fit", str(doc["task_id"]), round_no, self.state.global_version, set(doc.get("selected", [])), nonce=bytes.fromhex(doc["nonce"]) if doc.get("nonce") else None,
                     attempt=doc["attempt"], deadline_s=self.cfg.round_deadline_s)
        self._restoring = True
        try:
            for e in doc.get("earlier") or []:  # updates carried over from earlier attempts
                old = _Collect("fit", str(e["task_id"]), round_no, self.state.global_version, set(e["devices"]))
                if e.get("nonce"):
                    old.nonce = bytes.fromhex(e["nonce"])  # type: ignore[attr-defined]
                self._collect = old
                for device_id in e["devices"]:
                    if device_id in payloads:
                        self._handle("update", self.topics.device_update(device_id), payloads.pop(device_id), time.time())
                self._carry_over(old, c)
            self._collect = c
            for device_id, payload in sorted(payloads.items()):
                self._handle("update", self.topics.device_update(device_id), payload, time.time())
        finally:
            self._restoring = False
        log.info("round %d: resuming task %s with %d accepted update(s) restored from disk (%s)",
                 round_no, c.task_id, len(c.accepted), ", ".join(sorted(c.accepted)) or "none")
        return c

    def _resend_pending(self, c: _Collect) -> int:
        sent = 0
        for dev in sorted(c.expected - set(c.accepted)):
            sent += self._publish_task(c, dev)
            self.counters.tasks_resent += 1
        return sent

    def _on_connected(self, session_present: bool) -> None:
        if not self._connected_before:
            self._connected_before = True
            return
        self.counters.reconnects += 1
        if session_present:
            return  # the broker kept our session: subscriptions and queued messages are there
        # The broker lost its state (restarted without persistence): retained messages and queued
        # tasks are gone. Re-assert the retained global; each device of the open task that has
        # not answered gets its task again when it announces itself (it re-subscribed by then).
        log.warning("broker lost the session: re-publishing the retained global; open tasks follow")
        c = self._collect
        if c is not None:
            self._resend_on_announce = c.expected - set(c.accepted)
        try:
            if self.state.global_model is not None:
                self._publish_global()
                self.counters.globals_reasserted += 1
        except Exception as exc:  # noqa: BLE001 - disconnected again: the next connect retries
            log.warning("could not re-assert state after reconnecting: %s", exc)

    def figures(self) -> dict[str, Any]:
        """Counters for operators and tests (logged as one JSON line after every round)."""
        out: dict[str, Any] = {k: v for k, v in vars(self.counters).items() if isinstance(v, int)}
        stats = self.transport.stats()
        out.update({k: stats[k] for k in ("connects", "disconnects", "messages_rejected") if k in stats})
        for key in ("expired", "duplicates"):  # chunked transfers dropped idle / frames seen twice
            out[f"reassembly_{key}"] = sum(v.get(key, 0) for k, v in stats.items()
                                           if k.startswith("reassembly[") and isinstance(v, dict))
        out["round_completed"] = self.state.round_completed
        out["rss_mb"] = _rss_mb()
        return out

    def _collect_until(self, c: _Collect, deadline_s: float, quorum: int) -> None:
        deadline = time.monotonic() + deadline_s
        while not self._stop.is_set():
            now = time.time()
            pending = {d for d in c.expected - set(c.accepted) if self._may_answer(d, now)}
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._pump(min(left, 0.5))
        raise RoundFailed("stopped")

    # ------------------------------------------------------------------ phases
    def _publish_strategy_retained(self) -> int:
        """The mode's retained messages (zo: ledger rounds), published before the global they back."""
        return sum(self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=True).bytes
                   for topic, payload in self.strategy.retained_messages(self.state, self.topics.base))

    def _publish_global(self, msg: m.GlobalModel | None = None) -> tuple[int, float]:
        """Publish a difference on its own retained topic, or a snapshot (default: the current
        global) on the global topic, which makes every retained difference obsolete. The mode's
        retained messages go first."""
        extra_bytes = self._publish_strategy_retained()
        gm = msg or self.state.global_model
        assert gm is not None
        server = self._server()
        t0 = time.perf_counter()
        payload = gm.to_msgpack()
        if gm.is_snapshot:
            n = self.transport.publish(self.topics.global_model, payload, qos=QOS_GLOBAL, retain=True, framed=True).bytes
            for v, chunks in sorted(server.retained_diffs.items()):
                self._clear_retained(self.topics.global_diff(v), chunks)
            server.retained_diffs.clear()
        else:
            topic = self.topics.global_diff(gm.version)
            published = self.transport.publish(topic, payload, qos=QOS_GLOBAL, retain=True, framed=True)
            n, server.retained_diffs[gm.version] = published.bytes, published.chunks
        self.state.server = server.to_blob()
        return n + extra_bytes, time.perf_counter() - t0

    def _clear_retained(self, topic: str, chunks: int) -> None:
        try:
            self.transport.publish(topic, b"", qos=QOS_GLOBAL, retain=True)
            for i in range(chunks):  # known from state even after a restart
                self.transport.publish(chunk_topic(topic, i), b"", qos=QOS_GLOBAL, retain=True)
        except Exception as exc:  # a stale retained difference is harmless (older than any snapshot)
            log.warning("could not clear retained %s: %s", topic, exc)

    def _initialize_global(self) -> None:
        """No global yet: ask one ready device for its freshly initialised adapter (version 0)."""
        initial = self.strategy.initial_tensors()
        if initial is not None:  # the mode defines version 0 itself (zo: the base checkpoint)
            self._adopt_initial_global(initial)
            return
        for attempt in range(self.cfg.round_retries + 1):
            self._wait_for_devices(1, self.cfg.wait_for_devices_s)
            ready = sorted(self.ready_devices(), key=lambda d: d.device_id)
            device = ready[attempt % len(ready)].device_id
            log.info("initialising the global adapter from device %s", device)
            c, _ = self._send_tasks("init", 0, attempt, [device], self.cfg.round_deadline_s)
            self._collect_until(c, self.cfg.round_deadline_s, 1)
            self._collect = None
            if c.accepted:
                self._adopt_initial_global({k: t.dense() for k, t in c.decoded[device].items()})
                return
        raise RoundFailed("no device answered the init task")

    def _adopt_initial_global(self, arrays: dict[str, np.ndarray]) -> None:
        self._server_model = ServerModel(arrays, self.cfg.downlink, self.cfg.server_optimizer)
        self.state.global_model = self._server_model.snapshot(0, 0, self.cfg.adapter, self.cfg.model)
        self.state.server = self._server_model.to_blob()
        self.store.save(self.state)
        self._publish_global()

    def _evaluate(self, round_no: int) -> tuple[float | None, int, int, int]:
        """(eval_loss, devices, bytes up, bytes down) for the current global."""
        devices = self.strategy.configure_evaluate(round_no, self.ready_devices())
        if not devices:
            return None, 0, 0, 0
        c, sent = self._send_tasks("evaluate", round_no, 0, devices, self.cfg.eval_deadline_s)
        self._collect_until(c, self.cfg.eval_deadline_s, len(devices))
        self._collect = None
        return self.strategy.aggregate_evaluate(list(c.accepted.values())), len(c.accepted), c.bytes_in, sent

    def _count_bytes(self, direction: str, device_id: str, n: int) -> None:
        per = self._bytes_by[direction]
        per[device_id] = per.get(device_id, 0) + n

    def _finish_round(self, summary: m.RoundSummary) -> None:
        summary = summary.model_copy(update={
            "uplink_bytes_by_device": dict(sorted(self._bytes_by["up"].items())),
            "downlink_bytes_by_device": dict(sorted(self._bytes_by["down"].items())),
        })
        self._bytes_by = {"up": {}, "down": {}}
        self.state.history.append(summary)
        self.store.save(self.state)
        try:
            self.transport.publish(self.topics.rounds, summary.to_json(), qos=QOS_ROUNDS, retain=True)
        except Exception as exc:
            log.warning("could not publish round summary: %s", exc)
        if self.on_round:
            self.on_round(summary)

    def _run_round(self, round_no: int) -> m.RoundSummary:
        t_start = time.monotonic()
        quorum = self.cfg.effective_quorum
        resumed = self._resume_open_round(round_no)
        carried: _Collect | None = None  # the last attempt, whose accepted updates count in the next
        for attempt in range(resumed.attempt if resumed else 0, self.cfg.round_retries + 1):
            if resumed is not None:  # the round this coordinator was in when it died
                c, resumed = resumed, None
                selected = sorted(c.expected)
                self._publish_status("training")
                task_bytes = self._resend_pending(c)
            else:
                self._wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
                selected = self.strategy.configure_fit(round_no, self.ready_devices())
                if not selected:
                    continue
                self._publish_status("training")
                log.info("round %d: training on %s", round_no, ", ".join(selected))
                done = set(carried.accepted) if carried is not None else set()
                c, task_bytes = self._send_tasks(
                    "fit", round_no, attempt, [d for d in selected if d not in done], self.cfg.round_deadline_s)
                if carried is not None:
                    self._carry_over(carried, c)
                    selected = sorted(set(selected) | done)
                self._save_open_round(c)
            self._collect_until(c, self.cfg.round_deadline_s, quorum)
            self._collect = None  # closes the round: later updates are refused as late
            if len(c.accepted) >= quorum:
                break
            carried = c
            log.warning(
                "round %d attempt %d: %d of %d updates by the deadline, quorum %d; retrying",
                round_no, attempt, len(c.accepted), len(selected), quorum,
            )
        else:
            raise RoundFailed(f"round {round_no}: no quorum after {self.cfg.round_retries + 1} attempts")

        updates = [c.accepted[d] for d in sorted(c.accepted)]
        server = self._server()
        t0 = time.perf_counter()
        server.step(self.strategy.aggregate_deltas(server.published, updates, [c.decoded[d] for d in sorted(c.accepted)]))
        version = self.state.global_version + 1
        if self.strategy.snapshot_every_version:
            message = server.snapshot(version, round_no, self.cfg.adapter, self.cfg.model)
        else:
            message = server.advance(version, round_no, self.cfg.adapter, self.cfg.model)
        aggregate_s = time.perf_counter() - t0
        self.state.global_model = server.snapshot(version, round_no, self.cfg.adapter, self.cfg.model)
        self.state.server = server.to_blob()
        self.state.round_completed = round_no
        self.strategy.commit_round(self.state, round_no)
        for d in selected:
            rec = self.state.devices.get(d)
            if rec:
                if d in c.accepted:
                    rec.rounds_participated += 1
                else:
                    rec.rounds_missed += 1
        self.store.save(self.state)
        self.store.clear_open_round()  # after the save: a crash in between resumes nothing stale
        global_bytes, publish_s = self._publish_global(message)
        n_receivers = max(1, len([d for d in self.state.devices.values() if d.online]))
        for d in self.state.devices.values():
            if d.online:
                self._count_bytes("down", d.device_id, global_bytes)

        eval_loss, eval_devices, eval_up, eval_down = (None, 0, 0, 0)
        if self.cfg.evaluate:
            self._publish_status("evaluating")
            eval_loss, eval_devices, eval_up, eval_down = self._evaluate(round_no)

        tl = [(u.metrics.get("train_loss"), u.num_samples) for u in updates if u.metrics.get("train_loss") is not None]
        train_loss = sum(l * n for l, n in tl) / sum(n for _, n in tl) if tl else None
        timings = _protocol_timings(updates, c, aggregate_s, publish_s)
        return m.RoundSummary(
            round=round_no,
            global_version=self.state.global_version,
            participants=tuple(sorted(c.accepted)),
            selected=tuple(selected),
            stragglers=tuple(sorted(set(selected) - set(c.accepted))),
            num_samples=sum(u.num_samples for u in updates),
            train_loss=train_loss,
            eval_loss=eval_loss,
            eval_devices=eval_devices,
            uplink_bytes=c.bytes_in + eval_up,
            downlink_bytes=task_bytes + eval_down + global_bytes * n_receivers,
            duration_s=time.monotonic() - t_start,
            aggregate_s=aggregate_s,
            timings=timings,
        )

    def run(self) -> CoordinatorState:
        """Run until ``cfg.rounds`` rounds are complete (resuming from persisted state)."""
        self.start()
        try:
            if self.state.global_model is None:
                self._initialize_global()
            else:
                self._publish_global()  # a restarted coordinator re-asserts its retained global
            if not self.state.history and self.cfg.evaluate:
                self._wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
                loss, n_dev, up, down = self._evaluate(0)
                self._finish_round(m.RoundSummary(
                    round=0, global_version=self.state.global_version, eval_loss=loss,
                    eval_devices=n_dev, uplink_bytes=up, downlink_bytes=down,
                ))
            while self.state.round_completed < self.cfg.rounds and not self._stop.is_set():
                summary = self._run_round(self.state.round_completed + 1)
                self._finish_round(summary)
                log.info(
                    "round %d done: %d participants, eval loss %s, up %d B, down %d B",
                    summary.round, len(summary.participants),
                    "n/a" if summary.eval_loss is None else f"{summary.eval_loss:.4f}",
                    summary.uplink_bytes, summary.downlink_bytes,
                )
                log.info("figures %s", json.dumps(self.figures(), sort_keys=True))
            self._publish_status("finished" if self.state.round_completed >= self.cfg.rounds else "stopped")
        finally:
            self._collect = None
            log.info("figures %s", json.dumps(self.figures(), sort_keys=True))
        return self.state


def _rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return None


def _default_strategy(config: CoordinatorConfig) -> Strategy:
    if config.zo is not None:
        from broker_coordinator.zo_strategy import FedKSeed

        return FedKSeed(config)
    return FedAvg(config.min_clients, config.fraction, config.max_clients, config.selection_seed,
                  aggregation=config.aggregation)


def _check_update_fields(upd: m.Update) -> None:
    """Bounds the schema does not express: finite metrics, plausible sample counts."""
    if len(upd.metrics) > MAX_METRICS:
        raise ProtocolError(f"update carries {len(upd.metrics)} metrics, limit {MAX_METRICS}")
    for k, v in upd.metrics.items():
        if len(k) > 64 or not math.isfinite(v):
            raise ProtocolError(f"update metric {k[:64]!r} must have a name of <= 64 chars and a finite value, got {v!r}")
    if upd.num_samples > MAX_NUM_SAMPLES:
        raise ProtocolError(f"update reports {upd.num_samples} samples, limit {MAX_NUM_SAMPLES}")


def _protocol_timings(updates: list[m.Update], c: _Collect, aggregate_s: float, publish_s: float) -> dict[str, float]:
    """Protocol time of a round on its critical path, excluding waiting for slower devices.

    Device-side figures come from each update's metrics (encode/publish of this update, decode/apply
    of the previous global); the slowest device's protocol work counts, as rounds wait for it.
    """
    def worst(key: str) -> float:
        return max((u.metrics.get(key, 0.0) for u in updates), default=0.0)

    transfer = 0.0
    for d, u in c.accepted.items():
        sent_at = u.metrics.get("sent_at")
        if sent_at:
            transfer = max(transfer, c.received_at[d] - sent_at)
    return {
        "update_encode_s": worst("encode_s"),
        "update_transfer_s": max(0.0, transfer),
        "update_decode_s": c.decode_s,
        "aggregate_s": aggregate_s,
        "global_publish_s": publish_s,
        "global_receive_s": worst("global_receive_s"),
        "global_decode_s": worst("global_decode_s"),
        "global_apply_s": worst("global_apply_s"),
        "train_s": worst("train_s"),
    }
