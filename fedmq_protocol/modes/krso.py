"""FedKRSO: full-parameter federated fine-tuning in shared random subspaces (payloads, ledger).

Torch-free: the coordinator only sums subspace accumulators, it never needs a projection.

- Round ``t`` draws K seeds from a fresh root, ``round_seed(spec.seed, t)``; the task names that
  root (one integer), the K seeds derive from it exactly as FedKSeed's candidates do
  (``fedmq_protocol.modes.zo.candidate_seeds``).
- For a targeted linear weight W (d_out x d_in), parameter index i, seed s: P_s (r x d_in) is
  ``z * float32(1/sqrt(r))`` with z the counter-based gaussian of ``param_seed(s, i)``
  (``edge_agent.methods.zo_directions``), so E[P^T P] = I and every device draws the same bits.
- A device's update: the seeds it used (``KrsoUpdate.seeds``) and, in the update's ``tensors``,
  one accumulator acc[W][s] (d_out x r) per used seed and targeted weight, named
  ``"{seed}/{weight name}"`` (``tensor_name``), through the uplink codec like any fit update.
- A ledger round (``KrsoLedgerRound``, retained on ``{base}/krso/ledger/{round}``) holds per
  (W, s) the sample-weighted mean B̄ of the devices' accumulators (a device that did not use s
  counts as zero: FedAvg of the devices' weight changes), lossless float32.
- A checkpoint (``KrsoCheckpoint``, retained on ``{base}/krso/checkpoint``) holds the targeted
  weights after a round, exactly, and their digest; it bounds what a late device downloads.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmq_protocol.codec import CodecSpec, EncodedTensors, encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.base import ModePayload
from fedmq_protocol.modes.zo import candidate_seeds, splitmix64
from fedmq_protocol.wire import Message, OmitsDefaults

_M64 = (1 << 64) - 1
MAX_SEEDS = 256
MAX_RANK = 256
ALL_LINEAR = "all-linear"
LOSSLESS = CodecSpec(values="float32", auto_sparse=False, zstd=True)

class KrsoSpec(BaseModel):
    """What every device of a FedKRSO federation must agree on (coordinator ``krso:`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int = Field(0, ge=0, lt=2**63, description="root of every round's fresh draw of K seeds")
    num_seeds: int = Field(4, ge=1, le=MAX_SEEDS, description="K: seeds (random subspaces) per round")
    rank: int = Field(8, ge=1, le=MAX_RANK, description="r: rows of each projection P_s (r x d_in)")
    interval: int = Field(
        5, ge=1, le=1_000_000,
        description="J: local steps per interval; each interval trains B in one subspace, then merges it")
    target_modules: tuple[str, ...] = Field(
        (ALL_LINEAR,), min_length=1,
        description="linear layers of the transformer blocks trained, by Llama name (q_proj, ..., down_proj) "
                    "or all-linear")
    checkpoint_every: int = Field(
        5, ge=0, le=1_000_000,
        description="every this many rounds one device uploads the targeted weights (exact, checked by digest) "
                    "and the ledger before them is dropped: a late device downloads that checkpoint and at most "
                    "this many ledger rounds; 0: never (the ledger grows with the rounds)")
    base_fingerprint: str | None = Field(
        None, max_length=64, description="edge_agent.models.model_fingerprint of the base")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if ALL_LINEAR in v and len(v) > 1:
            raise ValueError(f"{ALL_LINEAR!r} stands alone")
        for t in v:
            if not t or not t.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"invalid module name {t!r}")
        return v


def round_seed(root: int, round_no: int) -> int:
    """The root of round ``round_no``'s K seeds (in [1, 2**63)): a fresh draw every round."""
    return (splitmix64((root ^ splitmix64(round_no + 0x4B52534F)) & _M64) >> 1) or 1


def round_seeds(spec: KrsoSpec, round_no: int) -> list[int]:
    return candidate_seeds(round_seed(spec.seed, round_no), spec.num_seeds)


def tensor_name(seed: int, weight: str) -> str:
    return f"{seed}/{weight}"


def split_name(name: str, where: str) -> tuple[int, str]:
    """(seed, weight name) of an accumulator's tensor name; ProtocolError naming ``where``."""
    head, sep, weight = name.partition("/")
    if not sep or not head.isdigit() or not weight or len(head) > 20:
        raise ProtocolError(f"{where}: tensor {name!r} is not named '<seed>/<weight>'")
    return int(head), weight


def weights_digest(arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """blake2b-128 over (name, shape, float32 bytes) in name order: equal digests, equal weights.
    Both sides compute it (the agent over its targeted weights, the coordinator over a checkpoint)."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in sorted(arrays, key=lambda kv: kv[0]):
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        h.update(f"{name}:{list(a32.shape)};".encode())
        h.update(a32.tobytes())
    return h.hexdigest()


class KrsoTask(KrsoSpec, ModePayload):
    """The ``krso`` part of a task: the spec, this round's root seed, and whether this device is
    asked to add a checkpoint of the weights it starts from."""

    mode: ClassVar[str] = "krso"
    round_seed: int = Field(ge=1, lt=2**63)
    checkpoint: bool = False

    def seeds(self) -> list[int]:
        return candidate_seeds(self.round_seed, self.num_seeds)

    def spec(self) -> KrsoSpec:
        return KrsoSpec(**{k: getattr(self, k) for k in KrsoSpec.model_fields})


class KrsoUpdate(ModePayload):
    """The ``krso`` part of a fit update (its accumulators travel in the update's ``tensors``)."""

    mode: ClassVar[str] = "krso"
    base_fingerprint: str = Field(max_length=64)
    round_seed: int = Field(ge=1, lt=2**63)
    seeds: tuple[int, ...] = Field(max_length=MAX_SEEDS, description="the seeds used, ascending")
    start_digest: str = Field(max_length=64, description="weights_digest of the targeted weights trained from")
    checkpoint: bytes | None = Field(None, description="msgpack codec map: the targeted weights trained from")

    @field_validator("seeds")
    @classmethod
    def _ascending(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in itertools.pairwise(v)) or any(not 1 <= s < 2**63 for s in v):
            raise ValueError("seeds must be distinct, ascending, in [1, 2**63)")
        return v


class KrsoLedgerRound(Message, OmitsDefaults):
    """One completed round (msgpack, retained on ``{base}/krso/ledger/{round}``): per used seed
    and targeted weight, B̄ (d_out x r), lossless float32 in ``tensors`` named ``{seed}/{weight}``.

    ``roots``: in asynchronous rounds a version also folds updates trained on older versions, whose
    seeds are drawn from those rounds' roots; the entry lists them (absent on the wire when empty)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    max_msgpack_bytes: ClassVar[int] = 1 << 31
    # a synchronous round's entry keeps the bytes of earlier releases
    omitted_at_default: ClassVar[tuple[str, ...]] = ("roots",)

    round: int = Field(ge=1)
    spec: KrsoSpec
    round_seed: int = Field(ge=1, lt=2**63)
    tensors: EncodedTensors
    num_clients: int = Field(0, ge=0)
    num_samples: int = Field(0, ge=0)
    start_digest: str | None = Field(None, max_length=64, description="the digest the round's devices trained from")
    roots: tuple[int, ...] = Field((), max_length=MAX_SEEDS, description="further root seeds whose draws the "
                                   "entry's seeds may come from (asynchronous rounds: stale updates)")

    @field_validator("roots")
    @classmethod
    def _roots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= r < 2**63 for r in v) or len(set(v)) != len(v):
            raise ValueError("roots must be distinct, in [1, 2**63)")
        return v

    def seed_order(self) -> list[int]:
        """The seeds this entry may hold, in canonical order: its round's draw, then each further root's."""
        order = candidate_seeds(self.round_seed, self.spec.num_seeds)
        seen = set(order)
        for root in self.roots:
            for s in candidate_seeds(root, self.spec.num_seeds):
                if s not in seen:
                    seen.add(s)
                    order.append(s)
        return order

    def entries(self, max_elements: int) -> dict[int, dict[str, np.ndarray]]:
        """seed -> weight name -> B̄ (float32, finite), seeds in the round's canonical order
        (ProtocolError for a seed that is not the round's or a non-finite value)."""
        where = f"ledger round {self.round}"
        dense = self.tensors.decode_dense(max_elements=max_elements, where=where)
        order = self.seed_order()
        out: dict[int, dict[str, np.ndarray]] = {}
        for name in sorted(dense):
            seed, weight = split_name(name, where)
            if seed not in order:
                raise ProtocolError(f"{where}: seed {seed} is not one of the round's")
            if not np.all(np.isfinite(dense[name])):
                raise ProtocolError(f"{where}: {name!r} has non-finite values")
            out.setdefault(seed, {})[weight] = dense[name]
        return {s: out[s] for s in order if s in out}


class KrsoCheckpoint(Message):
    """The targeted weights after ``round`` (exact), retained on ``{base}/krso/checkpoint``."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    max_msgpack_bytes: ClassVar[int] = 1 << 34

    round: int = Field(ge=0)
    spec: KrsoSpec
    digest: str = Field(max_length=64)
    tensors: EncodedTensors

    def arrays(self, max_elements: int) -> dict[str, np.ndarray]:
        """The weights, checked against ``digest`` (ProtocolError when they differ)."""
        dense = self.tensors.decode_dense(max_elements=max_elements, where=f"checkpoint of round {self.round}")
        got = weights_digest(dense.items())
        if got != self.digest:
            raise ProtocolError(f"checkpoint of round {self.round}: weights digest {got}, declared {self.digest}")
        return dense


def aggregate_round(round_no: int, spec: KrsoSpec, seed_root: int,
                    updates: Sequence[tuple[int, Mapping[str, np.ndarray]]],
                    start_digest: str | None = None, roots: Sequence[int] = ()) -> KrsoLedgerRound:
    """The FedKRSO server rule: per (W, s), sum_i (n_i / sum n) acc_i[W][s] over every device of
    the round (float64, stored float32). ``updates``: (num_samples, name -> accumulator); ``roots``:
    the further draws their seeds come from (asynchronous rounds)."""
    total = float(sum(n for n, _ in updates))
    if total <= 0:
        raise ValueError("updates report zero samples in total")
    acc: dict[str, np.ndarray] = {}
    for n, arrays in updates:
        for name, a in arrays.items():
            term = (n / total) * np.asarray(a, dtype=np.float64)
            acc[name] = acc[name] + term if name in acc else term
    out = {k: acc[k].astype(np.float32) for k in sorted(acc)}
    return KrsoLedgerRound(round=round_no, spec=spec, round_seed=seed_root, tensors=encode(out, LOSSLESS),
                           num_clients=len(updates), num_samples=int(total), start_digest=start_digest,
                           roots=tuple(r for r in dict.fromkeys(roots) if r != seed_root))


def pack_checkpoint(arrays: Mapping[str, np.ndarray]) -> bytes:
    import msgpack

    return msgpack.packb(encode(dict(arrays), LOSSLESS).to_wire(), use_bin_type=True)


def unpack_checkpoint(data: bytes, max_elements: int, where: str = "checkpoint") -> dict[str, np.ndarray]:
    from fedmq_protocol.wire import unpack_limited

    obj = unpack_limited(data, len(data) + 1024, where)
    return EncodedTensors.from_wire(obj, where).decode_dense(max_elements=max_elements, where=where)


def ledger_topic(base: str, round_no: int) -> str:
    return f"{base}/krso/ledger/{round_no}"


def ledger_filter(base: str) -> str:
    return f"{base}/krso/ledger/+"


def checkpoint_topic(base: str) -> str:
    return f"{base}/krso/checkpoint"


#: the payloads this mode puts in messages (fedmq_protocol.modes registry)
PAYLOADS: dict[str, type[ModePayload]] = {"task": KrsoTask, "update": KrsoUpdate}
#: the coordinator config section of this mode (``krso:``)
OPTIONS = KrsoSpec
