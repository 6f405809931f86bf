"""Strategies decide who trains and how results combine (configure / aggregate)."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from broker_coordinator.state import DeviceRecord
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import Update

if TYPE_CHECKING:
    from broker_coordinator.state import CoordinatorState


class Strategy(ABC):
    @abstractmethod
    def configure_fit(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        """Device ids to train in ``round_no`` (empty: not enough devices)."""

    @abstractmethod
    def aggregate_fit(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update]
    ) -> dict[str, np.ndarray]:
        """The next global adapter from the current one and accepted fit updates."""

    def configure_evaluate(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        return [d.device_id for d in available if d.eval_samples > 0]

    # -- mode hooks: defaults are FedAvg of adapter tensors; other federation modes override ----
    def initial_tensors(self) -> dict[str, np.ndarray] | None:
        """The version-0 global tensors, or None to ask a device for its initial adapter."""
        return None

    def task_fields(self, kind: str, round_no: int, state: "CoordinatorState") -> dict[str, Any]:
        """Extra fields of the tasks sent for ``kind`` in ``round_no``."""
        return {}

    def validate_fit(self, global_tensors: Mapping[str, np.ndarray], update: Update) -> None:
        """Raise ProtocolError when a fit update cannot be aggregated."""
        validate_update_tensors(global_tensors, update)

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


def validate_update_tensors(global_tensors: Mapping[str, np.ndarray], update: Update) -> None:
    """An update must carry exactly the global's tensors, same shapes, finite values."""
    names, expected = set(update.tensors), set(global_tensors)
    if names != expected:
        missing, extra = sorted(expected - names)[:3], sorted(names - expected)[:3]
        raise ProtocolError(f"update tensors do not match the global adapter (missing {missing}, unknown {extra})")
    for name, wt in update.tensors.items():
        if wt.shape != tuple(global_tensors[name].shape):
            raise ProtocolError(
                f"update tensor {name!r} has shape {list(wt.shape)}, global has {list(global_tensors[name].shape)}"
            )
        if not np.all(np.isfinite(wt.to_float32())):
            raise ProtocolError(f"update tensor {name!r} holds non-finite values")


class FedAvg(Strategy):
    """Sample-weighted federated averaging of adapter differences (McMahan et al.).

    new = global + sum_i (n_i / sum n) * delta_i, accumulated in float64.
    """

    def __init__(
        self, min_clients: int = 2, fraction: float = 1.0, max_clients: int | None = None, seed: int = 0
    ) -> None:
        self.min_clients = min_clients
        self.fraction = fraction
        self.max_clients = max_clients
        self.seed = seed

    def configure_fit(self, round_no: int, available: Sequence[DeviceRecord]) -> list[str]:
        ready = sorted((d for d in available if d.num_samples > 0), key=lambda d: d.device_id)
        if len(ready) < self.min_clients:
            return []
        k = max(self.min_clients, math.ceil(self.fraction * len(ready)))
        if self.max_clients:
            k = min(k, max(self.max_clients, self.min_clients))
        # Seeded per round: a restarted coordinator re-selects the same devices for a round.
        rng = random.Random(f"{self.seed}:{round_no}")
        return sorted(d.device_id for d in rng.sample(ready, k))

    def aggregate_fit(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update]
    ) -> dict[str, np.ndarray]:
        if not updates:
            raise ValueError("aggregate_fit needs at least one update")
        total = float(sum(u.num_samples for u in updates))
        if total <= 0:
            raise ValueError("updates report zero samples in total")
        out: dict[str, np.ndarray] = {}
        for name, base in global_tensors.items():
            acc = np.zeros(base.shape, dtype=np.float64)
            for u in updates:
                acc += (u.num_samples / total) * u.tensors[name].to_float32()
            out[name] = (base.astype(np.float64) + acc).astype(np.float32)
        return out
