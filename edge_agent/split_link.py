"""The device's link to the split server: one request/response exchange per call, over MQTT.

``SplitLink`` has its own connection (client id ``fedmq-agent-{device}-split``): the agent's
thread is inside the trainer's ``fit`` while steps are exchanged, so the runtime's event queue is
not read then. A request goes to ``split/{device}/request`` (framed: chunked when large), its
answer comes on ``split/{device}/response`` and is matched by its step key (task id, step, phase)
and correlation bytes (also sent as the MQTT 5 Response Topic and Correlation Data properties when
the broker speaks 5; the payload's fields are what is read); answers to other steps (late,
duplicated) are dropped and counted. No answer within ``step_timeout_s``: the same request again
(``attempt`` + 1), at most ``step_retries`` times, then ``SplitStepFailed``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.split import (
    QOS_SPLIT,
    SplitRequest,
    SplitResponse,
    SplitSpec,
    decode_hidden,
    encode_hidden,
    pack_mask,
    request_topic,
    response_topic,
)

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from fedmq_protocol.topics import Topics
    from fedmq_protocol.transport import MqttTransport

log = logging.getLogger("fedmq.agent.split")


class SplitStepFailed(ProtocolError):
    """A split step got no usable answer (refused, or no answer after every retry)."""


@dataclass
class LinkStats:
    """What the exchanges of one fit (or evaluation) cost: bytes per direction, the wall time of
    the exchanges and the server's compute time within it."""

    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    exchange_s: float = 0.0
    server_s: float = 0.0
    queued_s: float = 0.0
    retries: int = 0
    ignored: int = 0  # answers to no open request (late, duplicated)

    @property
    def transfer_s(self) -> float:
        """Time of the exchanges not spent at the server (computing, or queued behind other devices'
        steps): encoding, the broker, decoding."""
        return max(0.0, self.exchange_s - self.server_s - self.queued_s)

    def metrics(self, prefix: str = "split_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in
                {"requests": self.requests, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                 "exchange_s": self.exchange_s, "server_s": self.server_s, "queued_s": self.queued_s,
                 "transfer_s": self.transfer_s,
                 "retries": self.retries}.items()}


@dataclass
class _Waiter:
    key: tuple[str, int, str]
    correlation: bytes
    done: threading.Event = field(default_factory=threading.Event)
    response: SplitResponse | None = None
    nbytes: int = 0


def correlation_of(device_id: str, key: tuple[str, int, str]) -> bytes:
    """The correlation bytes of a step: the same for every attempt, so an answer to any attempt
    (the server answers a repeat with its first answer's bytes) matches."""
    return hashlib.sha256(f"{device_id}|{key[0]}|{key[1]}|{key[2]}".encode()).digest()[:16]


class SplitLink:
    def __init__(self, config: AgentConfig, topics: Topics, *, transport: MqttTransport | None = None) -> None:
        self.device_id = config.device_id
        self.base = topics.base
        self.max_elements = config.broker.max_message_bytes
        self.spec = SplitSpec()
        self.task_id: str | None = None
        self.stats = LinkStats()
        self._lock = threading.Lock()
        self._waiting: _Waiter | None = None
        self.ignored = 0
        self._config = config
        self._transport = transport
        self._started = False

    # -- connection -------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        if self._transport is None:
            from fedmq_protocol.transport import MqttTransport

            self._transport = MqttTransport(self._config.broker, f"fedmq-agent-{self.device_id}-split",
                                            clean_start=True)
        self._transport.subscribe(response_topic(self.base, self.device_id), self._on_response, qos=QOS_SPLIT,
                                  framed=True)
        self._transport.connect(self._config.broker.connect_timeout_s)
        self._started = True

    def close(self) -> None:
        if self._transport is not None and self._started:
            self._transport.close()
        self._started = False

    def begin(self, task_id: str, spec: SplitSpec) -> None:
        """Requests from now on belong to ``task_id`` and use ``spec``'s codec and time-outs."""
        self.task_id, self.spec = task_id, spec
        self.stats = LinkStats()

    # -- answers (network thread) -----------------------------------------------------------
    def _on_response(self, topic: str, payload: bytes) -> None:
        try:
            resp = SplitResponse.from_msgpack(payload, max_bytes=self.max_elements)
        except ProtocolError as exc:
            log.warning("split response on %s refused: %s", topic, exc)
            self.ignored += 1
            return
        with self._lock:
            w = self._waiting
            if (w is None or resp.key != w.key or resp.correlation != w.correlation
                    or resp.device_id != self.device_id or w.done.is_set()):
                self.ignored += 1
                self.stats.ignored += 1
                return
            w.response, w.nbytes = resp, len(payload)
            w.done.set()

    # -- requests ---------------------------------------------------------------------------
    def _exchange(self, step: int, phase: str, array: np.ndarray, mask: np.ndarray | None) -> tuple[SplitResponse, int]:
        if self.task_id is None:
            raise SplitStepFailed("split step outside a task")
        self.start()
        assert self._transport is not None
        key = (self.task_id, step, phase)
        corr = correlation_of(self.device_id, key)
        codec = self.spec.codec("gradients" if phase == "backward" else "activations")
        tensors = encode_hidden(array, codec)
        mask_fields: dict[str, Any] = {}
        if mask is not None:
            shape, bits = pack_mask(mask)
            mask_fields = {"mask_shape": shape, "mask": bits}
        topic = request_topic(self.base, self.device_id)
        t0 = time.perf_counter()
        for attempt in range(self.spec.step_retries + 1):
            req = SplitRequest(device_id=self.device_id, task_id=self.task_id, step=step, phase=phase,  # type: ignore[arg-type]
                               correlation=corr, tensors=tensors, attempt=attempt,
                               response_topic=response_topic(self.base, self.device_id), **mask_fields)
            waiter = _Waiter(key, corr)
            with self._lock:
                self._waiting = waiter
            try:
                sent = self._transport.publish(topic, req.to_msgpack(), qos=QOS_SPLIT, framed=True,
                                               timeout=self.spec.step_timeout_s,
                                               properties={"ResponseTopic": req.response_topic,
                                                           "CorrelationData": corr}).bytes
            except Exception as exc:  # noqa: BLE001 - a lost connection: try again like a time-out
                log.warning("split %s of step %d not sent: %s", phase, step, exc)
                sent = 0
            self.stats.bytes_up += sent
            self.stats.requests += 1
            if waiter.done.wait(self.spec.step_timeout_s):
                assert waiter.response is not None
                self.stats.exchange_s += time.perf_counter() - t0
                self.stats.server_s += waiter.response.server_s
                self.stats.queued_s += waiter.response.queued_s
                self.stats.bytes_down += waiter.nbytes
                return waiter.response, waiter.nbytes
            self.stats.retries += 1
            log.warning("split %s of step %d: no answer within %gs (attempt %d)", phase, step,
                        self.spec.step_timeout_s, attempt + 1)
        with self._lock:
            self._waiting = None
        raise SplitStepFailed(f"split {phase} of step {step}: no answer after {self.spec.step_retries + 1} requests")

    def _hidden(self, resp: SplitResponse, expected: tuple[int, ...], what: str) -> np.ndarray:
        try:
            return decode_hidden(resp.tensors, expected=expected, max_elements=self.max_elements, where=what)
        except ProtocolError as exc:
            raise SplitStepFailed(str(exc)) from None

    def forward(self, step: int, hidden: np.ndarray, mask: np.ndarray, phase: str = "forward") -> np.ndarray:
        """The hidden state at the tail cut for the hidden state at the head cut."""
        resp, _ = self._exchange(step, phase, hidden, mask)
        if not resp.ok:
            raise SplitStepFailed(f"split server refused the {phase} of step {step}: {resp.reason}")
        return self._hidden(resp, tuple(hidden.shape), f"split {phase} answer of step {step}")

    def backward(self, step: int, grad: np.ndarray, redo: Any = None) -> np.ndarray:
        """The gradient at the head cut for the gradient at the tail cut. ``redo()``: sends the
        step's forward again, when the server lost it (expired, restarted)."""
        resp, _ = self._exchange(step, "backward", grad, None)
        if not resp.ok and resp.redo_forward and redo is not None:
            log.info("split server holds no forward of step %d (%s): sending it again", step, resp.reason)
            redo()
            resp, _ = self._exchange(step, "backward", grad, None)
        if not resp.ok:
            raise SplitStepFailed(f"split server refused the backward of step {step}: {resp.reason}")
        return self._hidden(resp, tuple(grad.shape), f"split backward answer of step {step}")


__all__ = ["LinkStats", "SplitLink", "SplitStepFailed", "correlation_of"]
