"""Uplink compression on the device: codec choice, byte budget, persisted error feedback.

Error feedback (Seide et al. 2014; Stich et al. 2018): what the encoding drops from this round's
difference (top-k's unsent entries, quantization error) is kept and added to the next round's
difference, so nothing is lost, only delayed. The residual is saved atomically in the agent's
state dir after every encoded update, so a restarted agent continues with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmq_protocol.codec import BITS_PER_VALUE, CodecSpec, EncodedTensors, ValueFormat, encode, fit_budget
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.storage import atomic_write
from fedmq_protocol.wire import unpack_limited

log = logging.getLogger("fedmq.agent")

RESIDUAL_FILE = "uplink-residual.msgpack"
METRIC_KEYS = ("uplink_density", "uplink_value_bits", "uplink_bytes", "uplink_budget_bytes", "uplink_dropped_share")


class UplinkConfig(BaseModel):
    """How fit updates are encoded (agent YAML ``uplink:``); ``uplink_budget_bytes`` overrides
    ``values`` and ``density`` with the most accurate encoding that fits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    values: ValueFormat = Field("int4", description="value format of fit updates; float32 sends them exactly")
    density: float = Field(1.0, gt=0, le=1, description="share of largest-magnitude entries sent (top-k)")
    topk: Literal["global", "per_tensor"] = "global"
    block: int = Field(64, ge=1, le=1 << 20, description="values per int8 scale")
    zstd: bool = False
    error_feedback: bool = True

    def spec(self) -> CodecSpec:
        return CodecSpec(values=self.values, density=self.density, topk=self.topk, block=self.block, zstd=self.zstd)


class UplinkEncoder:
    def __init__(self, cfg: UplinkConfig, budget_bytes: int | None, state_dir: Path | None) -> None:
        self.cfg = cfg
        self.budget = budget_bytes
        self.path = Path(state_dir) / RESIDUAL_FILE if state_dir is not None else None
        self.residual: dict[str, np.ndarray] | None = self._load()
        self.last: dict[str, float] = {}

    def _load(self) -> dict[str, np.ndarray] | None:
        if not self.cfg.error_feedback or self.path is None or not self.path.exists():
            return None
        try:
            data = self.path.read_bytes()
            obj = unpack_limited(data, len(data), "residual file")
            if not isinstance(obj, dict) or obj.get("format") != 1:
                raise ProtocolError("unknown residual format")
            # lossless dense fp32: an element needs 4 payload bytes, so the file size bounds it
            return EncodedTensors.from_wire(obj["tensors"]).decode_dense(max_elements=len(data) // 4)
        except (OSError, KeyError, ProtocolError) as exc:
            log.warning("%s is unreadable (%s); starting without an error-feedback residual", self.path, exc)
            return None

    def _save(self) -> None:
        if self.path is None or self.residual is None:
            return
        enc = encode(self.residual, CodecSpec(values="float32", auto_sparse=False))
        atomic_write(self.path, msgpack.packb({"format": 1, "tensors": enc.to_wire()}, use_bin_type=True))

    def encode(
        self, delta: Mapping[str, np.ndarray], size_of: Callable[[EncodedTensors], int]
    ) -> tuple[EncodedTensors, dict[str, float]]:
        """Encode ``delta`` (+ the residual); returns the encoding and metrics describing it.
        ``size_of`` measures the message that will carry the encoding (the budget applies to it)."""
        x = {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
        r = self.residual
        if r is not None and set(r) == set(x) and all(r[k].shape == x[k].shape for k in x):
            x = {k: x[k] + r[k] for k in x}
        elif r is not None and set(r).isdisjoint(x):
            # other tensors altogether (krso: each round's subspaces are new): nothing to carry over
            log.info("error-feedback residual is for other tensors; dropped")
        elif r is not None:
            log.warning("error-feedback residual does not match the adapter; dropped")
        if self.budget is not None:
            choice = fit_budget(x, self.budget, size_of, topk=self.cfg.topk, block=self.cfg.block, zstd=self.cfg.zstd)
            enc, spec = choice.encoded, choice.spec
        else:
            spec = self.cfg.spec()
            enc = encode(x, spec)
        n = sum(v.size for v in x.values())
        sent = enc.decode_dense(max_elements=n)
        dropped = {k: x[k] - sent[k] for k in x}
        if self.cfg.error_feedback:
            self.residual = dropped
            self._save()
        sq = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in x.values())
        err = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in dropped.values())
        self.last = {
            "uplink_density": float(sum(int(np.count_nonzero(v)) for v in sent.values()) / max(1, n)),
            "uplink_value_bits": float(BITS_PER_VALUE[spec.values]),
            "uplink_bytes": float(size_of(enc)),
            "uplink_budget_bytes": float(self.budget or 0),
            "uplink_dropped_share": float(np.sqrt(err / sq)) if sq > 0 else 0.0,
        }
        return enc, dict(self.last)
