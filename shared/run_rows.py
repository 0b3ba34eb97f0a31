"""Reading the rows of a run's ``metrics.jsonl`` (one per site per round, plus ``site: "global"``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def series(rows: Iterable[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` (by round) of every row that has a finite number under ``key``."""
    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[row["site"]].append((int(row["round"]), float(value)))
    return {site: sorted(points) for site, points in found.items()}
