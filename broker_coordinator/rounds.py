"""The round runner: select devices, send tasks, collect results until the deadline or quorum,
retry, aggregate through the mode, persist, publish, evaluate.

Every accepted fit update is journalled (``broker_coordinator.journal``) before anything else
happens, so a coordinator that dies mid-round resumes the same round with what it had accepted;
an attempt that misses its quorum carries its accepted updates into the next attempt. Updates are
folded into the mode's running aggregate as they are accepted (``CoordinatorMode.fold``); a resumed
round refolds the journalled payloads, so it aggregates exactly what it had accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import Collection, UpdateIntake
from broker_coordinator.modes import CoordinatorMode
from broker_coordinator.partials import PartialIntake
from broker_coordinator.publisher import GlobalPublisher
from broker_coordinator.registry import DeviceRegistry, Presence
from broker_coordinator.state import CoordinatorState, StateStore
from broker_coordinator.strategy import mean_eval_loss, select_devices
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.partials import parse_partial_key
from fedmq_protocol.seal import Sealer
from fedmq_protocol.signing import new_nonce
from fedmq_protocol.topics import QOS_TASK, Topics
from fedmq_protocol.transport import MqttTransport

log = logging.getLogger("fedmq.coordinator")

EventHandler = Callable[[str, str, bytes, float], None]


class RoundFailed(RuntimeError):
    pass


class Traffic:
    """Bytes of the current round per device and direction (for the round summary)."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, int]] = {"up": {}, "down": {}}

    def add(self, direction: str, device_id: str, n: int) -> None:
        per = self.by[direction]
        per[device_id] = per.get(device_id, 0) + n

    def take(self) -> dict[str, dict[str, int]]:
        out, self.by = self.by, {"up": {}, "down": {}}
        return {k: dict(sorted(v.items())) for k, v in out.items()}


class RoundRunner:
    def __init__(
        self, cfg: CoordinatorConfig, topics: Topics, transport: MqttTransport, store: StateStore,
        state: CoordinatorState, mode: CoordinatorMode, registry: DeviceRegistry, intake: UpdateIntake,
        publisher: GlobalPublisher, counters: CoordinatorCounters, *,
        pump: Callable[[float], None], stopped: Callable[[], bool], set_status: Callable[[str], None],
        handle: EventHandler, sealer: Sealer | None = None, partials: PartialIntake | None = None,
    ) -> None:
        self.cfg, self.topics, self.transport, self.store, self.state = cfg, topics, transport, store, state
        self.mode, self.registry, self.intake, self.partials = mode, registry, intake, partials
        self.publisher, self.counters = publisher, counters
        self._pump, self._stopped, self._set_status, self._handle = pump, stopped, set_status, handle
        self.open: Collection | None = None  # the fan-out whose results are being collected
        self.traffic = Traffic()
        self._restoring = False  # replaying the open round's accepted updates from disk
        self.sealer = sealer or Sealer(topics.federation)
        # Until the open round recorded before a restart is restored, updates for it that the
        # broker kept for this coordinator (its session) wait here instead of being refused
        self._restore_selected: frozenset[str] = frozenset()
        self._held: list[tuple[str, str, bytes, float]] = []  # (kind, topic, payload, arrival)
        try:
            found = store.load_open_round()
        except Exception:  # noqa: BLE001 - an unreadable record is reported when the round starts
            found = None
        if found is not None and found[0].kind == "fit" and found[0].round == state.round_completed + 1:
            self._restore_selected = frozenset(found[0].selected)

    def awaited(self) -> frozenset[str]:
        """Devices whose updates the coordinator waits for (read from the network thread)."""
        c = self.open
        if c is not None:
            return frozenset(c.expected)
        return self._restore_selected

    # ------------------------------------------------------------------ tasks
    def send_tasks(self, kind: m.TaskKind, round_no: int, attempt: int, devices: list[str],
                   deadline_s: float) -> tuple[Collection, int]:
        gv = self.state.global_version
        c = Collection(kind, f"r{round_no}-{kind}-v{gv}-a{attempt}", round_no, gv, set(devices), nonce=new_nonce(),
                       attempt=attempt, deadline_s=deadline_s)
        self.open = c
        return c, sum(self.publish_task(c, dev) for dev in devices)

    def publish_task(self, c: Collection, dev: str) -> int:
        """Publish the task of ``c`` to ``dev`` (also to send it again: same task id)."""
        task = m.Task(
            kind=c.kind, task_id=c.task_id, round=c.round_no, device_id=dev, global_version=c.base_version,
            deadline_s=c.deadline_s, adapter=self.cfg.adapter,
            fit=self.cfg.fit.model_copy(update={"seed": self.cfg.fit.seed + c.round_no * 7919 + c.attempt}),
            model=self.cfg.model, payload=self.mode.task_payload_for(c.kind, c.round_no, dev), nonce=c.nonce,
        )
        topic = self.topics.device_task(dev)
        sealed = self.sealer.seal(topic, task.to_msgpack(), round_no=c.round_no, version=c.base_version)
        n = self.transport.publish(topic, sealed, qos=QOS_TASK, framed=True).bytes
        self.traffic.add("down", dev, n)
        return n

    def _resend_pending(self, c: Collection) -> int:
        sent = 0
        for dev in sorted(c.expected - set(c.accepted)):
            sent += self.publish_task(c, dev)
            self.counters.tasks_resent += 1
        return sent

    # ------------------------------------------------------------------ events
    def on_presence(self, p: Presence) -> None:
        c = self.open
        if p.online and p.back and c is not None and p.device_id in c.expected and p.device_id not in c.accepted:
            # the device restarted (or came back) while its task is open and may have lost the
            # task: send it again (a device that still has it ignores the duplicate task id; one
            # that already answered re-sends the same update, which is then a harmless duplicate)
            log.info("device %s is back while %s is open; task sent again", p.device_id, c.task_id)
            self.publish_task(c, p.device_id)
            self.counters.tasks_resent += 1

    def on_update(self, topic: str, payload: bytes, arrived_at: float) -> None:
        c = self.open
        if (c is None and self._restore_selected and len(self._held) < 4 * len(self._restore_selected)
                and self.topics.device_id_from(topic) in self._restore_selected):
            self._held.append(("update", topic, payload, arrived_at))  # fed to the round once it is restored
            return
        upd = self.intake.receive(topic, payload, arrived_at, c)
        if upd is None:
            log.info("duplicate update from %s for %s ignored",
                     self.topics.device_id_from(topic), c.task_id if c else None)
            return
        assert c is not None
        self.traffic.add("up", upd.device_id, len(payload))
        if self._restoring:
            self.counters.restored += 1
            return
        self.counters.updates_accepted += 1
        self.counters.fit_accepted += c.kind == "fit"
        if c.kind == "fit":  # on disk before anything else happens: survives a crash
            self.store.save_accepted(upd.device_id, payload)

    def on_partial(self, topic: str, payload: bytes, arrived_at: float) -> None:
        """A site aggregator's partial aggregate (broker_coordinator.partials): its devices count as
        accepted fit updates of the open fan-out; journalled like a device's update."""
        c = self.open
        if c is None and self._restore_selected and len(self._held) < 4 * len(self._restore_selected):
            self._held.append(("partial", topic, payload, arrived_at))
            return
        if self.partials is None:
            raise ProtocolError("this coordinator takes no partial aggregates (no aggregator_keys configured)")
        p = self.partials.receive(topic, payload, arrived_at, c)
        if p is None:
            log.info("duplicate partial from site %s ignored", self.topics.site_from(topic))
            return
        assert c is not None
        self.traffic.add("up", f"site:{p.site_id}", len(payload))
        if self._restoring:
            self.counters.restored += len(p.members)
            return
        self.counters.partials_accepted += 1
        self.counters.updates_accepted += len(p.members)
        self.counters.fit_accepted += len(p.members)
        log.info("partial %s: %d device(s) of site %s counted", p.key, len(p.members), p.site_id)
        self.store.save_accepted(p.key, payload)  # on disk before anything else happens

    def on_session_lost(self) -> None:
        """The broker restarted without persistence: retained messages and queued tasks are gone.
        Re-assert the retained global; each device of the open task that has not answered gets
        its task again when it announces itself (it re-subscribed by then)."""
        log.warning("broker lost the session: re-publishing the retained global; open tasks follow")
        c = self.open
        if c is not None:
            self.registry.expect_announcements(c.expected - set(c.accepted))
        try:
            if self.state.global_model is not None:
                self.publisher.publish(everything=True)
                self.counters.globals_reasserted += 1
        except Exception as exc:  # noqa: BLE001 - disconnected again: the next connect retries
            log.warning("could not re-assert state after reconnecting: %s", exc)

    # ------------------------------------------------------------------ waiting
    def wait_for_devices(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.registry.ready_with_data() < n:
            if self._stopped():
                raise RoundFailed("stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RoundFailed(f"only {len(self.registry.ready())} device(s) ready after {timeout:.0f}s, need {n}")
            self._pump(min(left, 0.5))

    def may_answer(self, device_id: str, now: float) -> bool:
        return self.registry.may_answer(device_id, self.open.task_id if self.open is not None else None, now)

    def collect_until(self, c: Collection, deadline_s: float) -> None:
        """Handle events until every awaited device answered (or cannot), or ``deadline_s`` passed."""
        deadline = time.monotonic() + deadline_s
        while not self._stopped():
            now = time.time()
            if not {d for d in c.expected - set(c.accepted) if self.may_answer(d, now)}:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._pump(min(left, 0.5))
        raise RoundFailed("stopped")

    # ------------------------------------------------------------------ phases
    def initialize_global(self) -> None:
        """No global yet: the mode's version 0, or one ready device's freshly initialised tensors."""
        initial = self.mode.initial_global()
        if initial is None:
            initial = self._initial_from_device()
        self.state.global_model = initial
        self.state.mode_state = self.mode.state_blob()
        self.store.save(self.state)
        self.publisher.publish()

    def _initial_from_device(self) -> m.GlobalModel:
        for attempt in range(self.cfg.round_retries + 1):
            self.wait_for_devices(1, self.cfg.wait_for_devices_s)
            ready = sorted(self.registry.ready(), key=lambda d: d.device_id)
            device = ready[attempt % len(ready)].device_id
            log.info("initialising the global from device %s", device)
            c, _ = self.send_tasks("init", 0, attempt, [device], self.cfg.round_deadline_s)
            self.collect_until(c, self.cfg.round_deadline_s)
            self.open = None
            if c.accepted:
                return self.mode.adopt_initial({k: t.dense() for k, t in c.contributions[device].items()})
        raise RoundFailed("no device answered the init task")

    def evaluate(self, round_no: int) -> tuple[float | None, int, int, int]:
        """(eval_loss, devices, bytes up, bytes down) for the current global."""
        devices = self.eval_selection()
        if not devices:
            return None, 0, 0, 0
        c, sent = self.send_tasks("evaluate", round_no, 0, devices, self.cfg.eval_deadline_s)
        self.collect_until(c, self.cfg.eval_deadline_s)
        self.open = None
        return mean_eval_loss(list(c.accepted.values())), len(c.accepted), c.bytes_in, sent

    def eval_selection(self) -> list[str]:
        """The ready devices with eval data that evaluate the global (``eval_devices``, ``eval_max_devices``)."""
        ready = sorted(d.device_id for d in self.registry.ready() if d.eval_samples > 0)
        if self.cfg.eval_devices is not None:
            chosen = set(self.cfg.eval_devices)
            ready = [d for d in ready if d in chosen]
        if self.cfg.eval_max_devices is not None:
            ready = ready[:self.cfg.eval_max_devices]
        return ready

    def _select(self, round_no: int) -> list[str]:
        return select_devices(round_no, self.registry.ready(), min_clients=self.cfg.min_clients,
                              fraction=self.cfg.fraction, max_clients=self.cfg.max_clients,
                              seed=self.cfg.selection_seed, accepts=self.mode.accepts)

    def _collect_fit(self, round_no: int) -> tuple[Collection, list[str], int]:
        """The round's fan-outs until one reaches the quorum: (its collection, selected, task bytes)."""
        quorum = self.cfg.effective_quorum
        resumed = self._resume_open_round(round_no)
        carried: Collection | None = None  # the last attempt, whose accepted updates count in the next
        for attempt in range(resumed.attempt if resumed else 0, self.cfg.round_retries + 1):
            if resumed is not None:  # the round this coordinator was in when it died
                c, resumed = resumed, None
                selected = sorted(c.expected)
                self._set_status("training")
                task_bytes = self._resend_pending(c)
            else:
                self.wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
                selected = self._select(round_no)
                if not selected:
                    continue
                self._set_status("training")
                log.info("round %d: training on %s", round_no, ", ".join(selected))
                done = set(carried.accepted) if carried is not None else set()
                c, task_bytes = self.send_tasks(
                    "fit", round_no, attempt, [d for d in selected if d not in done], self.cfg.round_deadline_s)
                if carried is not None:
                    c.carry_over(carried)
                    selected = sorted(set(selected) | done)
                self.store.save_open_round(c.journal())
            self.collect_until(c, self.cfg.round_deadline_s)
            self.open = None  # closes the round: later updates are refused as late
            if len(c.accepted) >= quorum:
                return c, selected, task_bytes
            carried = c
            log.warning("round %d attempt %d: %d of %d updates by the deadline, quorum %d; retrying",
                        round_no, attempt, len(c.accepted), len(selected), quorum)
        raise RoundFailed(f"round {round_no}: no quorum after {self.cfg.round_retries + 1} attempts")

    def run_round(self, round_no: int) -> m.RoundSummary:
        t_start = time.monotonic()
        c, selected, task_bytes = self._collect_fit(round_no)
        devices = sorted(c.accepted)
        updates = [c.accepted[d] for d in devices]
        t0 = time.perf_counter()
        outcome = self.mode.aggregate_folded(round_no, self.state.global_version + 1, updates,
                                             [c.contributions.get(d) for d in devices], c.running)
        aggregate_s = time.perf_counter() - t0
        self.state.global_model = outcome.snapshot
        self.state.mode_state = self.mode.state_blob()
        self.state.round_completed = round_no
        self.registry.record_participation(selected, set(c.accepted))
        self.store.save(self.state)
        self.store.clear_open_round()  # after the save: a crash in between resumes nothing stale
        global_bytes, publish_s = self.publisher.publish(outcome.message)
        receivers = self.registry.online()
        for d in receivers:
            self.traffic.add("down", d.device_id, global_bytes)

        fit_s = time.monotonic() - t_start
        eval_loss, eval_devices, eval_up, eval_down = (None, 0, 0, 0)
        if self.cfg.evaluate:
            self._set_status("evaluating")
            eval_loss, eval_devices, eval_up, eval_down = self.evaluate(round_no)
        duration_s = time.monotonic() - t_start

        tl = [(u.metrics["train_loss"], u.num_samples) for u in updates if u.metrics.get("train_loss") is not None]
        train_loss = sum(loss * n for loss, n in tl) / sum(n for _, n in tl) if tl else None
        return m.RoundSummary(
            round=round_no,
            global_version=self.state.global_version,
            participants=tuple(devices),
            selected=tuple(selected),
            stragglers=tuple(sorted(set(selected) - set(c.accepted))),
            num_samples=sum(u.num_samples for u in updates),
            train_loss=train_loss,
            eval_loss=eval_loss,
            eval_devices=eval_devices,
            uplink_bytes=c.bytes_in + eval_up,
            downlink_bytes=task_bytes + eval_down + global_bytes * max(1, len(receivers)),
            duration_s=duration_s,
            fit_s=fit_s,
            eval_s=duration_s - fit_s,
            aggregate_s=aggregate_s,
            timings=protocol_timings(updates, c, aggregate_s, publish_s),
        )

    # ------------------------------------------------------------------ resuming after a restart
    def _resume_open_round(self, round_no: int) -> Collection | None:
        """The fit task of ``round_no`` that was open when this coordinator died, with the updates it
        had accepted read back from disk (through the same checks as on arrival), or None."""
        try:
            found = self.store.load_open_round()
        except Exception as exc:  # noqa: BLE001 - an unreadable record only costs a fresh attempt
            log.warning("open round unreadable, starting the round afresh: %s", exc)
            found = None
        if found is None:
            return None
        rec, payloads = found
        if (rec.kind != "fit" or rec.round != round_no or rec.base_version != self.state.global_version
                or rec.attempt > self.cfg.round_retries):
            log.info("discarding the open round recorded before the restart (%s)", rec.task_id)
            self.store.clear_open_round()
            self._release_held()
            return None
        self.wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
        gv = self.state.global_version
        c = Collection("fit", rec.task_id, round_no, gv, set(rec.selected), nonce=rec.nonce, attempt=rec.attempt,
                       deadline_s=self.cfg.round_deadline_s)
        self._restoring = True
        try:
            for e in rec.earlier:  # updates carried over from earlier attempts
                old = Collection("fit", e.task_id, round_no, gv, set(e.devices), nonce=e.nonce, running=c.running)
                self.open = old
                for key in sorted(payloads):
                    parsed = parse_partial_key(key)
                    if parsed is not None and parsed[0] == e.task_id:
                        self._handle("partial", self.topics.site_partial(parsed[1]), payloads.pop(key), time.time())
                for device_id in e.devices:
                    if device_id in payloads:
                        self._handle("update", self.topics.device_update(device_id), payloads.pop(device_id),
                                     time.time())
                c.carry_over(old)
            self.open = c
            for key, payload in sorted(payloads.items()):
                parsed = parse_partial_key(key)
                if parsed is not None:
                    self._handle("partial", self.topics.site_partial(parsed[1]), payload, time.time())
                else:
                    self._handle("update", self.topics.device_update(key), payload, time.time())
        finally:
            self._restoring = False
        log.info("round %d: resuming task %s with %d accepted update(s) restored from disk (%s)",
                 round_no, c.task_id, len(c.accepted), ", ".join(sorted(c.accepted)) or "none")
        before = self.counters.updates_accepted
        self._release_held()
        if self.counters.updates_accepted > before:
            self.counters.queued_after_restart += self.counters.updates_accepted - before
            log.info("round %d: %d update(s) the broker held for this coordinator accepted",
                     round_no, self.counters.updates_accepted - before)
        return c

    def _release_held(self) -> None:
        """Feed the updates held until the restore (the open round is now restored, or gone)."""
        held, self._held, self._restore_selected = self._held, [], frozenset()
        for kind, topic, payload, arrived_at in held:
            self._handle(kind, topic, payload, arrived_at)


def protocol_timings(updates: list[m.Update], c: Collection, aggregate_s: float, publish_s: float) -> dict[str, float]:
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
