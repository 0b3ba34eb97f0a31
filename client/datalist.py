"""Decathlon-style datalists: ``{"training": [{"image": ..., "label": ...}], ...}``.

Paths are relative to the JSON file. Without a ``validation`` list a
deterministic split is made from the training list (by a hash of each image
path, so adding a case does not reshuffle the others).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import DataError

VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class Datalist:
    """A site's cases with absolute paths, split into training and validation."""

    path: Path
    training: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: dict[str, str] = field(default_factory=dict)
    modality: dict[str, str] = field(default_factory=dict)


def load_datalist(path: Path | str) -> Datalist:
    """Read and check a datalist; raise :class:`DataError` naming the file on any problem."""
    path = Path(path)
    raw = _read_json(path)
    training = _cases(raw, "training", path)
    if not training:
        raise DataError(f"{path}: the 'training' list is empty")
    if "validation" in raw:
        validation = _cases(raw, "validation", path)
    else:
        training, validation = split_cases(training)
    return Datalist(
        path=path,
        training=training,
        validation=validation,
        labels={str(k): str(v) for k, v in raw.get("labels", {}).items()},
        modality={str(k): str(v) for k, v in raw.get("modality", {}).items()},
    )


def split_cases(cases: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministically split ``cases`` into (training, validation); both non-empty if len >= 2."""
    if len(cases) < 2:
        return list(cases), []
    ranked = sorted(cases, key=lambda case: hashlib.sha256(str(case["image"]).encode()).hexdigest())
    n_validation = max(1, round(len(cases) * VALIDATION_FRACTION))
    chosen = {id(case) for case in ranked[:n_validation]}
    return [c for c in cases if id(c) not in chosen], [c for c in cases if id(c) in chosen]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: datalist file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read datalist ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or "training" not in raw:
        raise DataError(f"{path}: a datalist is a JSON object with a 'training' list")
    return raw


def _cases(raw: dict[str, Any], section: str, path: Path) -> list[dict[str, Any]]:
    entries = raw[section]
    if not isinstance(entries, list):
        raise DataError(f"{path}: '{section}' must be a list of cases")
    cases = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{path}: {section}[{index}] needs an 'image' and a 'label'")
        cases.append({"image": _resolve(entry["image"], path, section, index),
                      "label": _resolve(entry["label"], path, section, index)})
    return cases


def _resolve(value: Any, path: Path, section: str, index: int) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: {section}[{index}] has a path that is not a string: {value!r}")
    resolved = (path.parent / value).resolve()
    if not resolved.exists():
        raise DataError(f"{resolved}: file listed in {path} ({section}[{index}]) does not exist")
    return str(resolved)
