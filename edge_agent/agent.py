"""The edge agent runtime: announce, wait for tasks, train locally, publish updates, apply globals.

The runtime knows no federation mode: what a task's payload means, which trainer to build, how a
global is applied and what an update carries are the configured mode's (``edge_agent.modes``).
The runtime does the rest for every mode: the connection, presence and telemetry, the task loop
(duplicates, a result sent again for a task that comes again, deadlines), liveness for a
supervisor, memory budgets, and building, signing and publishing updates.

Threading: paho's network thread only enqueues payloads; decoding, training and publishing run on
the agent's main thread. A small telemetry thread reads progress fields (plain attribute reads).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import resources
from edge_agent.config import AgentConfig
from edge_agent.logs import quiet_libraries
from edge_agent.memory import MemoryManager, OverBudget, PlanRefused, configure_allocator
from edge_agent.methods.base import FitMemory, FitResult, TrainingMethod, release_memory
from edge_agent.modes import AgentContext, AgentMode, GlobalRejected, create_mode
from edge_agent.updates import ResultCache, UpdateBuilder
from edge_agent.uplink import UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.modes import ModePayload
from fedmq_protocol.rejections import RejectionLog
from fedmq_protocol.seal import SealOpener
from fedmq_protocol.storage import atomic_write
from fedmq_protocol.topics import QOS_GLOBAL, QOS_STATUS, QOS_TASK, QOS_TELEMETRY, QOS_UPDATE, Topics
from fedmq_protocol.transport import MqttTransport, WillMessage
from fedmq_protocol.transport.errors import SubscriptionRefused

log = logging.getLogger("fedmq.agent")

AGENT_VERSION = "0.1.0"
_RUNTIME_KINDS = ("task", "global", "own_status")  # event kinds of the runtime's own subscriptions
# bounded event queues, by kind: a flood of one kind cannot grow memory or starve the others
EVENT_QUEUE_LIMITS = {"own_status": 64}  # events held per kind (default below)
EVENT_QUEUE_DEFAULT = 4096
EVENT_QUEUE_BYTES = 64 << 20  # payload bytes held per kind (one event is always taken)
REJECTION_LOG_EVERY_S = 10.0  # refused payloads: one log line per topic at most this often


class AgentError(RuntimeError):
    pass


class AgentStateFile:
    """Small persisted facts of a device (birth sequence, memory-plan history)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "agent.json"
        self.data: dict[str, Any] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                log.warning("%s is unreadable; starting with fresh agent state", self.path)

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.data).encode())

    def next_birth_seq(self) -> int:
        seq = int(self.data.get("birth_seq", 0)) + 1
        self.data["birth_seq"] = seq
        self.save()
        return seq

    def raise_birth_seq(self, seq: int) -> None:
        if seq > int(self.data.get("birth_seq", 0)):
            self.data["birth_seq"] = seq
            self.save()


class EventQueues:
    """The agent's inbox: one bounded queue per event kind, taken in arrival order.

    The network thread puts, the agent's thread gets. A kind whose queue is full (events or
    bytes) drops the new event (counted in ``dropped``): junk on one topic cannot take another
    kind's room, nor grow memory without bound."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: dict[str, collections.deque[tuple[int, tuple[str, str, bytes, float]]]] = {}
        self._n = 0
        self._bytes: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def put(self, event: tuple[str, str, bytes, float]) -> None:
        kind = event[0]
        limit = EVENT_QUEUE_LIMITS.get(kind, EVENT_QUEUE_DEFAULT)
        with self._cv:
            q = self._items.setdefault(kind, collections.deque())
            held = self._bytes.get(kind, 0)
            if q and (len(q) >= limit or held + len(event[2]) > EVENT_QUEUE_BYTES):
                self.dropped[kind] = self.dropped.get(kind, 0) + 1
                return
            self._n += 1
            self._bytes[kind] = held + len(event[2])
            q.append((self._n, event))
            self._cv.notify()

    def get(self, timeout: float | None = None) -> tuple[str, str, bytes, float]:
        with self._cv:
            if not any(self._items.values()) and not self._cv.wait_for(
                    lambda: any(self._items.values()), timeout=timeout):
                raise queue.Empty
            q = min((q for q in self._items.values() if q), key=lambda q: q[0][0])
            event = q.popleft()[1]
            self._bytes[event[0]] -= len(event[2])
            return event

    def get_nowait(self) -> tuple[str, str, bytes, float]:
        return self.get(timeout=0)

    def qsize(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._items.values())

    def empty(self) -> bool:
        return self.qsize() == 0


class EdgeAgent:
    def __init__(self, config: AgentConfig, *, transport: MqttTransport | None = None) -> None:
        from edge_agent.data import load_jsonl

        quiet_libraries()  # before the ML stack is imported
        self.cfg = config
        self.topics = Topics(config.topic_root, config.federation)
        self.device_id = config.device_id
        self.train_examples = load_jsonl(config.data.train)
        self.eval_examples = load_jsonl(config.data.eval) if config.data.eval else []
        self.state_file = AgentStateFile(config.state_dir)
        self.seq = self.state_file.next_birth_seq()
        # presence order (messages.DeviceStatus.order): a connection mark and a per-message counter
        self._presence_lock = threading.RLock()
        self._counter = 0
        self.conn = self._next_counter()
        self._announced_at = 0.0
        self._last_status: bytes | None = None  # the last status this agent published (its own copy)
        self._status_restored_at = 0.0
        self.status_forged = 0  # someone else's status on this device's topic, replaced by ours
        self.stop_event = threading.Event()
        # Liveness for a supervisor (systemd watchdog): refreshed by the work loop and, through the
        # progress callback every fit gets from _fit, by every training step (_heartbeat)
        self.alive_at = time.monotonic()
        self.on_ready: list[Callable[[], Any]] = []  # called once connected, announced and the model resolved
        # (kind, topic, payload, arrival wall time): arrival is stamped on the network thread
        self._events = EventQueues()
        self._seen_tasks: list[str] = []
        self._results = ResultCache(config.state_dir)
        self.results_resent = 0
        self.method: TrainingMethod | None = None  # the trainer, built on first use (_ensure_method)
        self._method_key: Any = None  # TrainerChoice.key of the trainer loaded
        self.model_path: str | None = None
        self.tokenizer_fp: str | None = None  # announced (AgentMode.announces_tokenizer): a mismatch is never tasked
        self._model_names: dict[str, bool] = {}  # model name a task asked for -> this device holds it
        # newest global reachable from the snapshots and differences received (applied when idle)
        self.sync = GlobalSync(max_elements=config.broker.max_message_bytes)
        self.uplink = UplinkEncoder(config.uplink, config.uplink_budget_bytes, config.state_dir)
        signer = None  # Ed25519 key signing every update (signing_key), fedmq_protocol.signing
        if config.signing_key is not None:
            from fedmq_protocol.signing import Signer

            signer = Signer.from_file(config.signing_key)
        self.signer = signer
        self._updates = UpdateBuilder(self.device_id, config.federation, self.uplink, signer)
        self.rejected: dict[str, int] = {}  # payloads refused, by kind (published in telemetry)
        self.rejections = RejectionLog(log, REJECTION_LOG_EVERY_S)  # by topic and reason, log rate-limited
        self.seals = _seal_opener(config)  # tasks, globals, mode messages: the coordinator's seal
        last_task = self.state_file.data.get("task_counter")
        if isinstance(last_task, int):  # an old task replayed after a restart is still old
            self.seals.last_counter[self.topics.device_task(self.device_id)] = last_task
        self.global_version: int | None = None  # version whose weights the trainer holds
        self._dirty = False  # the trainer holds local (trained) weights, not the global
        self._global_timing: dict[str, float] = {}
        self._global_topic: str | None = None
        self._next_diff_topic: str | None = None  # exact subscription to the next difference
        self.mode: AgentMode = create_mode(AgentContext(config, self.topics, Path(config.state_dir), self._memory_plan))
        # memory budget: the plan training runs with, the per-step guard (edge_agent.memory)
        self.memory = MemoryManager(config, self.state_file, method=self.mode.planned_as(config.method))
        # the plan's micro-batch and guard (MemoryManager.install sets them), given to every fit
        self._fit_memory = FitMemory()
        self._plan_fit: m.FitConfig | None = None  # fit settings of the task being planned for
        if config.memory_budget is not None:
            configure_allocator()  # resident memory tracks what is in use (see edge_agent.memory.guard)
        self.state = "loading"
        self.progress: dict[str, Any] = {}
        self.transport = transport or MqttTransport(config.broker, f"fedmq-agent-{self.device_id}",
                                                    will=self._will())

    def _next_counter(self) -> int:
        with self._presence_lock:
            self._counter += 1
            return self._counter

    def _will(self) -> WillMessage:
        """The Last Will of connection ``self.conn``: says it is a Will and claims nothing current."""
        st = m.DeviceStatus(device_id=self.device_id, online=False, seq=self.seq, conn=self.conn, will=True,
                            state="offline", agent_version=AGENT_VERSION)
        return WillMessage(self.topics.device_status(self.device_id), self._signed(st).to_json(), QOS_STATUS, True)

    def _signed(self, st: m.DeviceStatus) -> m.DeviceStatus:
        if self.signer is None:
            return st
        obj = st.model_dump(by_alias=True, mode="json", exclude_none=True)
        return st.model_copy(update={"signature": self.signer.sign_status(self.cfg.federation, obj)})

    def _on_disconnected(self, reason: str) -> None:
        """The next connection gets a new mark, and a Will with it (set before paho reconnects)."""
        self.conn = self._next_counter()
        with contextlib.suppress(Exception):
            self.transport.set_will(self._will())

    # ------------------------------------------------------------------ presence & telemetry
    def _status(self, online: bool) -> m.DeviceStatus:
        return self._signed(m.DeviceStatus(
            device_id=self.device_id,
            online=online,
            seq=self.seq,
            conn=self.conn,
            counter=self._next_counter(),
            method=self.cfg.method,
            model=self.cfg.model,
            num_samples=len(self.train_examples) if online else None,
            eval_samples=len(self.eval_examples) if online else None,
            resources=resources.snapshot() if online else None,
            state=self.state if online else "offline",
            applied_version=self.global_version,
            agent_version=AGENT_VERSION,
            memory=self.memory.status() if online else None,
            template=self._template(),
            tokenizer=self.tokenizer_fp if online else None,
        ))

    def _template(self) -> str:
        """The prompt template in use: the loaded trainer's (chat, plain, custom), else the config's."""
        from edge_agent.data import template_kind

        loaded = getattr(self.method, "template", None)
        return loaded if isinstance(loaded, str) else template_kind(self.cfg.data.template)

    def announce(self) -> None:
        """Publish the retained status (also every ``status_interval_s``, from the telemetry thread)."""
        try:
            with self._presence_lock:  # counters in the order the broker gets them
                payload = self._status(True).to_json()
                self._last_status, self._announced_at = payload, time.monotonic()
            self.transport.publish(self.topics.device_status(self.device_id), payload, qos=QOS_STATUS, retain=True)
        except Exception as exc:  # noqa: BLE001 - presence is best effort; the next announce retries
            log.warning("could not publish status: %s", exc)

    def _on_own_status(self, payload: bytes) -> None:
        """A status on this device's own topic that it did not publish (a forgery or replay, which
        the broker now retains): ours is published again, above it in the order."""
        if not payload or payload == self._last_status or self._last_status is None:
            return
        try:
            st = m.DeviceStatus.from_json(payload)
        except ProtocolError:
            st = None
        if st is not None and self._last_status is not None:
            mine = m.DeviceStatus.from_json(self._last_status)
            if st.order < mine.order:
                return  # an earlier status of ours (a replay): the coordinator ignores it
            if self.signer is None and st.device_id == self.device_id:
                # unsigned, the coordinator cannot tell it from ours: step above it in the order
                # (a new connection mark above the forgery's; the Will of the next connection too)
                with self._presence_lock:
                    self.seq = max(self.seq, st.seq)
                    self._counter = max(self._counter, st.conn, st.counter)
                    self.conn = self._next_counter()
                self.state_file.raise_birth_seq(self.seq)
                with contextlib.suppress(Exception):
                    self.transport.set_will(self._will())
        self.status_forged += 1
        if time.monotonic() - self._status_restored_at >= 1.0:  # not faster than once a second
            self._status_restored_at = time.monotonic()
            self.announce()
        raise ProtocolError("a status this device did not publish was on its status topic; ours republished")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            # a change of state is progress: stamped first, so a watchdog that reads the new state
            # (and with it the allowance of a load that has just ended) also reads a fresh stamp
            self._heartbeat()
            self.state = state
            self.announce()

    def telemetry(self) -> m.Telemetry:
        p = self.progress
        return m.Telemetry(
            device_id=self.device_id,
            state=self.state,
            round=p.get("round"),
            step=p.get("step"),
            steps_total=p.get("steps_total"),
            loss=p.get("loss"),
            tokens_per_s=p.get("tokens_per_s"),
            bytes_sent=self.transport.bytes_sent,
            bytes_received=self.transport.bytes_received,
            applied_version=self.global_version,
            method=self.cfg.method,
            resources=resources.snapshot(),
            uplink=self.uplink.last,
            memory=self.memory.status(),
            rejected={**self.rejected, **{f"dropped_{k}": n for k, n in self._events.dropped.items()}},
        )

    def _telemetry_loop(self) -> None:
        """Telemetry every ``telemetry_interval_s``; the retained status every ``status_interval_s``
        (so a wrong state the broker retains, or a coordinator that missed one, is corrected)."""
        next_telemetry = time.monotonic() + self.cfg.telemetry_interval_s
        while not self.stop_event.wait(min(1.0, self.cfg.telemetry_interval_s, self.cfg.status_interval_s)):
            now = time.monotonic()
            if now - self._announced_at >= self.cfg.status_interval_s and self.transport.connected:
                self.announce()
            if now < next_telemetry:
                continue
            next_telemetry = now + self.cfg.telemetry_interval_s
            try:
                self.transport.publish(
                    self.topics.device_telemetry(self.device_id), self.telemetry().to_json(), qos=QOS_TELEMETRY
                )
            except Exception as exc:  # noqa: BLE001 - telemetry is best effort (QoS 0)
                log.debug("telemetry not sent: %s", exc)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from edge_agent.models import resolve_device, resolve_model

        def handler(kind: str) -> Callable[[str, bytes], None]:
            return lambda topic, payload: self._events.put((kind, topic, payload, time.time()))

        for sub in self.mode.subscriptions():
            if sub.kind in _RUNTIME_KINDS:
                raise AgentError(f"mode {self.mode.name}: event kind {sub.kind!r} is the runtime's")
            self.transport.subscribe(sub.topic, handler(sub.kind), qos=sub.qos, framed=sub.framed)
        self.transport.subscribe(self.topics.device_task(self.device_id), handler("task"), qos=QOS_TASK, framed=True)
        self.transport.subscribe(self.topics.global_model, handler("global"), qos=QOS_GLOBAL, framed=True)
        self.transport.subscribe(self.topics.all_global_diffs, handler("global"), qos=QOS_GLOBAL, framed=True)
        try:
            self.transport.subscribe(self.topics.device_status(self.device_id), handler("own_status"), qos=QOS_STATUS)
        except SubscriptionRefused as exc:  # an ACL without read on it: forged statuses go unnoticed here
            log.warning("cannot watch this device's own status topic: %s", exc)
        self.transport.on_connect.append(lambda session_present: self.announce())
        self.transport.on_disconnect.append(self._on_disconnected)
        self.transport.connect(self.cfg.broker.connect_timeout_s)
        self.announce()
        self.model_path = resolve_model(self.cfg.model, cache_dir=self.cfg.model_cache)
        if self.mode.announces_tokenizer:  # models that must share a tokenizer: say which
            from transformers import AutoTokenizer

            from edge_agent.models import tokenizer_fingerprint

            self.tokenizer_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(self.model_path))
        self.memory.prepare(self.model_path, resolve_device(self.cfg.device))
        threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True).start()
        self._set_state("refused" if self.memory.refused else "idle")
        for hook in self.on_ready:
            hook()

    def run(self) -> None:
        """Serve tasks until ``stop_event`` is set."""
        self.start()
        try:
            while not self.stop_event.is_set():
                self._pump(0.5)
                if self.state == "idle" and self._global_pending():
                    # refused: announced as such; tasks are declined until the config changes
                    with contextlib.suppress(PlanRefused):
                        self._apply_pending_global()
        finally:
            self.close()

    def close(self) -> None:
        self.stop_event.set()
        self.state = "offline"
        try:
            if self.transport.connected:
                self.transport.publish(
                    self.topics.device_status(self.device_id), self._status(False).to_json(), qos=QOS_STATUS,
                    retain=True, timeout=5,
                )
        except Exception as exc:  # noqa: BLE001 - the Will says the same if this does not get out
            log.warning("could not publish offline status: %s", exc)
        self.transport.close()

    def _heartbeat(self) -> None:
        """The process is making progress (the systemd watchdog reads ``alive_at``)."""
        self.alive_at = time.monotonic()

    # ------------------------------------------------------------------ events
    def _pump(self, timeout: float) -> None:
        self._heartbeat()
        try:
            kind, topic, payload, arrived_at = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            if kind == "own_status":
                self._on_own_status(payload)
                return
            if payload:  # (an empty payload clears a retained topic)
                opened = self.seals.open(topic, payload, kind=kind)
                if opened is None:
                    self.rejected["replayed"] = self.rejected.get("replayed", 0) + 1
                    return  # a copy of a message already taken (or an older one): not acted on
                payload = opened.body
                if kind == "task" and opened.counter is not None:
                    self.state_file.data["task_counter"] = opened.counter
                    self.state_file.save()
            if kind == "global":
                self._global_topic = topic  # checked against the message (_check_global_topic)
                self._on_global(payload, arrived_at)
            elif kind == "task":
                self._on_task(payload)
            else:
                self.mode.on_message(kind, topic, payload)
        except ProtocolError as exc:
            self._count_rejection(kind, topic, str(exc))

    def _count_rejection(self, kind: str, topic: str, reason: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        self.rejections.add(topic, reason, what=f"rejected {kind}")

    def _on_global(self, payload: bytes, received_at: float) -> None:
        t0 = time.perf_counter()
        if not payload:
            return  # a cleared retained difference
        gm = m.GlobalModel.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        self._check_global_topic(gm)
        # a difference is applied only on top of the exact version it names (GlobalSync checks)
        if self.sync.offer(gm):
            self._global_timing = {"global_receive_s": max(0.0, received_at - gm.created_at),
                                   "global_decode_s": time.perf_counter() - t0}
            self._follow_next_diff()

    def _follow_next_diff(self) -> None:
        """Subscribe to the exact topic of the next difference: a broker that delivers retained
        messages to exact-topic subscriptions only (RabbitMQ) still hands a late device the
        differences retained after its snapshot (the wildcard subscription takes live ones)."""
        if self.sync.version is None:
            return
        topic = self.topics.global_diff(self.sync.version + 1)
        if topic == self._next_diff_topic:
            return
        old, self._next_diff_topic = self._next_diff_topic, topic
        try:
            if old is not None:
                self.transport.unsubscribe(old)
            self.transport.subscribe(topic, lambda t, p: self._events.put(("global", t, p, time.time())),
                                     qos=QOS_GLOBAL, framed=True)
        except Exception as exc:  # noqa: BLE001 - the wildcard subscription still takes live differences
            log.debug("no exact subscription to %s: %s", topic, exc)

    def _check_global_topic(self, gm: m.GlobalModel) -> None:
        """A snapshot comes on ``global``, difference v on ``global/diff/{v}``: nothing else."""
        topic = self._global_topic
        if topic is None:
            return
        if topic == self.topics.global_model:
            if not gm.is_snapshot:
                raise ProtocolError(f"difference v{gm.version} published on the snapshot topic {topic!r}")
        elif gm.is_snapshot or topic != self.topics.global_diff(gm.version):
            raise ProtocolError(f"global v{gm.version} ({'snapshot' if gm.is_snapshot else 'difference'}) "
                                f"arrived on {topic!r}")

    def _global_pending(self) -> bool:
        return self.sync.version is not None and self.sync.version != self.global_version

    # ------------------------------------------------------------------ the trainer
    def _memory_plan(self, adapter: m.AdapterSpec, **inputs: Any) -> Any:
        """The memory plan for ``adapter``, the fit settings of the current (or last) task and a
        mode's further planner inputs; PlanRefused (state ``refused``, announced) when none fits
        the budget."""
        fit = self._plan_fit or self.memory.last_fit()
        try:
            return self.memory.plan_for(adapter, fit, **inputs)
        except PlanRefused:
            self._set_state("refused")
            self.announce()
            raise

    def _ensure_method(self, adapter: m.AdapterSpec) -> TrainingMethod:
        """The trainer the mode chooses for ``adapter``, loaded unless the one in memory is it."""
        choice = self.mode.choose_trainer(adapter)  # PlanRefused when the budget holds no plan
        if self.method is not None and self._method_key == choice.key:
            self.memory.install(self._fit_memory)  # a new micro-batch needs no reload
            return self.method
        from edge_agent.memory import meter
        from edge_agent.methods import get_method

        if self.cfg.training.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.training.torch_threads)
        self._set_state("loading")
        cls = get_method(choice.method)
        kwargs: dict[str, Any] = {"device": self.cfg.device, "dtype": self.cfg.dtype, "seed": 0,
                                  **choice.kwargs, **cls.options_for(self.cfg)}
        log.info("loading %s for %s", self.model_path, choice.what)
        if self.method is not None:  # the previous model (another plan) goes before the next loads
            self.method = None
            release_memory()
        meter().reset()
        assert self.model_path is not None, "start() resolves the model"
        self.method = method = cls(self.model_path, adapter, **kwargs)
        self.memory.load_measured(meter().host_peak_mb())
        self.memory.install(self._fit_memory)
        self._method_key = choice.key
        self.mode.trainer_loaded(method)
        # a fresh model holds no global: the newest one seen (self.sync) is pending again
        self.global_version, self._dirty = None, False
        self._set_state("idle")
        return method

    # ------------------------------------------------------------------ the global
    def _apply_pending_global(self) -> None:
        """Bring the trainer to the newest global reachable (applied when idle, or for a task)."""
        if not self._global_pending():
            return
        version, adapter = self.sync.version, self.sync.adapter
        assert version is not None and adapter is not None
        method = self._ensure_method(adapter)
        if self.mode.needs_reload(version):
            self._method_key = None
            method = self._ensure_method(adapter)
        if not self.mode.can_reach(version):
            return
        t0 = time.perf_counter()
        self._return_to_global(method)
        try:
            self.mode.apply_global(method, version, self.sync)
        except GlobalRejected as exc:
            # a global this model cannot take: forget it, wait for the next one (no retry loop)
            self.sync = GlobalSync(max_elements=self.cfg.broker.max_message_bytes)
            self._count_rejection(exc.kind, f"global v{version}", exc.reason)
            return
        self._global_timing["global_apply_s"] = time.perf_counter() - t0
        record = self.mode.state_record(version, method)
        if record is not None:
            atomic_write(Path(self.cfg.state_dir) / f"{self.mode.name}-state.json", json.dumps(record).encode())
        self.global_version = version
        log.info("applied global version %d", version)
        self.announce()

    def _return_to_global(self, method: TrainingMethod) -> None:
        """Undo local training, exactly (the mode knows how), before the weights are used again."""
        if self._dirty:
            self.mode.return_to_global(method)
            self._dirty = False

    def _wait_for_global(self, version: int, deadline: float) -> bool:
        while not self.stop_event.is_set():
            if self._global_pending() and self.sync.version is not None and self.sync.version <= version:
                self._apply_pending_global()
            if self.global_version == version:
                assert self.method is not None
                self._return_to_global(self.method)
                return True
            if self.global_version is not None and self.global_version > version:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, 0.2))
        return False

    # ------------------------------------------------------------------ tasks
    def _holds_model(self, name: str) -> bool:
        """Whether the model a task names is this device's: the configured name, or a name that
        resolves to the same checkpoint (``smollm2-135m`` is a directory of the model cache)."""
        if name not in self._model_names:
            from edge_agent.models import same_model

            self._model_names[name] = same_model(name, self.cfg.model, cache_dir=self.cfg.model_cache)
        return self._model_names[name]

    def _on_task(self, payload: bytes) -> None:
        task = m.Task.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        if task.device_id != self.device_id:
            raise ProtocolError(f"task for device {task.device_id!r} arrived on {self.device_id}'s topic")
        self.mode.accept_task(task)
        cached = self._results.get(task.task_id)
        if cached is None and task.task_id in self._seen_tasks:
            log.info("duplicate task %s ignored", task.task_id)
            return
        self._seen_tasks = ([*self._seen_tasks, task.task_id])[-64:]
        deadline = time.monotonic() + task.deadline_s
        if task.model and not self._holds_model(task.model):
            log.warning("task asks for model %s; this device holds %s", task.model, self.cfg.model)
        self._plan_fit = self._local_fit_config(task.fit)
        try:
            method = self._ensure_method(task.adapter)
        except PlanRefused as exc:
            log.error("task %s declined: %s", task.task_id, exc)
            return
        if task.kind == "init":
            init = self.mode.init_content(method)
            self._send(task, -1, 0, dict(init.metrics), init.arrays, init.payload)
            return
        # a fit keeps half its deadline for training
        wait_until = deadline - task.deadline_s * 0.5 if task.kind == "fit" else deadline
        if not self._wait_for_global(task.global_version, wait_until):
            log.warning("task %s needs global v%d, have v%s; skipped",
                        task.task_id, task.global_version, self.global_version)
            return
        if cached is not None and task.kind == "fit" and cached[0] == self.mode.global_digest():
            # idempotent by task id: this task was answered from this very global; maybe the
            # answer was lost, so send the same bytes again (a same-named task of another
            # federation run, on other weights, is trained anew)
            n = self.transport.publish(self.topics.device_update(self.device_id), cached[1], qos=QOS_UPDATE,
                                       framed=True).bytes
            self.results_resent += 1
            log.info("task %s came again: its result sent again (%d bytes)", task.task_id, n)
            return
        if task.kind == "evaluate":
            self._evaluate(task, method)
        elif task.kind == "fit":
            self._fit(task)

    def _local_fit_config(self, fit: m.FitConfig) -> m.FitConfig:
        o = self.cfg.training
        upd: dict[str, Any] = {}
        if o.max_batch_size and fit.batch_size > o.max_batch_size:
            upd["batch_size"] = o.max_batch_size
        if o.max_seq_len and fit.max_seq_len > o.max_seq_len:
            upd["max_seq_len"] = o.max_seq_len
        return fit.model_copy(update=upd) if upd else fit

    def _evaluate(self, task: m.Task, method: TrainingMethod) -> None:
        self._set_state("evaluating")
        try:
            loss, n = method.evaluate(self.eval_examples, self._local_fit_config(task.fit), memory=self._fit_memory)
        finally:
            self._set_state("idle")
        self._send(task, task.global_version, n, {"eval_loss": float(loss)}, None)

    def _fit(self, task: m.Task) -> None:
        method = self.method
        assert method is not None, "a fit task runs on the trainer _on_task ensured"
        try:
            self.mode.check_fit(task, method)
        except ValueError as exc:
            log.error("task %s refused: %s", task.task_id, exc)
            return
        cfg = self._local_fit_config(task.fit)
        self._set_state("training")
        self.progress = {"round": task.round, "step": 0, "steps_total": cfg.local_steps}
        started = time.perf_counter()

        slowdown = self.cfg.training.slowdown
        last_step = [started]

        def progress(step: int, loss: float) -> None:
            self._heartbeat()  # every step of every mode's fit: a long fit is not a hung process
            if slowdown > 1.0:  # a slower device: this step takes `slowdown` times as long
                self.stop_event.wait((slowdown - 1.0) * (time.perf_counter() - last_step[0]))
                last_step[0] = time.perf_counter()
            self.progress.update(step=step, loss=float(loss), elapsed_s=time.perf_counter() - started)

        result: FitResult | None = None
        prepared: dict[str, float] = {}
        try:
            prepared = self.mode.prepare_fit(task, method)
            self._dirty = True
            self.memory.fit_started()
            result = method.fit(self.train_examples, cfg, memory=self._fit_memory, progress=progress,
                                should_stop=self.stop_event.is_set, **self.mode.fit_options(task))
            self.memory.fit_finished()
        except OverBudget as exc:
            # stopped cleanly before the budget was crossed (or right after a step that crossed
            # it): no update is sent; the status reports the figures and the next plan is lower
            self.memory.on_over_budget(exc, task)
        finally:
            self._set_state("refused" if self.memory.refused else "idle")
        if result is None:
            self.announce()
            return
        if self.stop_event.is_set():
            log.info("stopping: the update of %s is abandoned", task.task_id)
            return
        self.progress["tokens_per_s"] = result.tokens / result.seconds if result.seconds > 0 else None
        content = self.mode.update_content(task, method, result)
        metrics = {
            "train_loss": float(result.train_loss),
            "steps": float(result.steps),
            "train_s": float(result.seconds),
            **prepared,
            **content.metrics,
            **self._global_timing,
        }
        self._send(task, task.global_version, result.num_samples, metrics, content.arrays, content.payload)

    # ------------------------------------------------------------------ updates
    def _send(self, task: m.Task, base_version: int, num_samples: int, metrics: Mapping[str, float],
              arrays: Mapping[str, np.ndarray] | None, payload: ModePayload | None = None) -> None:
        data = self._updates.build(task, base_version, num_samples, metrics, arrays, payload)
        if task.kind == "fit":  # before publishing: after a crash these bytes are sent again
            self._results.remember(task.task_id, self.mode.global_digest(), data)
        n = self.transport.publish(self.topics.device_update(self.device_id), data, qos=QOS_UPDATE, framed=True).bytes
        log.info("sent %s result for %s (%d bytes)", task.kind, task.task_id, n)


def _seal_opener(config: AgentConfig) -> SealOpener:
    key = None
    if config.coordinator_public_key is not None:
        from fedmq_protocol.signing import load_public_key

        key = load_public_key(config.coordinator_public_key)
    return SealOpener(config.federation, key, require_signatures=config.coordinator_signatures_required,
                      max_bytes=config.broker.max_message_bytes)


def create_agent(config: AgentConfig, **kwargs: Any) -> EdgeAgent:
    """The agent for ``config`` (its federation mode: ``config.mode``)."""
    return EdgeAgent(config, **kwargs)


__all__ = ["AGENT_VERSION", "AgentError", "AgentStateFile", "EdgeAgent", "create_agent"]
