"""Is a run running, finished or failed? Told from its folder alone (the dashboard has no line to the server).

- **finished**: ``summary.json`` exists (the server writes it after the last round).
- **failed**: no ``summary.json`` and nothing in the folder changed for longer than
  a round can take: two ``round-timeout`` s (training, then evaluation, each wait
  at most one) plus a grace period. The server must have stopped.
- **running**: otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.dashboard.run_reader import SUMMARY, RunFolder

#: Round timeout assumed when the run config is not known yet (the run config's default).
DEFAULT_ROUND_TIMEOUT = 3600.0
#: Added to two round timeouts before a silent run counts as failed (writing files, start-up).
GRACE_SECONDS = 120.0
RUNNING, FINISHED, FAILED = "running", "finished", "failed"


@dataclass(frozen=True)
class RunStatus:
    """A run's state (``running``, ``finished`` or ``failed``) and a sentence saying why."""

    state: str
    detail: str


def rounds_closed(run: RunFolder) -> int:
    """The highest round with a ``global`` row in ``metrics.jsonl`` (0 before round 1 closes)."""
    return max((row["round"] for row in run.rows if row["site"] == "global"), default=0)


def run_status(run: RunFolder, *, now: float) -> RunStatus:
    """The state of ``run`` at Unix time ``now`` (see the module docstring)."""
    planned = run.run_config.get("num-rounds", "?")
    if run.has(SUMMARY):
        return RunStatus(FINISHED, f"finished: {rounds_closed(run)} of {planned} rounds")
    last = run.last_change
    silent = now - last if last is not None else float("inf")
    timeout = _round_timeout(run)
    if silent > 2 * timeout + GRACE_SECONDS:
        return RunStatus(FAILED, f"stopped: nothing written for {_duration(silent)}, longer than a round can "
                                 f"take (2 x round-timeout {timeout:g} s), and no {SUMMARY}")
    # an absolute time: the page re-renders this line only when the run changes
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last is not None else "never"
    return RunStatus(RUNNING, f"running: round {rounds_closed(run)} of {planned} closed, last write {written}")


def _round_timeout(run: RunFolder) -> float:
    try:
        return float(run.run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT))
    except (TypeError, ValueError):
        return DEFAULT_ROUND_TIMEOUT


def _duration(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
