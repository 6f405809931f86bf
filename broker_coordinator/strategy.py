"""Who trains and how adapter differences combine: pure functions, and FedAvg built from them.

``select_devices`` is the selection every mode uses (seeded per round, so a restarted coordinator
selects the same devices). ``mean_delta`` is the sample-weighted mean of adapter differences and
``FedAvg`` the adapter mode's aggregation rule (plain mean, or the robust rules of
``broker_coordinator.robust``); none of them keeps state between calls. ``RunningMean`` is the same
mean folded one update at a time (streaming aggregation of a round).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from broker_coordinator.state import DeviceRecord
from fedmq_protocol.codec import DecodedTensor
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import Update

Decoded = Mapping[str, DecodedTensor]
if TYPE_CHECKING:
    from broker_coordinator.robust import AggregationConfig


def adapter_plan_accepted(device: DeviceRecord) -> bool:
    """Whether the device's announced memory plan trains the LoRA adapter an adapter federation
    averages: lora (float32 or bfloat16 base), qlora (NF4 base) and zeroth-order on the adapter;
    not zo on all parameters. A device that announced no plan is taken."""
    plan = device.plan
    if plan is None:
        return True
    return plan.get("method") in ("lora", "qlora") or (plan.get("method") == "zo" and plan.get("zo_target") == "lora")


def select_devices(
    round_no: int, available: Sequence[DeviceRecord], *, min_clients: int, fraction: float = 1.0,
    max_clients: int | None = None, seed: int = 0, accepts: Callable[[DeviceRecord], bool] = adapter_plan_accepted,
) -> list[str]:
    """Device ids to train in ``round_no`` (empty: fewer than ``min_clients`` can)."""
    ready = sorted((d for d in available if d.num_samples > 0 and accepts(d)), key=lambda d: d.device_id)
    if len(ready) < min_clients:
        return []
    k = max(min_clients, math.ceil(fraction * len(ready)))
    if max_clients:
        k = min(k, max(max_clients, min_clients))
    # Seeded per round: a restarted coordinator re-selects the same devices for a round.
    rng = random.Random(f"{seed}:{round_no}")
    return sorted(d.device_id for d in rng.sample(ready, k))


def validate_update_tensors(global_tensors: Mapping[str, np.ndarray], update: Update) -> dict[str, DecodedTensor]:
    """Decode an update's tensors: exactly the global's names and shapes (checked before anything is
    allocated), finite values. Returns them decoded (sparse ones stay sparse)."""
    if update.payload is not None:
        raise ProtocolError(
            f"fit update carries a {update.payload.mode} payload; this federation aggregates adapter tensors")
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
        for u, d in zip(updates, decoded, strict=True):
            d[name].add_into(acc, u.num_samples / total)
        out[name] = acc.reshape(base.shape)
    return out


class RunningMean:
    """Sample-weighted running sum of adapter differences: one dense float64 accumulator per tensor
    and the total weight, updated as each update is accepted (sparse updates are added at their
    indices). float64, as ``mean_delta`` accumulates: the streamed mean equals the batch one within
    float rounding whatever the arrival order, and thousands of additions lose no precision."""

    def __init__(self, global_tensors: Mapping[str, np.ndarray]) -> None:
        self.shapes = {name: tuple(base.shape) for name, base in global_tensors.items()}
        self.sums = {name: np.zeros(base.size, dtype=np.float64) for name, base in global_tensors.items()}
        self.total = 0.0
        self.count = 0

    def add(self, num_samples: int, decoded: Decoded, scale: float = 1.0) -> None:
        """sum += scale * num_samples * delta; total += num_samples."""
        weight = float(num_samples)
        for name, acc in self.sums.items():
            decoded[name].add_into(acc, scale * weight)
        self.total += weight
        self.count += 1

    def add_sums(self, sums: Mapping[str, np.ndarray], total: float, count: int) -> None:
        """Add a partial sum of ``count`` updates (a site aggregator's float64 ``sums`` of
        scale * num_samples * delta, and their ``total`` weight), as if each had been added here."""
        for name, acc in self.sums.items():
            acc += sums[name]
        self.total += float(total)
        self.count += count

    def mean(self) -> dict[str, np.ndarray]:
        """sum / total, float64, in the global's shapes."""
        if self.count == 0:
            raise ValueError("aggregation needs at least one update")
        if self.total <= 0:
            raise ValueError("updates report zero samples in total")
        return {name: (acc / self.total).reshape(self.shapes[name]) for name, acc in self.sums.items()}


def mean_eval_loss(results: Sequence[Update]) -> float | None:
    """Sample-weighted mean of the results' finite ``eval_loss`` (None: no result has one)."""
    pairs = [
        (r.metrics["eval_loss"], r.num_samples)
        for r in results
        if "eval_loss" in r.metrics and r.num_samples > 0 and math.isfinite(r.metrics["eval_loss"])
    ]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else None


class FedAvg:
    """Sample-weighted federated averaging of adapter differences (McMahan et al.).

    new = global + sum_i (n_i / sum n) * delta_i, accumulated in float64; with ``aggregation`` a
    robust rule instead (clipping, trimmed mean, median).
    """

    def __init__(
        self, min_clients: int = 2, fraction: float = 1.0, max_clients: int | None = None, seed: int = 0,
        aggregation: AggregationConfig | None = None,
    ) -> None:
        self.aggregation = aggregation  # None / fedavg without clipping: plain sample-weighted mean
        self.min_clients = min_clients
        self.fraction = fraction
        self.max_clients = max_clients
        self.seed = seed

    def configure_fit(self, round_no: int, available: Sequence[DeviceRecord],
                      accepts: Callable[[DeviceRecord], bool] = adapter_plan_accepted) -> list[str]:
        """Device ids to train in ``round_no`` (empty: not enough devices)."""
        return select_devices(round_no, available, min_clients=self.min_clients, fraction=self.fraction,
                              max_clients=self.max_clients, seed=self.seed, accepts=accepts)

    @property
    def streams(self) -> bool:
        """Whether the rule is linear in the updates, so each can be folded into a running sum as it
        is accepted: the sample-weighted mean, alone or with a fixed ``clip_norm`` (clipping is per
        update). Trimmed mean, median and clipping to a multiple of the round's median norm need
        all the round's updates at once."""
        return self.aggregation is None or self.aggregation.nonlinear_reason is None

    def fold_delta(self, running: RunningMean, update: Update, decoded: Decoded, weight: float = 1.0) -> None:
        """Add one accepted update into ``running`` (only when ``streams``), its difference scaled by
        ``weight`` (asynchronous rounds: the staleness weight; its samples still count in full)."""
        scale = weight
        if self.aggregation is not None and self.aggregation.clip_norm is not None:
            from broker_coordinator.robust import clip_scales, update_norm

            scale *= clip_scales([update_norm(decoded)], self.aggregation)[0]
        running.add(update.num_samples, decoded, scale)

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
