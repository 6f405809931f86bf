"""Update intake: every result a device publishes is decoded, checked and either accepted into the
open fan-out or refused with a reason, before anything else looks at it.

Checks, in order: the payload decodes within the size limit; the device named in it is the one
whose topic it came on; a fan-out with that task id is open and selected this device; metrics are
finite and bounded; the signature (when keys are configured) covers this fan-out's nonce; a
second copy is a duplicate; kind, round and base version match the task; the content is what the
kind needs (fit: the mode validates it against the global). An accepted fit update is then folded
by the mode (``CoordinatorMode.fold``): a linear rule adds it into the round's running sum and the
round keeps neither its tensors nor their decoded values.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.journal import EarlierAttempt, OpenRound
from broker_coordinator.modes import CoordinatorMode
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import Verifier
from fedmq_protocol.topics import Topics

MAX_METRICS = 256
MAX_NUM_SAMPLES = 1 << 40


@dataclass
class Collection:
    """Results awaited for one task fan-out, and those accepted so far."""

    kind: m.TaskKind
    task_id: str
    round_no: int
    base_version: int
    expected: set[str]
    nonce: bytes | None = None  # Task.nonce of this fan-out; signed updates must echo it
    accepted: dict[str, m.Update] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    contributions: dict[str, Any] = field(default_factory=dict)  # what the mode kept of it (fit, init)
    running: Any = None  # the mode's running aggregate of the accepted fit updates (CoordinatorMode.fold)
    bytes_in: int = 0
    decode_s: float = 0.0
    attempt: int = 0
    deadline_s: float = 0.0
    earlier: list[EarlierAttempt] = field(default_factory=list)  # accepted under earlier attempts
    via_partial: dict[str, str] = field(default_factory=dict)  # device -> key of the site partial counting it

    def carry_over(self, old: Collection) -> None:
        """Updates accepted under an earlier attempt of the round count in this one: nothing
        accepted is dropped, and those devices are not asked to train again."""
        if not old.accepted:
            return
        if old.running is not self.running:
            if self.running is not None:
                raise RuntimeError(f"task {self.task_id} already folds updates; cannot carry {old.task_id} over")
            self.running = old.running  # the same round: its running aggregate goes on
        already = {d for e in old.earlier for d in e.devices}
        newly = tuple(sorted(set(old.accepted) - already))
        self.earlier = [*old.earlier, EarlierAttempt(old.task_id, old.nonce, newly)]
        self.expected |= set(old.accepted)
        for d, u in old.accepted.items():
            self.accepted[d], self.received_at[d] = u, old.received_at[d]
            if d in old.contributions:
                self.contributions[d] = old.contributions[d]
        self.via_partial.update(old.via_partial)
        self.bytes_in += old.bytes_in
        self.decode_s += old.decode_s

    def journal(self) -> OpenRound:
        """The fan-out's record; what it accepted is journalled one payload at a time beside it
        (``StateStore.save_accepted``), so the record lists none of it."""
        return OpenRound(task_id=self.task_id, kind=self.kind, round=self.round_no, base_version=self.base_version,
                         attempt=self.attempt, selected=tuple(sorted(self.expected)), nonce=self.nonce,
                         earlier=tuple(self.earlier))


def check_update_fields(upd: m.Update) -> None:
    """Bounds the schema does not express: finite metrics, plausible sample counts."""
    if len(upd.metrics) > MAX_METRICS:
        raise ProtocolError(f"update carries {len(upd.metrics)} metrics, limit {MAX_METRICS}")
    for k, v in upd.metrics.items():
        if len(k) > 64 or not math.isfinite(v):
            raise ProtocolError(
                f"update metric {k[:64]!r} must have a name of <= 64 chars and a finite value, got {v!r}")
    if upd.num_samples > MAX_NUM_SAMPLES:
        raise ProtocolError(f"update reports {upd.num_samples} samples, limit {MAX_NUM_SAMPLES}")


class UpdateIntake:
    def __init__(self, topics: Topics, mode: CoordinatorMode, counters: CoordinatorCounters, *,
                 max_message_bytes: int, verifier: Verifier | None = None, signatures_required: bool = False) -> None:
        self.topics = topics
        self.mode = mode
        self.counters = counters
        self.max_message_bytes = max_message_bytes
        self.verifier = verifier
        self.signatures_required = signatures_required

    def receive(self, topic: str, payload: bytes, arrived_at: float, c: Collection | None) -> m.Update | None:
        """The update accepted into ``c`` (None: a duplicate of one already accepted); ProtocolError
        naming the reason when it is refused. ``c`` is left unchanged unless it is accepted."""
        t0 = time.perf_counter()
        device_id = self.topics.device_id_from(topic)
        upd = m.Update.from_msgpack(payload, max_bytes=self.max_message_bytes)
        decode_s = time.perf_counter() - t0
        if upd.device_id != device_id:
            raise ProtocolError(f"update names device {upd.device_id!r} but was published on {topic!r}")
        if c is None or upd.task_id != c.task_id:
            self.counters.late += 1
            raise ProtocolError(f"update for task {upd.task_id!r} (round {upd.round}) is not open; refused")
        if device_id not in c.expected:
            raise ProtocolError(f"device {device_id} was not selected for task {c.task_id}")
        check_update_fields(upd)
        self._check_signature(upd, c)
        if device_id in c.via_partial:
            self.counters.counted_twice += 1
            raise ProtocolError(f"device {device_id} is already counted in {c.via_partial[device_id]}; "
                                "its own update is refused")
        if device_id in c.accepted:
            self.counters.duplicates += 1
            return None
        if upd.kind != c.kind or upd.round != c.round_no or upd.base_version != c.base_version:
            raise ProtocolError(
                f"update (kind {upd.kind}, round {upd.round}, base v{upd.base_version}) does not match "
                f"task {c.task_id} (kind {c.kind}, round {c.round_no}, base v{c.base_version})"
            )
        contribution: Any = None
        if upd.kind == "fit":
            contribution = self.mode.validate_update(upd)
            if upd.num_samples <= 0:
                raise ProtocolError("fit update reports no samples")
        elif upd.kind == "evaluate":
            loss = upd.metrics.get("eval_loss")
            if loss is None or not math.isfinite(loss):
                raise ProtocolError("evaluate result carries no finite eval_loss")
        elif upd.kind == "init":
            # decoding checks sizes against the payload and refuses non-finite values
            contribution = upd.tensors.decode(max_elements=self.max_message_bytes, where="init tensors")
            if not contribution:
                raise ProtocolError("init result carries no tensors")
        if upd.kind == "fit":
            c.running, upd, contribution = self.mode.fold(c.running, upd, contribution)
        if contribution is not None:
            c.contributions[device_id] = contribution
        c.accepted[device_id] = upd
        c.received_at[device_id] = arrived_at
        c.bytes_in += len(payload)
        c.decode_s += decode_s
        return upd

    def _check_signature(self, upd: m.Update, c: Collection) -> None:
        """End-to-end identity: the update must be signed by its device's key for this fan-out."""
        if self.verifier is None:
            return
        if not self.signatures_required and (upd.signature is None or upd.device_id not in self.verifier.keys):
            return  # signatures optional: unsigned or unknown devices pass, a bad signature does not
        try:
            self.verifier.verify(upd.to_obj(), c.nonce)
        except ProtocolError:
            self.counters.signature_rejected += 1
            raise
