"""Agent configuration (YAML), one file per device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.uplink import UplinkConfig
from fedmq_protocol.topics import check_level
from fedmq_protocol.transport.config import BrokerConfig


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    train: Path = Field(description="JSONL of local training examples")
    eval: Path | None = Field(None, description="JSONL of held-out examples for federated evaluation")
    template: str = Field(
        "auto",
        description="how an example becomes model input, for training and evaluation alike: auto (chat "
        "when the tokenizer has a chat template, else plain), chat (the model's chat template: the "
        "prompt is the user turn, the response the assistant turn; loss on the answer and the "
        "end-of-turn token), plain ('### Instruction:\\n{prompt}\\n### Response:\\n', the response "
        "after it, then eos), or a custom format string with {prompt} (the response follows it)")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        from edge_agent.data import check_template

        return check_template(v)

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


class TrainingOverrides(BaseModel):
    """Device-local limits applied on top of what the coordinator asks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: int | None = Field(None, ge=1, description="cap the round's batch size (memory)")
    max_seq_len: int | None = Field(None, ge=8)
    torch_threads: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    slowdown: float = Field(
        1.0, ge=1.0, le=100.0, description="make every training step take this many times as long (the agent "
        "waits after each step): a slower device, for benchmarks and tests of mixed fleets; 1: full speed")


class MemoryBudgetConfig(BaseModel):
    """``memory_budget``: what the agent may use; it plans training to fit (edge_agent.memory.planner)
    and stops a round whose measured peak goes over (edge_agent.memory.guard).

    YAML: a size (``2G``, ``2048`` MiB, ``80%`` of RAM) for host memory, or a map
    ``{host_mb: 2048, gpu_mb: 4096}`` (sizes accepted too: ``host: 2G``; ``ram``/``total`` are
    read as the host figure, as ``fedmq service install`` does for ``MemoryMax=``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host_mb: float | None = Field(None, gt=0, description="host RAM of the agent process (MiB)")
    gpu_mb: float | None = Field(None, gt=0, description="CUDA memory (MiB); used when training on CUDA")
    safety_margin: float = Field(0.05, ge=0, lt=0.5, description="share of the budget kept free of the estimate")
    allow_4bit: bool = Field(True, description="may fall back to a 4-bit NF4 base (qlora)")
    allow_zo: bool = Field(True, description="may fall back to zeroth-order training of the adapter")
    zo_lr: float = Field(1e-4, gt=0, lt=1, description="SGD step of the zeroth-order fallback")
    zo_eps: float = Field(1e-3, gt=0, lt=1, description="perturbation of the zeroth-order fallback")
    guard: bool = Field(True, description="measure every step and stop a round that goes over budget")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        from edge_agent.memory.budget import parse_size_mb

        if v is None:
            return {}
        if not isinstance(v, dict):
            return {"host_mb": parse_size_mb(v, what="memory_budget")}
        out = dict(v)
        for alias in ("host", "ram", "total", "max"):
            if alias in out:
                value = out.pop(alias)
                if out.get("host_mb") is None:
                    out["host_mb"] = parse_size_mb(value, what=f"memory_budget.{alias}")
        if "gpu" in out:
            value = out.pop("gpu")
            if out.get("gpu_mb") is None:
                out["gpu_mb"] = parse_size_mb(value, what="memory_budget.gpu")
        for key in ("host_mb", "gpu_mb"):
            if isinstance(out.get(key), str):
                out[key] = parse_size_mb(out[key], what=f"memory_budget.{key}")
        return out

    @model_validator(mode="after")
    def _some_limit(self) -> MemoryBudgetConfig:
        if self.host_mb is None and self.gpu_mb is None:
            raise ValueError("memory_budget needs host_mb and/or gpu_mb")
        return self

    def budget(self, device: str = "cpu") -> Any:
        """The planner's ``Budget``: the GPU figure counts only when training on CUDA; the safety
        margin is taken off both."""
        from edge_agent.memory.budget import Budget

        keep = 1.0 - self.safety_margin
        gpu = self.gpu_mb if device.startswith("cuda") else None
        return Budget(host_mb=None if self.host_mb is None else self.host_mb * keep,
                      gpu_mb=None if gpu is None else gpu * keep)

    def limit(self, device: str = "cpu") -> Any:
        """The guard's ``Budget``: the configured figures themselves (no margin)."""
        from edge_agent.memory.budget import Budget

        return Budget(host_mb=self.host_mb, gpu_mb=self.gpu_mb if device.startswith("cuda") else None)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    federation: str = "default"
    topic_root: str = "fedmq"
    broker: BrokerConfig = BrokerConfig()
    model: str = Field(description="model name (smollm2-135m, tiny-llama), HF directory, .gguf file or hub id")
    method: str = Field("lora", description="training method (edge_agent.methods: lora, qlora, zo, krso); "
                        "zo: the coordinator's zo section picks the target; krso: FedKRSO")
    mode: str = Field("adapter", description="federation mode (fedmq_protocol.modes); by default the mode "
                      "named like the method (method zo: mode zo), else adapter")
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    state_dir: Path = Path("fedmq-state/agent")
    model_cache: Path | None = Field(None, description="where fetched models are cached (default $FEDMQ_HOME)")
    training: TrainingOverrides = TrainingOverrides()
    telemetry_interval_s: float = Field(10.0, gt=0)
    global_wait_s: float = Field(120.0, gt=0, description="how long a task waits for its global to arrive")
    uplink: UplinkConfig = UplinkConfig()
    uplink_budget_bytes: int | None = Field(
        None, ge=512, description="every fit update (msgpack Update payload) fits in this many bytes")
    memory_budget: MemoryBudgetConfig | None = Field(
        None, description="plan training to fit this memory and guard every step (host_mb, gpu_mb)")
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, `fedmq keys generate`) signing every update and status")
    status_interval_s: float = Field(
        30.0, gt=0, le=3600, description="the retained status is published again at least this often "
        "(the coordinator ages out a status not refreshed within its status_max_age_s)")
    coordinator_public_key: str | None = Field(
        None, description="the coordinator's Ed25519 public key (a file, PEM or base64 of the raw 32 bytes, "
        "or the base64 itself): tasks, globals and retained mode messages must carry its signature")
    require_coordinator_signatures: bool | None = Field(
        None, description="refuse coordinator messages not signed with coordinator_public_key "
        "(default: on when the key is set)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from edge_agent.methods import is_method, method_names

        if not is_method(v):
            raise ValueError(f"unknown training method {v!r}; valid: {', '.join(method_names())}")
        return v

    @field_validator("signing_key")
    @classmethod
    def _key_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            from fedmq_protocol.signing import Signer, SigningKeyError

            try:
                Signer.from_file(v)
            except SigningKeyError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("coordinator_public_key")
    @classmethod
    def _public_key_loads(cls, v: str | None) -> str | None:
        if v is not None:
            from fedmq_protocol.signing import SigningKeyError, load_public_key

            try:
                load_public_key(v)
            except SigningKeyError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _signatures_need_key(self) -> AgentConfig:
        if self.require_coordinator_signatures and self.coordinator_public_key is None:
            raise ValueError("require_coordinator_signatures needs coordinator_public_key")
        return self

    @property
    def coordinator_signatures_required(self) -> bool:
        if self.require_coordinator_signatures is None:
            return self.coordinator_public_key is not None
        return self.require_coordinator_signatures

    @model_validator(mode="before")
    @classmethod
    def _mode_of_method(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("mode") is None:
            from edge_agent.modes import default_mode

            v = {**v, "mode": default_mode(str(v.get("method") or "lora"))}
        return v

    @model_validator(mode="after")
    def _mode_trains_method(self) -> AgentConfig:
        from edge_agent.modes import mode_class

        methods = mode_class(self.mode).methods  # ValueError naming the valid modes
        if self.method not in methods:
            raise ValueError(f"mode {self.mode} trains with method {' or '.join(methods)}, not {self.method!r}")
        return self

    @model_validator(mode="after")
    def _levels(self) -> AgentConfig:
        check_level(self.device_id, "device_id")
        check_level(self.federation, "federation")
        check_level(self.topic_root, "topic_root")
        return self
