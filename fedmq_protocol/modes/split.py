"""Split learning (SplitFed, U-shape): the task payload, the split-step messages and their topics.

A device holds the embedding, the first ``l_head`` blocks, the last ``l_tail`` blocks, the final
norm and the LM head, each with LoRA; the split server (``fedmq split-server``) holds the middle
blocks with their own LoRA. One local training step is two request/response exchanges with the
split server, on the device's own topics:

1. ``forward``: the hidden state at the head cut ``[B, T, H]`` and the attention mask ``[B, T]``
   up; the hidden state at the tail cut back.
2. ``backward``: the gradient of the loss at the tail cut up; the server back-propagates through
   its blocks, steps its adapter once, and sends the gradient at the head cut back.

Evaluation sends ``evaluate`` requests (a forward that keeps nothing). Every request names its
step: ``(task_id, step, phase)``; the server answers a repeated request (a QoS-1 duplicate, a
retry) with the bytes of its first answer and never applies a backward twice. The
``correlation`` bytes of a request come back in its response, and ``response_topic`` names where
(the MQTT 5 Response Topic and Correlation Data properties carry the same values when the broker
speaks 5; the payload is what the receiver reads, so MQTT 3.1.1 works the same).

Torch-free: tensors go through the codec (``fedmq_protocol.codec``), the mask as a bitmap.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmq_protocol.codec import CodecSpec, EncodedTensors, encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.base import ModePayload
from fedmq_protocol.topics import check_level
from fedmq_protocol.wire import Message

ActivationFormat = Literal["float32", "bfloat16", "float16", "int8"]
Phase = Literal["forward", "backward", "evaluate"]
PHASES: tuple[str, ...] = ("forward", "backward", "evaluate")
HIDDEN = "h"  # the one tensor name of a request's or response's ``tensors``
MAX_TOKENS = 1 << 20  # B * T bound of one request's mask
QOS_SPLIT = 1


class SplitSpec(BaseModel):
    """Where the model is cut and how activations travel (coordinator ``split:`` section; every
    device of the federation trains the same cut, so their device-side adapters average)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    l_head: int = Field(2, ge=1, le=1024,
                        description="decoder blocks at the start the device runs (after the embedding)")
    l_tail: int = Field(2, ge=1, le=1024, description="decoder blocks at the end the device runs (then the norm, "
                        "the LM head and the loss: U-shape, labels and logits never leave the device)")
    activations: ActivationFormat = Field("bfloat16", description="value format of the hidden states sent at a cut "
                                          "(int8: one fp32 scale per 64 values)")
    gradients: ActivationFormat = Field("bfloat16", description="value format of the gradients sent at a cut")
    zstd: bool = Field(True, description="zstd-compress activations and gradients")
    step_timeout_s: float = Field(60.0, gt=0, le=3600, description="how long a device waits for one answer of the "
                                  "split server before it sends the request again")
    step_retries: int = Field(3, ge=0, le=100, description="requests sent again after a time-out before the device "
                              "abandons the fit (the steps done so far are its update)")

    def codec(self, what: Literal["activations", "gradients"]) -> CodecSpec:
        return CodecSpec(values=getattr(self, what), zstd=self.zstd, auto_sparse=False)


class SplitTask(SplitSpec, ModePayload):
    """The ``split`` part of a fit or evaluate task."""

    mode: ClassVar[str] = "split"


class _SplitMessage(Message):
    max_msgpack_bytes: ClassVar[int] = 1 << 30

    device_id: str = Field(min_length=1, max_length=64)
    task_id: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0, lt=1 << 40)  # the local step (forward, backward) or eval batch (evaluate)
    phase: Phase
    correlation: bytes = Field(max_length=64)
    tensors: EncodedTensors | None = None

    @field_validator("device_id")
    @classmethod
    def _level(cls, v: str) -> str:
        try:
            return check_level(v, "device id")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None

    @property
    def key(self) -> tuple[str, int, str]:
        """What names the step: (task id, step, phase)."""
        return (self.task_id, self.step, self.phase)


class SplitRequest(_SplitMessage):
    """Device -> split server, on ``split/{device}/request`` (msgpack, framed, QoS 1).

    ``forward`` / ``evaluate``: ``tensors`` holds the hidden state at the head cut and ``mask``
    the attention mask (``[B, T]``, a little-endian bitmap of ``ceil(B*T/8)`` bytes).
    ``backward``: ``tensors`` holds the gradient of the loss at the tail cut (same shape as the
    hidden state the server sent back for this step); no mask."""

    attempt: int = Field(0, ge=0, le=1000)
    response_topic: str = Field(min_length=1, max_length=512)
    mask_shape: tuple[int, int] | None = None
    mask: bytes | None = None

    @model_validator(mode="after")
    def _mask(self) -> SplitRequest:
        if self.phase == "backward":
            if self.mask is not None or self.mask_shape is not None:
                raise ValueError("a backward request carries no mask")
        else:
            if self.mask is None or self.mask_shape is None:
                raise ValueError(f"a {self.phase} request needs mask and mask_shape")
            b, t = self.mask_shape
            if b < 1 or t < 1 or b * t > MAX_TOKENS:
                raise ValueError(f"mask_shape {list(self.mask_shape)} outside 1..{MAX_TOKENS} tokens")
            if len(self.mask) != (b * t + 7) // 8:
                need = (b * t + 7) // 8
                raise ValueError(f"mask is {len(self.mask)} bytes, shape {list(self.mask_shape)} needs {need}")
        if self.tensors is None:
            raise ValueError(f"a {self.phase} request needs tensors")
        return self

    def mask_array(self) -> np.ndarray:
        """The attention mask as int64 ``[B, T]`` (1: a token, 0: padding)."""
        assert self.mask is not None and self.mask_shape is not None
        b, t = self.mask_shape
        bits = np.unpackbits(np.frombuffer(self.mask, dtype=np.uint8), bitorder="little")[: b * t]
        return bits.astype(np.int64).reshape(b, t)


class SplitResponse(_SplitMessage):
    """Split server -> device, on ``split/{device}/response`` (msgpack, framed, QoS 1).

    ``ok``: ``tensors`` holds the hidden state at the tail cut (``forward``, ``evaluate``) or the
    gradient at the head cut (``backward``). Refused: ``reason`` says why; ``redo_forward`` is
    set when the server holds no forward state for the step (expired, or the server restarted):
    the device sends the step's forward again, then its backward."""

    ok: bool
    reason: str | None = Field(None, max_length=1000)
    redo_forward: bool = False
    server_s: float = Field(0.0, ge=0)  # the server's compute time for this answer
    queued_s: float = Field(0.0, ge=0)  # how long the request waited at the server (other devices' steps)
    server_step: int = Field(0, ge=0)  # server adapter steps applied so far (all devices)


def pack_mask(mask: np.ndarray) -> tuple[tuple[int, int], bytes]:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"attention mask must be [B, T], got shape {list(m.shape)}")
    if not np.isin(m, (0, 1)).all():
        raise ValueError("attention mask values must be 0 or 1")
    return (int(m.shape[0]), int(m.shape[1])), np.packbits(m.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def encode_hidden(array: np.ndarray, spec: CodecSpec) -> EncodedTensors:
    return encode({HIDDEN: np.ascontiguousarray(array, dtype=np.float32)}, spec)


def decode_hidden(tensors: EncodedTensors | None, *, expected: tuple[int, ...] | None, max_elements: int,
                  where: str) -> np.ndarray:
    """The one float32 tensor of ``tensors``, checked: dense, 3-D, ``expected`` shape if given, finite."""
    if tensors is None:
        raise ProtocolError(f"{where}: no tensors")
    decoded = tensors.decode(max_elements=max_elements, where=where,
                             expected=None if expected is None else {HIDDEN: tuple(expected)})
    if set(decoded) != {HIDDEN}:
        raise ProtocolError(f"{where}: expected one tensor {HIDDEN!r}, got {sorted(decoded)[:3]}")
    t = decoded[HIDDEN]
    if t.indices is not None:
        raise ProtocolError(f"{where}: activations must be dense")
    if len(t.shape) != 3:
        raise ProtocolError(f"{where}: expected a [B, T, H] tensor, got shape {list(t.shape)}")
    if expected is not None and tuple(t.shape) != tuple(expected):
        raise ProtocolError(f"{where}: shape {list(t.shape)}, expected {list(expected)}")
    arr = t.dense()
    if not np.isfinite(arr).all():
        raise ProtocolError(f"{where}: non-finite values")
    return arr


def request_topic(base: str, device_id: str) -> str:
    return f"{base}/split/{check_level(device_id, 'device id')}/request"


def response_topic(base: str, device_id: str) -> str:
    return f"{base}/split/{check_level(device_id, 'device id')}/response"


def requests_filter(base: str) -> str:
    return f"{base}/split/+/request"


def server_status_topic(base: str) -> str:
    return f"{base}/split-server/status"


def device_of_request_topic(base: str, topic: str) -> str:
    prefix, suffix = f"{base}/split/", "/request"
    if not (topic.startswith(prefix) and topic.endswith(suffix)):
        raise ProtocolError(f"topic {topic!r} is not a split request topic")
    return check_level(topic[len(prefix):-len(suffix)], f"device id in topic {topic!r}")


#: the payloads this mode puts in messages (fedmq_protocol.modes registry)
PAYLOADS: dict[str, type[ModePayload]] = {"task": SplitTask}
#: the coordinator config section of this mode (``split:``)
OPTIONS = SplitSpec
