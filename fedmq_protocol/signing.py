"""End-to-end signatures of updates (Ed25519, via ``cryptography``).

Each device holds a private key; the coordinator holds the devices' public keys
(``device_keys`` in its YAML). A device signs every ``Update`` it sends; the coordinator refuses
an update whose signature is missing, made with another key, or made for another task.

What is signed (docs/protocol.md "Signed updates")::

    SIGNING_CONTEXT + msgpack([federation, device_id, task_id, round, base_version, nonce,
                               sha256(canonical(Update map without "signature"))])

``canonical`` is msgpack (bin type for bytes) of the schema-normalised map with every map's keys
sorted, so the digest does not depend on the sender's key order. ``nonce`` is the 16 random bytes
the coordinator put in the task (``Task.nonce``): a signed update is valid for one task fan-out
only, so replaying it into a later round, a retried attempt or a restarted coordinator's round
fails (the nonce differs), and the federation name keeps it from being replayed across
federations sharing a broker.

Keys on disk: private keys as PKCS#8 PEM (``fedmq keys generate``), public keys as PEM or as the
base64 of the raw 32 bytes (one line); a coordinator YAML may also give the base64 inline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack

from fedmq_protocol.errors import ProtocolError

SIGNING_CONTEXT = b"fedmq-update-signature-v1\x00"
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class SigningKeyError(ValueError):
    """A key file or key string cannot be used (the message names it)."""


def _crypto() -> tuple[Any, Any, Any, Any]:
    """cryptography's modules, imported on first use (a device without keys never loads them)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    return serialization, Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


_LEAVES = (bytes, bytearray, str, int, float, type(None))


def _key_order(k: Any) -> tuple[bool, Any]:
    return isinstance(k, bytes), k


def _sorted(obj: Any) -> Any:
    # leaves are returned in place (an update's tensor map is thousands of them): same bytes, fewer calls
    if isinstance(obj, Mapping):
        return {k: v if isinstance(v, _LEAVES) else _sorted(v)
                for k in sorted(obj, key=_key_order) for v in (obj[k],)}
    if isinstance(obj, (list, tuple)):
        return [v if isinstance(v, _LEAVES) else _sorted(v) for v in obj]
    return obj


def body_digest(update_obj: Mapping[str, Any]) -> bytes:
    """sha256 of the canonical msgpack of an Update map without its ``signature``."""
    body = {k: v for k, v in update_obj.items() if k != "signature"}
    return hashlib.sha256(msgpack.packb(_sorted(body), use_bin_type=True)).digest()


def signed_bytes(federation: str, update_obj: Mapping[str, Any]) -> bytes:
    """The exact byte string a device signs for ``update_obj`` (a schema-normalised Update map)."""
    nonce = update_obj.get("nonce")
    fields = [federation, update_obj["device_id"], update_obj["task_id"], int(update_obj["round"]),
              int(update_obj["base_version"]), bytes(nonce) if nonce is not None else b"", body_digest(update_obj)]
    return SIGNING_CONTEXT + msgpack.packb(fields, use_bin_type=True)


STATUS_CONTEXT = b"fedmq-status-signature-v1\x00"


def status_signed_bytes(federation: str, status_obj: Mapping[str, Any]) -> bytes:
    """What a device signs for a status: its JSON map (``exclude_none``) without ``signature``,
    keys sorted, compact, after the federation name."""
    import json

    body = {k: v for k, v in status_obj.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return STATUS_CONTEXT + msgpack.packb([federation, text], use_bin_type=True)


# -------------------------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[bytes, str]:
    """(private key PKCS#8 PEM, public key base64 of the raw 32 bytes)."""
    serialization, Priv, _, _ = _crypto()
    key = Priv.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(raw).decode()


class Signer:
    """A device's private key."""

    def __init__(self, key: Any) -> None:
        self._key = key
        serialization = _crypto()[0]
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        serialization, Priv, _, _ = _crypto()
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"signing key {str(p)!r}: {exc.strerror or exc}") from None
        try:
            if b"-----BEGIN" not in data or b"PRIVATE KEY" not in data:
                raise ValueError("expected a PEM private key (-----BEGIN PRIVATE KEY-----)")
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"signing key {str(p)!r} is not an unencrypted Ed25519 private key ({exc})") from None
        if not isinstance(key, Priv):
            raise SigningKeyError(f"signing key {str(p)!r} is not an Ed25519 key")
        return cls(key)

    def sign(self, federation: str, update_obj: Mapping[str, Any]) -> bytes:
        signature: bytes = self._key.sign(signed_bytes(federation, update_obj))
        return signature

    def sign_bytes(self, data: bytes) -> bytes:
        signature: bytes = self._key.sign(data)
        return signature

    def sign_status(self, federation: str, status_obj: Mapping[str, Any]) -> str:
        """The base64 signature of a status map (``DeviceStatus.signature``)."""
        return base64.b64encode(self._key.sign(status_signed_bytes(federation, status_obj))).decode()


def _is_b64_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == PUBLIC_KEY_BYTES
    except (ValueError, binascii.Error):
        return False


def load_public_key(spec: str, base_dir: Path | None = None) -> Any:
    """An Ed25519 public key from a file path (PEM or base64 raw) or an inline base64 string."""
    serialization, _, Pub, _ = _crypto()
    text = spec.strip()
    data: bytes | None = None
    path = Path(os.path.expanduser(text))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"public key file {str(path)!r}: {exc.strerror or exc}") from None
    elif text.startswith("-----BEGIN") or _is_b64_key(text):
        data = text.encode()
    else:
        raise SigningKeyError(f"public key {text[:60]!r}: no such file, and not the base64 of a 32-byte key")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            raw = base64.b64decode(data.strip(), validate=True)
            if len(raw) != PUBLIC_KEY_BYTES:
                raise ValueError(f"{len(raw)} bytes, an Ed25519 public key has {PUBLIC_KEY_BYTES}")
            key = Pub.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SigningKeyError(
            f"public key {text[:60]!r} is not an Ed25519 public key (PEM or base64 of 32 bytes): {exc}") from None
    if not isinstance(key, Pub):
        raise SigningKeyError(f"public key {text[:60]!r} is not an Ed25519 key")
    return key


def check_public_keys(keys: Mapping[str, str], field: str) -> None:
    """ValueError naming ``field.<id>`` for the first id that is not a topic level or key that
    does not load (config validation of ``device_keys``, ``aggregator_keys``)."""
    from fedmq_protocol.topics import check_level

    for key_id, spec in keys.items():
        check_level(key_id, f"{field}[{key_id!r}]")
        try:
            load_public_key(spec)
        except SigningKeyError as exc:
            raise ValueError(f"{field}.{key_id}: {exc}") from None


class Verifier:
    """The coordinator's list of device public keys."""

    def __init__(self, keys: Mapping[str, Any], federation: str) -> None:
        self.keys = dict(keys)
        self.federation = federation

    @classmethod
    def from_config(cls, device_keys: Mapping[str, str], federation: str, base_dir: Path | None = None) -> Verifier:
        return cls({d: load_public_key(s, base_dir) for d, s in device_keys.items()}, federation)

    def verify(self, update_obj: Mapping[str, Any], expected_nonce: bytes | None) -> None:
        """Raise ProtocolError unless ``update_obj`` is signed by its device's key for this task."""
        _, _, _, InvalidSignature = _crypto()
        device_id = update_obj.get("device_id")
        key = self.keys.get(device_id) if isinstance(device_id, str) else None
        if key is None:
            raise ProtocolError(f"no public key for device {device_id!r}: unsigned devices are refused")
        sig = update_obj.get("signature")
        if sig is None:
            raise ProtocolError(f"update from {device_id} is not signed")
        if not isinstance(sig, (bytes, bytearray)) or len(sig) != SIGNATURE_BYTES:
            raise ProtocolError(f"update from {device_id}: signature must be {SIGNATURE_BYTES} bytes")
        nonce = update_obj.get("nonce")
        if expected_nonce is not None and nonce != expected_nonce:
            raise ProtocolError(f"update from {device_id} carries another task's nonce (replayed or stale)")
        try:
            key.verify(bytes(sig), signed_bytes(self.federation, update_obj))
        except InvalidSignature:
            raise ProtocolError(f"update from {device_id}: signature does not verify with the device's key") from None

    def verify_status(self, status: Any) -> None:
        """Raise ProtocolError unless a ``DeviceStatus`` is signed by its device's key."""
        _, _, _, InvalidSignature = _crypto()
        key = self.keys.get(status.device_id)
        if key is None:
            raise ProtocolError(f"no public key for device {status.device_id!r}: unsigned devices are refused")
        if status.signature is None:
            raise ProtocolError(f"status of {status.device_id} is not signed")
        try:
            sig = base64.b64decode(status.signature, validate=True)
        except (ValueError, binascii.Error):
            raise ProtocolError(f"status of {status.device_id}: signature is not base64") from None
        obj = status.model_dump(by_alias=True, mode="json", exclude_none=True)
        try:
            key.verify(sig, status_signed_bytes(self.federation, obj))
        except InvalidSignature:
            raise ProtocolError(
                f"status of {status.device_id}: signature does not verify with the device's key") from None
