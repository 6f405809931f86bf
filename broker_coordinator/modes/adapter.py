"""Adapter averaging: devices train a shared LoRA adapter and send their differences.

The global is the adapter's tensors. Updates are validated against the copy devices hold
(``ServerModel.published``), combined by FedAvg or a robust rule (clipping, trimmed mean, median),
stepped by the server optimizer (FedAvg/FedAvgM/FedAdam) and published as a difference from the
previous version, or as a snapshot every ``downlink.snapshot_every`` versions.

Aggregation streams for the linear rules (FedAvg with or without a fixed ``clip_norm``, whatever
the server optimizer): each accepted update is added into a float64 running sum and its decoded
and encoded tensors are dropped, so a round holds O(model) + O(devices). Trimmed mean, median and
``clip_median_factor`` are not linear: the round keeps every update's decoded tensors until it
aggregates (O(devices x model)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from broker_coordinator.downlink import ServerModel
from broker_coordinator.modes import CoordinatorMode, RoundOutcome
from broker_coordinator.strategy import FedAvg, RunningMean, adapter_plan_accepted, validate_update_tensors
from fedmq_protocol.codec import EncodedTensors
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import GlobalModel, Update

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord
    from fedmq_protocol.partials import PartialAggregate


EMPTY_TENSORS = EncodedTensors({"codec": 1, "tensors": {}})


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

    def fold(self, running: Any, update: Update, contribution: Any) -> tuple[Any, Update, Any]:
        if not self.rule.streams:
            return running, update, contribution  # robust rules keep the round's decoded updates
        if running is None:
            running = RunningMean(self.published)
        self.rule.fold_delta(running, update, contribution)
        # the journal keeps the payload as received; the round keeps the update's metadata only
        return running, update.model_copy(update={"tensors": EMPTY_TENSORS}), None

    def fold_weighted(self, running: Any, update: Update, contribution: Any,
                      weight: float) -> tuple[Any, Update, Any]:
        if running is None:
            running = RunningMean(self.published)
        self.rule.fold_delta(running, update, contribution, weight)
        return running, update.model_copy(update={"tensors": EMPTY_TENSORS}), None

    def fold_partial(self, running: Any, partial: PartialAggregate) -> Any:
        """A site's float64 sum of its devices' (clipped) weighted differences, added as they are."""
        if not self.rule.streams:
            raise ProtocolError("partial aggregates need a linear rule (fedavg, with or without a fixed "
                                "clip_norm); this coordinator aggregates with a robust rule")
        agg = self.rule.aggregation
        clip = agg.clip_norm if agg is not None else None
        if partial.clip_norm != clip:
            raise ProtocolError(f"partial from site {partial.site_id} was clipped with clip_norm {partial.clip_norm}, "
                                f"this coordinator clips with {clip}")
        published = self.published
        sums = partial.decode_sums({k: tuple(v.shape) for k, v in published.items()})
        if running is None:
            running = RunningMean(published)
        running.add_sums(sums, partial.total_weight, len(partial.members))
        return running

    def aggregate_folded(self, round_no: int, version: int, updates: Sequence[Update],
                         contributions: Sequence[Any], running: Any) -> RoundOutcome:
        if not isinstance(running, RunningMean):
            return self.aggregate(round_no, version, updates, contributions)
        if running.count != len(updates):
            raise RuntimeError(f"running sum holds {running.count} update(s), the round {len(updates)}")
        return self._advance(round_no, version, running.mean())

    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        server = self.server
        assert server is not None
        return self._advance(round_no, version, self.rule.aggregate_deltas(server.published, updates, contributions))

    def _advance(self, round_no: int, version: int, delta: dict[str, np.ndarray]) -> RoundOutcome:
        server = self.server
        assert server is not None
        server.step(delta)
        message = server.advance(version, round_no, self.cfg.adapter, self.cfg.model)
        snapshot = server.snapshot(version, round_no, self.cfg.adapter, self.cfg.model)
        return RoundOutcome(message=message, snapshot=snapshot)


MODE = AdapterMode
