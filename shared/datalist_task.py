"""The task a set of datalists declares (input channels, classes and their names), for the run config.

The simulation harness and the local deployment runner both start from it, so
``--datalists`` gives the same run config whichever of the two runs the sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.errors import ConfigError
from shared.json_files import read_json


def task_from_datalists(datalists: tuple[Path, ...]) -> dict[str, int | str]:
    """``in-channels`` / ``num-classes`` / ``class-names`` that the datalists' ``modality`` / ``labels`` declare.

    Every datalist that declares them must agree (the sites train one model).
    """
    task: dict[str, int | str] = {}
    declared_by: dict[str, Path] = {}
    for path in datalists:
        raw = read_json(path, error=ConfigError, context="'--datalists': ")
        for section, key in (("modality", "in-channels"), ("labels", "num-classes")):
            if not isinstance(raw, dict) or not raw.get(section):
                continue
            count = len(raw[section])
            if key in task and task[key] != count:
                raise ConfigError(f"'--datalists': {path} declares {count} '{section}' entries but "
                                  f"{declared_by[key]} declares {task[key]}; all sites must agree")
            task[key], declared_by[key] = count, Path(path)
        if isinstance(raw, dict) and isinstance(raw.get("labels"), dict) and "class-names" not in task:
            labels = raw["labels"]
            task["class-names"] = ",".join(str(labels[k]) for k in sorted(labels, key=lambda k: int(k)))
    return task


def drop_unfitting_class_names(values: dict[str, Any], *, overrides: Mapping[str, Any]) -> None:
    """Remove ``class-names`` from ``values`` when the datalists' names no longer fit an overridden ``num-classes``
    (names the operator set in ``overrides`` are kept, and checked by :class:`RunConfig`)."""
    num_classes = values.get("num-classes", RunConfig().num_classes)
    if "class-names" not in overrides and len(str(values.get("class-names", "")).split(",")) != num_classes:
        values.pop("class-names", None)
