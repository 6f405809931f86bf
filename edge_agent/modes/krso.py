"""The FedKRSO mode, agent side.

The global is the base checkpoint plus the round ledger: round t's entry (retained on
``{base}/krso/ledger/{t}``) holds per used seed and targeted weight the mean accumulator B̄, and the
tensor-less global version N means "rounds 1..N applied". Before local training the targeted
weights are snapshotted to the state directory; before the next round is applied they are restored
bit for bit (local merges undone), then ``W += sum_s B̄[W][s] P_s``
(``edge_agent.methods.krso.apply_terms``), so every device holds the same bits after every round.

Catch-up: a device behind by rounds the broker no longer retains loads the retained checkpoint
(``{base}/krso/checkpoint``: the targeted weights after round c, checked by digest) and applies
the ledger rounds after c. A fit's update is the accumulators per used seed (the update's tensors,
through the uplink codec) and a ``KrsoUpdate`` naming the seeds, the round's root seed and the
digest of the weights it trained from; when the task asks, the exact weights it trained from too.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.modes import AgentMode, GlobalRejected, Subscription, TrainerChoice, UpdateContent, trainer_as
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import AdapterSpec
from fedmq_protocol.modes.krso import (
    KrsoCheckpoint,
    KrsoLedgerRound,
    KrsoSpec,
    KrsoTask,
    KrsoUpdate,
    checkpoint_topic,
    ledger_filter,
    ledger_topic,
    pack_checkpoint,
)
from fedmq_protocol.storage import atomic_write

if TYPE_CHECKING:
    from edge_agent.methods.base import FitResult, TrainingMethod
    from edge_agent.methods.krso import KrsoMethod
    from fedmq_protocol.globals import GlobalSync
    from fedmq_protocol.messages import Task

log = logging.getLogger("fedmq.agent")

SNAPSHOT_FILE = "krso-pre-round.pt"
CHECKPOINT_FILE = "krso-checkpoint.msgpack"  # the newest retained checkpoint, kept on disk, not in memory


def _krso(trainer: TrainingMethod) -> KrsoMethod:
    from edge_agent.methods.krso import KrsoMethod

    return trainer_as(trainer, KrsoMethod, "krso")


def plan_adapter(spec: KrsoSpec) -> AdapterSpec:
    """The adapter-shaped planner input of a krso plan: r and the targeted linears."""
    return AdapterSpec(r=spec.rank, target_modules=spec.target_modules)


class KrsoMode(AgentMode):
    name: ClassVar[str] = "krso"
    methods: ClassVar[tuple[str, ...]] = ("krso",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger: dict[int, KrsoLedgerRound] = {}
        self.checkpoint_round: int | None = None  # of the checkpoint in CHECKPOINT_FILE
        self._checkpoint_spec: KrsoSpec | None = None
        self._checkpoint_path = self.ctx.state_dir / CHECKPOINT_FILE
        self.applied_round = 0  # ledger rounds applied to the model in memory
        self._task: KrsoTask | None = None
        self._snapshot_path = self.ctx.state_dir / SNAPSHOT_FILE
        self._start_digest = ""
        self._checkpoint_bytes: bytes | None = None
        self.apply_s = 0.0  # time spent applying rounds (cumulative)
        self.checkpoints_loaded = 0

    # -- messages ---------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        base = self.ctx.topics.base
        return [Subscription(ledger_filter(base), "ledger"), Subscription(checkpoint_topic(base), "checkpoint")]

    def on_message(self, kind: str, topic: str, payload: bytes) -> None:
        if not payload:
            return
        if kind == "ledger":
            entry = KrsoLedgerRound.from_msgpack(payload, max_bytes=self.ctx.max_message_bytes)
            if topic != ledger_topic(self.ctx.topics.base, entry.round):
                raise ProtocolError(f"ledger round {entry.round} arrived on {topic!r}")
            entry.entries(max_elements=self.ctx.max_message_bytes)  # seeds of the round, finite values
            self.ledger[entry.round] = entry
        elif kind == "checkpoint":
            ckpt = KrsoCheckpoint.from_msgpack(payload, max_bytes=self.ctx.max_message_bytes)
            if self.checkpoint_round is None or ckpt.round > self.checkpoint_round:
                atomic_write(self._checkpoint_path, payload)
                self.checkpoint_round, self._checkpoint_spec = ckpt.round, ckpt.spec
                # the rounds it covers are not needed again (a reloaded model starts from it)
                self.ledger = {r: e for r, e in self.ledger.items() if r > ckpt.round}

    def accept_task(self, task: Task) -> None:
        self._task = task.payload_as(KrsoTask, f"task {task.task_id}")

    # -- the trainer ------------------------------------------------------------------------
    def _current_spec(self) -> KrsoSpec:
        if self._task is not None:
            return self._task.spec()
        if self.ledger:
            return self.ledger[max(self.ledger)].spec
        return self._checkpoint_spec or KrsoSpec()

    def planned_as(self, method: str) -> str:
        return "krso"

    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        spec = self._current_spec()
        plan = self.ctx.memory_plan(plan_adapter(spec))  # PlanRefused when the budget holds no plan
        kwargs: dict[str, Any] = {"target_modules": spec.target_modules}
        if plan is not None:
            kwargs.update(plan.method_spec()[1])  # the plan's base dtype and gradient checkpointing
        key = (spec.target_modules, plan.build_key if plan is not None else None)
        return TrainerChoice("krso", kwargs, key, f"krso on {', '.join(spec.target_modules)} (r={spec.rank})")

    def trainer_loaded(self, trainer: TrainingMethod) -> None:
        self.applied_round = 0  # a fresh model is the base: round 0

    # -- the global -------------------------------------------------------------------------
    def needs_reload(self, version: int) -> bool:
        if version < self.applied_round:  # the coordinator lost rounds: start over from the base
            log.warning("global v%d is behind the %d rounds applied; reloading the base", version, self.applied_round)
            return True
        return False

    def _start_round(self, version: int) -> int | None:
        """The round to start applying from (a checkpoint's, or the weights in memory), None
        while something needed has not arrived."""
        if all(r in self.ledger for r in range(self.applied_round + 1, version + 1)):
            return self.applied_round
        ck = self.checkpoint_round
        if (ck is not None and self.applied_round < ck <= version
                and all(r in self.ledger for r in range(ck + 1, version + 1))):
            return ck
        return None

    def can_reach(self, version: int) -> bool:
        return self._start_round(version) is not None  # retained rounds may still be on their way

    def apply_global(self, trainer: TrainingMethod, version: int, sync: GlobalSync) -> None:
        """Apply the rounds between the weights in memory (or the checkpoint) and ``version``."""
        method = _krso(trainer)
        start = self._start_round(version)
        assert start is not None, "apply_global follows can_reach"
        t0 = time.perf_counter()
        try:
            if start > self.applied_round:
                ck = KrsoCheckpoint.from_msgpack(self._checkpoint_path.read_bytes(),
                                                 max_bytes=self.ctx.max_message_bytes)
                method.check_spec(ck.spec)
                method.load_weights(ck.arrays(max_elements=method.num_trainable_params()))
                self.applied_round = ck.round
                self.checkpoints_loaded += 1
                log.info("loaded the checkpoint of round %d", ck.round)
            for r in range(self.applied_round + 1, version + 1):
                method.apply_round(self.ledger[r])
                self.applied_round = r
        except (ValueError, ProtocolError, OSError) as exc:
            raise GlobalRejected("ledger", f"cannot apply the krso ledger: {exc}") from None
        self.apply_s += time.perf_counter() - t0
        log.info("applied the krso ledger up to round %d (global v%d)", self.applied_round, version)

    def return_to_global(self, trainer: TrainingMethod) -> None:
        """Undo local merges exactly (the round-start snapshot)."""
        _krso(trainer).restore(self._snapshot_path)

    def state_record(self, version: int, trainer: TrainingMethod) -> dict[str, Any]:
        method = _krso(trainer)
        return {"global_version": version, "applied_round": self.applied_round,
                "base_fingerprint": method.fingerprint, "weights_digest": method.weights_digest(),
                "apply_s": self.apply_s, "checkpoints_loaded": self.checkpoints_loaded}

    # -- training ---------------------------------------------------------------------------
    def check_fit(self, task: Task, trainer: TrainingMethod) -> None:
        _krso(trainer).check_spec(task.payload_as(KrsoTask, f"task {task.task_id}").spec())

    def prepare_fit(self, task: Task, trainer: TrainingMethod) -> dict[str, float]:
        method = _krso(trainer)
        t0 = time.perf_counter()
        method.snapshot(self._snapshot_path)
        t1 = time.perf_counter()
        self._start_digest = method.weights_digest()
        spec = task.payload_as(KrsoTask, f"task {task.task_id}")
        self._checkpoint_bytes = pack_checkpoint(method.get_state()) if spec.checkpoint else None
        return {"snapshot_s": t1 - t0, "digest_s": time.perf_counter() - t1}

    def fit_options(self, task: Task) -> dict[str, Any]:
        spec = task.payload_as(KrsoTask, f"task {task.task_id}")
        return {"spec": spec.spec(), "seeds": spec.seeds()}

    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        method = _krso(trainer)
        spec = task.payload_as(KrsoTask, f"task {task.task_id}")
        payload = KrsoUpdate(base_fingerprint=method.fingerprint, round_seed=spec.round_seed,
                             seeds=tuple(sorted(method.last_seeds)), start_digest=self._start_digest,
                             checkpoint=self._checkpoint_bytes)
        self._checkpoint_bytes = None
        return UpdateContent(metrics={"tokens": float(result.tokens), "seeds_used": float(len(method.last_seeds))},
                             arrays=method.last_acc, payload=payload)


MODE = KrsoMode
