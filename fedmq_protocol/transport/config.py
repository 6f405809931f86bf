"""Broker connection settings (pydantic v2, frozen, unknown keys rejected)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """``"mqtt://host:port"`` -> ``("mqtt", host, port)``; raises ``ValueError`` with a clear reason."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker url {url!r} must look like mqtt://host:port or mqtts://host:port")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker url {url!r}: scheme must be 'mqtt' or 'mqtts', got {parts.scheme!r}")
    if parts.username or parts.password:
        raise ValueError(f"broker url {url!r}: put credentials in username/password, not the url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker url {url!r}: must not have a path, query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError(f"broker url {url!r}: missing host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker url {url!r}: port must be an integer in 1..65535") from None
    if port is None:
        port = DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"broker url {url!r}: port must be in 1..65535")
    return scheme, host, port


class BrokerConfig(BaseModel):
    """How to reach and use one MQTT broker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    keepalive_s: int = Field(30, ge=5, le=65535)
    mqtt_version: Literal["5", "3.1.1"] = "5"
    chunk_size: int = Field(256 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_message_bytes: int = Field(1 << 30, ge=1024)
    # Bytes of incomplete chunked messages held per framed subscription; default 2x max_message_bytes.
    max_pending_bytes: int | None = Field(None, ge=1024)
    reassembly_timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    session_expiry_s: int = Field(3600, ge=0, le=0xFFFFFFFF)
    publish_timeout_s: float = Field(60.0, gt=0)
    max_inflight: int = Field(16, ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parse_broker_url(v)
        return v

    @field_validator("password_file", "ca_file", "cert_file", "key_file")
    @classmethod
    def _file_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None:
            v = Path(os.path.expanduser(str(v)))
            if not v.is_file():
                raise ValueError(f"{info.field_name}: file {str(v)!r} does not exist")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate)")
        tls_opts = [n for n in ("ca_file", "cert_file", "key_file") if getattr(self, n) is not None]
        if self.tls_insecure:
            tls_opts.append("tls_insecure")
        if tls_opts and self.scheme != "mqtts":
            raise ValueError(f"{', '.join(tls_opts)} given but url {self.url!r} is not mqtts://")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if self.chunk_size > self.max_message_bytes:
            raise ValueError("chunk_size must not exceed max_message_bytes")
        return self

    # -- derived ----------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return parse_broker_url(self.url)[0]

    @property
    def host(self) -> str:
        return parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        return parse_broker_url(self.url)[2]

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @property
    def pending_bytes_limit(self) -> int:
        return self.max_pending_bytes if self.max_pending_bytes is not None else 2 * self.max_message_bytes

    def resolved_password(self) -> str | None:
        """The password, read from ``password_file`` (first line, stripped) when given."""
        if self.password_file is not None:
            text = self.password_file.read_text(encoding="utf-8")
            lines = text.splitlines()
            return lines[0].strip() if lines else ""
        return self.password
