"""Asynchronous rounds (FedBuff, Nguyen et al. 2022): the config section and the staleness rule.

Pure and torch-free: the scheduler that uses them is ``broker_coordinator.buffered``.

An update trained on global version ``b`` and accepted while the global is at version ``v`` has
staleness ``s = v - b``. It is refused when ``s > max_staleness`` and otherwise enters the buffer
with weight ``w(s)``: ``1/sqrt(1+s)`` (``sqrt``, the default) or ``1`` (``constant``). Every
``buffer_size`` accepted updates the buffer becomes the next global: the buffered mean difference
``sum_i n_i w(s_i) delta_i / sum_i n_i`` (``n_i`` its samples) is handed to the server optimizer,
exactly as a synchronous round's sample-weighted mean is (with every ``s_i = 0`` the two agree).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: modes that cannot fold updates trained on different global versions, and why
NOT_ASYNCHRONOUS: dict[str, str] = {
    "zo": "its seed ledger replays every device's steps against one global version per round",
    "kd": "its consensus is distilled from every device's answers on one probe set per round",
    "split": "its split server trains one shared model with the devices in step, round by round",
}

Weighting = Literal["sqrt", "constant"]


class AsynchronousConfig(BaseModel):
    """Asynchronous rounds (coordinator YAML ``asynchronous:``): devices train continuously and every
    ``buffer_size`` accepted updates make a new global."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="run FedBuff rounds instead of synchronous ones")
    buffer_size: int = Field(
        2, ge=1, le=1_000_000, description="accepted updates folded into each new global version")
    concurrency: int = Field(
        2, ge=1, le=1_000_000,
        description="devices kept training at once: an idle ready device gets a task as soon as one is free")
    max_staleness: int = Field(
        4, ge=0, le=1_000_000,
        description="an update trained on a global more than this many versions behind the current one is "
                    "refused (counted, reason 'stale')")
    staleness_weighting: Weighting = Field(
        "sqrt", description="weight of an update s versions stale in the buffer: sqrt = 1/sqrt(1+s), "
                            "constant = 1")
    versions: int | None = Field(
        None, ge=1, description="global versions to publish before stopping (each one is a round in the "
                                "history); null: the top-level rounds")
    task_timeout_s: float | None = Field(
        None, gt=0, description="a task unanswered this long is dropped and its device may get a new one; "
                                "null: the top-level round_deadline_s")


def staleness_weight(staleness: int, rule: Weighting) -> float:
    """w(s): the weight of an update ``staleness`` versions behind in the buffer."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if rule == "constant":
        return 1.0
    return 1.0 / math.sqrt(1.0 + staleness)


def asynchronous_problem(cfg: AsynchronousConfig, mode: str, robust: bool) -> str | None:
    """Why this federation cannot run asynchronous rounds (None: it can)."""
    if not cfg.enabled:
        return None
    if mode in NOT_ASYNCHRONOUS:
        return f"asynchronous: the {mode} mode cannot run asynchronous rounds: {NOT_ASYNCHRONOUS[mode]}"
    if robust:
        return ("asynchronous: robust aggregation rules (trimmed mean, median, clip_median_factor) need a whole "
                "round's updates at once; asynchronous rounds fold each update as it arrives (fedavg, with or "
                "without clip_norm)")
    return None
