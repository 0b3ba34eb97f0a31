"""Round checkpoints: everything needed to continue a run exactly where it stopped.

After every round the server writes ``checkpoint.ckpt`` in the run folder
(atomically: temp file, fsync, rename). It holds the global weights, the round
number, the strategy's own state (e.g. FedAdam/FedYogi moments), the metrics
rows written so far, the site ids learned from replies and the run config.

File layout: the line ``fedseg-checkpoint/1``, a line with the SHA-256 of the
payload and its length in bytes, then the payload (a ``torch.save`` of plain
dicts and tensors, loaded with ``weights_only=True``). A truncated or altered
file fails the checksum and is refused.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import atomic_write
from shared.errors import FedSegError

if TYPE_CHECKING:
    import torch

    from shared.config import RunConfig

CHECKPOINT_NAME = "checkpoint.ckpt"
MAGIC = b"fedseg-checkpoint/1\n"
# Run-config keys a resumed run may change; every other key must equal the checkpoint's.
MAY_CHANGE_ON_RESUME = frozenset({
    "num-rounds", "round-timeout", "run-dir", "resume-from", "simulation-sites", "device",
    "min-train-nodes", "min-available-nodes", "min-train-replies", "fraction-train", "fraction-evaluate",
    "overlap-evaluation",
})


class CheckpointError(FedSegError):
    """A checkpoint is missing, corrupt, truncated or belongs to a different run setup."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` completed rounds."""

    round: int
    state_dict: dict[str, torch.Tensor]
    run_config: dict[str, Any]
    strategy_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metrics_rows: list[dict[str, Any]] = field(default_factory=list)
    known_sites: dict[int, str] = field(default_factory=dict)
    plan: str = ""  # the run's plan as JSON (shared.plan.Plan); a resumed run trains the same one
    federation_id: int = 0  # the run id of the run that began it (sites key their own weights by it); 0: unknown


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``run_dir/checkpoint.ckpt`` atomically, with its checksum."""
    import torch

    buffer = io.BytesIO()
    torch.save({"round": checkpoint.round, "state_dict": checkpoint.state_dict,
                "run_config": checkpoint.run_config, "strategy_state": checkpoint.strategy_state,
                "metrics_rows": checkpoint.metrics_rows,
                "known_sites": {str(k): v for k, v in checkpoint.known_sites.items()}, "plan": checkpoint.plan,
                "federation_id": checkpoint.federation_id}, buffer)
    payload = buffer.getvalue()
    header = MAGIC + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()

    def write(handle: Any) -> None:
        handle.write(header)
        handle.write(payload)

    return atomic_write(Path(run_dir) / CHECKPOINT_NAME, write)


def checkpoint_path(resume_from: str | Path) -> Path:
    """The checkpoint file named by run config ``resume-from`` (a run folder or a file)."""
    path = Path(resume_from).expanduser()
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint; raise :class:`CheckpointError` naming the file."""
    import torch

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"run config key 'resume-from': cannot read checkpoint {path} ({exc})") from None
    payload = _verified_payload(raw, path)
    try:
        data = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return Checkpoint(round=int(data["round"]), state_dict=data["state_dict"], run_config=data["run_config"],
                          strategy_state=data["strategy_state"], metrics_rows=data["metrics_rows"],
                          known_sites={int(k): v for k, v in data["known_sites"].items()},
                          plan=str(data.get("plan", "")), federation_id=int(data.get("federation_id", 0)))
    except Exception as exc:  # a payload with a valid checksum but the wrong content
        raise CheckpointError(f"checkpoint {path}: unreadable content ({exc})") from None


def check_resumable(checkpoint: Checkpoint, config: RunConfig, *, path: Path) -> None:
    """Refuse to resume when the run setup differs from the checkpoint's."""
    current = config.to_mapping()
    differing = sorted(key for key, value in checkpoint.run_config.items()
                       if key not in MAY_CHANGE_ON_RESUME and current.get(key) != value)
    if differing:
        details = ", ".join(f"{k}={checkpoint.run_config[k]!r} (now {current.get(k)!r})" for k in differing)
        raise CheckpointError(f"checkpoint {path} was written by a different run setup: {details}")


def _verified_payload(raw: bytes, path: Path) -> bytes:
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a fedseg checkpoint (missing header)")
    header_end = raw.find(b"\n", len(MAGIC))
    try:
        digest, length = raw[len(MAGIC):header_end].decode().split()
        length_value = int(length)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: damaged header") from None
    payload = raw[header_end + 1:]
    if len(payload) != length_value:
        raise CheckpointError(f"checkpoint {path}: truncated ({len(payload)} of {length_value} payload bytes)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (the file is corrupt)")
    return payload
