"""Read one run folder for the dashboard: what is there, and what is missing or unreadable.

Nothing here writes. Each file is parsed once per version: the readers are
memoised on the file's ``(mtime_ns, size)`` (:func:`latest_version`), so a poll
of an unchanged run costs a few ``stat`` calls. A run folder is read while the server writes it:
``metrics.jsonl`` grows by whole lines, every other file is replaced
atomically, so a reader sees an old or a new version, never a mix, except for
the last line of ``metrics.jsonl`` while it is being appended (skipped and
named, like any unreadable line).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.baselines import BASELINES_FILE
from shared.errors import FedSegError

METRICS, PLAN, SUMMARY, CHECKPOINT, MODEL = (
    "metrics.jsonl", "plan.json", "summary.json", "checkpoint.ckpt", "global_model.pt")
RUN_CONFIG_TOML = "run-config.toml"  # written by the simulation harness before the run starts
#: Files whose change means the run changed (their stamps make the run's signature).
WATCHED = (METRICS, PLAN, SUMMARY, CHECKPOINT, MODEL, BASELINES_FILE, "report.html", RUN_CONFIG_TOML)
#: A folder holding any of these is a run folder.
RUN_MARKERS = (METRICS, PLAN, SUMMARY, CHECKPOINT, MODEL)

Stamp = tuple[int, int] | None


@dataclass(frozen=True)
class MetricsFile:
    """The readable rows of ``metrics.jsonl`` and a note per line that was not."""

    rows: tuple[dict[str, Any], ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelFacts:
    """What the dashboard shows of ``global_model.pt`` (the weights themselves are not kept)."""

    file_sha256: str
    size: int
    weights_sha256: str | None
    round: int | None
    final: bool
    run_config: dict[str, Any]
    class_names: tuple[str, ...]


@dataclass
class RunFolder:
    """Everything the dashboard knows of one run, read at one moment."""

    run_id: str
    path: Path
    stamps: dict[str, Stamp]
    rows: tuple[dict[str, Any], ...] = ()
    plan: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    model: ModelFacts | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def last_change(self) -> float | None:
        """Unix time of the newest write to any watched file (None if none exists)."""
        times = [stamp[0] / 1e9 for stamp in self.stamps.values() if stamp is not None]
        return max(times) if times else None

    def has(self, name: str) -> bool:
        return self.stamps.get(name) is not None


def latest_version(reader: Callable[[str, Stamp], Any]) -> Callable[[str, Stamp], Any]:
    """Memoise ``reader(path, stamp)`` for the latest version of each file only.

    A file is parsed again only when its stamp changes, and an old version is
    dropped then (an LRU cache would keep every version of a growing
    ``metrics.jsonl``). A failure is remembered too, so a corrupt checkpoint is
    not reloaded at every poll.
    """
    cache: dict[str, tuple[Stamp, Any, Exception | None]] = {}

    @functools.wraps(reader)
    def read(path: str, stamp: Stamp) -> Any:
        hit = cache.get(path)
        if hit is None or hit[0] != stamp:
            try:
                hit = (stamp, reader(path, stamp), None)
            except (OSError, ValueError, TypeError, FedSegError) as exc:
                hit = (stamp, None, exc)
            cache[path] = hit
        if hit[2] is not None:
            raise hit[2].with_traceback(None)
        return hit[1]

    return read


def stamp_of(path: Path) -> Stamp:
    """``(mtime_ns, size)`` of ``path``, or None when it does not exist."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def read_run(path: Path, *, full: bool = True) -> RunFolder:
    """Read the run folder ``path`` (see the module docstring); problems are collected, never raised.

    ``full=False`` (the runs list) skips the checkpoint and the model file, which hold the weights,
    unless the model file is the only one that has the run config.
    """
    stamps = {name: stamp_of(path / name) for name in WATCHED}
    run = RunFolder(run_id=path.name, path=path, stamps=stamps)
    if stamps[METRICS] is None:
        run.problems.append(f"{METRICS} is missing: no round has closed yet, so there are no results to show")
    else:
        metrics = _read_metrics(str(path / METRICS), stamps[METRICS])
        run.rows, run.problems = metrics.rows, run.problems + list(metrics.problems)
    run.plan = _json_part(run, PLAN, missing=f"{PLAN} is missing: the plan is written before round 1")
    run.summary = _json_part(run, SUMMARY, missing=None)
    run.baselines = _json_part(run, BASELINES_FILE, missing=None)
    if full:
        run.checkpoint = _guarded(run, CHECKPOINT, _read_checkpoint)
        run.model = _guarded(run, MODEL, _read_model)
    run.run_config = _run_config(run)
    if not run.run_config and not full:  # a deployed, unfinished run: only its model file has the config
        run.model = _guarded(run, MODEL, _read_model)
        run.run_config = _run_config(run)
    return run


def _json_part(run: RunFolder, name: str, *, missing: str | None) -> dict[str, Any] | None:
    """A JSON file's object; a note in ``run.problems`` when it is missing (if ``missing``) or unreadable."""
    if run.stamps[name] is None:
        if missing:
            run.problems.append(missing)
        return None
    return _guarded(run, name, _read_json)


def _guarded(run: RunFolder, name: str, reader: Any) -> Any:
    """``reader(path, stamp)`` for an existing file; its failure becomes a problem line, not an error page."""
    if run.stamps[name] is None:
        return None
    try:
        return reader(str(run.path / name), run.stamps[name])
    except (OSError, ValueError, TypeError, FedSegError) as exc:
        run.problems.append(f"{name} cannot be read: {exc}")
        return None


def _run_config(run: RunFolder) -> dict[str, Any]:
    """The run config from the first file read that has it: the summary, the model file, the checkpoint
    (each written only once round 1 closed), else the simulation harness' TOML (written before the run)."""
    candidates = ((run.summary or {}).get("run_config"), run.model.run_config if run.model else None,
                  (run.checkpoint or {}).get("run_config"))
    for config in candidates:
        if isinstance(config, dict) and config:
            return config
    return _guarded(run, RUN_CONFIG_TOML, _read_toml) or {}


@latest_version
def _read_metrics(path: str, stamp: Stamp) -> MetricsFile:
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                ending = "" if line.endswith("\n") else "; the line is incomplete (a truncated or ongoing write)"
                problems.append(f"{METRICS} line {number} is not valid JSON ({exc.msg}){ending}: skipped")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("round"), int) or "site" not in row:
                problems.append(f"{METRICS} line {number} has no integer 'round' and 'site': skipped")
                continue
            rows.append(row)
    return MetricsFile(rows=tuple(rows), problems=tuple(problems))


@latest_version
def _read_json(path: str, stamp: Stamp) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


@latest_version
def _read_toml(path: str, stamp: Stamp) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


@latest_version
def _read_checkpoint(path: str, stamp: Stamp) -> dict[str, Any]:
    """The checkpoint's facts (checksum verified) and its run config."""
    from server.check_checkpoint import checkpoint_facts
    from server.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(Path(path))
    return {**checkpoint_facts(checkpoint, path=Path(path)), "run_config": checkpoint.run_config}


@latest_version
def _read_model(path: str, stamp: Stamp) -> ModelFacts:
    from shared.model_file import read_model_file

    with open(path, "rb") as handle:
        file_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    payload = read_model_file(path)
    return ModelFacts(file_sha256=file_sha256, size=stamp[1] if stamp else 0,
                      weights_sha256=payload.get("sha256"), round=payload.get("round"),
                      final=bool(payload.get("final")), run_config=dict(payload.get("run_config") or {}),
                      class_names=tuple(payload.get("class_names") or ()))
