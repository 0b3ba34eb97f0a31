"""``python -m server check-checkpoint PATH``: verify a checkpoint and show what a resume would continue from."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.checkpoint import Checkpoint, checkpoint_path, load_checkpoint


def describe_checkpoint(*, path: Path | str) -> dict[str, Any]:
    """Verify the checkpoint at ``path`` (a run folder or a file); return its main facts.

    Raises :class:`~server.checkpoint.CheckpointError` naming the file if it is
    missing, truncated or corrupt.
    """
    resolved = checkpoint_path(path)
    return checkpoint_facts(load_checkpoint(resolved), path=resolved)


def checkpoint_facts(checkpoint: Checkpoint, *, path: Path) -> dict[str, Any]:
    """The main facts of a loaded (verified) ``checkpoint`` read from ``path``."""
    sites = sorted({row["site"] for row in checkpoint.metrics_rows if row.get("site") != "global"})
    return {"file": str(path), "round": checkpoint.round, "strategy": checkpoint.run_config.get("strategy"),
            "num-rounds": checkpoint.run_config.get("num-rounds"), "seed": checkpoint.run_config.get("seed"),
            "tensors": len(checkpoint.state_dict), "strategy-state": sorted(checkpoint.strategy_state),
            "sites": sites}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a run folder or a checkpoint.ckpt file")


def run(args: argparse.Namespace) -> int:
    facts = describe_checkpoint(path=args.path)
    print(f"ok: {facts['file']} (checksum verified)")
    for key, value in facts.items():
        if key != "file":
            print(f"  {key}: {value}")
    print(f"resume-from continues at round {facts['round'] + 1}")
    return 0
