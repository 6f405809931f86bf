"""Adapter averaging: devices train a shared LoRA adapter and send their differences.

The global is the adapter's tensors. Updates are validated against the copy devices hold
(``ServerModel.published``), combined by FedAvg or a robust rule (clipping, trimmed mean, median),
stepped by the server optimizer (FedAvg/FedAvgM/FedAdam) and published as a difference from the
previous version, or as a snapshot every ``downlink.snapshot_every`` versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from broker_coordinator.downlink import ServerModel
from broker_coordinator.modes import CoordinatorMode, RoundOutcome
from broker_coordinator.strategy import FedAvg, adapter_plan_accepted, validate_update_tensors
from fedmq_protocol.messages import GlobalModel, Update

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord


class AdapterMode(CoordinatorMode):
    name = "adapter"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        self.rule = FedAvg(aggregation=config.aggregation)
        self.server: ServerModel | None = None

    def restore(self, state: CoordinatorState) -> None:
        gm = state.global_model
        if gm is None:
            self.server = None
            return
        if not gm.is_snapshot:
            raise ValueError(f"persisted global v{gm.version} is a difference, not a snapshot")
        published = gm.tensors.decode_dense(max_elements=self.cfg.broker.max_message_bytes)
        self.server = ServerModel.from_blob(state.mode_state, published, self.cfg.downlink, self.cfg.server_optimizer)

    def state_blob(self) -> Any:
        return None if self.server is None else self.server.to_blob()

    def accepts(self, device: DeviceRecord) -> bool:
        return adapter_plan_accepted(device)

    def initial_global(self) -> GlobalModel | None:
        return None  # the adapter a device initialises (same seeded init on every device)

    def adopt_initial(self, arrays: dict[str, Any]) -> GlobalModel:
        self.server = ServerModel(arrays, self.cfg.downlink, self.cfg.server_optimizer)
        return self.server.snapshot(0, 0, self.cfg.adapter, self.cfg.model)

    @property
    def published(self) -> dict[str, np.ndarray]:
        """The global as devices hold it: what their differences are relative to."""
        if self.server is None:
            raise RuntimeError("no global adapter yet")
        return self.server.published

    def validate_update(self, update: Update) -> Any:
        return validate_update_tensors(self.published, update)

    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        server = self.server
        assert server is not None
        server.step(self.rule.aggregate_deltas(server.published, updates, contributions))
        message = server.advance(version, round_no, self.cfg.adapter, self.cfg.model)
        snapshot = server.snapshot(version, round_no, self.cfg.adapter, self.cfg.model)
        return RoundOutcome(message=message, snapshot=snapshot)


MODE = AdapterMode
