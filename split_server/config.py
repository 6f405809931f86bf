"""The split server's YAML (pydantic v2, frozen, unknown keys refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmq_protocol.messages import AdapterSpec
from fedmq_protocol.modes.split import SplitSpec
from fedmq_protocol.topics import check_level
from fedmq_protocol.transport.config import BrokerConfig


class SplitServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field("default", description="federation name (the topic level after topic_root)")
    topic_root: str = Field("fedmq", description="first topic level")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="the MQTT broker")
    model: str = Field(description="the devices' base model: a name (smollm2-135m, tiny-llama), an HF directory")
    model_cache: Path | None = Field(None, description="where fetched models are cached (default $FEDMQ_HOME)")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec,
                                 description="the LoRA on the middle blocks (the coordinator's adapter: section)")
    split: SplitSpec = Field(default_factory=SplitSpec, description="the cut (the coordinator's split: section; "
                             "tasks naming another cut are refused)")
    state_dir: Path = Field(Path("./split-server-state"), description="where the server adapter is persisted")
    device: str = Field("cpu", description="torch device of the middle blocks (cpu, cuda, auto)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the middle blocks")
    seed: int = Field(0, ge=0, description="LoRA init seed (devices initialise with 0)")
    lr: float | None = Field(None, gt=0, lt=10, description="server adapter learning rate (default: the task's fit.lr)")
    pending_ttl_s: float = Field(300.0, gt=0, description="how long the forward state of a step waits for its "
                                 "backward before it expires")
    max_pending: int = Field(256, ge=1, description="forward states held at most (oldest dropped first)")
    persist_every: int = Field(1, ge=1, description="persist the adapter every N applied steps (and on exit)")
    status_interval_s: float = Field(5.0, gt=0, description="how often counters go to the retained status topic")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    log_level: str = Field("INFO", description="logging level")
    coordinator_public_key: str | None = Field(
        None, description="the coordinator's Ed25519 public key (a file, PEM or base64 of the raw 32 bytes, "
        "or the base64 itself): the tasks that name who is in a round must carry its signature")

    @field_validator("coordinator_public_key")
    @classmethod
    def _public_key_loads(cls, v: str | None) -> str | None:
        if v is not None:
            from fedmq_protocol.signing import load_public_key

            load_public_key(v)  # its SigningKeyError is a ValueError: reported as this field's error
        return v

    @field_validator("federation", "topic_root")
    @classmethod
    def _level(cls, v: str) -> str:
        try:
            return check_level(v, "topic level")
        except Exception as exc:  # noqa: BLE001 - reported as the field's error
            raise ValueError(str(exc)) from None
