"""Zeroth-order federated fine-tuning (FedKSeed): seeds, task/update payloads, ledger entries.

Torch-free so the coordinator can derive the K candidate seeds and keep the seed ledger itself.

- The K candidate seeds of a federation derive from one 63-bit root seed (splitmix64 stream), so
  a task carries one integer instead of K.
- A device's update is the candidate indices it drew and the projected gradients g it accumulated
  for each (uint16 index + float32 g, little endian): ~6 bytes per distinct seed.
- The global model is "base checkpoint fingerprint + ledger"; one ``ZoLedgerRound`` per completed
  round holds, per candidate index, the sample-weighted sum of g over the round's devices. Devices
  replay rounds in canonical order (round, then index ascending): theta -= lr * g_sum * z(seed).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.base import ModePayload
from fedmq_protocol.wire import Message

_M64 = (1 << 64) - 1
MAX_SEEDS = 65536  # indices travel as uint16
# z itself is defined in edge_agent.methods.zo_directions (counter-based, the same bits everywhere)
Direction = Literal["gaussian", "rademacher"]
Target = Literal["full", "lora"]


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def candidate_seeds(root_seed: int, k: int) -> list[int]:
    """The K candidate seeds (each in [1, 2**63)) derived from ``root_seed``."""
    if not 1 <= k <= MAX_SEEDS:
        raise ValueError(f"number of candidate seeds must be 1..{MAX_SEEDS}, got {k}")
    out, state = [], root_seed & _M64
    for _ in range(k):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        out.append((splitmix64(state) >> 1) or 1)
    return out


def param_seed(seed: int, param_index: int) -> int:
    """Seed of the generator that draws z for parameter number ``param_index`` under ``seed``."""
    return splitmix64((seed ^ splitmix64(param_index + 0x5EED)) & _M64) >> 1


def pro_probabilities(g_history: dict[int, list[float]], k: int, clip: float = 1000.0) -> np.ndarray:
    """FedKSeed-Pro seed probabilities: softmax(minmax_norm(mean |clip(g, ±clip)|)) over the K
    candidates; a candidate with no history scores 0 before normalisation."""
    score = np.zeros(k, dtype=np.float64)
    for i, hist in g_history.items():
        if hist:
            score[i] = float(np.mean(np.abs(np.clip(np.asarray(hist, dtype=np.float64), -clip, clip))))
    lo, hi = float(score.min()), float(score.max())
    norm = (score - lo) / (hi - lo) if hi > lo else np.zeros(k)
    e = np.exp(norm - norm.max())
    probs: np.ndarray = e / e.sum()
    return probs


def pack_pool(pool: dict[int, float]) -> tuple[bytes, bytes]:
    """(uint16 indices ascending, float32 g) little-endian byte strings."""
    idx = sorted(pool)
    return (np.asarray(idx, dtype="<u2").tobytes(), np.asarray([pool[i] for i in idx], dtype="<f4").tobytes())


def unpack_pool(indices: bytes, g: bytes, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (indices, g): sizes match, indices strictly ascending and < k, g finite."""
    if len(indices) % 2 or len(g) % 4 or len(indices) // 2 != len(g) // 4:
        raise ProtocolError(f"{what}: {len(indices)} index bytes do not pair with {len(g)} g bytes")
    idx = np.frombuffer(indices, dtype="<u2").astype(np.int64)
    val = np.frombuffer(g, dtype="<f4")
    if idx.size and (idx.max() >= k or np.any(np.diff(idx) <= 0)):
        raise ProtocolError(f"{what}: seed indices must be strictly ascending and below {k}")
    if not np.all(np.isfinite(val)):
        raise ProtocolError(f"{what}: non-finite projected gradient")
    return idx, val


class ZoSpec(BaseModel):
    """What every device of a zeroth-order federation must agree on (coordinator ``zo:`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int = Field(0, ge=0, lt=2**63, description="root seed of the K candidate seeds")
    num_seeds: int = Field(4096, ge=1, le=MAX_SEEDS, description="K")
    eps: float = Field(1e-3, gt=0, lt=1)
    lr: float = Field(1e-6, gt=0, lt=1)
    direction: Direction = "gaussian"
    target: Target = "full"
    pro: bool = Field(False, description="FedKSeed-Pro: sample seeds by importance")
    base_fingerprint: str | None = Field(
        None, max_length=64, description="edge_agent.models.model_fingerprint of the base")


class ZoTask(ZoSpec, ModePayload):
    """The ``zo`` part of a task: the spec plus Pro probabilities (K float32) when enabled."""

    mode: ClassVar[str] = "zo"

    probabilities: bytes | None = None

    @model_validator(mode="after")
    def _probs(self) -> ZoTask:
        if self.probabilities is not None:
            p = (np.frombuffer(self.probabilities, dtype="<f4")
                 if len(self.probabilities) == 4 * self.num_seeds else None)
            if (p is None or not np.all(np.isfinite(p)) or np.any(p < 0)
                    or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-3)):
                raise ValueError(f"probabilities must be {self.num_seeds} finite non-negative float32 summing to 1")
        return self

    def probability_array(self) -> np.ndarray | None:
        return None if self.probabilities is None else np.frombuffer(self.probabilities, dtype="<f4").astype(np.float64)


class ZoUpdate(ModePayload):
    """The ``zo`` part of a fit update: candidate indices drawn and their accumulated g."""

    mode: ClassVar[str] = "zo"
    base_fingerprint: str = Field(max_length=64)
    indices: bytes = Field(max_length=2 * MAX_SEEDS)
    g: bytes = Field(max_length=4 * MAX_SEEDS)


class ZoLedgerRound(Message):
    """One completed round of the seed ledger (msgpack, retained on ``{base}/zo/ledger/{round}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_msgpack_bytes: ClassVar[int] = 1 << 22

    round: int = Field(ge=1)
    spec: ZoSpec
    adapter: dict[str, Any] | None = None  # AdapterSpec fields when target is lora
    indices: bytes = Field(max_length=2 * MAX_SEEDS)
    g: bytes = Field(max_length=4 * MAX_SEEDS)
    num_clients: int = Field(0, ge=0)
    num_samples: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pool(self) -> ZoLedgerRound:
        try:
            unpack_pool(self.indices, self.g, self.spec.num_seeds, f"ledger round {self.round}")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        return self

    def entries(self) -> list[tuple[int, float]]:
        """(candidate index, g_sum) in canonical (ascending index) order."""
        idx, val = unpack_pool(self.indices, self.g, self.spec.num_seeds, f"ledger round {self.round}")
        return [(int(i), float(v)) for i, v in zip(idx, val, strict=True)]


def aggregate_round(round_no: int, spec: ZoSpec, adapter: dict[str, Any] | None,
                    updates: list[tuple[int, ZoUpdate]]) -> ZoLedgerRound:
    """FedKSeed server rule: per index, sum_i (n_i / sum n) * g_i (float64, stored float32).
    ``updates``: (num_samples, update) pairs."""
    total = float(sum(n for n, _ in updates))
    if total <= 0:
        raise ValueError("updates report zero samples in total")
    acc: dict[int, float] = {}
    for n, u in updates:
        idx, val = unpack_pool(u.indices, u.g, spec.num_seeds, "update")
        for i, v in zip(idx.tolist(), val.tolist(), strict=True):
            acc[i] = acc.get(i, 0.0) + (n / total) * v
    indices, g = pack_pool(acc)
    return ZoLedgerRound(round=round_no, spec=spec, adapter=adapter, indices=indices, g=g,
                         num_clients=len(updates), num_samples=int(total))


def ledger_topic(base: str, round_no: int) -> str:
    return f"{base}/zo/ledger/{round_no}"


def ledger_filter(base: str) -> str:
    return f"{base}/zo/ledger/+"


#: the payloads this mode puts in messages (fedmq_protocol.modes registry)
PAYLOADS: dict[str, type[ModePayload]] = {"task": ZoTask, "update": ZoUpdate}
#: the coordinator config section of this mode (``zo:``)
OPTIONS = ZoSpec
