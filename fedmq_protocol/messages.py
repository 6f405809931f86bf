"""Protocol messages.

Two encodings, chosen per topic (docs/protocol.md):
- JSON for what operators read (status, telemetry, round metrics): ``to_json`` / ``from_json``.
- msgpack for what machines exchange (tasks, updates, global adapters): ``to_msgpack`` /
  ``from_msgpack``. Every message carries ``schema`` so decoders can refuse what they do not know.

All models are frozen and reject unknown fields, so a malformed payload fails in one place with
an error that names the field.
"""

from __future__ import annotations

import numbers
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from fedmq_protocol.codec import EncodedTensors
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes import MessageKind, ModePayload, payload_modes, payload_type
from fedmq_protocol.wire import DEFAULT_MAX_MESSAGE_BYTES, Message, unpack_limited, validation_summary

P = TypeVar("P", bound=ModePayload)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Message", "unpack_limited", "validation_summary"]  # re-exported

# ---------------------------------------------------------------------------------------------
# Shared parts
# ---------------------------------------------------------------------------------------------


class AdapterSpec(BaseModel):
    """The LoRA adapter every device of a federation trains (must match for aggregation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # FFA-LoRA (Sun et al., 2024): lora_A stays at its shared seeded init and only lora_B trains.
    # A's difference is then exactly zero and costs no uplink bytes, and averaging B is exact
    # FedAvg of the adapters' products (both factors' averages no longer mix).
    freeze_a: bool = False


class FitConfig(BaseModel):
    """Local training hyper-parameters of one round (the agent may lower batch size to fit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    local_steps: int = Field(10, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0, lt=10)
    batch_size: int = Field(4, ge=1, le=4096)
    max_seq_len: int = Field(128, ge=8, le=131072)
    seed: int = Field(0, ge=0, lt=2**63)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_batches: int = Field(0, ge=0, le=100000)  # 0: the whole eval set


# ---------------------------------------------------------------------------------------------
# JSON messages
# ---------------------------------------------------------------------------------------------


class GpuInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    total_mb: float
    free_mb: float


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cpu_count: int
    cpu_percent: float
    ram_total_mb: float
    ram_available_mb: float
    process_rss_mb: float
    gpus: tuple[GpuInfo, ...] = ()


class MemoryPlan(BaseModel):
    """The training plan a device chose for its memory budget (edge_agent.memory_plan.Plan)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str  # lora | qlora | zo | krso | split
    base: str  # float32 | bfloat16 | nf4
    zo_target: str | None = None  # zo: full | lora
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    gradient_checkpointing: bool = False
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    device: str = "cpu"
    estimate_host_mb: float | None = None
    estimate_gpu_mb: float | None = None


class OverBudgetReport(BaseModel):
    """A round the device stopped because a step went over its memory budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: str
    round: int
    step: int
    peak_host_mb: float | None = None
    peak_gpu_mb: float | None = None
    budget_host_mb: float | None = None
    budget_gpu_mb: float | None = None
    predicted: bool = False  # the step was not started: its predicted peak was over
    ts: float = Field(default_factory=time.time)


class DeviceMemory(BaseModel):
    """Memory budget, plan and measured peaks of a device (in its status and telemetry, MiB)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    budget_host_mb: float | None = None
    budget_gpu_mb: float | None = None
    plan: MemoryPlan | None = None
    refused: str | None = None  # no plan fits: why, and the smallest budget that would
    min_host_mb: float | None = None
    min_gpu_mb: float | None = None
    over_budget: OverBudgetReport | None = None  # the last round stopped over budget
    peak_host_mb: float | None = None  # measured: highest step peak of the last fit
    peak_gpu_mb: float | None = None
    step_peak_host_mb: float | None = None  # measured: the last step
    step_peak_gpu_mb: float | None = None
    load_peak_host_mb: float | None = None  # measured: loading the model


class DeviceStatus(Message):
    """Retained birth (``online`` true) and Last-Will death (``online`` false) of a device.

    Statuses are totally ordered by ``order``: ``seq`` (one per agent process), ``conn`` (one
    per connection of that process, the Will's mark), then births before the death of their
    connection, then ``counter`` (one per status message). A status not later than the latest
    one accepted is a replay, a QoS 1 redelivery or a stale Will, and is ignored. ``will``: this
    is the Last Will, set at connect time (its ``ts`` is then; the receiver dates it by arrival).
    """

    device_id: str
    online: bool
    seq: int = Field(ge=0, lt=1 << 53)
    conn: int = Field(0, ge=0, lt=1 << 53)
    counter: int = Field(0, ge=0, lt=1 << 53)
    will: bool = False
    ts: float = Field(default_factory=time.time)
    method: str | None = None
    model: str | None = None
    num_samples: int | None = Field(default=None, ge=0)
    eval_samples: int | None = Field(default=None, ge=0)
    resources: Resources | None = None
    state: str | None = None  # idle | training | evaluating | loading
    applied_version: int | None = None
    agent_version: str | None = None
    memory: DeviceMemory | None = None  # budget, chosen plan, refusal / over-budget report
    # the prompt template (agent config data.template): chat | plain | custom once the model is
    # loaded, auto before (JSON status only)
    template: str | None = None
    # SHA-256 (hex) of the model's tokenizer (vocabulary and special ids), once the model is resolved,
    # from devices of modes that need one tokenizer across models (kd)
    tokenizer: str | None = Field(None, min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")
    # Ed25519 signature by the device's key (base64; fedmq_protocol.signing.sign_status)
    signature: str | None = Field(None, max_length=128)

    @property
    def order(self) -> tuple[int, int, int, int]:
        """Position in the device's total order of statuses (see the class docstring)."""
        return (self.seq, self.conn, 0 if self.online else 1, self.counter)


class CoordinatorStatus(Message):
    online: bool
    seq: int = Field(ge=0)
    ts: float = Field(default_factory=time.time)
    state: str | None = None  # waiting | training | evaluating | finished
    round: int | None = None
    global_version: int | None = None
    rounds_total: int | None = None
    # input refused so far (counters since start: updates_rejected, signature_rejected, ...)
    counters: dict[str, int] | None = None
    last_rejection: str | None = None


class Telemetry(Message):
    """Periodic device telemetry (JSON, QoS 0). Units are in the field names."""

    device_id: str
    ts: float = Field(default_factory=time.time)
    state: str
    round: int | None = None
    step: int | None = None
    steps_total: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    applied_version: int | None = None
    method: str | None = None
    resources: Resources | None = None
    # encoding of the last fit update: density, value bits, bytes, budget (edge_agent.uplink)
    uplink: dict[str, float] = Field(default_factory=dict)
    memory: DeviceMemory | None = None  # budget, plan, measured peaks (MiB)
    # payloads this agent refused since start, by kind (task, global, ledger)
    rejected: dict[str, int] = Field(default_factory=dict)


class RoundSummary(Message):
    """Metrics of one completed round (JSON, retained on the rounds topic)."""

    round: int = Field(ge=0)
    global_version: int = Field(ge=0)
    participants: tuple[str, ...] = ()
    selected: tuple[str, ...] = ()
    stragglers: tuple[str, ...] = ()
    num_samples: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_devices: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    # per device: result payloads received from it / task payloads + globals sent to it
    uplink_bytes_by_device: dict[str, int] = Field(default_factory=dict)
    downlink_bytes_by_device: dict[str, int] = Field(default_factory=dict)
    duration_s: float = 0.0
    # duration_s in two parts: training (select, fan-out, collect, aggregate, publish) and evaluation
    # (absent from summaries written before they were reported apart)
    fit_s: float | None = None
    eval_s: float | None = None
    aggregate_s: float = 0.0
    # protocol-time breakdown in seconds (encode, transfer, decode, aggregate, publish, apply)
    timings: dict[str, float] = Field(default_factory=dict)
    ts: float = Field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------
# msgpack messages
# ---------------------------------------------------------------------------------------------

TaskKind = Literal["fit", "evaluate", "init"]

#: protocol v1 wrote Task and Update with a ``zo`` key, nil when the message had no mode payload;
#: they still do, so their bytes are unchanged (tests/test_wire_golden.py)
V1_EMPTY_SLOT = "zo"


class _CarriesModePayload(Message):
    """A message with one slot for a federation mode's payload (``payload``).

    On the wire the slot's key is the mode's name (``zo: {...}``): an externally tagged union,
    validated by the class the mode registered for this message kind (fedmq_protocol.modes), as
    strictly as every other field. ``empty_slot`` is the key written when there is no payload
    (None: the key is left out).
    """

    message_kind: ClassVar[MessageKind]
    empty_slot: ClassVar[str | None] = None
    # each message declares ``payload`` itself, at the place of the slot in its wire map
    if TYPE_CHECKING:
        payload: ModePayload | None

    @model_validator(mode="before")
    @classmethod
    def _untag_payload(cls, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        tags = [k for k in obj if k in payload_modes(cls.message_kind) or k == cls.empty_slot]
        if not tags:
            return obj
        if "payload" in obj or len(tags) > 1:
            found = sorted(tags) + (["payload"] if "payload" in obj else [])
            raise ValueError(f"a {cls.__name__} carries at most one mode payload, got {found}")
        out = {k: v for k, v in obj.items() if k != tags[0]}
        value = obj[tags[0]]
        if value is None:
            return out
        payload_cls = payload_type(cls.message_kind, tags[0])
        if payload_cls is None:
            raise ValueError(f"{tags[0]}: mode {tags[0]!r} carries no payload in a {cls.__name__}")
        out["payload"] = value if isinstance(value, payload_cls) else payload_cls.model_validate(value)
        return out

    @field_validator("payload", check_fields=False)
    @classmethod
    def _registered_payload(cls, v: ModePayload | None) -> ModePayload | None:
        if v is not None and payload_type(cls.message_kind, v.mode) is not type(v):
            raise ValueError(f"{type(v).__name__} is not the {cls.message_kind} payload of a registered mode")
        return v

    @model_serializer(mode="wrap")
    def _tag_payload(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in handler(self).items():
            if k != "payload":
                out[k] = v
            elif self.payload is not None:
                out[self.payload.mode] = v
            elif self.empty_slot is not None:
                out[self.empty_slot] = None
        return out

    @property
    def mode(self) -> str | None:
        """The mode whose payload this message carries (None: none)."""
        return None if self.payload is None else self.payload.mode

    def payload_as(self, cls: type[P], what: str = "message") -> P:
        """The payload, which must be a ``cls``; ProtocolError naming what is there otherwise."""
        if not isinstance(self.payload, cls):
            got = "none" if self.payload is None else f"a {self.payload.mode} payload"
            raise ProtocolError(f"{what} carries {got}; this federation runs mode {cls.mode}")
        return self.payload


class Task(_CarriesModePayload):
    """Coordinator -> one device: train (fit), evaluate the global, or send the initial adapter.
    ``payload``: the federation mode's part (e.g. zo: the seed spec), on the wire under its name."""

    message_kind: ClassVar[MessageKind] = "task"
    empty_slot: ClassVar[str | None] = V1_EMPTY_SLOT

    kind: TaskKind
    task_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    device_id: str
    global_version: int = Field(ge=-1)  # -1: no global yet (init task)
    deadline_s: float = Field(gt=0)
    adapter: AdapterSpec
    fit: FitConfig = FitConfig()
    model: str | None = None  # the federation's model name, for a device-side sanity check
    payload: SerializeAsAny[ModePayload] | None = None  # the mode's part (v1 wire: key "zo")
    # per fan-out random bytes; a signed update echoes them (fedmq_protocol.signing)
    nonce: bytes | None = Field(default=None, max_length=64)


class Update(_CarriesModePayload):
    """Device -> coordinator: the result of a task.

    ``fit``: ``tensors`` holds local adapter minus the global at ``base_version`` (plus the
    device's error-feedback residual), encoded by ``fedmq_protocol.codec`` (maybe sparse/quantized).
    ``init``: ``tensors`` holds the device's freshly initialised adapter (lossless).
    ``evaluate``: no tensors; ``metrics['eval_loss']``.
    ``payload``: the mode's part of a fit result (e.g. zo: seeds drawn and their g).
    """

    message_kind: ClassVar[MessageKind] = "update"
    empty_slot: ClassVar[str | None] = V1_EMPTY_SLOT

    kind: TaskKind
    task_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    device_id: str
    base_version: int = Field(ge=-1)
    num_samples: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    tensors: EncodedTensors = EncodedTensors({"codec": 1, "tensors": {}})
    payload: SerializeAsAny[ModePayload] | None = None  # the mode's part (v1 wire: key "zo")
    # end-to-end identity (fedmq_protocol.signing): the task's nonce and an Ed25519 signature
    nonce: bytes | None = Field(default=None, max_length=64)
    signature: bytes | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _wire_types(cls, obj: Any) -> Any:
        """No coercion of what identifies or weighs an update: ints are ints (not "10", 1.0 or
        true), ids are strings, metrics are numbers."""
        if isinstance(obj, dict):
            for k in ("schema", "round", "base_version", "num_samples"):
                v = obj.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                    raise ValueError(f"{k} must be an integer, got {type(v).__name__}")
            for k in ("task_id", "device_id", "kind"):
                if k in obj and not isinstance(obj[k], str):
                    raise ValueError(f"{k} must be a string, got {type(obj[k]).__name__}")
            metrics = obj.get("metrics")
            if isinstance(metrics, dict) and not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in metrics.values()):
                raise ValueError("metrics values must be numbers")
        return obj


class GlobalModel(_CarriesModePayload):
    """Coordinator -> all: the global adapter at ``version``.

    ``base_version`` None: a snapshot, ``tensors`` holds the whole adapter (dense fp32, exact).
    Otherwise a difference: adding the decoded ``tensors`` to version ``base_version`` (in float32,
    ``edge_agent``/``broker_coordinator`` use ``fedmq_protocol.globals.apply_diff``) gives
    ``version``; it must never be applied to any other base. ``payload``: a mode's part of the
    global, if it has one (none of today's modes: the key is absent when there is none).
    """

    message_kind: ClassVar[MessageKind] = "global"

    version: int = Field(ge=0)
    round: int = Field(ge=0)
    adapter: AdapterSpec
    model: str | None = None
    base_version: int | None = Field(default=None, ge=0)
    tensors: EncodedTensors
    created_at: float = Field(default_factory=time.time)
    payload: SerializeAsAny[ModePayload] | None = None

    @model_validator(mode="after")
    def _base_before_version(self) -> GlobalModel:
        if self.base_version is not None and self.base_version >= self.version:
            raise ValueError(f"difference v{self.version} cannot have base v{self.base_version}")
        return self

    @property
    def is_snapshot(self) -> bool:
        return self.base_version is None
