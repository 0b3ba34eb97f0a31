"""Jinja filters: how numbers, times and sizes read on the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any


def number(value: Any, digits: int = 4) -> str:
    """A float to ``digits`` decimals; ``–`` for a missing value; other values as they are."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def when(value: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS`` (the dashboard host's time zone)."""
    if value is None:
        return "–"
    return dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S")


def size(value: int | None) -> str:
    """Bytes as ``12.3 MB``."""
    if value is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(value)


def listing(value: Any) -> str:
    """A list as ``8, 16, 32`` (nested lists in brackets), a mapping as ``key value, ...``; else as text."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {listing(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(f"[{listing(v)}]" if isinstance(v, (list, tuple)) else listing(v) for v in value)
    return number(value)


FILTERS = {"number": number, "when": when, "size": size, "listing": listing}
