"""Strategies decide who trains and how results combine (configure / aggregate)."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from broker_coordinator.state import DeviceRecord
from fedmq_protocol.codec import DecodedTensor
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import Update

Decoded = Mapping[str, DecodedTensor]
if TYPE_CHECKING:
    from broker_coordinator.robust import AggregationConfig
    from broker_coordinator.state import CoordinatorState


class Strategy(ABC):
    @abstractmethod
    def configure_fit(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        """Device ids to train in ``round_no`` (empty: not enough devices)."""

    @abstractmethod
    def aggregate_deltas(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update],
        decoded: Sequence[Decoded] | None = None,
    ) -> dict[str, np.ndarray]:
        """The combined difference (float64) of accepted fit updates, for the server optimizer."""

    def aggregate_fit(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update],
        decoded: Sequence[Decoded] | None = None,
    ) -> dict[str, np.ndarray]:
        """The next global adapter (plain FedAvg step) from the current one and accepted updates."""
        mean = self.aggregate_deltas(global_tensors, updates, decoded)
        return {k: (b.astype(np.float64) + mean[k]).astype(np.float32) for k, b in global_tensors.items()}

    def configure_evaluate(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        return [d.device_id for d in available if d.eval_samples > 0]

    def accepts(self, device: DeviceRecord) -> bool:
        """Whether the device's announced memory plan trains what this federation aggregates.
        Adapter federations take every plan that trains the same LoRA adapter: lora (float32 or
        bfloat16 base), qlora (NF4 base) and zeroth-order on the adapter; not zo on all parameters."""
        plan = device.plan
        if plan is None:
            return True
        return plan.get("method") in ("lora", "qlora") or (plan.get("method") == "zo" and plan.get("zo_target") == "lora")

    # -- mode hooks: defaults are FedAvg of adapter tensors; other federation modes override ----
    def initial_tensors(self) -> dict[str, np.ndarray] | None:
        """The version-0 global tensors, or None to ask a device for its initial adapter."""
        return None

    def task_fields(self, kind: str, round_no: int, state: "CoordinatorState") -> dict[str, Any]:
        """Extra fields of the tasks sent for ``kind`` in ``round_no``."""
        return {}

    # The global of this mode is tiny (zo: tensor-less, the ledger carries it): publish every
    # version as a snapshot rather than as a difference.
    snapshot_every_version: bool = False

    def validate_fit(self, global_tensors: Mapping[str, np.ndarray], update: Update) -> dict[str, DecodedTensor]:
        """The update's tensors decoded; raise ProtocolError when it cannot be aggregated."""
        return validate_update_tensors(global_tensors, update)

    def commit_round(self, state: "CoordinatorState", round_no: int) -> None:
        """Record mode-specific results of the round just aggregated into ``state`` (persisted)."""

    def retained_messages(self, state: "CoordinatorState", base_topic: str) -> list[tuple[str, bytes]]:
        """(topic, payload) published retained before each global (kept small and idempotent)."""
        return []

    def aggregate_evaluate(self, results: Sequence[Update]) -> float | None:
        """Sample-weighted mean eval loss."""
        pairs = [
            (r.metrics["eval_loss"], r.num_samples)
            for r in results
            if "eval_loss" in r.metrics and r.num_samples > 0 and math.isfinite(r.metrics["eval_loss"])
        ]
        total = sum(n for _, n in pairs)
        return sum(loss * n for loss, n in pairs) / total if total else None


def validate_update_tensors(global_tensors: Mapping[str, np.ndarray], update: Update) -> dict[str, DecodedTensor]:
    """Decode an update's tensors: exactly the global's names and shapes (checked before anything is
    allocated), finite values. Returns them decoded (sparse ones stay sparse)."""
    if update.payload is not None:
        raise ProtocolError("fit update carries a zo seed pool; this federation aggregates adapter tensors")
    shapes = {k: tuple(v.shape) for k, v in global_tensors.items()}
    try:
        return update.tensors.decode(max_elements=sum(v.size for v in global_tensors.values()),
                                     expected=shapes, where="update tensors")
    except ProtocolError as exc:
        raise ProtocolError(f"update tensors do not match the global adapter: {exc}") from None


def mean_delta(
    global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update], decoded: Sequence[Decoded] | None = None
) -> dict[str, np.ndarray]:
    """Sample-weighted mean of the updates' differences, float64, one dense accumulator per tensor:
    sparse updates are added at their indices, never densified one by one."""
    if not updates:
        raise ValueError("aggregation needs at least one update")
    total = float(sum(u.num_samples for u in updates))
    if total <= 0:
        raise ValueError("updates report zero samples in total")
    if decoded is None:
        decoded = [validate_update_tensors(global_tensors, u) for u in updates]
    out: dict[str, np.ndarray] = {}
    for name, base in global_tensors.items():
        acc = np.zeros(base.size, dtype=np.float64)
        for u, d in zip(updates, decoded):
            d[name].add_into(acc, u.num_samples / total)
        out[name] = acc.reshape(base.shape)
    return out


class FedAvg(Strategy):
    """Sample-weighted federated averaging of adapter differences (McMahan et al.).

    new = global + sum_i (n_i / sum n) * delta_i, accumulated in float64.
    """

    def __init__(
        self, min_clients: int = 2, fraction: float = 1.0, max_clients: int | None = None, seed: int = 0,
        aggregation: "AggregationConfig | None" = None,
    ) -> None:
        self.aggregation = aggregation  # None / fedavg without clipping: plain sample-weighted mean
        self.min_clients = min_clients
        self.fraction = fraction
        self.max_clients = max_clients
        self.seed = seed

    def configure_fit(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        ready = sorted((d for d in available if d.num_samples > 0 and self.accepts(d)), key=lambda d: d.device_id)
        if len(ready) < self.min_clients:
            return []
        k = max(self.min_clients, math.ceil(self.fraction * len(ready)))
        if self.max_clients:
            k = min(k, max(self.max_clients, self.min_clients))
        # Seeded per round: a restarted coordinator re-selects the same devices for a round.
        rng = random.Random(f"{self.seed}:{round_no}")
        return sorted(d.device_id for d in rng.sample(ready, k))

    def aggregate_deltas(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update],
        decoded: Sequence[Decoded] | None = None,
    ) -> dict[str, np.ndarray]:
        """sum_i (n_i / sum n) * delta_i in float64 (the server optimizer applies it), or the robust
        rule of ``aggregation`` (broker_coordinator.robust: clipping, trimmed mean, median)."""
        if self.aggregation is None or self.aggregation.is_plain:
            return mean_delta(global_tensors, updates, decoded)
        from broker_coordinator.robust import robust_delta

        if decoded is None:
            decoded = [validate_update_tensors(global_tensors, u) for u in updates]
        return robust_delta(global_tensors, [u.num_samples for u in updates], decoded, self.aggregation)
