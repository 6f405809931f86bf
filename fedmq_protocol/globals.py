"""Following the global adapter from snapshots and differences (both sides use this code).

The coordinator publishes a snapshot (the whole adapter, dense fp32) every ``snapshot_every``
versions and a difference from the previous version otherwise. Devices and coordinator compute
version ``v`` as ``apply_diff(version v-1, diff v)`` with this one function, in float32, so they
hold bitwise identical weights whatever the difference's (lossy) encoding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmq_protocol.codec import DecodedTensor
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import AdapterSpec, GlobalModel

MAX_BUFFERED_DIFFS = 256


def apply_diff(base: Mapping[str, np.ndarray], diff: Mapping[str, DecodedTensor]) -> dict[str, np.ndarray]:
    """``base + diff`` in float32 (a new dict; ``base`` is not modified)."""
    if set(base) != set(diff):
        raise ProtocolError("difference does not cover the same tensors as its base")
    out: dict[str, np.ndarray] = {}
    for name, arr in base.items():
        d = diff[name]
        if tuple(d.shape) != tuple(arr.shape):
            raise ProtocolError(f"difference for {name!r} has shape {list(d.shape)}, base has {list(arr.shape)}")
        flat = np.array(arr, dtype=np.float32, copy=True).reshape(-1)
        if d.indices is None:
            flat += d.values
        else:
            flat[d.indices] += d.values
        out[name] = flat.reshape(arr.shape)
    return out


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


class GlobalSync:
    """The newest global reachable from the snapshots and differences seen so far.

    A difference is applied only to the exact version it names as its base; differences that
    arrive ahead of their base wait (bounded) until a snapshot or earlier difference makes them
    applicable. ``max_elements`` bounds what a snapshot may declare.
    """

    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements
        self.version: int | None = None
        self.arrays: dict[str, np.ndarray] | None = None
        self.adapter: AdapterSpec | None = None
        self.round: int | None = None
        self.created_at: float | None = None
        self._pending: dict[int, GlobalModel] = {}  # base_version -> difference
        self.diffs_applied = 0
        self.snapshots_applied = 0

    def offer(self, gm: GlobalModel) -> bool:
        """Take a snapshot or difference; True if the held version advanced."""
        before = self.version
        if gm.is_snapshot:
            if self.version is None or gm.version > self.version:
                self.arrays = gm.tensors.decode_dense(max_elements=self.max_elements, where=f"global v{gm.version}")
                self._set(gm)
                self.snapshots_applied += 1
        elif self.version is None or gm.version > self.version:
            if gm.base_version is None or gm.base_version >= gm.version:
                raise ProtocolError(f"difference v{gm.version} names base v{gm.base_version}")
            self._pending[gm.base_version] = gm
            if len(self._pending) > MAX_BUFFERED_DIFFS:
                self._pending.pop(min(self._pending))
        self._chain()
        if self.version is not None:
            self._pending = {b: d for b, d in self._pending.items() if b >= self.version}
        return self.version != before

    @property
    def missing(self) -> bool:
        """Differences are waiting for a base this side does not hold (a snapshot is needed)."""
        return bool(self._pending) and (self.version is None or self.version not in self._pending)

    def _chain(self) -> None:
        while self.version is not None and self.version in self._pending:
            gm = self._pending.pop(self.version)
            assert self.arrays is not None
            diff = gm.tensors.decode(
                max_elements=sum(a.size for a in self.arrays.values()),
                expected=shapes_of(self.arrays),
                where=f"global diff v{gm.base_version}->v{gm.version}",
            )
            self.arrays = apply_diff(self.arrays, diff)
            self._set(gm)
            self.diffs_applied += 1

    def _set(self, gm: GlobalModel) -> None:
        self.version, self.adapter, self.round, self.created_at = gm.version, gm.adapter, gm.round, gm.created_at
