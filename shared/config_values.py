"""Parsing and checking of single run-config values; every error names the key."""

from __future__ import annotations

from typing import Any

from shared.errors import ConfigError

AUTO = "auto"


def to_key(field_name: str) -> str:
    """Return the run-config key of a dataclass field (``a_b`` -> ``a-b``)."""
    return field_name.replace("_", "-")


def parse_int_list(value: str, *, key: str) -> tuple[int, ...]:
    """Parse a comma-separated list of positive integers such as ``"16,32,64"``."""
    try:
        items = tuple(int(part) for part in str(value).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"run config key '{key}': expected comma-separated integers, got {value!r}") from None
    if not items or any(item <= 0 for item in items):
        raise ConfigError(f"run config key '{key}': expected positive integers, got {value!r}")
    return items


def parse_float_list(value: str, *, key: str) -> tuple[float, ...]:
    """Parse a comma-separated list of positive numbers such as ``"0.8,0.8,3"``."""
    try:
        items = tuple(float(part) for part in str(value).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"run config key '{key}': expected comma-separated numbers, got {value!r}") from None
    if not items or any(not item > 0 for item in items):
        raise ConfigError(f"run config key '{key}': expected positive numbers, got {value!r}")
    return items


def per_axis(values: tuple[Any, ...], *, dims: int, key: str) -> tuple[Any, ...]:
    """One value for every axis: a single value is repeated, else there must be ``dims`` of them."""
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ConfigError(f"run config key '{key}': expected 1 or {dims} values (one per axis), got {len(values)}")
    return values


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise :class:`ConfigError` ``run config key 'KEY': RULE, got VALUE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"run config key '{key}': {rule}, got {value!r}")


def require_together(ok: bool, keys: tuple[str, ...], rule: str) -> None:
    """Raise :class:`ConfigError` naming every key of a rule that ties keys together, unless ``ok``."""
    if not ok:
        raise ConfigError(f"run config keys {', '.join(repr(k) for k in keys)}: {rule}")
