"""Framing, chunking and bounded, idempotent reassembly of binary payloads.

Binary (msgpack) payloads travel *framed*; JSON status payloads are published raw and never go
through this module. Pure Python + msgpack: no paho, no torch.

Frame layout (all integers big-endian)::

    byte 0      FRAME_MAGIC (0xFD: "fedmq frame, version 1")
    byte 1      frame type: b"W" WHOLE, b"M" MANIFEST, b"C" CHUNK
    bytes 2..   body

    WHOLE     body = the payload itself.                         topic: T
    MANIFEST  body = msgpack map                                  topic: T
                {"transfer_id": bin(16), "total_size": int, "chunk_size": int,
                 "n_chunks": int, "chunk_sha256": [bin(32), ...], "sha256": bin(32)}
    CHUNK     body = transfer_id (16 bytes) + index (uint32) + data     topic: T/c/{index}

A payload of at most ``chunk_size`` bytes is one WHOLE frame on ``T``. A larger payload is
split into ``n_chunks = ceil(len / chunk_size)`` CHUNK frames published on ``T/c/0``,
``T/c/1``, ... followed LAST by the MANIFEST on ``T`` (so a retained ``T`` always names a
complete set of retained chunks). The manifest must itself fit in one chunk frame: at
``chunk_size`` C the largest payload is about ``C * C / 34`` bytes (2 GiB at the default
256 KiB; 32 MiB at 32 KiB); :func:`frame_payload` raises ``ValueError`` beyond that.

:class:`Reassembler` turns frames back into ``(logical_topic, payload)``. It is idempotent
(duplicate chunks/manifests and recently completed transfers are ignored), order-independent
(chunks that arrive before their manifest are held as *orphans*; WHOLE frames carry no
transfer id, so a QoS 1 re-send of a small message is delivered again), verifies every chunk's
SHA-256 and the whole payload's, and is bounded in memory (``max_message_bytes``,
``max_pending_bytes``, ``max_transfers``) and in time (``timeout_s`` of inactivity).
Malformed input raises :class:`~fedmq_protocol.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.wire import unpack_limited

FRAME_MAGIC = 0xFD
WHOLE = b"W"
MANIFEST = b"M"
CHUNK = b"C"
HEADER_SIZE = 2
TRANSFER_ID_SIZE = 16
_CHUNK_HDR = struct.Struct(">16sI")
CHUNK_OVERHEAD = HEADER_SIZE + _CHUNK_HDR.size  # 22 bytes of framing per chunk
MAX_CHUNK_INDEX = 0xFFFFFFFF
CHUNK_SUFFIX = "/c/"
_CHUNK_TOPIC = re.compile(r"^(.+)/c/(0|[1-9][0-9]{0,9})$")
# Per-chunk manifest cost: 32-byte digest + 2 bytes of msgpack bin header.
_MANIFEST_BYTES_PER_CHUNK = 34


def chunk_topic(topic: str, index: int) -> str:
    """The MQTT topic of chunk ``index`` of a message on ``topic``."""
    return f"{topic}{CHUNK_SUFFIX}{index}"


def split_chunk_topic(topic: str) -> tuple[str, int | None]:
    """``("T", i)`` for ``"T/c/i"``, ``(topic, None)`` for any other topic."""
    m = _CHUNK_TOPIC.match(topic)
    if m is None:
        return topic, None
    return m.group(1), int(m.group(2))


def _header(kind: bytes) -> bytes:
    return bytes((FRAME_MAGIC,)) + kind


def frame_whole(payload: bytes) -> bytes:
    return _header(WHOLE) + bytes(payload)


def frame_payload(payload: bytes, chunk_size: int) -> list[tuple[str, bytes]]:
    """Frame ``payload`` for publishing: ``[(topic_suffix, frame), ...]`` in publish order.

    ``len(payload) <= chunk_size`` gives ``[("", WHOLE)]``; otherwise the CHUNK frames on
    ``"/c/{i}"`` come first and the MANIFEST on ``""`` last.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    total = len(data)
    if total <= chunk_size:
        return [("", frame_whole(bytes(data)))]
    n_chunks = math.ceil(total / chunk_size)
    if n_chunks > MAX_CHUNK_INDEX:
        raise ValueError(f"payload of {total} bytes needs {n_chunks} chunks (max {MAX_CHUNK_INDEX})")
    tid = os.urandom(TRANSFER_ID_SIZE)
    frames: list[tuple[str, bytes]] = []
    digests: list[bytes] = []
    view = memoryview(data)
    for i in range(n_chunks):
        piece = view[i * chunk_size:(i + 1) * chunk_size]
        digests.append(hashlib.sha256(piece).digest())
        frames.append((f"{CHUNK_SUFFIX}{i}", _header(CHUNK) + _CHUNK_HDR.pack(tid, i) + piece.tobytes()))
    manifest = {
        "transfer_id": tid,
        "total_size": total,
        "chunk_size": chunk_size,
        "n_chunks": n_chunks,
        "chunk_sha256": digests,
        "sha256": hashlib.sha256(view).digest(),
    }
    mframe = _header(MANIFEST) + msgpack.packb(manifest, use_bin_type=True)
    if len(mframe) > chunk_size + CHUNK_OVERHEAD:
        raise ValueError(
            f"payload of {total} bytes at chunk_size {chunk_size} needs {n_chunks} chunks and a "
            f"{len(mframe)}-byte manifest, larger than one chunk; use a larger chunk_size "
            f"(at most ~{chunk_size * chunk_size // _MANIFEST_BYTES_PER_CHUNK} bytes fit)"
        )
    frames.append(("", mframe))
    return frames


@dataclass(frozen=True)
class Manifest:
    transfer_id: bytes
    total_size: int
    chunk_size: int
    n_chunks: int
    chunk_sha256: tuple[bytes, ...]
    sha256: bytes

    def chunk_len(self, index: int) -> int:
        if index < self.n_chunks - 1:
            return self.chunk_size
        return self.total_size - self.chunk_size * (self.n_chunks - 1)


def _int_field(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"manifest field {name!r} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"manifest field {name!r}={v} out of range [{lo}, {hi}]")
    return v


def parse_manifest(body: bytes, max_message_bytes: int) -> Manifest:
    """Decode and validate a MANIFEST body (without the 2-byte header)."""
    obj = unpack_limited(body, max_bytes=len(body), what="chunk manifest")
    if not isinstance(obj, dict):
        raise ProtocolError(f"chunk manifest must be a map, got {type(obj).__name__}")
    expected = {"transfer_id", "total_size", "chunk_size", "n_chunks", "chunk_sha256", "sha256"}
    if set(obj) != expected:
        missing = sorted(expected - set(obj))
        extra = sorted(map(str, set(obj) - expected))
        raise ProtocolError(f"chunk manifest fields wrong (missing {missing}, unknown {extra})")
    tid = obj["transfer_id"]
    if not isinstance(tid, bytes) or len(tid) != TRANSFER_ID_SIZE:
        raise ProtocolError("chunk manifest transfer_id must be 16 bytes")
    total = _int_field(obj, "total_size", 0, 2**63)
    if total > max_message_bytes:
        raise ProtocolError(f"chunk manifest declares {total} bytes, limit {max_message_bytes}")
    chunk_size = _int_field(obj, "chunk_size", 1, 2**63)
    n_chunks = _int_field(obj, "n_chunks", 1, MAX_CHUNK_INDEX)
    if n_chunks != max(1, math.ceil(total / chunk_size)):
        raise ProtocolError(
            f"chunk manifest n_chunks={n_chunks} inconsistent with total_size={total} "
            f"and chunk_size={chunk_size}"
        )
    digests = obj["chunk_sha256"]
    if not isinstance(digests, list) or len(digests) != n_chunks:
        raise ProtocolError(f"chunk manifest chunk_sha256 must be a list of {n_chunks} digests")
    if not all(isinstance(d, bytes) and len(d) == 32 for d in digests):
        raise ProtocolError("chunk manifest chunk_sha256 entries must be 32-byte digests")
    whole = obj["sha256"]
    if not isinstance(whole, bytes) or len(whole) != 32:
        raise ProtocolError("chunk manifest sha256 must be a 32-byte digest")
    return Manifest(tid, total, chunk_size, n_chunks, tuple(digests), whole)


@dataclass
class _Transfer:
    topic: str
    transfer_id: bytes
    created: float
    last_activity: float
    manifest: Manifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0

    def describe(self) -> str:
        kind = "transfer" if self.manifest is not None else "orphan chunks"
        have = f"{len(self.chunks)}/{self.manifest.n_chunks}" if self.manifest else str(len(self.chunks))
        return f"{kind} {self.transfer_id.hex()[:12]} on {self.topic!r} ({have} chunks, {self.nbytes} bytes)"


class Reassembler:
    """Reassembles framed messages; see the module docstring.

    ``timeout_s`` is measured from a transfer's last activity (its last new chunk or its
    manifest), so a large transfer that keeps making progress is not cut off.
    Pending memory is the sum of the chunk bytes held; a manifest that declares more than
    ``max_message_bytes`` (or more than ``max_pending_bytes``) is refused before anything is
    allocated. ``feed``/``expire`` are serialised by an internal lock.
    """

    def __init__(
        self,
        max_message_bytes: int,
        max_pending_bytes: int,
        timeout_s: float,
        max_transfers: int = 64,
        clock: Callable[[], float] = time.monotonic,
        completed_memory: int = 1024,
    ) -> None:
        if max_message_bytes < 1 or max_pending_bytes < 1 or timeout_s <= 0 or max_transfers < 1:
            raise ValueError("Reassembler limits must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes = max_pending_bytes
        self.timeout_s = timeout_s
        self.max_transfers = max_transfers
        self._clock = clock
        self._completed_memory = completed_memory
        self._transfers: OrderedDict[tuple[str, bytes], _Transfer] = OrderedDict()
        self._completed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._pending_bytes = 0
        self._lock = threading.RLock()
        self.completed = 0
        self.duplicates = 0
        self.rejected = 0
        self.expired = 0
        self.evicted = 0
        self.last_reason: str | None = None

    # -- introspection ----------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def stats(self) -> dict[str, int]:
        return {
            "completed": self.completed,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "expired": self.expired,
            "evicted": self.evicted,
            "pending_bytes": self._pending_bytes,
            "pending_transfers": len(self._transfers),
        }

    # -- public API -------------------------------------------------------------------------
    def feed(self, topic: str, frame: bytes) -> tuple[str, bytes] | None:
        """Process one received frame; return ``(logical_topic, payload)`` when one completes."""
        with self._lock:
            self.expire()
            try:
                return self._feed(topic, frame)
            except ProtocolError as exc:
                self.rejected += 1
                self.last_reason = str(exc)
                raise
            except Exception as exc:  # noqa: BLE001 - defensive: any failure on a frame becomes a ProtocolError
                self.rejected += 1
                self.last_reason = f"malformed frame on {topic!r}: {type(exc).__name__}: {exc}"
                raise ProtocolError(self.last_reason) from None

    def expire(self) -> list[str]:
        """Drop transfers idle for more than ``timeout_s``; return one reason per drop."""
        with self._lock:
            now = self._clock()
            reasons = []
            for key, tr in list(self._transfers.items()):
                if now - tr.last_activity > self.timeout_s:
                    self._drop(key)
                    self.expired += 1
                    reasons.append(f"expired {tr.describe()} after {now - tr.last_activity:.1f}s idle")
            return reasons

    # -- internals --------------------------------------------------------------------------
    def _feed(self, topic: str, frame: bytes) -> tuple[str, bytes] | None:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"frame on {topic!r} is not bytes")
        frame = bytes(frame)
        if len(frame) == 0:
            return None  # a retained clear
        if len(frame) < HEADER_SIZE or frame[0] != FRAME_MAGIC:
            raise ProtocolError(
                f"payload on {topic!r} is not a fedmq frame (first byte {frame[:1].hex() or 'none'}, "
                f"expected {FRAME_MAGIC:02x})"
            )
        kind = frame[1:2]
        logical, index = split_chunk_topic(topic)
        if kind == CHUNK:
            if index is None:
                raise ProtocolError(f"chunk frame on {topic!r}, which is not a '<topic>/c/<index>' topic")
            return self._on_chunk(logical, index, frame)
        if index is not None:
            raise ProtocolError(f"non-chunk frame on chunk topic {topic!r}")
        if kind == WHOLE:
            body = frame[HEADER_SIZE:]
            if len(body) > self.max_message_bytes:
                raise ProtocolError(
                    f"message on {topic!r} is {len(body)} bytes, limit {self.max_message_bytes}"
                )
            self.completed += 1
            return topic, body
        if kind == MANIFEST:
            return self._on_manifest(topic, parse_manifest(frame[HEADER_SIZE:], self.max_message_bytes))
        raise ProtocolError(f"unknown frame type {kind!r} on {topic!r}")

    def _on_chunk(self, logical: str, topic_index: int, frame: bytes) -> tuple[str, bytes] | None:
        if len(frame) <= CHUNK_OVERHEAD:
            raise ProtocolError(f"chunk frame on {logical!r} too short ({len(frame)} bytes)")
        tid, index = _CHUNK_HDR.unpack_from(frame, HEADER_SIZE)
        if index != topic_index:
            raise ProtocolError(f"chunk index {index} does not match its topic index {topic_index}")
        data = frame[CHUNK_OVERHEAD:]
        key = (logical, tid)
        if key in self._completed:
            self.duplicates += 1
            return None
        tr = self._transfers.get(key)
        now = self._clock()
        if tr is None:
            if len(data) > min(self.max_pending_bytes, self.max_message_bytes):
                raise ProtocolError(f"orphan chunk of {len(data)} bytes on {logical!r} exceeds the limits")
            tr = self._new_transfer(key, now)
        if index in tr.chunks:
            self.duplicates += 1
            return None
        m = tr.manifest
        if m is not None:
            self._check_chunk(m, logical, index, data)
        self._make_room(len(data), keep=key)
        tr.chunks[index] = data
        tr.nbytes += len(data)
        self._pending_bytes += len(data)
        tr.last_activity = now
        if m is not None and len(tr.chunks) == m.n_chunks:
            return self._complete(key, tr)
        return None

    def _check_chunk(self, m: Manifest, logical: str, index: int, data: bytes) -> None:
        if index >= m.n_chunks:
            raise ProtocolError(f"chunk {index} on {logical!r} beyond n_chunks={m.n_chunks}")
        if len(data) != m.chunk_len(index):
            raise ProtocolError(
                f"chunk {index} on {logical!r} is {len(data)} bytes, manifest says {m.chunk_len(index)}"
            )
        if hashlib.sha256(data).digest() != m.chunk_sha256[index]:
            raise ProtocolError(f"chunk {index} on {logical!r} fails its SHA-256 check")

    def _on_manifest(self, topic: str, m: Manifest) -> tuple[str, bytes] | None:
        key = (topic, m.transfer_id)
        if key in self._completed:
            self.duplicates += 1
            return None
        if m.total_size > self.max_pending_bytes:
            raise ProtocolError(
                f"chunk manifest on {topic!r} declares {m.total_size} bytes, "
                f"more than max_pending_bytes {self.max_pending_bytes}"
            )
        tr = self._transfers.get(key)
        if tr is not None and tr.manifest is not None:
            self.duplicates += 1
            return None
        # A newer manifest supersedes any incomplete older transfer on the same topic.
        for okey, other in list(self._transfers.items()):
            if okey != key and other.topic == topic and other.manifest is not None:
                self._drop(okey)
                self.evicted += 1
        now = self._clock()
        if tr is None:
            tr = self._new_transfer(key, now)
        tr.manifest = m
        tr.last_activity = now
        bad = []
        for index, data in list(tr.chunks.items()):
            try:
                self._check_chunk(m, topic, index, data)
            except ProtocolError as exc:
                bad.append(str(exc))
                del tr.chunks[index]
                tr.nbytes -= len(data)
                self._pending_bytes -= len(data)
        if len(tr.chunks) == m.n_chunks:
            return self._complete(key, tr)
        if bad:
            raise ProtocolError(f"dropped {len(bad)} early chunk(s): {bad[0]}")
        return None

    def _complete(self, key: tuple[str, bytes], tr: _Transfer) -> tuple[str, bytes] | None:
        m = tr.manifest
        assert m is not None
        payload = b"".join(tr.chunks[i] for i in range(m.n_chunks))
        self._drop(key)
        self._completed[key] = None
        while len(self._completed) > self._completed_memory:
            self._completed.popitem(last=False)
        if len(payload) != m.total_size or hashlib.sha256(payload).digest() != m.sha256:
            raise ProtocolError(f"reassembled message on {tr.topic!r} fails its SHA-256 check")
        self.completed += 1
        return tr.topic, payload

    def _new_transfer(self, key: tuple[str, bytes], now: float) -> _Transfer:
        while len(self._transfers) >= self.max_transfers:
            self._evict_oldest(keep=None)
        tr = _Transfer(topic=key[0], transfer_id=key[1], created=now, last_activity=now)
        self._transfers[key] = tr
        return tr

    def _make_room(self, nbytes: int, keep: tuple[str, bytes]) -> None:
        while self._pending_bytes + nbytes > self.max_pending_bytes:
            if not self._evict_oldest(keep=keep):
                tr = self._transfers.get(keep)
                if tr is not None and not tr.chunks and tr.manifest is None:
                    self._drop(keep)
                raise ProtocolError(
                    f"chunk of {nbytes} bytes does not fit in max_pending_bytes {self.max_pending_bytes}"
                )

    def _evict_oldest(self, keep: tuple[str, bytes] | None) -> bool:
        for key in self._transfers:
            if key != keep:
                self._drop(key)
                self.evicted += 1
                return True
        return False

    def _drop(self, key: tuple[str, bytes]) -> None:
        tr = self._transfers.pop(key, None)
        if tr is not None:
            self._pending_bytes -= tr.nbytes
            tr.chunks.clear()
            tr.nbytes = 0
