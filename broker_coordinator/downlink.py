"""The coordinator's model of the global: the exact (optimizer) weights, the copy devices hold,
the server optimizer, and the snapshot/difference messages that move devices from one to the next.

``exact`` is what aggregation and the server optimizer produce. ``published`` is what devices
reconstruct from the messages (``fedmq_protocol.globals.apply_diff``); every difference is
``exact - published`` encoded under the downlink spec, so whatever a lossy encoding drops now is
sent in a later difference (error feedback on the server), and a snapshot (every
``snapshot_every`` versions) resets ``published`` to ``exact``. Devices train from ``published``
and the coordinator checks updates against it, so both sides always agree bitwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmq_protocol.codec import CodecSpec, EncodedTensors, ValueFormat, encode
from fedmq_protocol.globals import apply_diff, shapes_of
from fedmq_protocol.messages import AdapterSpec, GlobalModel

BLOB_FORMAT = 1


class DownlinkConfig(BaseModel):
    """How new globals travel to devices (coordinator YAML ``downlink:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    snapshot_every: int = Field(10, ge=1, description="a full snapshot every N versions, differences between")
    values: ValueFormat = Field("int8", description="value format of differences (snapshots are always exact "
                                "float32); what it drops is sent later (server-side error feedback)")
    density: float = Field(1.0, gt=0, le=1, description="share of largest-magnitude entries of a difference sent")
    block: int = Field(64, ge=1, le=1 << 20)
    zstd: bool = Field(True, description="zstd-compress every global (snapshots and differences), losslessly")

    def spec(self) -> CodecSpec:
        return CodecSpec(values=self.values, density=self.density, block=self.block, zstd=self.zstd)


class ServerOptimizerConfig(BaseModel):
    """Server-side update rule applied to the sample-weighted mean difference (``server_optimizer:``).

    fedavg: x += lr·Δ. fedavgm: m = momentum·m + Δ; x += lr·m. fedadam (FLASC / Reddi et al.):
    Adam on the pseudo-gradient −Δ with bias correction: x += lr·m̂/(√v̂ + eps).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)


def lossless(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The wire map of ``arrays`` in exact float32, dense."""
    return encode(arrays, CodecSpec(values="float32", auto_sparse=False)).to_wire()


def snapshot_tensors(arrays: Mapping[str, np.ndarray], zstd: bool) -> dict[str, Any]:
    """The wire map of a snapshot: exact float32, dense (bit for bit, signed zeros included),
    compressed losslessly with zstd when ``zstd``."""
    return encode(arrays, CodecSpec(values="float32", auto_sparse=False, zstd=zstd)).to_wire()


def _load(obj: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    n = sum(int(np.prod(s)) for s in shapes.values())
    return EncodedTensors.from_wire(obj).decode_dense(max_elements=n, expected=shapes)


class ServerModel:
    def __init__(self, published: Mapping[str, np.ndarray], downlink: DownlinkConfig,
                 optimizer: ServerOptimizerConfig) -> None:
        self.downlink = downlink
        self.opt = optimizer
        self.published = {k: np.array(v, dtype=np.float32) for k, v in published.items()}
        self.exact = {k: v.copy() for k, v in self.published.items()}
        self.m: dict[str, np.ndarray] | None = None
        self.v: dict[str, np.ndarray] | None = None
        self.t = 0

    # -- persistence --------------------------------------------------------------------------
    def to_blob(self) -> dict[str, Any]:
        blob: dict[str, Any] = {"format": BLOB_FORMAT, "exact": lossless(self.exact), "t": self.t}
        if self.m is not None:
            blob["m"] = lossless(self.m)
        if self.v is not None:
            blob["v"] = lossless(self.v)
        return blob

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any] | None, published: Mapping[str, np.ndarray],
                  downlink: DownlinkConfig, optimizer: ServerOptimizerConfig) -> ServerModel:
        sm = cls(published, downlink, optimizer)
        if not blob:
            return sm
        if blob.get("format") != BLOB_FORMAT:
            raise ValueError(f"unsupported server state format {blob.get('format')!r}")
        shapes = shapes_of(sm.published)
        sm.exact = _load(blob["exact"], shapes)
        sm.t = int(blob.get("t", 0))
        if "m" in blob:
            sm.m = _load(blob["m"], shapes)
        if "v" in blob:
            sm.v = _load(blob["v"], shapes)
        return sm

    # -- optimizer ----------------------------------------------------------------------------
    def step(self, mean_delta: Mapping[str, np.ndarray]) -> None:
        """Apply the aggregated difference (float64 arrays) to ``exact``."""
        o = self.opt
        self.t += 1
        for name, x in self.exact.items():
            d = np.asarray(mean_delta[name], dtype=np.float64)
            if o.name == "fedavg":
                upd = o.lr * d
            elif o.name == "fedavgm":
                if self.m is None:
                    self.m = {k: np.zeros_like(v) for k, v in self.exact.items()}
                m = o.momentum * self.m[name].astype(np.float64) + d
                self.m[name] = m.astype(np.float32)
                upd = o.lr * m
            else:
                if self.m is None or self.v is None:
                    self.m = {k: np.zeros_like(v) for k, v in self.exact.items()}
                    self.v = {k: np.zeros_like(v) for k, v in self.exact.items()}
                m = o.beta1 * self.m[name].astype(np.float64) + (1 - o.beta1) * d
                v = o.beta2 * self.v[name].astype(np.float64) + (1 - o.beta2) * d * d
                self.m[name], self.v[name] = m.astype(np.float32), v.astype(np.float32)
                mhat, vhat = m / (1 - o.beta1 ** self.t), v / (1 - o.beta2 ** self.t)
                upd = o.lr * mhat / (np.sqrt(vhat) + o.eps)
            self.exact[name] = (x.astype(np.float64) + upd).astype(np.float32)

    # -- messages -----------------------------------------------------------------------------
    def snapshot(self, version: int, round_no: int, adapter: AdapterSpec, model: str | None) -> GlobalModel:
        """The whole of ``published``, exact: dense float32, zstd-compressed when ``downlink.zstd``
        (a freshly initialised adapter's all-zero lora_B then costs almost nothing)."""
        return GlobalModel(version=version, round=round_no, adapter=adapter, model=model,
                           tensors=EncodedTensors(snapshot_tensors(self.published, zstd=self.downlink.zstd)))

    def advance(self, version: int, round_no: int, adapter: AdapterSpec, model: str | None) -> GlobalModel:
        """Move ``published`` to version ``version``; the message that does the same on devices."""
        if version % self.downlink.snapshot_every == 0:
            self.published = {k: v.copy() for k, v in self.exact.items()}
            return self.snapshot(version, round_no, adapter, model)
        diff = {k: self.exact[k] - self.published[k] for k in self.exact}
        enc = encode(diff, self.downlink.spec())
        decoded = enc.decode(max_elements=sum(a.size for a in diff.values()), expected=shapes_of(diff))
        self.published = apply_diff(self.published, decoded)
        return GlobalModel(version=version, round=round_no, adapter=adapter, model=model,
                           base_version=version - 1, tensors=enc)

