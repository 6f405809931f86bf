"""Coordinator configuration (YAML)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker_coordinator.downlink import DownlinkConfig, ServerOptimizerConfig
from broker_coordinator.robust import AggregationConfig
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.topics import check_level
from fedmq_protocol.transport.config import BrokerConfig
from fedmq_protocol.modes.zo import ZoSpec


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = "default"
    topic_root: str = "fedmq"
    coordinator_id: str = "coordinator"
    broker: BrokerConfig = BrokerConfig()
    state_dir: Path = Path("fedmq-state/coordinator")
    model: str | None = Field(None, description="model name the devices train (sanity check only)")
    adapter: AdapterSpec = AdapterSpec()
    fit: FitConfig = FitConfig()

    rounds: int = Field(10, ge=1)
    min_clients: int = Field(2, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    max_clients: int | None = Field(None, ge=1)
    quorum: int | None = Field(None, ge=1, description="updates needed to close a round at its deadline")
    round_deadline_s: float = Field(600, gt=0)
    round_retries: int = Field(3, ge=0)
    offline_grace_s: float = Field(
        15, ge=0, description="a selected device that went offline (Last Will) is still awaited this long: "
        "a broker restart publishes every Will, and the device is back within seconds")
    evaluate: bool = True
    eval_deadline_s: float = Field(300, gt=0)
    wait_for_devices_s: float = Field(600, gt=0)
    selection_seed: int = 0
    downlink: DownlinkConfig = DownlinkConfig()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    zo: ZoSpec | None = Field(None, description="zeroth-order federation (FedKSeed): devices train with method zo")
    aggregation: AggregationConfig = AggregationConfig()
    device_keys: dict[str, str] = Field(
        default_factory=dict,
        description="device_id -> Ed25519 public key: a file (PEM or base64 of the raw 32 bytes) or the base64 itself")
    require_signatures: bool | None = Field(
        None, description="refuse updates not signed by their device's key (default: on when device_keys is set)")

    @model_validator(mode="after")
    def _check(self) -> "CoordinatorConfig":
        check_level(self.federation, "federation")
        check_level(self.topic_root, "topic_root")
        check_level(self.coordinator_id, "coordinator_id")
        if self.quorum is not None and self.quorum > self.min_clients:
            raise ValueError(f"quorum ({self.quorum}) cannot exceed min_clients ({self.min_clients})")
        if self.zo is not None and not self.aggregation.is_plain:
            raise ValueError("aggregation: robust rules and clipping apply to adapter updates, not to zo federations")
        for device_id, key in self.device_keys.items():
            check_level(device_id, f"device_keys[{device_id!r}]")
            from fedmq_protocol.signing import SigningKeyError, load_public_key

            try:
                load_public_key(key)
            except SigningKeyError as exc:
                raise ValueError(f"device_keys.{device_id}: {exc}") from None
        if self.require_signatures and not self.device_keys:
            raise ValueError("require_signatures needs device_keys (device_id: public key)")
        return self

    @property
    def signatures_required(self) -> bool:
        return bool(self.device_keys) if self.require_signatures is None else self.require_signatures

    @property
    def effective_quorum(self) -> int:
        return self.quorum or self.min_clients
