"""The zeroth-order (FedKSeed) mode, agent side.

The global model is the base checkpoint plus the seed ledger. Ledger rounds arrive retained on
``{base}/zo/ledger/{round}``; the tensor-less global version N means "rounds 1..N replayed". An
agent replays, in order, every round it has not applied (a new or returning agent catches up the
same way). Before local training the trainable parameters are snapshotted to the state directory
and restored bit for bit before the next replay, so a device that trained ends bitwise equal to one
that did not, without holding a second copy of the model in memory. A fit's update is the seeds
drawn and their accumulated projected gradients (``ZoUpdate``), no tensors.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.modes import AgentMode, GlobalRejected, Subscription, TrainerChoice, UpdateContent, trainer_as
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.zo import ZoLedgerRound, ZoSpec, ZoTask, ZoUpdate, ledger_filter, ledger_topic, pack_pool

if TYPE_CHECKING:
    from edge_agent.methods.base import FitResult, TrainingMethod
    from edge_agent.methods.zo import ZoMethod
    from fedmq_protocol.globals import GlobalSync
    from fedmq_protocol.messages import AdapterSpec, Task

log = logging.getLogger("fedmq.agent")

SNAPSHOT_FILE = "zo-pre-round.pt"


def _zo(trainer: TrainingMethod) -> ZoMethod:
    from edge_agent.methods.zo import ZoMethod

    return trainer_as(trainer, ZoMethod, "zo")


class ZoMode(AgentMode):
    name: ClassVar[str] = "zo"
    methods: ClassVar[tuple[str, ...]] = ("zo",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger: dict[int, ZoLedgerRound] = {}
        self.applied_round = 0  # ledger rounds replayed on the model in memory
        self._spec: ZoTask | None = None  # of the last task
        self._snapshot_path = self.ctx.state_dir / SNAPSHOT_FILE
        self.replay_s = 0.0  # time spent replaying the ledger (cumulative)

    # -- messages ---------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        return [Subscription(ledger_filter(self.ctx.topics.base), "ledger")]

    def on_message(self, kind: str, topic: str, payload: bytes) -> None:
        if kind != "ledger" or not payload:
            return
        entry = ZoLedgerRound.from_msgpack(payload, max_bytes=self.ctx.max_message_bytes)
        if topic != ledger_topic(self.ctx.topics.base, entry.round):
            raise ProtocolError(f"ledger round {entry.round} arrived on {topic!r}")
        self.ledger[entry.round] = entry

    def accept_task(self, task: Task) -> None:
        self._spec = task.payload_as(ZoTask, f"task {task.task_id}")

    # -- the trainer ------------------------------------------------------------------------
    def _current_spec(self) -> ZoSpec | None:
        if self._spec is not None:
            return self._spec
        return self.ledger[max(self.ledger)].spec if self.ledger else None

    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        spec = self._current_spec()
        target = spec.target if spec is not None else "full"
        self.ctx.memory_plan(adapter, zo_target=target)  # PlanRefused when the budget holds no plan
        return TrainerChoice("zo", {"target": target}, (target, adapter if target == "lora" else None),
                             f"zeroth-order training of {target} parameters")

    def trainer_loaded(self, trainer: TrainingMethod) -> None:
        # a fresh model holds no round: the newest global is reached by replaying from round 1
        self.applied_round = 0

    # -- the global -------------------------------------------------------------------------
    def needs_reload(self, version: int) -> bool:
        if version < self.applied_round:  # the coordinator lost rounds: start over from the base
            log.warning("global v%d is behind the %d rounds applied; reloading the base", version, self.applied_round)
            return True
        return False

    def can_reach(self, version: int) -> bool:
        # the retained ledger rounds may still be on their way
        return all(r in self.ledger for r in range(self.applied_round + 1, version + 1))

    def apply_global(self, trainer: TrainingMethod, version: int, sync: GlobalSync) -> None:
        """Replay the ledger rounds between the weights in memory and ``version``."""
        method = _zo(trainer)
        t0 = time.perf_counter()
        try:
            for r in range(self.applied_round + 1, version + 1):
                method.apply_round(self.ledger[r])
                self.applied_round = r
        except ValueError as exc:
            # a ledger this model cannot replay (other base, other target)
            raise GlobalRejected("ledger", f"cannot replay the seed ledger: {exc}") from None
        self.replay_s += time.perf_counter() - t0
        log.info("replayed the seed ledger up to round %d (global v%d)", self.applied_round, version)

    def return_to_global(self, trainer: TrainingMethod) -> None:
        """Undo local training exactly (the pre-round snapshot)."""
        _zo(trainer).restore(self._snapshot_path)

    def state_record(self, version: int, trainer: TrainingMethod) -> dict[str, Any]:
        """Which ledger the weights in memory replay and their digest (devices of one federation
        at one version must agree on it)."""
        method = _zo(trainer)
        return {"global_version": version, "applied_round": self.applied_round,
                "base_fingerprint": method.fingerprint, "target": method.target,
                "param_digest": method.param_digest(), "replay_s": self.replay_s}

    # -- training ---------------------------------------------------------------------------
    def check_fit(self, task: Task, trainer: TrainingMethod) -> None:
        _zo(trainer).check_spec(task.payload_as(ZoTask, f"task {task.task_id}"))

    def prepare_fit(self, task: Task, trainer: TrainingMethod) -> dict[str, float]:
        t0 = time.perf_counter()
        _zo(trainer).snapshot(self._snapshot_path)
        return {"snapshot_s": time.perf_counter() - t0}

    def fit_options(self, task: Task) -> dict[str, Any]:
        spec = task.payload_as(ZoTask, f"task {task.task_id}")
        return {"spec": spec, "probabilities": spec.probability_array()}

    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        method = _zo(trainer)
        indices, g = pack_pool(method.last_pool)
        return UpdateContent(payload=ZoUpdate(base_fingerprint=method.fingerprint, indices=indices, g=g))


MODE = ZoMode
