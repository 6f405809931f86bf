"""Partial aggregates: what a site aggregator sends upstream instead of its devices' updates.

A site aggregator (``fedmq aggregator``) receives the fit updates of the devices behind its site
broker, checks them as the coordinator would, and folds them into one sample-weighted float64 sum.
It publishes that sum on ``{root}/{federation}/partials/{site_id}`` as a :class:`PartialAggregate`
(msgpack, framed, QoS 1, not retained), signed with the aggregator's Ed25519 key::

    PARTIAL_CONTEXT + msgpack([federation, site_id, task_id, round, base_version, nonce, seq,
                               sha256(canonical(PartialAggregate map without "signature"))])

``nonce`` is the task fan-out's nonce (``Task.nonce``), so a partial is valid for one fan-out only;
``seq`` numbers the partials a site sends for one fan-out (0, then 1, ... for updates that arrived
after a flush). ``sums`` holds, per tensor, ``sum_i scale_i * n_i * delta_i`` as little-endian
float64 (``scale_i`` the fixed ``clip_norm`` scale when one is configured, else 1) and
``total_weight`` is ``sum_i n_i``: the coordinator adds both into its running mean, so the global
equals flat FedAvg of the same updates within float64 rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import SIGNATURE_BYTES, body_digest
from fedmq_protocol.wire import Message

PARTIAL_CONTEXT = b"fedmq-partial-signature-v1\x00"
MAX_MEMBERS = 1 << 20


class PartialMember(BaseModel):
    """One device a partial counts: its sample count and the metrics of its update."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device_id: str = Field(min_length=1, max_length=64)
    num_samples: int = Field(gt=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class PartialAggregate(Message):
    """Site aggregator -> coordinator: the sum of its devices' fit updates for one fan-out."""

    kind_name = "partial"

    site_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, lt=1 << 31)
    task_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    nonce: bytes | None = Field(default=None, max_length=64)
    clip_norm: float | None = Field(default=None, gt=0)  # the fixed clip applied per update, if any
    members: tuple[PartialMember, ...] = Field(min_length=1, max_length=MAX_MEMBERS)
    total_weight: float = Field(gt=0)
    # tensor name -> {"shape": [..], "f8": little-endian float64 bytes}
    sums: dict[str, dict[str, Any]]
    created_at: float = Field(default_factory=time.time)
    signature: bytes | None = Field(default=None, max_length=SIGNATURE_BYTES)

    @field_validator("sums")
    @classmethod
    def _sum_maps(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, t in v.items():
            if not isinstance(t, dict) or set(t) != {"shape", "f8"}:
                raise ValueError(f"sums[{name[:64]!r}] must be a map of shape and f8")
            shape, data = t["shape"], t["f8"]
            if (not isinstance(shape, (list, tuple))
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise ValueError(f"sums[{name[:64]!r}].shape must be a list of non-negative integers")
            if not isinstance(data, bytes) or len(data) != 8 * math.prod(shape):
                raise ValueError(f"sums[{name[:64]!r}].f8 must hold 8 bytes per element of its shape")
        return v

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(mb.device_id for mb in self.members)

    @property
    def key(self) -> str:
        """What names this partial in the coordinator's journal: ``partial~{task}~{site}~{seq}``
        (``~`` is not a topic-level character, so no device id can take the name)."""
        return partial_key(self.task_id, self.site_id, self.seq)

    def decode_sums(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The sums as flat float64 arrays: exactly the names and shapes of ``expected``, finite."""
        if set(self.sums) != set(expected):
            missing, extra = sorted(set(expected) - set(self.sums)), sorted(set(self.sums) - set(expected))
            raise ProtocolError(f"partial from site {self.site_id} does not match the global's tensors "
                                f"(missing {missing[:3]}, unknown {extra[:3]})")
        out: dict[str, np.ndarray] = {}
        for name, shape in expected.items():
            t = self.sums[name]
            if tuple(t["shape"]) != tuple(shape):
                raise ProtocolError(f"partial from site {self.site_id}: {name!r} has shape {list(t['shape'])}, "
                                    f"the global {list(shape)}")
            arr = np.frombuffer(t["f8"], dtype="<f8")
            if not np.isfinite(arr).all():
                raise ProtocolError(f"partial from site {self.site_id}: {name!r} holds non-finite values")
            out[name] = arr
        return out


class SiteStatus(Message):
    """Site aggregator -> all (JSON, retained on ``{root}/{fed}/sites/{site}/status``): birth, and as
    Last Will ``online: false``; refreshed after every partial it publishes."""

    site_id: str
    online: bool
    ts: float = Field(default_factory=time.time)
    global_version: int | None = None  # the global the aggregator holds (its devices' base)
    devices: int = 0  # site devices known (listed, or seen on the site broker)
    counters: dict[str, int] = Field(default_factory=dict)


def encode_sums(sums: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """The ``sums`` map of float64 accumulators in the global's shapes."""
    return {name: {"shape": list(shapes[name]), "f8": np.ascontiguousarray(acc, dtype="<f8").tobytes()}
            for name, acc in sums.items()}


def partial_key(task_id: str, site_id: str, seq: int) -> str:
    return f"partial~{task_id}~{site_id}~{seq}"


def parse_partial_key(key: str) -> tuple[str, str, int] | None:
    """(task_id, site_id, seq) of a journal key written by :func:`partial_key`; None for a device id."""
    parts = key.split("~")
    if len(parts) != 4 or parts[0] != "partial" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def partial_signed_bytes(federation: str, obj: Mapping[str, Any]) -> bytes:
    """The exact bytes an aggregator signs for a schema-normalised PartialAggregate map."""
    nonce = obj.get("nonce")
    fields = [federation, obj["site_id"], obj["task_id"], int(obj["round"]), int(obj["base_version"]),
              bytes(nonce) if nonce is not None else b"", int(obj["seq"]), body_digest(obj)]
    return PARTIAL_CONTEXT + msgpack.packb(fields, use_bin_type=True)


def sign_partial(partial: PartialAggregate, federation: str, signer: Any) -> bytes:
    """The msgpack payload of ``partial`` signed with ``signer`` (a ``fedmq_protocol.signing.Signer``)."""
    obj = partial.model_copy(update={"signature": None}).to_obj()
    obj["signature"] = signer.sign_bytes(partial_signed_bytes(federation, obj))
    return bytes(msgpack.packb(obj, use_bin_type=True))


def verify_partial(partial: PartialAggregate, federation: str, keys: Mapping[str, Any],
                   expected_nonce: bytes | None) -> None:
    """ProtocolError unless ``partial`` is signed by its site's configured key for this fan-out."""
    from cryptography.exceptions import InvalidSignature

    site = partial.site_id
    key = keys.get(site)
    if key is None:
        raise ProtocolError(f"no aggregator key for site {site!r} (aggregator_keys): its partials are refused")
    if partial.signature is None:
        raise ProtocolError(f"partial from site {site} is not signed")
    if len(partial.signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"partial from site {site}: signature must be {SIGNATURE_BYTES} bytes")
    if expected_nonce is not None and partial.nonce != expected_nonce:
        raise ProtocolError(f"partial from site {site} carries another task's nonce (replayed or stale)")
    try:
        key.verify(bytes(partial.signature), partial_signed_bytes(federation, partial.to_obj()))
    except InvalidSignature:
        raise ProtocolError(f"partial from site {site}: signature does not verify with the aggregator's key") from None
