"""Framing, chunking and bounded, idempotent reassembly of binary payloads.

Binary (msgpack) payloads travel *framed*; JSON status payloads are published raw and never go
through this module. Pure Python + msgpack: no paho, no torch.

Every payload on the wire is one msgpack object (``msgpack.unpackb`` reads any of them)::

    whole message   the message itself (a map whose first key is "schema")        topic: T
    manifest        {"fedmq_manifest": 1, "transfer": bin(16), "size": int,        topic: T
                     "chunk_size": int, "chunks": int,
                     "chunk_sha256": [bin(32), ...], "sha256": bin(32)}
    chunk           {"fedmq_chunk": index, "transfer": bin(16), "data": bin}     topic: T/c/{index}

On ``T`` a map whose *first* key is ``"fedmq_manifest"`` is a manifest; anything else is a whole
message, handed on as is (the message decoder validates it). On ``T/c/{index}`` only chunks are
accepted.

A payload of at most ``chunk_size`` bytes is published whole on ``T``. A larger payload is split
into ``chunks = ceil(size / chunk_size)`` chunks published on ``T/c/0``, ``T/c/1``, ... followed
LAST by the manifest on ``T`` (so a retained ``T`` always names a complete set of retained
chunks). The manifest must itself fit in one chunk: at ``chunk_size`` C the largest payload is
about ``C * C / 34`` bytes (2 GiB at the default 256 KiB; 32 MiB at 32 KiB);
:func:`frame_payload` raises ``ValueError`` beyond that.

:class:`Reassembler` turns these back into ``(logical_topic, payload)``. It is idempotent
(duplicate chunks/manifests and recently completed transfers are ignored), order-independent
(chunks that arrive before their manifest are held as *orphans*; whole messages carry no
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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.wire import unpack_limited

MANIFEST_KEY = "fedmq_manifest"
MANIFEST_VERSION = 1
CHUNK_KEY = "fedmq_chunk"
TRANSFER_ID_SIZE = 16
MAX_CHUNK_INDEX = 0xFFFFFFFF
CHUNK_SUFFIX = "/c/"
_CHUNK_TOPIC = re.compile(r"^(.+)/c/(0|[1-9][0-9]{0,9})$")
_MANIFEST_FIELDS = frozenset({MANIFEST_KEY, "transfer", "size", "chunk_size", "chunks", "chunk_sha256", "sha256"})
_CHUNK_FIELDS = frozenset({CHUNK_KEY, "transfer", "data"})
# Per-chunk manifest cost: 32-byte digest + 2 bytes of msgpack bin header.
_MANIFEST_BYTES_PER_CHUNK = 34
# The leading bytes that hold a map header and a first key as short as the marker keys.
_PEEK_BYTES = 64
# The framing retired in this version: 0xFD then W (whole), M (manifest) or C (chunk).
_RETIRED_FRAME = re.compile(rb"\A\xfd[WMC]")


def chunk_topic(topic: str, index: int) -> str:
    """The MQTT topic of chunk ``index`` of a message on ``topic``."""
    return f"{topic}{CHUNK_SUFFIX}{index}"


def split_chunk_topic(topic: str) -> tuple[str, int | None]:
    """``("T", i)`` for ``"T/c/i"``, ``(topic, None)`` for any other topic."""
    m = _CHUNK_TOPIC.match(topic)
    if m is None:
        return topic, None
    return m.group(1), int(m.group(2))


def pack_chunk(transfer_id: bytes, index: int, data: bytes) -> bytes:
    """The payload of chunk ``index`` of a transfer (published on ``T/c/{index}``)."""
    return msgpack.packb({CHUNK_KEY: index, "transfer": transfer_id, "data": data}, use_bin_type=True)


# Largest msgpack cost of a chunk around its data: the map at the largest index, plus a bin32
# header (5 bytes) instead of the bin8 header (2 bytes) of the empty data packed here.
CHUNK_OVERHEAD = len(pack_chunk(bytes(TRANSFER_ID_SIZE), MAX_CHUNK_INDEX, b"")) + 3


def first_key(payload: bytes) -> object:
    """The first key of a msgpack map at the start of ``payload``, or ``None`` (not a map, empty,
    or a first key that is not short). Reads at most the first few dozen bytes."""
    up = msgpack.Unpacker(raw=False, max_buffer_size=_PEEK_BYTES)
    up.feed(payload[:_PEEK_BYTES])
    try:
        if up.read_map_header() < 1:
            return None
        key: object = up.unpack()
    except Exception:  # noqa: BLE001 - not a map, truncated or malformed: not a manifest
        return None
    return key


def frame_payload(payload: bytes, chunk_size: int) -> list[tuple[str, bytes]]:
    """Frame ``payload`` for publishing: ``[(topic_suffix, payload), ...]`` in publish order.

    ``len(payload) <= chunk_size`` gives ``[("", payload)]`` (the message as is); otherwise the
    chunks on ``"/c/{i}"`` come first and the manifest on ``""`` last.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    total = len(data)
    if total == 0:
        raise ValueError("an empty payload is not a message (on a retained topic it clears it)")
    if total <= chunk_size:
        return [("", bytes(data))]
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
        frames.append((f"{CHUNK_SUFFIX}{i}", pack_chunk(tid, i, piece.tobytes())))
    manifest = {
        MANIFEST_KEY: MANIFEST_VERSION,
        "transfer": tid,
        "size": total,
        "chunk_size": chunk_size,
        "chunks": n_chunks,
        "chunk_sha256": digests,
        "sha256": hashlib.sha256(view).digest(),
    }
    mframe = msgpack.packb(manifest, use_bin_type=True)
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


def _int_field(obj: dict[str, Any], name: str, lo: int, hi: int, what: str = "chunk manifest") -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{what} field {name!r} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{what} field {name!r}={v} out of range [{lo}, {hi}]")
    return v


def _fields(obj: Any, expected: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map, got {type(obj).__name__}")
    if set(obj) != expected:
        missing = sorted(expected - set(obj))
        extra = sorted(map(str, set(obj) - expected))
        raise ProtocolError(f"{what} fields wrong (missing {missing}, unknown {extra})")
    return obj


def _transfer_id(obj: dict[str, Any], what: str) -> bytes:
    tid = obj["transfer"]
    if not isinstance(tid, bytes) or len(tid) != TRANSFER_ID_SIZE:
        raise ProtocolError(f"{what} transfer must be {TRANSFER_ID_SIZE} bytes (bin)")
    return tid


def parse_manifest(payload: bytes, max_message_bytes: int) -> Manifest:
    """Decode and validate a manifest (``{"fedmq_manifest": 1, ...}``)."""
    obj = _fields(unpack_limited(payload, max_bytes=len(payload), what="chunk manifest"), _MANIFEST_FIELDS,
                  "chunk manifest")
    _int_field(obj, MANIFEST_KEY, MANIFEST_VERSION, MANIFEST_VERSION)
    tid = _transfer_id(obj, "chunk manifest")
    total = _int_field(obj, "size", 0, 2**63)
    if total > max_message_bytes:
        raise ProtocolError(f"chunk manifest declares {total} bytes, limit {max_message_bytes}")
    chunk_size = _int_field(obj, "chunk_size", 1, 2**63)
    n_chunks = _int_field(obj, "chunks", 1, MAX_CHUNK_INDEX)
    if n_chunks != max(1, math.ceil(total / chunk_size)):
        raise ProtocolError(
            f"chunk manifest chunks={n_chunks} inconsistent with size={total} "
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


def parse_chunk(payload: bytes) -> tuple[bytes, int, bytes]:
    """Decode and validate a chunk: ``(transfer_id, index, data)``."""
    obj = _fields(unpack_limited(payload, max_bytes=len(payload), what="chunk"), _CHUNK_FIELDS, "chunk")
    index = _int_field(obj, CHUNK_KEY, 0, MAX_CHUNK_INDEX, what="chunk")
    tid = _transfer_id(obj, "chunk")
    data = obj["data"]
    if not isinstance(data, bytes) or not data:
        raise ProtocolError("chunk data must be non-empty bin")
    return tid, index, data


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

    def missing_chunks(self, topic: str) -> list[int]:
        """Chunk indices still missing of the transfer on ``topic`` whose manifest arrived."""
        with self._lock:
            for tr in self._transfers.values():
                if tr.topic == topic and tr.manifest is not None:
                    return [i for i in range(tr.manifest.n_chunks) if i not in tr.chunks]
        return []

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
            raise ProtocolError(f"payload on {topic!r} is not bytes")
        frame = bytes(frame)
        if len(frame) == 0:
            return None  # a retained clear
        if _RETIRED_FRAME.match(frame):
            raise ProtocolError(
                f"payload on {topic!r} uses the retired 0xFD framing of earlier fedmq releases "
                f"(every payload is now one msgpack object); upgrade the sender"
            )
        logical, index = split_chunk_topic(topic)
        if index is not None:
            return self._on_chunk(logical, index, frame)
        key = first_key(frame)
        if key == MANIFEST_KEY:
            return self._on_manifest(topic, parse_manifest(frame, self.max_message_bytes))
        if key == CHUNK_KEY:
            raise ProtocolError(f"chunk on {topic!r}, which is not a '<topic>/c/<index>' topic")
        if len(frame) > self.max_message_bytes:
            raise ProtocolError(f"message on {topic!r} is {len(frame)} bytes, limit {self.max_message_bytes}")
        self.completed += 1
        return topic, frame

    def _on_chunk(self, logical: str, topic_index: int, frame: bytes) -> tuple[str, bytes] | None:
        if len(frame) > min(self.max_pending_bytes, self.max_message_bytes) + CHUNK_OVERHEAD:
            raise ProtocolError(f"chunk of {len(frame)} bytes on {logical!r} exceeds the limits")
        tid, index, data = parse_chunk(frame)
        if index != topic_index:
            raise ProtocolError(f"chunk index {index} does not match its topic index {topic_index}")
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
            raise ProtocolError(f"chunk {index} on {logical!r} beyond the manifest's chunks={m.n_chunks}")
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
