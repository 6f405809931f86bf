"""The edge agent: announce, wait for tasks, train locally, publish updates, apply globals.

Threading: paho's network thread only enqueues payloads; decoding, training and publishing run on
the agent's main thread. A small telemetry thread reads progress fields (plain attribute reads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from edge_agent import resources
from edge_agent.config import AgentConfig
from edge_agent.memory import MemoryManager, OverBudget, PlanRefused, configure_allocator
from edge_agent.uplink import METRIC_KEYS as UPLINK_KEYS, UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.codec import encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.topics import QOS_GLOBAL, QOS_STATUS, QOS_TASK, QOS_TELEMETRY, QOS_UPDATE, Topics
from fedmq_protocol.transport import MqttTransport, WillMessage

log = logging.getLogger("fedmq.agent")

AGENT_VERSION = "0.1.0"


class AgentError(RuntimeError):
    pass


class AgentStateFile:
    """Small persisted facts of a device (birth sequence, last applied version)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "agent.json"
        self.data: dict[str, Any] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                log.warning("%s is unreadable; starting with fresh agent state", self.path)

    def save(self) -> None:
        from fedmq_protocol.storage import atomic_write

        atomic_write(self.path, json.dumps(self.data).encode())

    def next_birth_seq(self) -> int:
        seq = int(self.data.get("birth_seq", 0)) + 1
        self.data["birth_seq"] = seq
        self.save()
        return seq


class EdgeAgent:
    def __init__(self, config: AgentConfig, *, transport: MqttTransport | None = None) -> None:
        from edge_agent.data import load_jsonl

        self.cfg = config
        self.topics = Topics(config.topic_root, config.federation)
        self.device_id = config.device_id
        self.train_examples = load_jsonl(config.data.train)
        self.eval_examples = load_jsonl(config.data.eval) if config.data.eval else []
        self.state_file = AgentStateFile(config.state_dir)
        self.seq = self.state_file.next_birth_seq()
        self.stop_event = threading.Event()
        # Liveness for a supervisor (systemd watchdog): refreshed by the work loop and every step.
        self.alive_at = time.monotonic()
        self.on_ready: list[Any] = []  # called once connected, announced and the model resolved
        # (kind, topic, payload, arrival wall time): arrival is stamped on the network thread
        self._events: queue.Queue[tuple[str, str, bytes, float]] = queue.Queue()
        self._seen_tasks: list[str] = []
        # the last fit result sent (task id, digest of the global it was trained from, payload; also
        # on disk): a task that comes again (the coordinator or the broker restarted, or this agent
        # did) gets the same bytes again, not a new update
        self._last_result: tuple[str, str, bytes] | None = self._load_last_result()
        self.results_resent = 0
        self.method: Any = None  # edge_agent.methods TrainingMethod, built on first use
        self._method_adapter: m.AdapterSpec | None = None
        self.model_path: str | None = None
        # newest global reachable from the snapshots and differences received (applied when idle)
        self.sync = GlobalSync(max_elements=config.broker.max_message_bytes)
        self.uplink = UplinkEncoder(config.uplink, config.uplink_budget_bytes, config.state_dir)
        self.signer = None  # Ed25519 key signing every update (signing_key), fedmq_protocol.signing
        if config.signing_key is not None:
            from fedmq_protocol.signing import Signer

            self.signer = Signer.from_file(config.signing_key)
        self.rejected: dict[str, int] = {}  # payloads refused, by kind (published in telemetry)
        self.global_version: int | None = None  # version whose weights the adapter holds
        self.global_arrays: dict[str, np.ndarray] | None = None
        self._dirty = False  # adapter holds local (trained) weights, not the global
        self._global_timing: dict[str, float] = {}
        # memory budget: the plan training runs with, the per-step guard (edge_agent.memory)
        self.memory = MemoryManager(config, self.state_file)
        self._plan_fit: m.FitConfig | None = None  # fit settings of the task being planned for
        self._method_key: tuple | None = None
        if config.memory_budget is not None:
            configure_allocator()  # resident memory tracks what is in use (see edge_agent.memory.guard)
        self.state = "loading"
        self.progress: dict[str, Any] = {}
        will = WillMessage(self.topics.device_status(self.device_id), self._status(False).to_json(), QOS_STATUS, True)
        self.transport = transport or MqttTransport(config.broker, f"fedmq-agent-{self.device_id}", will=will)

    # ------------------------------------------------------------------ presence & telemetry
    def _status(self, online: bool) -> m.DeviceStatus:
        return m.DeviceStatus(
            device_id=self.device_id,
            online=online,
            seq=self.seq,
            method=self.cfg.method,
            model=self.cfg.model,
            num_samples=len(self.train_examples) if online else None,
            eval_samples=len(self.eval_examples) if online else None,
            resources=resources.snapshot() if online else None,
            state=self.state if online else "offline",
            applied_version=self.global_version,
            agent_version=AGENT_VERSION,
            memory=self.memory.status() if online else None,
        )

    def announce(self) -> None:
        try:
            self.transport.publish(
                self.topics.device_status(self.device_id), self._status(True).to_json(), qos=QOS_STATUS, retain=True
            )
        except Exception as exc:
            log.warning("could not publish status: %s", exc)

    def _set_state(self, state: str) -> None:
        if state != self.state:
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
            rejected=dict(self.rejected),
        )

    def _telemetry_loop(self) -> None:
        while not self.stop_event.wait(self.cfg.telemetry_interval_s):
            try:
                self.transport.publish(
                    self.topics.device_telemetry(self.device_id), self.telemetry().to_json(), qos=QOS_TELEMETRY
                )
            except Exception as exc:
                log.debug("telemetry not sent: %s", exc)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from edge_agent.models import resolve_model

        handler = lambda kind: (lambda topic, payload: self._events.put((kind, topic, payload, time.time())))  # noqa: E731
        self.transport.subscribe(self.topics.device_task(self.device_id), handler("task"), qos=QOS_TASK, framed=True)
        self.transport.subscribe(self.topics.global_model, handler("global"), qos=QOS_GLOBAL, framed=True)
        self.transport.subscribe(self.topics.all_global_diffs, handler("global"), qos=QOS_GLOBAL, framed=True)
        self.transport.on_connect.append(lambda session_present: self.announce())
        self.transport.connect(self.cfg.broker.connect_timeout_s)
        self.announce()
        self.model_path = resolve_model(self.cfg.model, cache_dir=self.cfg.model_cache)
        from edge_agent.models import resolve_device

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
                    try:
                        self._apply_pending_global()
                    except PlanRefused:
                        pass  # announced as refused; tasks are declined until the config changes
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
        except Exception as exc:
            log.warning("could not publish offline status: %s", exc)
        self.transport.close()

    # ------------------------------------------------------------------ events
    def _pump(self, timeout: float) -> None:
        self.alive_at = time.monotonic()
        try:
            kind, topic, payload, arrived_at = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            if kind == "global":
                self._global_topic = topic  # checked against the message (_check_global_topic)
                self._on_global(payload, arrived_at)
            elif kind == "task":
                self._on_task(payload)
            else:
                self._on_other_event(kind, topic, payload)
        except ProtocolError as exc:
            self._count_rejection(kind, topic, str(exc))

    def _count_rejection(self, kind: str, topic: str, reason: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        log.warning("rejected %s on %s: %s", kind, topic, reason[:1000])

    def _on_other_event(self, kind: str, topic: str, payload: bytes) -> None:
        """Events of extra subscriptions made by subclasses."""

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

    def _check_global_topic(self, gm: m.GlobalModel) -> None:
        """A snapshot comes on ``global``, difference v on ``global/diff/{v}``: nothing else."""
        topic = getattr(self, "_global_topic", None)
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

    def _memory_plan(self, adapter: m.AdapterSpec, zo_target: str | None = None) -> Any:
        """The memory plan for ``adapter`` and the fit settings of the current (or last) task;
        PlanRefused (state ``refused``, announced) when none fits the budget."""
        fit = self._plan_fit or self.memory.last_fit()
        try:
            return self.memory.plan_for(adapter, fit, zo_target=zo_target)
        except PlanRefused:
            self._set_state("refused")
            self.announce()
            raise

    def _ensure_method(self, adapter: m.AdapterSpec) -> None:
        plan = self._memory_plan(adapter)
        key = plan.build_key if plan is not None else None
        if self.method is not None and self._method_adapter == adapter and self._method_key == key:
            self.memory.install(self.method)  # a new micro-batch needs no reload
            return
        from edge_agent.memory import meter
        from edge_agent.methods import get_method

        if self.cfg.training.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.training.torch_threads)
        self._set_state("loading")
        name, plan_kwargs = plan.method_spec() if plan is not None else (self.cfg.method, {})
        if name == "zo-adapter":  # the memory plan's fallback: zeroth-order on this adapter
            from edge_agent.methods.zo_adapter import ZoAdapterMethod as cls

            mb = self.cfg.memory_budget
            if mb is not None:
                plan_kwargs = {**plan_kwargs, "lr": mb.zo_lr, "eps": mb.zo_eps}
        else:
            cls = get_method(name)
        kwargs: dict[str, Any] = {"device": self.cfg.device, "dtype": self.cfg.dtype, "seed": 0, **plan_kwargs}
        if self.cfg.training.gradient_checkpointing and name != "zo":
            kwargs["gradient_checkpointing"] = True
        log.info("loading %s with %s adapter r=%d", self.model_path, name, adapter.r)
        if self.method is not None:  # the previous model (another plan) goes before the next loads
            from edge_agent.methods.base import _release_memory

            self.method = None
            _release_memory()
        meter().reset()
        self.method = cls(self.model_path, adapter, **kwargs)
        self.memory.load_measured(meter().host_peak_mb())
        self.memory.install(self.method)
        self._method_adapter, self._method_key = adapter, key
        self.global_version, self.global_arrays, self._dirty = None, None, False
        self._set_state("idle")

    def _apply_pending_global(self) -> None:
        if not self._global_pending():
            return
        assert self.sync.adapter is not None and self.sync.arrays is not None
        self._ensure_method(self.sync.adapter)
        t0 = time.perf_counter()
        arrays, version = self.sync.arrays, self.sync.version
        try:
            self.method.set_adapter(arrays)  # raises ValueError naming a mismatching tensor
        except ValueError as exc:
            # a global that does not fit this device's adapter: forget it, wait for the next snapshot
            self.sync = type(self.sync)(max_elements=self.cfg.broker.max_message_bytes)
            self._count_rejection("global", f"global v{version}", f"does not fit the adapter: {exc}")
            return
        self._global_timing["global_apply_s"] = time.perf_counter() - t0
        self.global_arrays, self.global_version, self._dirty = arrays, version, False
        log.info("applied global version %d", version)
        self.announce()

    def _wait_for_global(self, version: int, deadline: float) -> bool:
        while not self.stop_event.is_set():
            if self._global_pending() and self.sync.version <= version:
                self._apply_pending_global()
            if self.global_version == version:
                if self._dirty:
                    self.method.set_adapter(self.global_arrays)
                    self._dirty = False
                return True
            if self.global_version is not None and self.global_version > version:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, 0.2))
        return False

    def _on_task(self, payload: bytes) -> None:
        task = m.Task.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        if task.device_id != self.device_id:
            raise ProtocolError(f"task for device {task.device_id!r} arrived on {self.device_id}'s topic")
        cached = self._last_result if self._last_result is not None and self._last_result[0] == task.task_id else None
        if cached is None and task.task_id in self._seen_tasks:
            log.info("duplicate task %s ignored", task.task_id)
            return
        self._seen_tasks = (self._seen_tasks + [task.task_id])[-64:]
        deadline = time.monotonic() + task.deadline_s
        if task.model and task.model != self.cfg.model:
            log.warning("task asks for model %s; this device holds %s", task.model, self.cfg.model)
        self._plan_fit = self._local_fit_config(task.fit)
        try:
            self._ensure_method(task.adapter)
        except PlanRefused as exc:
            log.error("task %s declined: %s", task.task_id, exc)
            return
        if task.kind == "init":
            self._send(task, -1, 0, {}, self.method.get_adapter())
            return
        if not self._wait_for_global(task.global_version, deadline - task.deadline_s * 0.5 if task.kind == "fit" else deadline):
            log.warning("task %s needs global v%d, have v%s; skipped", task.task_id, task.global_version, self.global_version)
            return
        if cached is not None and task.kind == "fit" and cached[1] == self._global_digest():
            # idempotent by task id: this task was answered from this very global; maybe the
            # answer was lost, so send the same bytes again (a same-named task of another
            # federation run, on other weights, is trained anew)
            n = self.transport.publish(self.topics.device_update(self.device_id), cached[2], qos=QOS_UPDATE, framed=True).bytes
            self.results_resent += 1
            log.info("task %s came again: its result sent again (%d bytes)", task.task_id, n)
            return
        if task.kind == "evaluate":
            self._evaluate(task)
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

    def _evaluate(self, task: m.Task) -> None:
        self._set_state("evaluating")
        try:
            loss, n = self.method.evaluate(self.eval_examples, self._local_fit_config(task.fit))
        finally:
            self._set_state("idle")
        self._send(task, task.global_version, n, {"eval_loss": float(loss)}, {})

    def _fit(self, task: m.Task) -> None:
        cfg = self._local_fit_config(task.fit)
        self._set_state("training")
        self.progress = {"round": task.round, "step": 0, "steps_total": cfg.local_steps}
        started = time.perf_counter()

        def progress(step: int, loss: float) -> None:
            elapsed = time.perf_counter() - started
            self.alive_at = time.monotonic()
            self.progress.update(step=step, loss=float(loss), elapsed_s=elapsed)

        result = None
        try:
            self._dirty = True
            self.memory.fit_started()
            result = self._run_fit(cfg, progress)
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
        t0 = time.perf_counter()
        local = self.method.get_adapter()
        assert self.global_arrays is not None
        delta = {k: local[k] - self.global_arrays[k] for k in self.global_arrays}
        # FAULT INJECTION FOR TESTS ONLY (tests/test_robust_aggregation.py): a misbehaving device
        # that multiplies its update (100: scaled, -1: sign-flipped). Never set in production.
        fault_scale = os.environ.get("FEDMQ_FAULT_INJECT_UPDATE_SCALE")
        if fault_scale:
            log.warning("FAULT INJECTION: update of %s scaled by %s", task.task_id, fault_scale)
            delta = {k: v * np.float32(float(fault_scale)) for k, v in delta.items()}
        metrics = {
            "train_loss": float(result.train_loss),
            "steps": float(result.steps),
            "train_s": float(result.seconds),
            "tokens": float(result.tokens),
            "diff_s": time.perf_counter() - t0,
            **self._global_timing,
        }
        self._send(task, task.global_version, result.num_samples, metrics, delta)

    def _run_fit(self, cfg: m.FitConfig, progress: Any) -> Any:
        """Local training with the method of the memory plan (zo-adapter draws its own seeds)."""
        return self.method.fit(self.train_examples, cfg, progress=progress, should_stop=self.stop_event.is_set)

    def _send(
        self, task: m.Task, base_version: int, num_samples: int, metrics: dict[str, float],
        arrays: dict[str, np.ndarray], **extra: Any,
    ) -> None:
        t0 = time.perf_counter()
        base = dict(kind=task.kind, task_id=task.task_id, round=task.round, device_id=self.device_id,
                    base_version=base_version, num_samples=num_samples)
        if self.signer is not None:  # placeholders of the final sizes, so budgets stay exact
            base.update(nonce=task.nonce, signature=bytes(64))
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            log.warning("metrics %s are not finite; not sent", bad)
            metrics = {k: v for k, v in metrics.items() if k not in bad}
        if task.kind == "fit" and arrays:
            # the budget covers the whole msgpack Update, metrics included (placeholders: floats
            # always pack as 9 bytes, so the final message has exactly the measured size)
            final = {**metrics, **{k: 0.0 for k in UPLINK_KEYS}, "encode_s": 0.0, "sent_at": 0.0}
            size_of = lambda enc: len(m.Update(**base, metrics=final, tensors=enc, **extra).to_msgpack())  # noqa: E731
            tensors, uplink_metrics = self.uplink.encode(arrays, size_of)
            metrics = {**metrics, **uplink_metrics}
        else:
            tensors = encode(arrays)  # init: the starting adapter travels exactly; zo: no tensors
        obj = m.Update(**base, metrics=metrics, tensors=tensors, **extra).to_obj()
        msgpack.packb(obj, use_bin_type=True)
        encode_s = time.perf_counter() - t0
        # The measured encode time and the send instant ride in the message itself; re-packing the
        # already built map only copies bytes.
        obj["metrics"] = {**obj["metrics"], "encode_s": encode_s, "sent_at": time.time()}
        if self.signer is not None:
            obj["signature"] = self.signer.sign(self.cfg.federation, obj)
        payload = msgpack.packb(obj, use_bin_type=True)
        if task.kind == "fit":  # before publishing: after a crash these bytes are sent again
            self._remember_result(task.task_id, self._global_digest(), payload)
        n = self.transport.publish(self.topics.device_update(self.device_id), payload, qos=QOS_UPDATE, framed=True).bytes
        log.info("sent %s result for %s (%d bytes)", task.kind, task.task_id, n)


    @property
    def _last_result_path(self) -> Path:
        return Path(self.cfg.state_dir) / "last-result.msgpack"

    def _global_digest(self) -> str:
        """SHA-256 of the global the adapter was reset to (names, shapes, float32 values)."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.global_arrays or {}):
            a = np.ascontiguousarray(self.global_arrays[name], dtype=np.float32)
            h.update(f"{name}:{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def _remember_result(self, task_id: str, base_digest: str, payload: bytes) -> None:
        from fedmq_protocol.storage import atomic_write

        self._last_result = (task_id, base_digest, payload)
        try:
            atomic_write(self._last_result_path, msgpack.packb(
                {"task_id": task_id, "base_digest": base_digest, "payload": payload}, use_bin_type=True))
        except OSError as exc:  # the result still goes out; only a resend after a crash is lost
            log.warning("could not keep the result of %s: %s", task_id, exc)

    def _load_last_result(self) -> tuple[str, str, bytes] | None:
        try:
            obj = msgpack.unpackb(self._last_result_path.read_bytes(), raw=False)
            return str(obj["task_id"]), str(obj["base_digest"]), bytes(obj["payload"])
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged file only costs the resend
            log.warning("%s unreadable (%s); ignored", self._last_result_path, exc)
            return None


def create_agent(config: AgentConfig, **kwargs: Any) -> EdgeAgent:
    """The agent runtime for ``config.method`` (zo federations replay a seed ledger)."""
    if config.method == "zo":
        from edge_agent.zo_agent import ZoEdgeAgent

        return ZoEdgeAgent(config, **kwargs)
    return EdgeAgent(config, **kwargs)
