"""Where a long benchmark federation goes on from: the run that finished, or the newest checkpoint.

A federation of hours is run again with the same output folder to go on. Its ``latest`` run may be a
resumed run cut short before its first new round (no checkpoint of its own yet); the rounds done are
then in the newest earlier run folder that holds a checkpoint, which is where to resume from.
"""

from __future__ import annotations

from pathlib import Path

from server.checkpoint import CHECKPOINT_NAME


def finished_run(folder: Path) -> Path | None:
    """The ``latest`` run folder in ``folder`` if it finished (has ``summary.json``), else None."""
    latest = folder / "latest"
    return latest.resolve() if (latest / "summary.json").is_file() else None


def newest_checkpoint_run(folder: Path) -> Path | None:
    """The newest run folder in ``folder`` holding a checkpoint (run folders are named by start time)."""
    runs = sorted(p for p in folder.glob("*/") if not p.is_symlink() and (p / CHECKPOINT_NAME).is_file())
    return runs[-1].resolve() if runs else None
