"""YAML config files validated by pydantic models, with one-line errors.

Errors name the file and the dotted key (``broker.url``, ``training.lr``) so an operator can fix a
device's config from the journal line alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid. ``str()`` is one line."""


C = TypeVar("C", bound=BaseModel)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            parts.append(f"missing required key '{key}'")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            parts.append(f"key '{key}': {err['msg']}{shown}")
    return f"{source}: " + "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def load_config(path: str | Path, model: type[C], overrides: dict[str, Any] | None = None) -> C:
    """Read ``path`` (YAML), apply top-level ``overrides``, validate into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(raw).__name__}")
    raw.update(overrides or {})
    return validate_config(raw, model, str(p))


def validate_config(raw: dict[str, Any], model: type[C], source: str = "config") -> C:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    except ValueError as exc:  # raised by our own validators outside pydantic's wrapping
        raise ConfigError(f"{source}: {exc}") from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
