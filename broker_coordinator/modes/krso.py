"""FedKRSO: the coordinator side of federated fine-tuning in shared random subspaces (torch-free).

The global is the base checkpoint (its fingerprint) plus the round ledger. Each round's task names
a fresh root seed (its K seeds derive from it); each accepted update carries per used seed and
targeted weight an accumulator (d_out x r). Aggregation is per (weight, seed) the sample-weighted
mean (``fedmq_protocol.modes.krso.aggregate_round``): summing, no projection, no model. The
round's entry goes retained on ``{base}/krso/ledger/{round}`` before the (tensor-less) global
version that points at it.

Bounded catch-up: every ``checkpoint_every`` rounds the first device asked uploads, with its update,
the exact targeted weights it trained from; they are accepted only when their digest is the one
every device of the round reported (``start_digest``), published retained on
``{base}/krso/checkpoint`` and the ledger rounds they cover are dropped (state and broker).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from broker_coordinator.downlink import lossless
from broker_coordinator.modes import CoordinatorMode, RoundOutcome
from broker_coordinator.modes.adapter import EMPTY_TENSORS
from fedmq_protocol.codec import EncodedTensors, encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import GlobalModel, TaskKind, Update
from fedmq_protocol.modes.krso import (
    LOSSLESS,
    KrsoCheckpoint,
    KrsoLedgerRound,
    KrsoSpec,
    KrsoTask,
    KrsoUpdate,
    aggregate_round,
    checkpoint_topic,
    ledger_topic,
    round_seed,
    split_name,
    unpack_checkpoint,
    weights_digest,
)
from fedmq_protocol.modes.zo import candidate_seeds
from fedmq_protocol.storage import atomic_write

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord

log = logging.getLogger("fedmq.coordinator")

STATE_FORMAT = 1


@dataclass(frozen=True)
class Contribution:
    """What aggregation needs of an accepted update."""

    arrays: dict[str, np.ndarray]  # "{seed}/{weight}" -> accumulator (float32)
    start_digest: str
    checkpoint: dict[str, np.ndarray] | None = None


class KrsoMode(CoordinatorMode):
    """Device selection as FedAvg; aggregation into the round ledger (FedKRSO server rule)."""

    name = "krso"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        spec = config.mode_options
        assert isinstance(spec, KrsoSpec)
        self.spec: KrsoSpec = spec
        self.ledger: list[KrsoLedgerRound] = []
        self._fingerprint = spec.base_fingerprint
        self._published: set[int] = set()
        # weight name -> d_out, learned from the first accepted update (persisted)
        self.shapes: dict[str, int] = {}
        self.checkpoint_round = 0  # weights after this round are in the checkpoint file (0: none, the base)
        self.checkpoint_digest: str | None = None
        self._checkpoint_published = False
        self._cleared: list[int] = []  # ledger rounds a checkpoint covers, to clear on the broker
        self._asked: dict[int, str] = {}  # round -> the device asked for a checkpoint
        self._round_digest: dict[int, str] = {}  # round -> the digest its devices trained from
        self.refused: Counter[str] = Counter()  # refused updates by reason

    # -- state ------------------------------------------------------------------------------
    def _checkpoint_path(self, round_no: int) -> Path:
        return Path(self.cfg.state_dir) / f"krso-checkpoint-r{round_no}.msgpack"

    def restore(self, state: CoordinatorState) -> None:
        blob = state.mode_state if isinstance(state.mode_state, dict) else {}
        self.ledger = [e for e in (KrsoLedgerRound.from_obj(x) for x in blob.get("ledger", []))
                       if e.round <= state.round_completed]
        self.shapes = {str(k): int(v) for k, v in (blob.get("shapes") or {}).items()}
        ck = blob.get("checkpoint") or {}
        if ck and int(ck["round"]) <= state.round_completed and self._checkpoint_path(int(ck["round"])).exists():
            self.checkpoint_round, self.checkpoint_digest = int(ck["round"]), str(ck["digest"])
        self.refused = Counter({str(k): int(v) for k, v in (blob.get("refused") or {}).items()})
        if self._fingerprint is None:
            self._fingerprint = blob.get("base_fingerprint")

    def state_blob(self) -> Any:
        ck = None if not self.checkpoint_round else {"round": self.checkpoint_round, "digest": self.checkpoint_digest}
        return {"format": STATE_FORMAT, "ledger": [e.to_obj() for e in self.ledger], "shapes": self.shapes,
                "checkpoint": ck, "refused": dict(self.refused), "base_fingerprint": self._fingerprint}

    def current_spec(self) -> KrsoSpec:
        return self.spec.model_copy(update={"base_fingerprint": self._fingerprint})

    # -- devices and tasks ------------------------------------------------------------------
    def accepts(self, device: DeviceRecord) -> bool:
        plan = device.plan
        return plan is None or plan.get("method") == "krso"

    def initial_global(self) -> GlobalModel:
        return self._global(0, 0)  # version 0 is the base checkpoint itself

    def _global(self, version: int, round_no: int) -> GlobalModel:
        return GlobalModel(version=version, round=round_no, adapter=self.cfg.adapter, model=self.cfg.model,
                           tensors=EncodedTensors(lossless({})))

    def _wants_checkpoint(self, round_no: int) -> bool:
        """Round ``round_no`` starts from the weights after round_no - 1: checkpoint them when the
        last checkpoint is ``checkpoint_every`` rounds or more behind."""
        every = self.spec.checkpoint_every
        return bool(every) and round_no > 1 and (round_no - 1) - self.checkpoint_round >= every

    def task_payload(self, kind: TaskKind, round_no: int) -> KrsoTask:
        return KrsoTask(**self.current_spec().model_dump(), round_seed=round_seed(self.spec.seed, round_no))

    def task_payload_for(self, kind: TaskKind, round_no: int, device_id: str) -> KrsoTask:
        task = self.task_payload(kind, round_no)
        if kind == "fit" and self._wants_checkpoint(round_no):
            asked = self._asked.setdefault(round_no, device_id)  # the first device the round asks
            if asked == device_id:
                return task.model_copy(update={"checkpoint": True})
        return task

    # -- updates ----------------------------------------------------------------------------
    def _refuse(self, reason: str, message: str) -> ProtocolError:
        self.refused[reason] += 1
        return ProtocolError(f"krso update refused ({reason}): {message}")

    def _seed_home(self, seed: int) -> int | None:
        """The ledger round whose draw holds ``seed`` (None: no round's)."""
        for e in self.ledger:
            if seed in candidate_seeds(e.round_seed, e.spec.num_seeds):
                return e.round
        return None

    def validate_update(self, update: Update) -> Contribution:
        if not isinstance(update.payload, KrsoUpdate):
            raise self._refuse("payload", "fit update carries no krso payload")
        p = update.payload
        if self._fingerprint is not None and p.base_fingerprint != self._fingerprint:
            raise self._refuse("base", f"trained base {p.base_fingerprint}; the federation's is {self._fingerprint}")
        expected_root = round_seed(self.spec.seed, update.round)
        if p.round_seed != expected_root:
            raise self._refuse("round_seed", f"names root seed {p.round_seed}; round {update.round}'s is "
                                             f"{expected_root}")
        seeds = candidate_seeds(expected_root, self.spec.num_seeds)
        for s in p.seeds:
            if s not in seeds:
                home = self._seed_home(s)
                if home is not None:
                    raise self._refuse("seed_not_in_round", f"seed {s} is round {home}'s, not round {update.round}'s")
                raise self._refuse("unknown_seed", f"seed {s} is not one of round {update.round}'s {len(seeds)} seeds")
        try:
            arrays = update.tensors.decode_dense(
                # twice what the federation's shapes allow: a wrong shape is refused as such below
                max_elements=2 * max(1, len(p.seeds)) * self.spec.rank * (sum(self.shapes.values()) or 1 << 27),
                where="krso accumulators")
        except ProtocolError as exc:  # the codec refuses NaN and infinity as it decodes
            raise self._refuse("non_finite" if "non-finite" in str(exc) else "tensors", str(exc)) from None
        by_seed: dict[int, dict[str, tuple[int, ...]]] = {}
        for name, a in arrays.items():
            try:
                seed, weight = split_name(name, "krso update")
            except ProtocolError as exc:
                raise self._refuse("name", str(exc)) from None
            if seed not in p.seeds:
                raise self._refuse("unknown_seed", f"tensor {name!r} names seed {seed}, not one the update lists")
            if a.ndim != 2 or a.shape[1] != self.spec.rank:
                raise self._refuse("shape", f"{name!r} has shape {list(a.shape)}; accumulators are "
                                            f"d_out x {self.spec.rank}")
            if weight in self.shapes and a.shape[0] != self.shapes[weight]:
                raise self._refuse("shape", f"{name!r} has shape {list(a.shape)}, expected [{self.shapes[weight]}, "
                                            f"{self.spec.rank}]")
            if not np.all(np.isfinite(a)):
                raise self._refuse("non_finite", f"{name!r} has non-finite values")
            by_seed.setdefault(seed, {})[weight] = a.shape
        if set(by_seed) != set(p.seeds):
            raise self._refuse("seeds", f"lists seeds {sorted(p.seeds)} but carries accumulators for "
                                        f"{sorted(by_seed)}")
        targets = next(iter(by_seed.values())).keys() if by_seed else set()
        if any(set(w) != set(targets) for w in by_seed.values()) or (self.shapes and by_seed
                                                                      and set(targets) != set(self.shapes)):
            raise self._refuse("weights", "every used seed must carry one accumulator per targeted weight, "
                                          f"the federation's {len(self.shapes) or len(targets)}")
        agreed = self._round_digest.get(update.round)
        if agreed is not None and p.start_digest != agreed:
            raise self._refuse("diverged", f"trained from weights {p.start_digest}; round {update.round}'s devices "
                                           f"trained from {agreed}")
        checkpoint = self._checkpoint_of(update, p) if p.checkpoint is not None else None
        # accepted: the first update of a round fixes what the round trained from
        self._round_digest.setdefault(update.round, p.start_digest)
        if self._fingerprint is None:
            self._fingerprint = p.base_fingerprint
        if not self.shapes and by_seed:
            self.shapes = {w: int(shape[0]) for w, shape in next(iter(by_seed.values())).items()}
        return Contribution(arrays, p.start_digest, checkpoint)

    def _checkpoint_of(self, update: Update, p: KrsoUpdate) -> dict[str, np.ndarray] | None:
        """The checkpoint an update carries, when it was asked for and matches the digest the update
        trained from; otherwise None (counted and logged: the accumulators are still accepted)."""
        assert p.checkpoint is not None
        problem = None
        checkpoint = None
        if self._asked.get(update.round) != update.device_id:
            problem = "it was not asked for"
        else:
            try:
                checkpoint = unpack_checkpoint(p.checkpoint, max_elements=self.cfg.broker.max_message_bytes // 4)
            except ProtocolError as exc:
                problem = str(exc)
            else:
                if weights_digest(checkpoint.items()) != p.start_digest:
                    problem = "its weights do not match the digest the update trained from"
        if problem is None:
            return checkpoint
        self.refused["checkpoint"] += 1
        log.warning("checkpoint from %s dropped (its update is kept): %s", update.device_id, problem)
        return None

    def fold_weighted(self, running: Any, update: Update, contribution: Any,
                      weight: float) -> tuple[Any, Update, Any]:
        """Each update's accumulators are kept, scaled by its weight (the ledger sums them)."""
        assert isinstance(contribution, Contribution)
        scaled = replace(contribution, arrays={
            k: weight * np.asarray(a, dtype=np.float64) for k, a in contribution.arrays.items()})
        return running, update.model_copy(update={"tensors": EMPTY_TENSORS}), scaled

    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        """The round's ledger entry (and a checkpoint when one came); the global moves its version."""
        if not updates:
            raise ValueError("aggregation needs at least one update")
        contribs: list[Contribution] = list(contributions)
        digest = self._round_digest.get(round_no) or contribs[0].start_digest
        # asynchronous rounds: updates trained on older versions used their own round's draw of seeds
        roots = [u.payload.round_seed for u in updates if isinstance(u.payload, KrsoUpdate)]
        entry = aggregate_round(round_no, self.current_spec(), round_seed(self.spec.seed, round_no),
                                [(u.num_samples, c.arrays) for u, c in zip(updates, contribs, strict=True)],
                                start_digest=digest, roots=roots)
        self.ledger = [e for e in self.ledger if e.round < round_no] + [entry]
        # a checkpoint holds the weights its update trained from: those after that update's round - 1
        ck, c_round = next(((c, u.round - 1) for u, c in zip(updates, contribs, strict=True)
                            if c.checkpoint is not None and c.start_digest == self._round_digest.get(u.round, digest)
                            and u.round - 1 > self.checkpoint_round), (None, 0))
        if ck is not None and ck.checkpoint is not None:
            msg = KrsoCheckpoint(round=c_round, spec=self.current_spec(), digest=digest,
                                 tensors=encode(ck.checkpoint, LOSSLESS))
            atomic_write(self._checkpoint_path(c_round), msg.to_msgpack())
            old = self.checkpoint_round
            self.checkpoint_round, self.checkpoint_digest, self._checkpoint_published = c_round, digest, False
            if old and old != c_round:
                self._checkpoint_path(old).unlink(missing_ok=True)
            covered = [e.round for e in self.ledger if e.round <= c_round]
            self._cleared += [r for r in covered if r in self._published]
            self.ledger = [e for e in self.ledger if e.round > c_round]
            log.info("checkpoint of round %d (%s): ledger rounds %s dropped", c_round, digest, covered)
        self._asked = {r: d for r, d in self._asked.items() if r > round_no}
        self._round_digest = {r: d for r, d in self._round_digest.items() if r > round_no}
        snapshot = self._global(version, round_no)
        return RoundOutcome(message=snapshot, snapshot=snapshot)

    def retained_messages(self, base_topic: str, everything: bool = False) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = [(ledger_topic(base_topic, r), b"") for r in self._cleared]
        self._cleared = []
        if self.checkpoint_round and (everything or not self._checkpoint_published):
            path = self._checkpoint_path(self.checkpoint_round)
            if path.exists():
                out.append((checkpoint_topic(base_topic), path.read_bytes()))
                self._checkpoint_published = True
        out += [(ledger_topic(base_topic, e.round), e.to_msgpack()) for e in self.ledger
                if everything or e.round not in self._published]
        self._published.update(e.round for e in self.ledger)
        return out


MODE = KrsoMode
