"""FedKSeed: the coordinator side of zeroth-order federated fine-tuning (torch-free).

The global model is the base checkpoint (its fingerprint) plus the seed ledger in
``CoordinatorState.zo_ledger``: per round, candidate index -> sample-weighted sum of the devices'
projected gradients. Each round's ledger entry is published retained on ``{base}/zo/ledger/{round}``
before the (tensor-less) global version that points at it, so a device that was offline or is new
catches up by replaying the retained entries it has not applied.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.state import CoordinatorState, DeviceRecord
from broker_coordinator.strategy import FedAvg
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import Update
from fedmq_protocol.modes.zo import (
    ZoLedgerRound, ZoSpec, ZoTask, aggregate_round, ledger_topic, pro_probabilities, unpack_pool,
)


class FedKSeed(FedAvg):
    """Device selection as FedAvg; aggregation into the seed ledger (FedKSeed server rule)."""

    snapshot_every_version = True

    def accepts(self, device: DeviceRecord) -> bool:
        """Zeroth-order devices only (a device plans its target when the task names it)."""
        plan = device.plan
        return plan is None or plan.get("method") == "zo"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config.min_clients, config.fraction, config.max_clients, config.selection_seed)
        assert config.zo is not None
        self.spec: ZoSpec = config.zo
        self.adapter = config.adapter.model_dump(mode="json") if self.spec.target == "lora" else None
        self._fingerprint = self.spec.base_fingerprint
        self._pending: ZoLedgerRound | None = None
        self._published: set[int] = set()

    def _sync(self, state: CoordinatorState) -> None:
        if self._fingerprint is None and state.zo_ledger:
            self._fingerprint = state.zo_ledger[-1].spec.base_fingerprint

    def current_spec(self) -> ZoSpec:
        return self.spec.model_copy(update={"base_fingerprint": self._fingerprint})

    def initial_tensors(self) -> dict[str, np.ndarray]:
        return {}  # version 0 is the base checkpoint itself

    def task_fields(self, kind: str, round_no: int, state: CoordinatorState) -> dict[str, Any]:
        self._sync(state)
        probs = None
        if self.spec.pro and kind == "fit":
            hist: dict[int, list[float]] = {}
            for entry in state.zo_ledger:
                for i, g in entry.entries():
                    hist.setdefault(i, []).append(g)
            probs = pro_probabilities(hist, self.spec.num_seeds).astype("<f4")
            probs = (probs / probs.sum(dtype=np.float64)).astype("<f4").tobytes()
        return {"zo": ZoTask(**self.current_spec().model_dump(), probabilities=probs)}

    def validate_fit(self, global_tensors: Mapping[str, np.ndarray], update: Update) -> dict[str, Any]:
        if update.payload is None:
            raise ProtocolError("zo federation: fit update carries no seed pool")
        if not update.tensors.empty:
            raise ProtocolError("zo federation: fit update must not carry tensors")
        unpack_pool(update.payload.indices, update.payload.g, self.spec.num_seeds, "zo update")
        fp = update.payload.base_fingerprint
        if self._fingerprint is None:
            self._fingerprint = fp  # the first device's base defines the federation's
        elif fp != self._fingerprint:
            raise ProtocolError(f"zo update trained base {fp}; the federation's base is {self._fingerprint}")
        return {}  # nothing tensor-shaped to decode

    def aggregate_deltas(
        self, global_tensors: Mapping[str, np.ndarray], updates: Sequence[Update], decoded: Any = None,
    ) -> dict[str, np.ndarray]:
        """Aggregate into the pending ledger round; the (tensor-less) global itself does not move."""
        if not updates:
            raise ValueError("aggregation needs at least one update")
        round_no = updates[0].round
        self._pending = aggregate_round(
            round_no, self.current_spec(), self.adapter, [(u.num_samples, u.payload) for u in updates if u.payload is not None]
        )
        return {}

    def commit_round(self, state: CoordinatorState, round_no: int) -> None:
        if self._pending is None or self._pending.round != round_no:
            raise RuntimeError(f"no aggregated ledger entry for round {round_no}")
        state.zo_ledger = [e for e in state.zo_ledger if e.round < round_no] + [self._pending]
        self._pending = None

    def retained_messages(self, state: CoordinatorState, base_topic: str) -> list[tuple[str, bytes]]:
        out = [(ledger_topic(base_topic, e.round), e.to_msgpack()) for e in state.zo_ledger if e.round not in self._published]
        self._published.update(e.round for e in state.zo_ledger)
        return out
