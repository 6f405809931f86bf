"""Coordinator configuration (YAML).

The federation mode is ``mode:``, or the one whose section is present: a mode whose payload module
defines ``OPTIONS`` (a pydantic model) gets a top-level section of its name (``zo:`` for FedKSeed),
validated like every other key.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from broker_coordinator.downlink import DownlinkConfig, ServerOptimizerConfig
from broker_coordinator.robust import AggregationConfig
from broker_coordinator.staleness import AsynchronousConfig, asynchronous_problem
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.modes import DEFAULT_MODE, MODES, check_mode
from fedmq_protocol.topics import check_level
from fedmq_protocol.transport.config import BrokerConfig


def mode_options_types() -> dict[str, type[BaseModel]]:
    """mode name -> the model of its config section (modes without options have none)."""
    out: dict[str, type[BaseModel]] = {}
    for name, module in MODES.items():
        options = getattr(importlib.import_module(module), "OPTIONS", None) if module else None
        if options is not None:
            out[name] = options
    return out


class CoordinatorConfigBase(BaseModel):
    """The coordinator YAML; ``CoordinatorConfig`` adds a section per mode with options."""

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
    eval_devices: list[str] | None = Field(
        None, description="evaluate on these devices only (those of them ready with eval data); "
        "null: every device with eval data")
    eval_max_devices: int | None = Field(
        None, ge=1, description="evaluate on at most this many devices (the first by device id); null: no limit")
    eval_deadline_s: float = Field(300, gt=0)
    wait_for_devices_s: float = Field(600, gt=0)
    selection_seed: int = 0
    downlink: DownlinkConfig = DownlinkConfig()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    mode: str | None = Field(
        None,
        description="federation mode (fedmq_protocol.modes); default: the mode whose section is set, else adapter",
    )
    aggregation: AggregationConfig = AggregationConfig()
    asynchronous: AsynchronousConfig = Field(
        AsynchronousConfig(), description="FedBuff rounds: devices train continuously, a new global every "
        "buffer_size accepted updates, each weighted by its staleness (broker_coordinator.staleness)")
    device_keys: dict[str, str] = Field(
        default_factory=dict,
        description="device_id -> Ed25519 public key: a file (PEM or base64 of the raw 32 bytes) or the base64 itself")
    require_signatures: bool | None = Field(
        None, description="refuse updates and statuses not signed by their device's key "
        "(default: on when device_keys is set)")
    aggregator_keys: dict[str, str] = Field(
        default_factory=dict,
        description="site_id -> Ed25519 public key of that site's aggregator (`fedmq aggregator`): a file or the "
        "base64 itself; partial aggregates are taken only from these sites, signed with these keys")
    coordinator_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, `fedmq keys generate`) signing every task, global, "
        "difference and retained mode message; agents check it with coordinator_public_key")
    status_max_age_s: float | None = Field(
        120, gt=0, description="a device whose status has not been refreshed for this long is not ready "
        "(agents refresh theirs every status_interval_s); null: statuses never age")
    retained_guard_s: float = Field(
        5.0, gt=0, description="a forged copy of one of the coordinator's retained messages is replaced "
        "by the real one at most this often per topic")

    @model_validator(mode="after")
    def _check(self) -> CoordinatorConfig:
        check_level(self.federation, "federation")
        check_level(self.topic_root, "topic_root")
        check_level(self.coordinator_id, "coordinator_id")
        if self.quorum is not None and self.quorum > self.min_clients:
            raise ValueError(f"quorum ({self.quorum}) cannot exceed min_clients ({self.min_clients})")
        sections = [name for name in mode_options_types() if getattr(self, name, None) is not None]
        if len(sections) > 1:
            raise ValueError(f"sections {', '.join(sections)} name different federation modes; keep one")
        if self.mode is not None:
            check_mode(self.mode)
            if sections and sections[0] != self.mode:
                raise ValueError(f"mode is {self.mode!r} but the config has a {sections[0]!r} section")
        elif sections:
            object.__setattr__(self, "mode", sections[0])
        else:
            object.__setattr__(self, "mode", DEFAULT_MODE)
        if self.mode != "adapter" and not self.aggregation.is_plain:
            raise ValueError(
                f"aggregation: robust rules and clipping apply to adapter updates, not to {self.mode} federations")
        robust = not (self.aggregation.rule == "fedavg" and self.aggregation.clip_median_factor is None)
        problem = asynchronous_problem(self.asynchronous, str(self.mode), robust)
        if problem is not None:
            raise ValueError(problem)
        if self.eval_devices is not None:
            if not self.eval_devices:
                raise ValueError("eval_devices is empty: list device ids, or set evaluate: false")
            for device_id in self.eval_devices:
                check_level(device_id, f"eval_devices[{device_id!r}]")
        from fedmq_protocol.signing import check_public_keys

        check_public_keys(self.device_keys, "device_keys")
        check_public_keys(self.aggregator_keys, "aggregator_keys")
        if self.aggregator_keys and self.mode != "adapter":
            raise ValueError(f"aggregator_keys: site aggregators combine adapter updates, not {self.mode} ones")
        if self.aggregator_keys and self.aggregation.nonlinear_reason:
            raise ValueError(f"aggregator_keys: sites cannot pre-aggregate this aggregation "
                             f"({self.aggregation.nonlinear_reason}); use fedavg, with or without a fixed clip_norm")
        if self.coordinator_key is not None:
            from fedmq_protocol.signing import Signer, SigningKeyError

            try:
                Signer.from_file(self.coordinator_key)
            except SigningKeyError as exc:
                raise ValueError(f"coordinator_key: {exc}") from None
        if self.require_signatures and not self.device_keys:
            raise ValueError("require_signatures needs device_keys (device_id: public key)")
        return self

    @property
    def mode_options(self) -> BaseModel | None:
        """The validated section of the federation's mode (None: the mode has no options)."""
        options: BaseModel | None = getattr(self, str(self.mode), None)
        return options

    @property
    def signatures_required(self) -> bool:
        return bool(self.device_keys) if self.require_signatures is None else self.require_signatures

    @property
    def effective_quorum(self) -> int:
        return self.quorum or self.min_clients

    @property
    def async_versions(self) -> int:
        """Global versions an asynchronous run publishes (``asynchronous.versions``, else ``rounds``)."""
        return self.asynchronous.versions or self.rounds

    @property
    def async_task_timeout_s(self) -> float:
        return self.asynchronous.task_timeout_s or self.round_deadline_s


def _with_mode_sections() -> type[CoordinatorConfigBase]:
    fields: dict[str, Any] = {
        name: (options | None, Field(None, description=f"options of the {name} federation mode (sets mode: {name})"))
        for name, options in mode_options_types().items()
    }
    model: type[CoordinatorConfigBase] = create_model(
        "CoordinatorConfig", __base__=CoordinatorConfigBase, __module__=__name__, **fields)
    return model


if TYPE_CHECKING:
    CoordinatorConfig = CoordinatorConfigBase
else:
    CoordinatorConfig = _with_mode_sections()
