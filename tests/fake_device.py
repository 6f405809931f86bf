"""A torch-free stand-in for an edge agent, for protocol-level tests against a real coordinator.

It announces itself, answers ``init`` with a fixed adapter and ``fit`` with a difference it is
given (signed when it holds a key), and lets a test run code (a flood of forged payloads) before it
answers a fit task.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq_protocol import messages as m
from fedmq_protocol.codec import encode
from fedmq_protocol.seal import body_of
from fedmq_protocol.signing import Signer
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport, Published
from fedmq_protocol.transport.config import BrokerConfig


def tiny_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((32, 4), np.float32),
        "base_model.model.layers.0.v_proj.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
        "base_model.model.layers.0.v_proj.lora_B.weight": np.zeros((16, 4), np.float32),
    }


def update_obj(task: m.Task, device_id: str, arrays: dict[str, np.ndarray] | None, *, federation: str,
               signer: Signer | None = None, num_samples: int = 10, **fields: Any) -> dict[str, Any]:
    """The msgpack map of an Update answering ``task`` (signed with ``signer``)."""
    kw: dict[str, Any] = {"kind": task.kind, "task_id": task.task_id, "round": task.round, "device_id": device_id,
                          "base_version": task.global_version if task.kind != "init" else -1,
                          "num_samples": num_samples, "metrics": {"train_loss": 1.0},
                          "tensors": encode(arrays or {}), "nonce": task.nonce}
    kw.update(fields)
    obj = m.Update(**kw).to_obj()
    if signer is not None:
        obj["signature"] = signer.sign(federation, obj)
    return obj


@dataclass
class FakeDevice:
    url: str
    device_id: str
    federation: str = "test"
    signer: Signer | None = None
    adapter: dict[str, np.ndarray] = field(default_factory=tiny_adapter)
    delta: Callable[[m.Task], dict[str, np.ndarray]] | None = None
    before_fit_answer: Callable[[FakeDevice, m.Task], None] | None = None
    username: str | None = None
    password: str | None = None
    chunk_size: int = 256 * 1024
    tasks: list[m.Task] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # update payloads published (in order)
    errors: list[str] = field(default_factory=list)  # exceptions while answering tasks

    def start(self) -> FakeDevice:
        self.topics = Topics("fedmq", self.federation)
        cfg = BrokerConfig(url=self.url, username=self.username, password=self.password, chunk_size=self.chunk_size)
        self.transport = MqttTransport(cfg, f"fake-{self.device_id}-{time.time_ns()}", clean_start=True)
        self._queue: queue.Queue[m.Task | None] = queue.Queue()
        self.transport.subscribe(self.topics.device_task(self.device_id),
                                 lambda t, p: self._queue.put(m.Task.from_msgpack(body_of(p))), qos=1, framed=True)
        self.transport.connect(10)
        status = m.DeviceStatus(device_id=self.device_id, online=True, seq=int(time.time() * 1000),
                                num_samples=10, eval_samples=0, state="idle", method="lora")
        if self.signer is not None:  # a coordinator with device keys refuses unsigned statuses
            obj = status.model_dump(by_alias=True, mode="json", exclude_none=True)
            status = status.model_copy(update={"signature": self.signer.sign_status(self.federation, obj)})
        self.transport.publish(self.topics.device_status(self.device_id), status.to_json(), qos=1, retain=True)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def publish_update(self, payload: bytes, *, device_topic: str | None = None, framed: bool = True) -> Published:
        topic = self.topics.device_update(device_topic or self.device_id)
        self.sent.append(payload)
        return self.transport.publish(topic, payload, qos=1, framed=framed)

    def answer(self, task: m.Task, arrays: dict[str, np.ndarray] | None) -> bytes:
        obj = update_obj(task, self.device_id, arrays, federation=self.federation, signer=self.signer)
        payload = msgpack.packb(obj, use_bin_type=True)
        self.publish_update(payload)
        return payload

    def _serve(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            self.tasks.append(task)
            try:
                self._answer_task(task)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which asserts none
                import traceback

                self.errors.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def _answer_task(self, task: m.Task) -> None:
        if task.kind == "init":
            self.answer(task, self.adapter)
        elif task.kind == "fit":
            if self.before_fit_answer is not None:
                self.before_fit_answer(self, task)
            d = self.delta(task) if self.delta else {k: np.full_like(v, 0.01) for k, v in self.adapter.items()}
            self.answer(task, d)
        elif task.kind == "evaluate":
            obj = update_obj(task, self.device_id, None, federation=self.federation, signer=self.signer,
                             metrics={"eval_loss": 1.0})
            self.publish_update(msgpack.packb(obj, use_bin_type=True))

    def close(self) -> None:
        self._queue.put(None)
        try:
            offline = m.DeviceStatus(device_id=self.device_id, online=False, seq=int(time.time() * 1000),
                                     state="offline")
            self.transport.publish(self.topics.device_status(self.device_id), offline.to_json(), qos=1, retain=True)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self.transport.close()


def read_retained_json(url: str, topic: str, model: type, timeout: float = 10.0):
    """The retained message on ``topic`` decoded as ``model`` (None if there is none)."""
    got: list = []
    ev = threading.Event()

    def on_msg(t: str, p: bytes) -> None:
        if p:
            got.append(model.from_json(p))
            ev.set()

    tr = MqttTransport(BrokerConfig(url=url), f"read-{time.time_ns()}", clean_start=True)
    tr.subscribe(topic, on_msg, qos=1)
    tr.connect(10)
    try:
        ev.wait(timeout)
    finally:
        tr.close()
    return got[-1] if got else None
