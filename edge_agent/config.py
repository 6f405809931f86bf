"""Agent configuration (YAML), one file per device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.uplink import UplinkConfig
from fedmq_protocol.topics import check_level
from fedmq_protocol.transport.config import BrokerConfig


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    train: Path = Field(description="JSONL of local training examples")
    eval: Path | None = Field(None, description="JSONL of held-out examples for federated evaluation")

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


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    federation: str = "default"
    topic_root: str = "fedmq"
    broker: BrokerConfig = BrokerConfig()
    model: str = Field(description="model name (smollm2-135m, tiny-llama), HF directory, .gguf file or hub id")
    method: Literal["lora", "qlora", "zo"] = "lora"  # zo: the coordinator's zo section picks the target
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
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, `fedmq keys generate`) signing every update")

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

    @model_validator(mode="after")
    def _levels(self) -> "AgentConfig":
        check_level(self.device_id, "device_id")
        check_level(self.federation, "federation")
        check_level(self.topic_root, "topic_root")
        return self
