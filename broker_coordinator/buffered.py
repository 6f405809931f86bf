"""Asynchronous rounds (FedBuff): the coordinator keeps ``concurrency`` devices training, folds every
accepted update into a buffer weighted by its staleness and publishes a new global every
``buffer_size`` accepted updates (``broker_coordinator.staleness``: the config and the rule).

- A task goes to a ready device as soon as it is idle (its previous update arrived, was refused,
  or its task timed out); it names the global version the coordinator holds at that moment
  (``base``) and the round that version would open (``base + 1`` when no flush failed), so the
  device trains on the latest global it can reach and its update says which one it was.
- An update is checked by the same intake as in synchronous rounds (task, nonce, signature, the
  mode's validation against the global); then its staleness ``s = version now - base`` decides:
  ``s > max_staleness`` is refused (counted as ``stale``, with its reason) and the buffer is left
  as it was; otherwise it is journalled (payload as received) before it counts, then folded with
  weight ``w(s)``.
- At ``buffer_size`` updates the mode turns the buffer into the next version exactly as it turns a
  synchronous round (``aggregate_folded``: the server optimizer applies the buffered mean), the
  state is saved, then the journal forgets the buffer, then the global is published.

The journal (``async-round.json`` beside the state, one ``async-{task id}.msgpack`` per buffered
update) holds the outstanding tasks (device, base version, nonce) and the buffered updates in
arrival order. A restarted coordinator refolds the buffer through the same checks and weights (same
order: the same float sums) when it was collected on the current global, drops it when the saved
state already contains it (a crash between the save and the journal), and sends the outstanding
tasks again under the same ids.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from broker_coordinator.intake import Collection, UpdateIntake
from broker_coordinator.modes import CoordinatorMode
from broker_coordinator.rounds import RoundRunner
from broker_coordinator.staleness import NOT_ASYNCHRONOUS, staleness_weight
from broker_coordinator.state import FileStateStore
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import new_nonce
from fedmq_protocol.storage import atomic_write

log = logging.getLogger("fedmq.coordinator")

JOURNAL_FORMAT = 1
JOURNAL_FILE = "async-round.json"
ACCEPTED_LOG = 10_000  # entries of ``BufferedRounds.accepted_log`` kept


@dataclass(frozen=True)
class TaskRecord:
    """One asynchronous task as the journal keeps it."""

    task_id: str
    device_id: str
    round: int
    base_version: int
    attempt: int
    nonce: bytes | None

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "device_id": self.device_id, "round": self.round,
                "base_version": self.base_version, "attempt": self.attempt,
                "nonce": self.nonce.hex() if self.nonce else None}

    @classmethod
    def from_json(cls, obj: Any) -> TaskRecord:
        if not isinstance(obj, dict):
            raise ValueError("asynchronous journal: a task must be a map")
        for key in ("round", "base_version", "attempt"):
            if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool):
                raise ValueError(f"asynchronous journal: task {key} must be an integer")
        for key in ("task_id", "device_id"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"asynchronous journal: task {key} must be text")
        nonce = obj.get("nonce")
        return cls(obj["task_id"], obj["device_id"], obj["round"], obj["base_version"], obj["attempt"],
                   bytes.fromhex(nonce) if isinstance(nonce, str) else None)

    @classmethod
    def of(cls, c: Collection) -> TaskRecord:
        (device_id,) = c.expected
        return cls(c.task_id, device_id, c.round_no, c.base_version, c.attempt, c.nonce)

    def collection(self, deadline_s: float) -> Collection:
        return Collection("fit", self.task_id, self.round, self.base_version, {self.device_id}, nonce=self.nonce,
                          attempt=self.attempt, deadline_s=deadline_s)


@dataclass
class JournalRecord:
    version: int  # the global the buffer is being collected on
    seq: int  # tasks sent so far (names the next task)
    tasks: list[TaskRecord] = field(default_factory=list)  # outstanding
    buffer: list[TaskRecord] = field(default_factory=list)  # the buffered updates' tasks, in arrival order


class AsyncJournal:
    """The asynchronous schedule on disk (``directory``) or, without one, in memory."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self._record: JournalRecord | None = None
        self._payloads: dict[str, bytes] = {}

    def _file(self) -> Path:
        assert self.dir is not None
        return self.dir / JOURNAL_FILE

    def _payload_file(self, task_id: str) -> Path:
        assert self.dir is not None
        return self.dir / f"async-{task_id}.msgpack"

    def save(self, record: JournalRecord, task_id: str | None = None, payload: bytes | None = None) -> None:
        """Record the schedule; an accepted update's payload is written before the record listing it."""
        if self.dir is None:
            if task_id is not None and payload is not None:
                self._payloads[task_id] = bytes(payload)
            self._record = JournalRecord(record.version, record.seq, list(record.tasks), list(record.buffer))
            self._payloads = {t.task_id: self._payloads[t.task_id] for t in record.buffer
                              if t.task_id in self._payloads}
            return
        if task_id is not None and payload is not None:
            atomic_write(self._payload_file(task_id), bytes(payload))
        doc = {"format": JOURNAL_FORMAT, "version": record.version, "seq": record.seq,
               "tasks": [t.to_json() for t in record.tasks], "buffer": [t.to_json() for t in record.buffer]}
        atomic_write(self._file(), json.dumps(doc, indent=1).encode())
        keep = {f"async-{t.task_id}.msgpack" for t in record.buffer}
        for p in self.dir.glob("async-*.msgpack"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def load(self) -> tuple[JournalRecord, dict[str, bytes]] | None:
        """The schedule recorded before a restart and its buffered payloads (ValueError: unreadable)."""
        if self.dir is None:
            return None if self._record is None else (self._record, dict(self._payloads))
        try:
            doc = json.loads(self._file().read_text())
        except FileNotFoundError:
            return None
        if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"{self._file()}: not an asynchronous journal of format {JOURNAL_FORMAT}")
        record = JournalRecord(int(doc["version"]), int(doc["seq"]),
                               [TaskRecord.from_json(t) for t in doc.get("tasks") or []],
                               [TaskRecord.from_json(t) for t in doc.get("buffer") or []])
        payloads: dict[str, bytes] = {}
        for t in record.buffer:
            with contextlib.suppress(FileNotFoundError):
                payloads[t.task_id] = self._payload_file(t.task_id).read_bytes()
        return record, payloads

    def clear(self) -> None:
        self._record, self._payloads = None, {}
        if self.dir is not None:
            self._file().unlink(missing_ok=True)
            for p in self.dir.glob("async-*.msgpack"):
                p.unlink(missing_ok=True)


class _Validating:
    """The mode as the asynchronous intake sees it: validation only. Folding waits for the staleness
    check, so a refused update leaves the buffer untouched."""

    def __init__(self, mode: CoordinatorMode) -> None:
        self._mode = mode

    def validate_update(self, update: m.Update) -> Any:
        return self._mode.validate_update(update)

    def fold(self, running: Any, update: m.Update, contribution: Any) -> tuple[Any, m.Update, Any]:
        return running, update, contribution


@dataclass(frozen=True)
class Accepted:
    """One update taken into a buffer (in arrival order; for operators and tests)."""

    device_id: str
    task_id: str
    base_version: int
    version: int  # the global it was folded on
    staleness: int
    weight: float
    restored: bool = False  # refolded from the journal after a restart


class Buffer:
    """The buffered updates of the next version, folded with their staleness weights: the adapter
    mode into a float64 ``RunningMean`` (O(model)), krso keeping each update's accumulators scaled."""

    def __init__(self, mode: CoordinatorMode) -> None:
        if mode.name in NOT_ASYNCHRONOUS:
            raise ValueError(f"the {mode.name} mode has no asynchronous buffer: {NOT_ASYNCHRONOUS[mode.name]}")
        self.mode = mode
        self.running: Any = None  # the mode's running state (the adapter's float64 RunningMean)
        self.updates: list[m.Update] = []
        self.contributions: list[Any] = []
        self.tasks: list[TaskRecord] = []  # the tasks the updates answered, in arrival order (the journal)
        self.payload_bytes = 0

    def __len__(self) -> int:
        return len(self.updates)

    def add(self, task: TaskRecord, update: m.Update, contribution: Any, weight: float, payload_bytes: int) -> None:
        self.running, update, contribution = self.mode.fold_weighted(self.running, update, contribution, weight)
        self.tasks.append(task)
        self.updates.append(update)
        self.contributions.append(contribution)
        self.payload_bytes += payload_bytes


class BufferedRounds(RoundRunner):
    """The round runner of asynchronous rounds (``asynchronous.enabled``); ``init`` and ``evaluate``
    fan-outs are the synchronous runner's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acfg = self.cfg.asynchronous
        self.outstanding: dict[str, Collection] = {}  # device -> its open task
        self.sent_at: dict[str, float] = {}  # device -> when its task went out (monotonic)
        self.last_tasked: dict[str, float] = {}
        self.buffer = Buffer(self.mode)
        # the latest updates taken into buffers (bounded: a long run keeps O(buffer), not every update)
        self.accepted_log: collections.deque[Accepted] = collections.deque(
            maxlen=max(ACCEPTED_LOG, 2 * self.acfg.buffer_size))
        self.seq = 0
        self._finished: dict[str, str] = {}  # device -> its task still out when the run completed
        self._finish_cb: Callable[[m.RoundSummary], None] | None = None
        self._done: list[m.RoundSummary] = []  # versions published, their summaries not handed on yet
        self._scheduling = False  # updates go to the asynchronous intake (not during init / evaluate)
        self._flush_started = time.monotonic()
        self.validating = UpdateIntake(
            self.topics, cast(CoordinatorMode, _Validating(self.mode)), self.counters,
            max_message_bytes=self.intake.max_message_bytes, verifier=self.intake.verifier,
            signatures_required=self.intake.signatures_required)
        self.journal = AsyncJournal(self.store.dir if isinstance(self.store, FileStateStore) else None)
        if self.state.global_model is not None:
            self._restore()

    @property
    def target_rounds(self) -> int:
        return self.cfg.async_versions

    def awaited(self) -> frozenset[str]:
        c = self.open
        if c is not None:
            return frozenset(c.expected)
        return frozenset(self.outstanding)

    # ------------------------------------------------------------------ journal
    def _record(self) -> JournalRecord:
        return JournalRecord(self.state.global_version, self.seq,
                             [TaskRecord.of(c) for _, c in sorted(self.outstanding.items())], list(self.buffer.tasks))

    def _buffered_log(self) -> list[Accepted]:
        n = len(self.buffer)
        return list(itertools.islice(self.accepted_log, len(self.accepted_log) - n, None)) if n else []

    def _save_journal(self, accepted: Collection | None = None, payload: bytes | None = None) -> None:
        """Record the schedule (with ``accepted``'s update, not folded yet, and its payload)."""
        rec = self._record()
        if accepted is not None:
            rec.buffer.append(TaskRecord.of(accepted))
        self.journal.save(rec, accepted.task_id if accepted is not None else None, payload)

    def _restore(self) -> None:
        try:
            found = self.journal.load()
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("asynchronous journal unreadable, starting the schedule afresh: %s", exc)
            found = None
        if found is None:
            return
        rec, payloads = found
        self.seq = rec.seq
        timeout = self.cfg.async_task_timeout_s
        now = time.monotonic()
        for t in rec.tasks:
            self.outstanding[t.device_id] = t.collection(timeout)
            self.sent_at[t.device_id] = now
        kept = 0
        if rec.version == self.state.global_version:
            for t in rec.buffer:
                payload = payloads.get(t.task_id)
                if payload is None:
                    log.warning("buffered update of task %s missing from the journal", t.task_id)
                    continue
                c = t.collection(timeout)
                try:
                    upd = self.validating.receive(self.topics.device_update(t.device_id), payload, time.time(), c)
                except ProtocolError as exc:
                    log.warning("buffered update of task %s no longer valid, dropped: %s", t.task_id, exc)
                    continue
                assert upd is not None
                self._fold(c, upd, c.contributions.pop(t.device_id, None), len(payload), restored=True)
                self.counters.restored += 1
                kept += 1
            log.info("asynchronous schedule restored: %d buffered update(s) refolded on v%d, %d task(s) open",
                     kept, rec.version, len(self.outstanding))
        else:
            log.info("asynchronous journal of v%d is in the saved global v%d already; %d task(s) open",
                     rec.version, self.state.global_version, len(self.outstanding))
        self._save_journal()

    # ------------------------------------------------------------------ tasks
    def _send_task(self, device_id: str) -> None:
        self.seq += 1
        gv, round_no = self.state.global_version, self.state.round_completed + 1
        c = Collection("fit", f"r{round_no}-fit-v{gv}-a{self.seq}", round_no, gv, {device_id}, nonce=new_nonce(),
                       attempt=self.seq, deadline_s=self.cfg.async_task_timeout_s)
        self.outstanding[device_id] = c
        self.sent_at[device_id] = self.last_tasked[device_id] = time.monotonic()
        self._save_journal()  # before it goes out: a restart knows every task a device may answer
        self.publish_task(c, device_id)

    def _dispatch(self) -> None:
        """Keep ``concurrency`` devices training: a task to each idle ready device, least recently asked first."""
        free = self.acfg.concurrency - len(self.outstanding)
        if free <= 0:
            return
        idle = [d.device_id for d in self.registry.ready()
                if d.num_samples > 0 and d.device_id not in self.outstanding and self.mode.accepts(d)]
        idle.sort(key=lambda d: (self.last_tasked.get(d, -1.0), d))
        for device_id in idle[:free]:
            self._send_task(device_id)

    def _expire(self) -> None:
        """Drop tasks unanswered for ``task_timeout_s`` or whose device cannot answer any more."""
        now, wall = time.monotonic(), time.time()
        for device_id, c in sorted(self.outstanding.items()):
            if now - self.sent_at[device_id] > c.deadline_s or not self.registry.may_answer(device_id, c.task_id,
                                                                                                wall):
                log.warning("task %s of %s dropped: unanswered or the device cannot answer", c.task_id, device_id)
                del self.outstanding[device_id]
                self.counters.tasks_expired += 1
                self._save_journal()

    # ------------------------------------------------------------------ events
    def on_presence(self, p: Any) -> None:
        if self.open is not None or not self._scheduling:
            super().on_presence(p)
            return
        c = self.outstanding.get(p.device_id)
        if p.online and p.back and c is not None:
            log.info("device %s is back while its task %s is open; task sent again", p.device_id, c.task_id)
            self.publish_task(c, p.device_id)
            self.counters.tasks_resent += 1

    def on_session_lost(self) -> None:
        super().on_session_lost()
        self.registry.expect_announcements(set(self.outstanding))

    def on_update(self, topic: str, payload: bytes, arrived_at: float) -> None:
        device_id = self.topics.device_id_from(topic)
        if device_id in self._finished and self._finished[device_id] == _task_id_of(payload):
            # trained while the last version was made: expected, not used (and not a refusal)
            del self._finished[device_id]
            self.counters.late += 1
            log.info("update of %s for %s came after the last version; not used", device_id, _task_id_of(payload))
            return
        if self.open is not None or not self._scheduling or self.state.round_completed >= self.target_rounds:
            super().on_update(topic, payload, arrived_at)
            return
        c = self.outstanding.get(device_id)
        upd = self.validating.receive(topic, payload, arrived_at, c)
        if upd is None or c is None:
            return
        del self.outstanding[device_id]
        staleness = self.state.global_version - c.base_version
        if staleness > self.acfg.max_staleness:
            self.counters.stale += 1
            self._save_journal()
            raise ProtocolError(
                f"update for task {c.task_id} trained on global v{c.base_version}, {staleness} versions behind "
                f"v{self.state.global_version} (asynchronous.max_staleness {self.acfg.max_staleness}): "
                "refused as stale")
        self._save_journal(c, payload)  # on disk before it counts: survives a crash
        self._fold(c, upd, c.contributions.pop(device_id, None), len(payload))
        self.traffic.add("up", device_id, len(payload))
        self.counters.updates_accepted += 1
        self.counters.fit_accepted += 1
        if len(self.buffer) >= self.acfg.buffer_size:  # at once: the next update folds on the new version
            self._flushed(self._flush())

    def _flushed(self, summary: m.RoundSummary) -> None:
        """Hand a version's summary on now; the last one waits for its evaluation (in the schedule's loop)."""
        if summary.round >= self.target_rounds:  # the run is complete: what is still out is not used
            self._finished.update({d: c.task_id for d, c in self.outstanding.items()})
            self.outstanding.clear()
        if self.cfg.evaluate and summary.round >= self.target_rounds:
            self._done.append(summary)
        elif self._finish_cb is not None:
            self._finish_cb(summary)

    def _fold(self, c: Collection, upd: m.Update, contribution: Any, payload_bytes: int,
              restored: bool = False) -> None:
        staleness = self.state.global_version - c.base_version
        weight = staleness_weight(staleness, self.acfg.staleness_weighting)
        self.buffer.add(TaskRecord.of(c), upd, contribution, weight, payload_bytes)
        self.accepted_log.append(Accepted(upd.device_id, c.task_id, c.base_version, self.state.global_version,
                                          staleness, weight, restored))

    # ------------------------------------------------------------------ the schedule
    def run_async(self, finish: Callable[[m.RoundSummary], None]) -> None:
        """Publish versions until ``target_rounds`` are done (or stopped), calling ``finish`` with each
        version's summary."""
        if self.state.round_completed < self.target_rounds:  # it starts as a round would
            self.wait_for_devices(self.cfg.min_clients, self.cfg.wait_for_devices_s)
        self._scheduling, self._finish_cb = True, finish
        self._flush_started = time.monotonic()
        try:
            for device_id, c in sorted(self.outstanding.items()):  # tasks open before a restart
                self.publish_task(c, device_id)
                self.counters.tasks_resent += 1
            if len(self.buffer) >= self.acfg.buffer_size and self.state.round_completed < self.target_rounds:
                self._flushed(self._flush())  # a restored buffer that was full already
            self._set_status("training")
            while True:
                while self._done:
                    self._finish(self._done.pop(0), finish)
                if self.state.round_completed >= self.target_rounds or self._stopped():
                    break
                self._expire()
                self._dispatch()
                self._pump(0.2)
        finally:
            self._scheduling, self._finish_cb = False, None
        if self.state.round_completed >= self.target_rounds:
            self.journal.clear()

    def _finish(self, summary: m.RoundSummary, finish: Callable[[m.RoundSummary], None]) -> None:
        if self.cfg.evaluate and summary.round >= self.target_rounds:  # the last version is evaluated
            self._set_status("evaluating")
            t0 = time.monotonic()
            eval_loss, eval_devices, eval_up, eval_down = self.evaluate(summary.round)
            eval_s = time.monotonic() - t0
            summary = summary.model_copy(update={
                "eval_loss": eval_loss, "eval_devices": eval_devices, "uplink_bytes": summary.uplink_bytes + eval_up,
                "downlink_bytes": summary.downlink_bytes + eval_down, "eval_s": eval_s,
                "duration_s": summary.duration_s + eval_s})
        finish(summary)

    def _flush(self) -> m.RoundSummary:
        t_start = self._flush_started
        buf, entries = self.buffer, self._buffered_log()
        self.buffer = Buffer(self.mode)
        round_no, version = self.state.round_completed + 1, self.state.global_version + 1
        t0 = time.perf_counter()
        outcome = self.mode.aggregate_folded(round_no, version, buf.updates, buf.contributions, buf.running)
        aggregate_s = time.perf_counter() - t0
        self.state.global_model = outcome.snapshot
        self.state.mode_state = self.mode.state_blob()
        self.state.round_completed = round_no
        devices = sorted({e.device_id for e in entries})
        self.registry.record_participation(devices, set(devices))
        self.store.save(self.state)
        self._save_journal()  # after the save: the journal's buffer is in the saved global now
        global_bytes, publish_s = self.publisher.publish(outcome.message)
        for d in self.registry.online():
            self.traffic.add("down", d.device_id, global_bytes)
        s = [e.staleness for e in entries]
        log.info("version %d from %d buffered update(s) of %s, staleness mean %.2f max %d", version, len(entries),
                 ", ".join(devices), sum(s) / max(1, len(s)), max(s, default=0))
        self._flush_started = time.monotonic()
        duration_s = self._flush_started - t_start
        return m.RoundSummary(
            round=round_no, global_version=version, participants=tuple(devices), selected=tuple(devices),
            num_samples=sum(u.num_samples for u in buf.updates), train_loss=_train_loss(buf.updates),
            uplink_bytes=buf.payload_bytes, downlink_bytes=global_bytes * max(1, len(self.registry.online())),
            duration_s=duration_s, fit_s=duration_s, eval_s=0.0, aggregate_s=aggregate_s,
            timings={"aggregate_s": aggregate_s, "global_publish_s": publish_s},
        )


def _task_id_of(payload: bytes) -> str | None:
    try:
        return m.Update.from_msgpack(payload).task_id
    except ProtocolError:
        return None


def _train_loss(updates: Sequence[m.Update]) -> float | None:
    tl = [(u.metrics["train_loss"], u.num_samples) for u in updates if u.metrics.get("train_loss") is not None]
    total = sum(n for _, n in tl)
    return sum(loss * n for loss, n in tl) / total if total else None
