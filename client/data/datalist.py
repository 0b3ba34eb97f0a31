"""Decathlon-style datalists: ``{"training": [{"image": ..., "label": ...}], ...}``.

Paths are relative to the JSON file. An image is a path or a list of paths
(one per modality); ``modality`` and ``labels`` (Decathlon convention) name the
input channels and classes; an optional ``label_map`` (``{"stored": class}``)
maps stored label values to the configured classes. Without a ``validation`` list a
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
    label_map: dict[int, int] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality of each input channel, in channel order ("MR" when the datalist does not say)."""
        return tuple(self.modality[k] for k in sorted(self.modality, key=int)) if self.modality else ("MR",)


def load_datalist(path: Path | str, *, check_files: bool = True) -> Datalist:
    """Read and check a datalist; raise :class:`DataError` naming the file on any problem.

    With ``check_files=False`` listed files may be missing (``check-data``
    reports each one itself instead of stopping at the first).
    """
    path = Path(path)
    raw = _read_json(path)
    training = _cases(raw, "training", path, check_files)
    if not training:
        raise DataError(f"{path}: the 'training' list is empty")
    if "validation" in raw:
        validation = _cases(raw, "validation", path, check_files)
    else:
        training, validation = split_cases(training)
    for section in ("modality", "labels"):
        if not isinstance(raw.get(section, {}), dict) or not all(str(k).isdigit() for k in raw.get(section, {})):
            raise DataError(f"{path}: '{section}' must map channel/class numbers to names, "
                            f"e.g. {{\"0\": \"CT\"}}")
    return Datalist(
        path=path,
        training=training,
        validation=validation,
        labels={str(k): str(v) for k, v in raw.get("labels", {}).items()},
        modality={str(k): str(v) for k, v in raw.get("modality", {}).items()},
        label_map=_label_map(raw, path),
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


def _label_map(raw: dict[str, Any], path: Path) -> dict[int, int]:
    try:
        return {int(k): int(v) for k, v in raw.get("label_map", {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: 'label_map' must map stored label values to class numbers, "
                        f"e.g. {{\"2\": 1}}") from None


def _cases(raw: dict[str, Any], section: str, path: Path, check_files: bool) -> list[dict[str, Any]]:
    entries = raw[section]
    if not isinstance(entries, list):
        raise DataError(f"{path}: '{section}' must be a list of cases")
    cases = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{path}: {section}[{index}] needs an 'image' and a 'label'")
        image = entry["image"]
        images = [_resolve(v, path, section, index, check_files) for v in (image if isinstance(image, list) else [image])]
        if not images:
            raise DataError(f"{path}: {section}[{index}] has an empty image list")
        cases.append({"image": images[0] if len(images) == 1 else images,
                      "label": _resolve(entry["label"], path, section, index, check_files)})
    return cases


def _resolve(value: Any, path: Path, section: str, index: int, check_files: bool) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: {section}[{index}] has a path that is not a string: {value!r}")
    resolved = (path.parent / value).resolve()
    if check_files and not resolved.exists():
        raise DataError(f"{resolved}: file listed in {path} ({section}[{index}]) does not exist")
    return str(resolved)
