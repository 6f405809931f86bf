"""What every wire message shares: the bounded msgpack reader and the ``Message`` base.

Every payload that arrives from the network goes through :func:`unpack_limited` (no container or
string may claim more than the payload could hold) and then a strict pydantic model, so a
malformed payload fails in one place with an error naming the field.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, TypeVar

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from fedmq_protocol import SCHEMA_VERSION
from fedmq_protocol.errors import ProtocolError

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB: a 7B-model LoRA at r=64 is a few hundred MB

M = TypeVar("M", bound="Message")


def validation_summary(exc: ValidationError, cls: type) -> str:
    """One line naming the first (up to five) invalid fields of ``cls``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid {cls.__name__}: " + "; ".join(parts)


def unpack_limited(data: bytes, max_bytes: int, what: str = "payload") -> Any:
    """msgpack-decode with every container and string bounded by the payload size limit.

    The size check happens before any allocation; msgpack's own ``max_*_len`` limits stop a
    header from claiming more elements than the buffer could hold.
    """
    if len(data) > max_bytes:
        raise ProtocolError(f"{what} is {len(data)} bytes, limit {max_bytes}")
    n = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=n,
            max_str_len=min(n, 1 << 20),
            max_array_len=min(n, 1 << 20),
            max_map_len=min(n, 1 << 20),
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from None


class OmitsDefaults(BaseModel):
    """A model whose fields named in ``omitted_at_default`` are left out of its serialized map while
    they hold their default: a field added to a message keeps the bytes of every message that does
    not use it (golden bytes, signatures and digests of earlier releases stay valid)."""

    omitted_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        for name in self.omitted_at_default:
            if getattr(self, name) == fields[name].default:
                out.pop(fields[name].alias or name, None)
        return out


class Message(BaseModel):
    """Base of every wire message: frozen, unknown fields refused, ``schema`` checked."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    kind_name: ClassVar[str] = "message"
    max_msgpack_bytes: ClassVar[int] = DEFAULT_MAX_MESSAGE_BYTES

    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {v} (this build speaks {SCHEMA_VERSION})")
        return v

    def to_obj(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="python")

    @classmethod
    def from_obj(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise ProtocolError(f"invalid {cls.__name__}: expected a map, got {type(obj).__name__}")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise ProtocolError(validation_summary(exc, cls)) from None

    # -- JSON -------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        obj = self.model_dump(by_alias=True, mode="json", exclude_none=True)
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls: type[M], data: bytes, max_bytes: int = 1 << 20) -> M:
        if len(data) > max_bytes:
            raise ProtocolError(f"{cls.__name__} JSON is {len(data)} bytes, limit {max_bytes}")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"invalid {cls.__name__}: not JSON ({exc})") from None
        return cls.from_obj(obj)

    # -- msgpack ----------------------------------------------------------------------------
    def to_msgpack(self) -> bytes:
        return bytes(msgpack.packb(self.to_obj(), use_bin_type=True))

    @classmethod
    def from_msgpack(cls: type[M], data: bytes, max_bytes: int | None = None) -> M:
        limit = cls.max_msgpack_bytes if max_bytes is None else max_bytes
        return cls.from_obj(unpack_limited(data, limit, what=cls.__name__))
