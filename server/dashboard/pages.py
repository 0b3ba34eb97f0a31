"""What each page shows: the list of runs, and one run's panels, built from the run folders.

Pure functions of the folders and the clock; the web layer (:mod:`server.dashboard.app`)
renders them with the templates and sends them to the page.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.dashboard.figures import run_figures
from server.dashboard.rounds_view import RoundView, SiteView, round_views, site_views
from server.dashboard.run_reader import RunFolder, is_run_folder, read_run
from server.dashboard.run_status import RunStatus, rounds_closed, run_status
from shared.baselines import comparison_rows
from shared.errors import FedSegError

#: Run ids the dashboard serves: a plain folder name (no path separators, not hidden).
RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
#: Files of a run folder the dashboard serves for download or viewing, and nothing else.
SERVED_FILE = re.compile(r"^(report\.html|report\.md|summary\.json|plan\.json|metrics\.jsonl|baselines\.json"
                         r"|global_model\.pt|plots/[A-Za-z0-9_.-]+\.png)$")


class UnknownRunError(FedSegError):
    """The asked run id is not a run folder under the dashboard's runs folder."""


@dataclass
class RunPage:
    """Everything one run's page shows."""

    run: RunFolder
    status: RunStatus
    rounds: list[RoundView]
    sites: list[SiteView]
    baselines: list[dict[str, Any]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    @property
    def signature(self) -> str:
        """Changes whenever anything the page shows changes (a watched file or the run's state)."""
        return _digest([sorted(self.run.stamps.items()), self.status.state])

    def figures(self) -> dict[str, dict[str, Any]]:
        return run_figures(self.run.rows, baselines=self.run.baselines, sites=self.sites,
                           class_names=self.class_names)


@dataclass(frozen=True)
class RunEntry:
    """One line of the runs list."""

    run_id: str
    status: RunStatus
    rounds: int
    planned: Any
    sites: int
    dice: float | None
    max_epsilon: float | None
    last_change: float | None
    problems: int
    is_latest: bool


def run_dir_of(runs_dir: Path, *, run_id: str) -> Path:
    """The folder of ``run_id`` under ``runs_dir`` (``latest`` follows the link); raise if it is no run."""
    if not RUN_ID.match(run_id):
        raise UnknownRunError(f"{run_id!r} is not a run id")
    path = (runs_dir / run_id).resolve()
    if path.parent != runs_dir.resolve() or not is_run_folder(path):
        raise UnknownRunError(f"no run folder {run_id!r} in {runs_dir}")
    return path


def run_page(run_dir: Path, *, now: float) -> RunPage:
    """Read ``run_dir`` and derive every panel of its page."""
    run = read_run(run_dir)
    plan_sites = (run.plan or {}).get("sites") or {}
    sites = site_views(run.rows, plan_sites=plan_sites if isinstance(plan_sites, dict) else {})
    baselines = []
    if run.baselines:
        try:
            baselines = comparison_rows(run.baselines)
        except (KeyError, TypeError, AttributeError) as exc:
            run.problems.append(f"baselines.json has an unexpected layout ({type(exc).__name__}: {exc})")
    return RunPage(run=run, status=run_status(run, now=now), rounds=round_views(run.rows), sites=sites,
                   baselines=baselines, class_names=_class_names(run))


def run_entries(runs_dir: Path, *, now: float) -> list[RunEntry]:
    """Every run folder directly under ``runs_dir``, the most recently written first."""
    if not runs_dir.is_dir():
        return []
    latest = (runs_dir / "latest").resolve() if (runs_dir / "latest").is_symlink() else None
    entries = [_entry(read_run(path, full=False), now=now, is_latest=path.resolve() == latest)
               for path in runs_dir.iterdir() if not path.is_symlink() and RUN_ID.match(path.name)
               and is_run_folder(path)]
    return sorted(entries, key=lambda e: (e.last_change or 0.0, e.run_id), reverse=True)


def runs_signature(entries: list[RunEntry]) -> str:
    return _digest([(e.run_id, e.last_change, e.status.state, e.problems) for e in entries])


def served_file(run_dir: Path, *, name: str) -> Path | None:
    """The run folder's file ``name`` if the dashboard may serve it and it exists, else None."""
    if not SERVED_FILE.match(name):
        return None
    path = (run_dir / name).resolve()
    return path if path.is_file() and path.is_relative_to(run_dir.resolve()) else None


def _entry(run: RunFolder, *, now: float, is_latest: bool) -> RunEntry:
    last_global = next((row for row in reversed(run.rows) if row["site"] == "global"), {})
    return RunEntry(run_id=run.run_id, status=run_status(run, now=now), rounds=rounds_closed(run),
                    planned=run.run_config.get("num-rounds", "?"),
                    sites=len({row["site"] for row in run.rows if row["site"] != "global"}),
                    dice=last_global.get("dice"), max_epsilon=last_global.get("max-epsilon"),
                    last_change=run.last_change, problems=len(run.problems), is_latest=is_latest)


def _class_names(run: RunFolder) -> list[str]:
    """The model file's class names, else run config ``class-names``, else none (classes go by number)."""
    if run.model and run.model.class_names:
        return list(run.model.class_names)
    declared = [name.strip() for name in str(run.run_config.get("class-names", "")).split(",") if name.strip()]
    return declared


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
