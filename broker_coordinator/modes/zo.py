"""FedKSeed: the coordinator side of zeroth-order federated fine-tuning (torch-free).

The global is the base checkpoint (its fingerprint) plus the seed ledger: per round, candidate
index -> sample-weighted sum of the devices' projected gradients. Each round's ledger entry is
published retained on ``{base}/zo/ledger/{round}`` before the (tensor-less) global version that
points at it, so a device that was offline or is new catches up by replaying the retained entries
it has not applied. Every version is a snapshot: there are no tensors to send differences of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from broker_coordinator.downlink import lossless
from broker_coordinator.modes import CoordinatorMode, RoundOutcome
from fedmq_protocol.codec import EncodedTensors
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import GlobalModel, TaskKind, Update
from fedmq_protocol.modes.zo import (
    ZoLedgerRound,
    ZoSpec,
    ZoTask,
    ZoUpdate,
    aggregate_round,
    ledger_topic,
    pro_probabilities,
    unpack_pool,
)

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord

STATE_FORMAT = 1


class ZoMode(CoordinatorMode):
    """Device selection as FedAvg; aggregation into the seed ledger (FedKSeed server rule)."""

    name = "zo"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        spec = config.mode_options
        assert isinstance(spec, ZoSpec)
        self.spec: ZoSpec = spec
        self.adapter = config.adapter.model_dump(mode="json") if spec.target == "lora" else None
        self.ledger: list[ZoLedgerRound] = []
        self._fingerprint = spec.base_fingerprint
        self._published: set[int] = set()

    # -- state ------------------------------------------------------------------------------
    def restore(self, state: CoordinatorState) -> None:
        blob = state.mode_state
        raw = blob.get("ledger", []) if isinstance(blob, dict) else blob or []  # a list: earlier releases
        # an earlier release wrote the ledger before state.json: a crash in between left a round too many
        self.ledger = [e for e in (ZoLedgerRound.model_validate(x) for x in raw) if e.round <= state.round_completed]
        if self._fingerprint is None and self.ledger:
            self._fingerprint = self.ledger[-1].spec.base_fingerprint

    def state_blob(self) -> Any:
        return {"format": STATE_FORMAT, "ledger": [e.model_dump(by_alias=True, mode="python") for e in self.ledger]}

    def current_spec(self) -> ZoSpec:
        return self.spec.model_copy(update={"base_fingerprint": self._fingerprint})

    # -- devices and tasks ------------------------------------------------------------------
    def accepts(self, device: DeviceRecord) -> bool:
        """Zeroth-order devices only (a device plans its target when the task names it)."""
        plan = device.plan
        return plan is None or plan.get("method") == "zo"

    def initial_global(self) -> GlobalModel:
        return self._global(0, 0)  # version 0 is the base checkpoint itself

    def _global(self, version: int, round_no: int) -> GlobalModel:
        return GlobalModel(version=version, round=round_no, adapter=self.cfg.adapter, model=self.cfg.model,
                           tensors=EncodedTensors(lossless({})))

    def task_payload(self, kind: TaskKind, round_no: int) -> ZoTask:
        probs = None
        if self.spec.pro and kind == "fit":
            hist: dict[int, list[float]] = {}
            for entry in self.ledger:
                for i, g in entry.entries():
                    hist.setdefault(i, []).append(g)
            p = pro_probabilities(hist, self.spec.num_seeds)
            probs = (p / p.sum(dtype=np.float64)).astype("<f4").tobytes()
        return ZoTask(**self.current_spec().model_dump(), probabilities=probs)

    # -- updates ----------------------------------------------------------------------------
    def validate_update(self, update: Update) -> ZoUpdate:
        if update.payload is None:
            raise ProtocolError("zo federation: fit update carries no seed pool")
        zo = update.payload_as(ZoUpdate, "fit update")
        if not update.tensors.empty:
            raise ProtocolError("zo federation: fit update must not carry tensors")
        unpack_pool(zo.indices, zo.g, self.spec.num_seeds, "zo update")
        if self._fingerprint is None:
            self._fingerprint = zo.base_fingerprint  # the first device's base defines the federation's
        elif zo.base_fingerprint != self._fingerprint:
            raise ProtocolError(
                f"zo update trained base {zo.base_fingerprint}; the federation's base is {self._fingerprint}")
        return zo

    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        """The round's ledger entry; the (tensor-less) global only moves its version."""
        if not updates:
            raise ValueError("aggregation needs at least one update")
        entry = aggregate_round(round_no, self.current_spec(), self.adapter,
                                [(u.num_samples, zo) for u, zo in zip(updates, contributions, strict=True)])
        self.ledger = [e for e in self.ledger if e.round < round_no] + [entry]
        snapshot = self._global(version, round_no)
        return RoundOutcome(message=snapshot, snapshot=snapshot)

    def retained_messages(self, base_topic: str, everything: bool = False) -> list[tuple[str, bytes]]:
        out = [(ledger_topic(base_topic, e.round), e.to_msgpack()) for e in self.ledger
               if everything or e.round not in self._published]
        self._published.update(e.round for e in self.ledger)
        return out


MODE = ZoMode
