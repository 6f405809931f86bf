"""Updates leaving the agent: encoded, signed and packed once (``UpdateBuilder``); the last fit
result kept on disk so a task that comes again gets the same bytes again (``ResultCache``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from edge_agent.uplink import METRIC_KEYS as UPLINK_KEYS
from edge_agent.uplink import UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.codec import EncodedTensors, encode
from fedmq_protocol.modes import ModePayload
from fedmq_protocol.storage import atomic_write

if TYPE_CHECKING:
    from fedmq_protocol.signing import Signer

log = logging.getLogger("fedmq.agent")

# entries of the Update map whose final values are known only once the rest is packed
_LATE = ("metrics", "signature")


class UpdateBuilder:
    """Builds the msgpack ``Update`` answering a task: tensors through the uplink encoder (a fit's:
    byte budget, error feedback) or exactly (an init's), the timing metrics, the signature."""

    def __init__(self, device_id: str, federation: str, uplink: UplinkEncoder, signer: Signer | None) -> None:
        self.device_id = device_id
        self.federation = federation
        self.uplink = uplink
        self.signer = signer

    def build(self, task: m.Task, base_version: int, num_samples: int, metrics: Mapping[str, float],
              arrays: Mapping[str, np.ndarray] | None, payload: ModePayload | None = None) -> bytes:
        t0 = time.perf_counter()
        signed = self.signer is not None
        # with a signer, the 64-byte placeholder keeps budgets exact (the real one replaces it)
        nonce, signature = (task.nonce, bytes(64)) if signed else (None, None)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            log.warning("metrics %s are not finite; not sent", bad)
        values = {k: float(v) for k, v in metrics.items() if k not in bad}

        def update(metric_values: dict[str, float], tensors: EncodedTensors) -> m.Update:
            return m.Update(kind=task.kind, task_id=task.task_id, round=task.round, device_id=self.device_id,
                            base_version=base_version, num_samples=num_samples, metrics=metric_values,
                            tensors=tensors, payload=payload, nonce=nonce, signature=signature)

        if task.kind == "fit" and arrays:
            # the budget covers the whole msgpack Update, metrics included (placeholders: floats
            # always pack as 9 bytes, so the final message has exactly the measured size)
            final = {**values, **dict.fromkeys(UPLINK_KEYS, 0.0), "encode_s": 0.0, "sent_at": 0.0}
            tensors, uplink_metrics = self.uplink.encode(arrays, lambda enc: len(update(final, enc).to_msgpack()))
            values = {**values, **uplink_metrics}
        else:
            tensors = encode(dict(arrays or {}))  # init: the starting adapter travels exactly
        obj = update(values, tensors).to_obj()
        # One pack of the message: a msgpack map is its header followed by each key and value
        # packed in turn, so every entry is packed once, here, in the message's order, except the
        # two whose values depend on this very timing: the metrics (``encode_s``, the time taken
        # so far, the packing of the tensors included, and ``sent_at``) and the signature (over
        # those metrics). They are small; they are packed after, into their places. The bytes
        # are those of ``msgpack.packb(obj)``.
        packer = msgpack.Packer(use_bin_type=True)
        parts = {k: packer.pack(k) + packer.pack(v) if k not in _LATE else b"" for k, v in obj.items()}
        encode_s = time.perf_counter() - t0
        obj["metrics"] = {**obj["metrics"], "encode_s": encode_s, "sent_at": time.time()}
        if self.signer is not None:
            obj["signature"] = self.signer.sign(self.federation, obj)
        for k in _LATE:
            parts[k] = packer.pack(k) + packer.pack(obj[k])
        return b"".join([packer.pack_map_header(len(obj)), *parts.values()])


class ResultCache:
    """The last fit result sent (task id, digest of the global it was trained from, payload; also
    on disk): a task that comes again (the coordinator or the broker restarted, or this agent
    did) gets the same bytes again, not a new update."""

    FILE = "last-result.msgpack"

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / self.FILE
        self.last: tuple[str, str, bytes] | None = self._load()

    def get(self, task_id: str) -> tuple[str, bytes] | None:
        """(global digest, payload) of the result of ``task_id``, if it was the last one sent."""
        if self.last is None or self.last[0] != task_id:
            return None
        return self.last[1], self.last[2]

    def remember(self, task_id: str, base_digest: str, payload: bytes) -> None:
        self.last = (task_id, base_digest, payload)
        try:
            atomic_write(self.path, msgpack.packb(
                {"task_id": task_id, "base_digest": base_digest, "payload": payload}, use_bin_type=True))
        except OSError as exc:  # the result still goes out; only a resend after a crash is lost
            log.warning("could not keep the result of %s: %s", task_id, exc)

    def _load(self) -> tuple[str, str, bytes] | None:
        try:
            obj: Any = msgpack.unpackb(self.path.read_bytes(), raw=False)
            return str(obj["task_id"]), str(obj["base_digest"]), bytes(obj["payload"])
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged file only costs the resend
            log.warning("%s unreadable (%s); ignored", self.path, exc)
            return None
