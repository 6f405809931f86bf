"""``SplitServer``: the middle blocks of a split model with one shared LoRA adapter, over MQTT.

SplitFed variant: **one shared server adapter, stepped once per device step, serialized** (steps
of all devices apply one after another under one lock, like SplitFed-V2's sequential server). One
copy is the simplest state that stays consistent: a step is applied whole or not at all, a
restart resumes from one file, and nothing needs averaging at round end (per-device copies
averaged per round would hold N adapters and their optimizer states, and a device vanishing
mid-round would leave its copy to be dropped or guessed). The cost is that devices' steps queue
at the server; their device-side work still overlaps.

Requests (``fedmq_protocol.modes.split``) arrive on ``split/+/request``; answers go to the
requesting device's ``split/{device}/response``. Per step:

- ``forward``: the blocks run with gradients; the graph (its input, hidden state and mask) is the
  step's pending forward state (expires after ``pending_ttl_s``; a new forward of the same device
  replaces it). The graph saves copies of the adapter weights it uses, so steps of other devices
  applied before its backward leave it intact: its gradients are those of the weights its forward
  saw (SplitFed's staleness), and a vanished device leaves only a graph that expires.
- ``backward``: the gradient is back-propagated through the kept graph, the adapter clipped (the
  task's ``max_grad_norm``) and stepped (AdamW), the state persisted (``atomic_write``) and the
  gradient at the head cut answered.
- ``evaluate``: a forward that keeps nothing.

Every answer is cached per device and phase with its step key: a repeated request (QoS-1
duplicate, a device's retry) gets the same bytes again and a backward is never applied twice
(the cache of applied backwards is persisted with the adapter, so this holds across restarts).
A request is refused with a reason and counted (``refused`` in the status) when it cannot be
used: undecodable, wrong shape or dtype, non-finite, a device with no open task of this
federation (tasks are read from the coordinator's task topics), an expired task, a cut other than
the server's, an unknown, expired or late step. Nothing a device sends can stop the server.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.split import (
    QOS_SPLIT,
    SplitRequest,
    SplitResponse,
    SplitTask,
    decode_hidden,
    device_of_request_topic,
    encode_hidden,
    requests_filter,
    response_topic,
    server_status_topic,
)
from fedmq_protocol.seal import SealOpener
from fedmq_protocol.storage import atomic_write
from fedmq_protocol.topics import Topics

if TYPE_CHECKING:
    from fedmq_protocol.transport import MqttTransport
    from split_server.config import SplitServerConfig

log = logging.getLogger("fedmq.split_server")

STATE_FILE = "split-server.msgpack"
STATE_FORMAT = 1


class Refused(Exception):
    """A request that cannot be used: ``kind`` is the counter, ``reason`` goes to the device."""

    def __init__(self, kind: str, reason: str, *, redo_forward: bool = False) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.redo_forward = kind, reason, redo_forward


@dataclass
class OpenTask:
    task_id: str
    kind: str
    round: int
    lr: float
    max_grad_norm: float
    spec: SplitTask
    expires_at: float  # wall clock (persisted: a restarted server knows the open round)


@dataclass
class Pending:
    key: tuple[str, int, str]
    hidden: Any  # torch tensor [B, T, H]: the input, a leaf requiring grad
    mask: Any  # torch tensor [B, T]
    out: Any  # the blocks' output, with its graph back to ``hidden``
    expires_at: float


class SplitServer:
    def __init__(self, config: SplitServerConfig, *, transport: MqttTransport | None = None) -> None:
        self.cfg = config
        # Tasks say who is in a round: they are opened like an agent opens them (seal, signature,
        # counter per topic), so a forged or replayed task cannot open a step for anyone.
        key = None
        if config.coordinator_public_key is not None:
            from fedmq_protocol.signing import load_public_key

            key = load_public_key(config.coordinator_public_key)
        self.seals = SealOpener(config.federation, key, require_signatures=key is not None,
                                max_bytes=config.broker.max_message_bytes)
        self.topics = Topics(config.topic_root, config.federation)
        self.base = self.topics.base
        self.state_path = Path(config.state_dir) / STATE_FILE
        self.stop_event = threading.Event()
        self._events: queue.Queue[tuple[str, str, bytes, float]] = queue.Queue()  # (kind, topic, payload, arrival)
        self._lock = threading.Lock()  # the adapter and its optimizer: one step at a time
        self.tasks: dict[str, OpenTask] = {}
        self.pending: OrderedDict[str, Pending] = OrderedDict()  # device -> its step's forward state
        # device -> phase -> (step key, answer bytes): what a repeat of that request gets again
        self.answers: dict[str, dict[str, tuple[tuple[str, int, str], bytes]]] = {}
        self.applied: dict[str, tuple[str, int]] = {}  # device -> (task id, step) of its last applied backward
        self.server_step = 0
        self.counters: dict[str, int] = {"requests": 0, "answered": 0, "duplicates": 0, "applied": 0}
        self.refused: dict[str, int] = {}
        self._unsaved = 0
        self.transport = transport
        self._loaded = False
        self._started = False
        self._queued = 0.0  # how long the request being answered waited in the queue
        self.alive_at = time.monotonic()  # refreshed by the work loop (the systemd watchdog reads it)

    # -- the model --------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        from edge_agent.methods.split_model import load_part
        from edge_agent.models import resolve_model

        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        path = resolve_model(self.cfg.model, cache_dir=self.cfg.model_cache, log=log.info)
        s = self.cfg.split
        _, self.part, self.params, self.cut = load_part(path, self.cfg.adapter, l_head=s.l_head, l_tail=s.l_tail,
                                                        side="server", seed=self.cfg.seed, dtype=self.cfg.dtype,
                                                        device=self.cfg.device)
        self.device = next(iter(self.params.values())).device
        self.dtype = next(iter(self.params.values())).dtype
        trainable = [p for p in self.params.values() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=self.cfg.lr or 1e-3, weight_decay=0.0)
        self.part.model.train()
        if self.state_path.exists():
            self._restore()
        log.info("split server: blocks %d..%d of %s, %d adapter tensors, server step %d",
                 self.cut.server_layers[0], self.cut.server_layers[-1], path, len(self.params), self.server_step)
        self._loaded = True

    # -- persistence ------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().to("cpu").float().numpy().copy() for n, p in self.params.items()}

    def _blob(self) -> bytes:
        def arr(a: Any) -> list[Any]:
            a = np.ascontiguousarray(a, dtype=np.float32)
            return [list(a.shape), a.tobytes()]

        adam: dict[str, Any] = {}
        for n, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                adam[n] = {"step": float(st["step"]), "exp_avg": arr(st["exp_avg"].cpu().numpy()),
                           "exp_avg_sq": arr(st["exp_avg_sq"].cpu().numpy())}
        obj = {
            "format": STATE_FORMAT, "server_step": self.server_step,
            "cut": [self.cut.n_layers, self.cut.l_head, self.cut.l_tail],
            "adapter": {n: arr(a) for n, a in self.adapter_state().items()}, "adam": adam,
            "applied": {d: list(v) for d, v in self.applied.items()},
            "answers": {d: [list(k), b] for d, per in self.answers.items() for ph, (k, b) in per.items()
                        if ph == "backward"},
            "counters": self.counters, "refused": self.refused,
            "tasks": {d: {"task_id": t.task_id, "kind": t.kind, "round": t.round, "lr": t.lr,
                          "max_grad_norm": t.max_grad_norm, "spec": t.spec.model_dump(), "expires_at": t.expires_at}
                      for d, t in self.tasks.items()},
        }
        return bytes(msgpack.packb(obj, use_bin_type=True))

    def save(self) -> None:
        atomic_write(self.state_path, self._blob())
        self._unsaved = 0

    def _restore(self) -> None:
        import torch

        obj = msgpack.unpackb(self.state_path.read_bytes(), raw=False)
        if obj.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.state_path}: unknown state format {obj.get('format')!r}")
        if list(obj["cut"]) != [self.cut.n_layers, self.cut.l_head, self.cut.l_tail]:
            raise ValueError(f"{self.state_path}: persisted for cut {obj['cut']}, configured "
                             f"{[self.cut.n_layers, self.cut.l_head, self.cut.l_tail]}")

        def tensor(v: list[Any]) -> Any:
            return torch.from_numpy(np.frombuffer(v[1], dtype=np.float32).reshape(v[0]).copy())

        if set(obj["adapter"]) != set(self.params):
            raise ValueError(f"{self.state_path}: adapter tensors do not match the configured adapter")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensor(obj["adapter"][n]).to(p.device, p.dtype))
        for n, st in obj.get("adam", {}).items():
            p = self.params[n]
            self.opt.state[p] = {"step": torch.tensor(st["step"]),
                                 "exp_avg": tensor(st["exp_avg"]).to(p.device, p.dtype),
                                 "exp_avg_sq": tensor(st["exp_avg_sq"]).to(p.device, p.dtype)}
        self.server_step = int(obj["server_step"])
        self.applied = {d: (str(v[0]), int(v[1])) for d, v in obj.get("applied", {}).items()}
        for d, (k, b) in obj.get("answers", {}).items():
            self.answers.setdefault(d, {})["backward"] = ((str(k[0]), int(k[1]), str(k[2])), bytes(b))
        for d, t in obj.get("tasks", {}).items():
            self.tasks[d] = OpenTask(str(t["task_id"]), str(t["kind"]), int(t["round"]), float(t["lr"]),
                                     float(t["max_grad_norm"]), SplitTask(**t["spec"]), float(t["expires_at"]))
        self.counters.update(obj.get("counters", {}))
        self.refused.update(obj.get("refused", {}))
        log.info("resumed from %s at server step %d", self.state_path, self.server_step)

    # -- messages (network thread: queue only) ----------------------------------------------
    def start(self) -> None:
        if not self._loaded:
            self.load()
        if self._started:
            return
        self._started = True
        if self.transport is None:
            from fedmq_protocol.transport import MqttTransport, WillMessage

            will = WillMessage(server_status_topic(self.base), json.dumps({"online": False}).encode(), 1, True)
            self.transport = MqttTransport(self.cfg.broker, f"fedmq-split-server-{self.cfg.federation}", will=will,
                                           clean_start=True)
        t = self.transport
        t.subscribe(f"{self.base}/devices/+/task",
                    lambda tp, pl: self._events.put(("task", tp, pl, time.perf_counter())), qos=1, framed=True)
        t.subscribe(requests_filter(self.base),
                    lambda tp, pl: self._events.put(("request", tp, pl, time.perf_counter())), qos=QOS_SPLIT,
                    framed=True)
        t.connect(self.cfg.broker.connect_timeout_s)
        self.publish_status()

    def status(self, online: bool = True) -> dict[str, Any]:
        return {"online": online, "server_step": self.server_step, "open_tasks": len(self.tasks),
                "pending": len(self.pending), **self.counters, "refused": dict(self.refused),
                "cut": {"l_head": self.cut.l_head, "l_tail": self.cut.l_tail, "n_layers": self.cut.n_layers}}

    def publish_status(self, online: bool = True) -> None:
        if self.transport is None:
            return
        try:
            self.transport.publish(server_status_topic(self.base), json.dumps(self.status(online)).encode(),
                                   qos=1, retain=True, timeout=5)
        except Exception as exc:  # noqa: BLE001 - status is best effort
            log.debug("status not published: %s", exc)

    def run(self) -> None:
        self.start()
        last_status = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.alive_at = time.monotonic()
                try:
                    kind, topic, payload, arrived = self._events.get(timeout=0.2)
                except queue.Empty:
                    kind = ""
                if kind == "task":
                    self.on_task(topic, payload)
                elif kind == "request":
                    self.on_request(topic, payload, arrived)
                if time.monotonic() - last_status > self.cfg.status_interval_s:
                    self.publish_status()
                    last_status = time.monotonic()
        finally:
            self.close()

    def close(self) -> None:
        self.stop_event.set()
        if self._loaded and self._unsaved:
            self.save()
        if self.transport is not None:
            self.publish_status(online=False)
            self.transport.close()

    # -- tasks: who is in the round ---------------------------------------------------------
    def on_task(self, topic: str, payload: bytes) -> None:
        try:
            opened = self.seals.open(topic, payload, kind="task")
            if opened is None:  # an unchanged replay of a task already taken
                return
            task = m.Task.from_msgpack(opened.body, max_bytes=self.cfg.broker.max_message_bytes)
        except ProtocolError as exc:
            log.debug("task on %s not read: %s", topic, exc)
            return
        if not isinstance(task.payload, SplitTask) or task.kind not in ("fit", "evaluate"):
            return
        if self.topics.device_id_from(topic) != task.device_id:
            return
        self.tasks[task.device_id] = OpenTask(task.task_id, task.kind, task.round, task.fit.lr,
                                              task.fit.max_grad_norm, task.payload,
                                              time.time() + task.deadline_s)
        self.save()  # a restart mid-round still knows who is in it

    # -- requests ---------------------------------------------------------------------------
    def _refuse(self, kind: str, reason: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        log.warning("split request refused (%s): %s", kind, reason[:500])

    def on_request(self, topic: str, payload: bytes, arrived: float | None = None) -> bytes | None:
        """Answer one request (published to the device's response topic); returns the answer.
        ``arrived``: when it reached the server (``time.perf_counter``), for ``queued_s``."""
        self.counters["requests"] += 1
        self._queued = 0.0 if arrived is None else max(0.0, time.perf_counter() - arrived)
        try:
            device = device_of_request_topic(self.base, topic)
            req = SplitRequest.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        except ProtocolError as exc:
            self._refuse("bad_message", f"{topic}: {exc}")
            return None  # nothing names the step: no answer can be matched
        try:
            if req.device_id != device:
                raise Refused("bad_message", f"request of {req.device_id!r} on {device!r}'s topic {topic!r}")
            if req.response_topic != response_topic(self.base, device):
                raise Refused("bad_message", f"response_topic {req.response_topic!r} is not the device's "
                                             f"{response_topic(self.base, device)!r}")
            cached = self.answers.get(device, {}).get(req.phase)
            if cached is not None and cached[0] == req.key:
                self.counters["duplicates"] += 1
                self._send(device, cached[1], req.correlation)
                return cached[1]
            answer = self._handle(device, req)
        except Refused as exc:
            self._refuse(exc.kind, exc.reason)
            answer = self._answer(device, req, ok=False, reason=exc.reason, redo_forward=exc.redo_forward)
        except ProtocolError as exc:
            kind = "non_finite" if "non-finite" in str(exc) else "bad_tensor"
            self._refuse(kind, str(exc))
            answer = self._answer(device, req, ok=False, reason=str(exc))
        except Exception as exc:
            log.exception("split request of %s failed", device)
            self._refuse("internal", f"{type(exc).__name__}: {exc}")
            answer = self._answer(device, req, ok=False, reason=f"server error: {type(exc).__name__}")
        self._send(device, answer, req.correlation)
        return answer

    def _send(self, device: str, answer: bytes, correlation: bytes) -> None:
        if self.transport is None:
            return
        try:  # the correlation also as the MQTT 5 property (MQTT 3.1.1: the payload's field only)
            self.transport.publish(response_topic(self.base, device), answer, qos=QOS_SPLIT, framed=True,
                                   properties={"CorrelationData": correlation})
            self.counters["answered"] += 1
        except Exception as exc:  # noqa: BLE001 - the device asks again after its time-out
            log.warning("answer to %s not sent: %s", device, exc)

    def _answer(self, device: str, req: SplitRequest, *, ok: bool, reason: str | None = None,
                redo_forward: bool = False, tensors: Any = None, server_s: float = 0.0) -> bytes:
        return SplitResponse(device_id=device, task_id=req.task_id, step=req.step, phase=req.phase,
                             correlation=req.correlation, tensors=tensors, ok=ok, reason=reason,
                             redo_forward=redo_forward, server_s=server_s, queued_s=self._queued,
                             server_step=self.server_step).to_msgpack()

    def _open_task(self, device: str, req: SplitRequest) -> OpenTask:
        task = self.tasks.get(device)
        if task is None or task.task_id != req.task_id:
            raise Refused("not_in_round", f"device {device} has no open task {req.task_id!r} of this federation")
        if time.time() > task.expires_at:
            raise Refused("expired_task", f"task {req.task_id} of {device} is past its deadline")
        want = "evaluate" if req.phase == "evaluate" else "fit"
        if task.kind != want:
            raise Refused("bad_message", f"a {req.phase} request for {task.kind} task {task.task_id}")
        s = task.spec
        if (s.l_head, s.l_tail) != (self.cut.l_head, self.cut.l_tail):
            raise Refused("cut_mismatch", f"task {task.task_id} cuts at l_head={s.l_head} l_tail={s.l_tail}; "
                                          f"this server holds l_head={self.cut.l_head} l_tail={self.cut.l_tail}")
        return task

    def _graph_keeps_own_weights(self) -> Any:
        """While building a step's graph: the adapter weights it saves for backward are copies, so
        the steps of other devices applied before its backward (in place) leave it intact; its
        gradients are those of the weights its forward used (SplitFed's staleness), exactly."""
        import torch

        ptrs = {p.untyped_storage().data_ptr() for p in self.params.values()}

        def pack(t: Any) -> Any:
            return t.detach().clone() if t.untyped_storage().data_ptr() in ptrs else t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _expire(self) -> None:
        now = time.monotonic()
        for d in [d for d, p in self.pending.items() if p.expires_at < now]:
            del self.pending[d]
            self.counters["expired"] = self.counters.get("expired", 0) + 1

    def _input(self, req: SplitRequest, what: str) -> tuple[Any, Any]:
        import torch

        assert req.mask_shape is not None
        b, t = req.mask_shape
        arr = decode_hidden(req.tensors, expected=(b, t, self.part.hidden_size), max_elements=b * t *
                            self.part.hidden_size, where=what)
        mask = req.mask_array()
        if not (mask[:, 0] == 1).all():
            raise Refused("bad_message", f"{what}: every row must start with a token (right padding)")
        return (torch.from_numpy(arr).to(self.device, self.dtype), torch.from_numpy(mask).to(self.device))

    def _handle(self, device: str, req: SplitRequest) -> bytes:
        import torch

        task = self._open_task(device, req)
        self._expire()
        what = f"split {req.phase} of {device} step {req.step}"
        t0 = time.perf_counter()
        codec = task.spec.codec("gradients" if req.phase == "backward" else "activations")
        applied = self.applied.get(device)
        if req.phase in ("forward", "evaluate"):
            if req.phase == "forward" and applied is not None and applied[0] == req.task_id and req.step <= applied[1]:
                raise Refused("late_step", f"{what}: step {applied[1]} of this task is already applied")
            hidden, mask = self._input(req, what)
            train = req.phase == "forward"
            if train:
                hidden.requires_grad_(True)
            with self._lock, torch.set_grad_enabled(train), self._graph_keeps_own_weights():
                out = self.part.forward(hidden, mask)
            if train:
                self.pending[device] = Pending(req.key, hidden, mask, out, time.monotonic() + self.cfg.pending_ttl_s)
                self.pending.move_to_end(device)
                while len(self.pending) > self.cfg.max_pending:
                    self.pending.popitem(last=False)
            tensors = encode_hidden(out.detach().float().cpu().numpy(), codec)
            answer = self._answer(device, req, ok=True, tensors=tensors, server_s=time.perf_counter() - t0)
            self.answers.setdefault(device, {})[req.phase] = (req.key, answer)
            return answer
        # backward
        if applied is not None and applied[0] == req.task_id and req.step <= applied[1]:
            raise Refused("late_step", f"{what}: step {applied[1]} of this task is already applied")
        pend = self.pending.get(device)
        if pend is None or pend.key[:2] != req.key[:2]:
            raise Refused("unknown_step", f"{what}: no forward state for this step (expired, replaced or the "
                                          "server restarted)", redo_forward=True)
        grad = decode_hidden(req.tensors, expected=tuple(pend.hidden.shape), max_elements=int(pend.hidden.numel()),
                             where=what)
        params = [p for p in self.params.values() if p.requires_grad]
        with self._lock:
            x, out = pend.hidden, pend.out
            out.backward(torch.from_numpy(grad).to(out.device, out.dtype))
            torch.nn.utils.clip_grad_norm_(params, task.max_grad_norm)
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr or task.lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.server_step += 1
            assert x.grad is not None
            g_in = x.grad.float().cpu().numpy()
        del self.pending[device]
        self.applied[device] = (req.task_id, req.step)
        self.counters["applied"] += 1
        answer = self._answer(device, req, ok=True, tensors=encode_hidden(g_in, codec),
                              server_s=time.perf_counter() - t0)
        self.answers.setdefault(device, {})["backward"] = (req.key, answer)
        self._unsaved += 1
        if self._unsaved >= self.cfg.persist_every:
            self.save()  # before the answer: a restart re-sends it, never applies the step again
        return answer


__all__ = ["Refused", "SplitServer"]
