"""Sealed coordinator messages: tasks, globals, global differences and a mode's retained messages.

The coordinator wraps each such payload (the message's own bytes, unchanged) in a seal::

    {"fedmq_sealed": 1, "topic": str, "round": int, "version": int, "counter": int,
     "body": bin, "check": bin(32), "signature": bin(64)}

over ``SEAL_CONTEXT + msgpack([federation, topic, round, version, counter, sha256(body)])``:
``check`` is their sha256 (always present), ``signature`` the coordinator's Ed25519 signature of
them (present when the coordinator has a ``coordinator_key``).
``counter`` grows with every message the coordinator seals (it starts from the clock in
microseconds, so a restarted coordinator continues above its predecessor): a receiver takes a
seal on a topic only if its counter is above the last one it took there, so an unchanged replay
of an earlier task or global is recognised as such. ``topic`` binds the seal to where it was
published; ``round`` and ``version`` are the coordinator's at sealing (a task's round and base
version). ``check`` stops every accidental or blind mutation, not a forger: only the signature
authenticates.

Receivers (:class:`SealOpener`): with the coordinator's public key and signatures required, an
unsigned or unsealed payload is refused; otherwise an unsealed payload is taken (an earlier
release's bytes stay readable) until the first sealed one has been opened, after which unsealed
payloads are refused too (a coordinator of this release seals everything).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from fedmq_protocol.chunking import first_key
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import SIGNATURE_BYTES, Signer
from fedmq_protocol.wire import unpack_limited

SEAL_KEY = "fedmq_sealed"
SEAL_VERSION = 1
SEAL_CONTEXT = b"fedmq-coordinator-seal-v1\x00"
_FIELDS = frozenset({SEAL_KEY, "topic", "round", "version", "counter", "body", "signature", "check"})


def sealed_bytes(federation: str, topic: str, round_no: int, version: int, counter: int, body: bytes) -> bytes:
    """The bytes the coordinator signs (or, unsigned, hashes into ``check``)."""
    fields = [federation, topic, int(round_no), int(version), int(counter), hashlib.sha256(body).digest()]
    return SEAL_CONTEXT + msgpack.packb(fields, use_bin_type=True)


def is_sealed(payload: bytes) -> bool:
    return first_key(payload) == SEAL_KEY


class Sealer:
    """The coordinator's side: seals payloads with a growing counter (thread-safe)."""

    def __init__(self, federation: str, signer: Signer | None = None, start: int | None = None) -> None:
        self.federation = federation
        self.signer = signer
        self._counter = int(time.time() * 1_000_000) if start is None else start
        self._lock = threading.Lock()

    def seal(self, topic: str, body: bytes, *, round_no: int, version: int) -> bytes:
        with self._lock:
            self._counter += 1
            counter = self._counter
        data = sealed_bytes(self.federation, topic, round_no, version, counter, body)
        obj: dict[str, Any] = {SEAL_KEY: SEAL_VERSION, "topic": topic, "round": int(round_no),
                               "version": int(version), "counter": counter, "body": body}
        obj["check"] = hashlib.sha256(data).digest()
        if self.signer is not None:
            obj["signature"] = self.signer.sign_bytes(data)
        return bytes(msgpack.packb(obj, use_bin_type=True))


@dataclass(frozen=True)
class Opened:
    body: bytes
    counter: int | None  # None: an unsealed payload
    signed: bool


class SealOpener:
    """The agent's side: checks seals and keeps, per topic, the last counter taken."""

    def __init__(self, federation: str, public_key: Any | None = None, *, require_signatures: bool = False,
                 max_bytes: int = 1 << 30) -> None:
        if require_signatures and public_key is None:
            raise ValueError("require_signatures needs the coordinator's public key")
        self.federation = federation
        self.public_key = public_key
        self.require_signatures = require_signatures
        self.max_bytes = max_bytes
        self.last_counter: dict[str, int] = {}
        self.seen_sealed = False
        self.replays = 0  # seals not above the last counter taken on their topic (ignored)

    def open(self, topic: str, payload: bytes, *, kind: str = "message") -> Opened | None:
        """The body of ``payload`` received on ``topic`` (None: a replay of a seal already taken
        there, or an earlier one); ProtocolError naming the reason when it is refused."""
        if not is_sealed(payload):
            if self.require_signatures:
                raise ProtocolError(f"{kind} on {topic!r} is not sealed; signatures are required")
            if self.seen_sealed:
                raise ProtocolError(f"{kind} on {topic!r} is not sealed (this coordinator seals everything)")
            return Opened(payload, None, False)
        obj = unpack_limited(payload, self.max_bytes, what=f"sealed {kind}")
        if not isinstance(obj, dict) or set(obj) - _FIELDS or obj.get(SEAL_KEY) != SEAL_VERSION:
            raise ProtocolError(f"sealed {kind} on {topic!r}: unknown seal format")
        body, counter = obj.get("body"), obj.get("counter")
        r, v, t = obj.get("round"), obj.get("version"), obj.get("topic")
        if (not isinstance(body, bytes) or not isinstance(t, str)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in (r, v, counter))):
            raise ProtocolError(f"sealed {kind} on {topic!r}: fields of the wrong type")
        assert isinstance(r, int) and isinstance(v, int) and isinstance(counter, int)
        if t != topic:
            raise ProtocolError(f"sealed {kind} for topic {t[:200]!r} arrived on {topic!r}")
        data = sealed_bytes(self.federation, t, r, v, counter, body)
        if obj.get("check") != hashlib.sha256(data).digest():
            raise ProtocolError(f"sealed {kind} on {topic!r}: check does not match (modified in transit)")
        sig = obj.get("signature")
        if sig is not None and (not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES):
            raise ProtocolError(f"sealed {kind} on {topic!r}: signature must be {SIGNATURE_BYTES} bytes")
        if sig is None and self.require_signatures:
            raise ProtocolError(f"{kind} on {topic!r} is not signed; signatures are required")
        if sig is not None and self.public_key is not None:
            from cryptography.exceptions import InvalidSignature

            try:
                self.public_key.verify(sig, data)
            except InvalidSignature:
                raise ProtocolError(
                    f"sealed {kind} on {topic!r}: signature does not verify with the coordinator's key") from None
        last = self.last_counter.get(topic)
        if last is not None and counter <= last:
            self.replays += 1
            return None
        self.last_counter[topic] = counter
        self.seen_sealed = True
        return Opened(body, counter, sig is not None and self.public_key is not None)


def body_of(payload: bytes, max_bytes: int = 1 << 30) -> bytes:
    """The message inside a seal, unchecked (for observers and tools; receivers that act on it
    use :class:`SealOpener`); an unsealed payload as is."""
    if not is_sealed(payload):
        return payload
    obj = unpack_limited(payload, max_bytes, what="sealed message")
    body = obj.get("body") if isinstance(obj, dict) else None
    if not isinstance(body, bytes):
        raise ProtocolError("sealed message without a body")
    return body
